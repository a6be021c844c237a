package cni

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"

	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/nstest"
)

func confList(t *testing.T, conf string) *libcni.NetworkConfigList {
	l, err := libcni.ConfListFromBytes([]byte(conf))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// margay with the reference host-local IPAM instead of margay-ipam.
func TestPluginWithHostLocal(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	r.list = confList(t, fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a",
		 "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": "10.99.0.0/24"}]]}}]}`, r.etcd, t.TempDir()))
	podA, podB := nstest.New(t, "pod"), nstest.New(t, "pod")
	rtA, rtB := podRT(podA, "pod-a"), podRT(podB, "pod-b")
	res, err := r.add(rtA)
	if err != nil {
		t.Fatalf("ADD with host-local: %v", err)
	}
	if _, err := r.add(rtB); err != nil {
		t.Fatalf("ADD pod-b: %v", err)
	}
	ip := res.IPs[0].Address.IP.String()
	if !strings.HasPrefix(ip, "10.99.0.") || !strings.Contains(podA.MustRun(t, "ip", "-o", "addr", "show", "eth0"), ip+"/32") {
		t.Errorf("pod-a got %s from host-local; want a /32 from 10.99.0.0/24 on eth0", ip)
	}
	if out, err := podA.Run("ping", "-c", "2", "-W", "2", "-i", "0.2", podIP(t, podB)); err != nil {
		t.Errorf("ping pod-b: %v\n%s", err, out)
	}
	if err := r.check(rtA); err != nil {
		t.Errorf("CHECK: %v", err)
	}
	for range 2 {
		if err := r.del(rtA); err != nil {
			t.Errorf("DEL: %v", err)
		}
	}
	// host-local released it: the next pod may get it again.
	if out, err := r.ctl("get", "workloadendpoints", "-o", "json"); err != nil || strings.Contains(out, "pod-a") {
		t.Errorf("endpoints after DEL: %v: %s", err, out)
	}
}

// margay-ipam under the reference bridge plugin: it reads etcd_endpoints and
// nodename from the network configuration the bridge plugin hands it.
func TestIPAMUnderBridge(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	r.list = confList(t, fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
		{"type": "bridge", "bridge": "mgybr0", "etcd_endpoints": %q, "nodename": "node-a",
		 "ipam": {"type": "margay-ipam"}}]}`, r.etcd))
	pod := nstest.New(t, "pod")
	rt := podRT(pod, "pod-br")
	res, err := r.add(rt)
	if err != nil {
		t.Fatalf("ADD through bridge: %v", err)
	}
	ip := res.IPs[0].Address.IP.String()
	if !strings.HasPrefix(ip, "10.244.") || !strings.Contains(pod.MustRun(t, "ip", "-o", "addr", "show", "eth0"), ip+"/32") {
		t.Errorf("bridge pod got %s; want a margay address on eth0", ip)
	}
	if out := r.node.MustRun(t, "ip", "-o", "link", "show", "master", "mgybr0"); !strings.Contains(out, "veth") {
		t.Errorf("no veth on the bridge: %q", out)
	}
	// bridge's own CHECK wants a gateway in the result, which margay-ipam does not
	// give (margay routes pods through 169.254.1.1): CHECK is left out here.
	if err := r.del(rt); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	var info ipam.IPInfo
	if out, err := r.ctl("ipam", "show", "--ip", ip, "-o", "json"); err != nil || json.Unmarshal([]byte(out), &info) != nil || info.Allocated {
		t.Errorf("%s after DEL through bridge: %v: %s, want free", ip, err, out)
	}
}
