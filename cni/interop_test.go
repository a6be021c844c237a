package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

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
	r := newRuntime(t, "1.1.0")
	dataDir := t.TempDir()
	r.list = confList(t, fmt.Sprintf(`{"cniVersion": "1.1.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "mtu": 1500,
		 "ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": "10.99.0.0/24"}]]}}]}`, r.etcd, dataDir))
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
	if out, err := r.ctl("get", "workloadendpoints", "-o", "json"); err != nil || strings.Contains(out, "pod-a") {
		t.Errorf("endpoints after DEL: %v: %s", err, out)
	}
	// GC with libcni's cache lost: pod-b goes too, host-local releasing its
	// address for the container margay names.
	ipB := podIP(t, podB)
	err = r.node.Do(func() error {
		return libcni.NewCNIConfigWithCacheDir([]string{binDir}, t.TempDir(), nil).GCNetworkList(context.Background(), r.list, &libcni.GCArgs{})
	})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dataDir, "k8s-pod-network", ipB)); !os.IsNotExist(err) {
		t.Errorf("host-local still holds pod-b's %s after GC (stat: %v)", ipB, err)
	}
	if out, err := r.ctl("get", "workloadendpoints", "-o", "json"); err != nil || strings.Contains(out, "pod-b") {
		t.Errorf("endpoints after GC: %v: %s", err, out)
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

// margay followed by the reference portmap plugin, as in Kubernetes clusters with
// hostPort pods: pod-b reaches pod-a's server through the node's address and the
// host port, CHECK passes the chain, and DEL removes portmap's rules.
func TestPluginPortmapChain(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	r.list = confList(t, fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "mtu": 1500, "ipam": {"type": "margay-ipam"}},
		{"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}]}`, r.etcd))
	podA, podB := nstest.New(t, "pod"), nstest.New(t, "pod")
	rtA := podRT(podA, "pod-a")
	rtA.CapabilityArgs = map[string]any{"portMappings": []map[string]any{
		{"hostPort": 30080, "containerPort": 8080, "protocol": "tcp"}}}
	res, err := r.add(rtA)
	if err != nil {
		t.Fatalf("ADD through margay and portmap: %v", err)
	}
	if _, err := r.add(podRT(podB, "pod-b")); err != nil {
		t.Fatal(err)
	}
	ipA := res.IPs[0].Address.IP.String()

	var ln net.Listener
	if err := podA.Do(func() (err error) { ln, err = net.Listen("tcp4", ":8080"); return err }); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			fmt.Fprintf(c, "pod-a\n")
			c.Close()
		}
	}()
	var got []byte
	err = podB.Do(func() error {
		c, err := net.DialTimeout("tcp4", "198.18.1.2:30080", 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		got, err = io.ReadAll(c)
		return err
	})
	if err != nil || string(got) != "pod-a\n" {
		t.Errorf("pod-b to the node's host port 30080: %q, %v; want pod-a's server", got, err)
	}
	if err := r.check(rtA); err != nil {
		t.Errorf("CHECK of the chain: %v", err)
	}
	if rules := r.node.MustRun(t, "iptables-save", "-t", "nat"); !strings.Contains(rules, ipA+":8080") {
		t.Errorf("no DNAT to %s:8080 after ADD:\n%s", ipA, rules)
	}
	if err := r.del(rtA); err != nil {
		t.Fatalf("DEL: %v", err)
	}
	if rules := r.node.MustRun(t, "iptables-save", "-t", "nat"); strings.Contains(rules, ipA) {
		t.Errorf("portmap's rules for %s outlived DEL:\n%s", ipA, rules)
	}
}
