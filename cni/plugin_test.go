package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/nstest"
)

// runtime drives the plugins through libcni, exactly as containerd or CRI-O do,
// from inside a node namespace, with etcd running in that namespace too (its
// loopback is not the test's). The test reads the datastore with margayctl, run
// in the node.
type runtime struct {
	t     *testing.T
	node  *nstest.NS
	srv   *etcdtest.Server
	etcd  string
	cache string // libcni's cache of attachments
	list  *libcni.NetworkConfigList
}

// lib is libcni for one call; libcni.CNIConfig is not safe for concurrent use.
func (r *runtime) lib() *libcni.CNIConfig {
	return libcni.NewCNIConfigWithCacheDir([]string{binDir}, r.cache, nil)
}

func newRuntime(t *testing.T, cniVersion string) *runtime {
	n := node(t)
	srv, err := etcdtest.Start(etcdtest.Options{NetNS: n.Name})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Close)
	r := &runtime{t: t, node: n, srv: srv, etcd: srv.Endpoints()[0], cache: t.TempDir()}
	poolFile := filepath.Join(t.TempDir(), "pool.yaml")
	// The pool, and the Node that margay-node would have registered.
	os.WriteFile(poolFile, []byte("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16}\n---\n"+
		"apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: node-a}\nspec: {bgp: {ipv4Address: 10.0.0.1/24}}\n"), 0o600)
	if out, err := r.ctl("apply", "-f", poolFile); err != nil {
		t.Fatalf("create the pool and the node: %v: %s", err, out)
	}
	conf := fmt.Sprintf(`{"cniVersion": %q, "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "mtu": 1440, "ipam": {"type": "margay-ipam"}}]}`, cniVersion, r.etcd)
	if r.list, err = libcni.ConfListFromBytes([]byte(conf)); err != nil {
		t.Fatal(err)
	}
	return r
}

// ctl runs margayctl in the node.
func (r *runtime) ctl(args ...string) (string, error) {
	return r.node.Run(append([]string{filepath.Join(binDir, "margayctl"), "--etcd-endpoints", r.etcd}, args...)...)
}

func podRT(ns *nstest.NS, name string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: "cid-" + name, NetNS: ns.Path, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "default"}, {"K8S_POD_NAME", name}}}
}

func (r *runtime) add(rt *libcni.RuntimeConf) (*current.Result, error) {
	var res types.Result
	err := r.node.Do(func() (err error) {
		res, err = r.lib().AddNetworkList(context.Background(), r.list, rt)
		return err
	})
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(res)
}

func (r *runtime) check(rt *libcni.RuntimeConf) error {
	return r.node.Do(func() error { return r.lib().CheckNetworkList(context.Background(), r.list, rt) })
}

func (r *runtime) del(rt *libcni.RuntimeConf) error {
	return r.node.Do(func() error { return r.lib().DelNetworkList(context.Background(), r.list, rt) })
}

// podIP is the IPv4 address on a pod's eth0.
func podIP(t *testing.T, ns *nstest.NS) string {
	f := strings.Fields(ns.MustRun(t, "ip", "-o", "-4", "addr", "show", "eth0"))
	for i, w := range f {
		if w == "inet" && i+1 < len(f) {
			if p, err := netip.ParsePrefix(f[i+1]); err == nil {
				return p.Addr().String()
			}
		}
	}
	t.Fatalf("no address on eth0 in %s: %v", ns.Name, f)
	return ""
}

// Every spec version through libcni: ADD two pods, check the wiring and the
// endpoint, ping, CHECK (and CHECK noticing a deleted host route), DEL twice.
func TestPluginLifecycle(t *testing.T) {
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			r := newRuntime(t, v)
			podA, podB := nstest.New(t, "pod"), nstest.New(t, "pod")
			rtA, rtB := podRT(podA, "pod-a"), podRT(podB, "pod-b")
			resA, err := r.add(rtA)
			if err != nil {
				t.Fatalf("ADD pod-a: %v", err)
			}
			if _, err := r.add(rtB); err != nil {
				t.Fatalf("ADD pod-b: %v", err)
			}
			host := HostVethName("default", "pod-a", "cid-a")
			if len(resA.Interfaces) != 2 || resA.Interfaces[0].Name != host || resA.Interfaces[1].Sandbox != podA.Path {
				t.Errorf("interfaces %+v: want the host veth %s and eth0 in the pod", resA.Interfaces, host)
			}
			if len(resA.IPs) != 1 || resA.IPs[0].Interface == nil || *resA.IPs[0].Interface != 1 {
				t.Fatalf("ips %+v: want one address on interface 1", resA.IPs)
			}
			ipA := resA.IPs[0].Address.IP.String()
			if got := podA.MustRun(t, "ip", "-o", "addr", "show", "eth0"); !strings.Contains(got, ipA+"/32") {
				t.Errorf("pod eth0: %q, want %s/32", got, ipA)
			}
			if got := podA.MustRun(t, "ip", "link", "show", "eth0"); !strings.Contains(got, "mtu 1440") {
				t.Errorf("pod eth0 %q: want the configured mtu 1440", got)
			}
			var wep api.WorkloadEndpoint
			out, err := r.ctl("get", "workloadendpoints", "node-a.default.pod-a.eth0", "-o", "json")
			if err != nil || json.Unmarshal([]byte(out), &wep) != nil || wep.Spec.InterfaceName != host ||
				len(wep.Spec.IPNetworks) != 1 || wep.Spec.IPNetworks[0] != ipA+"/32" {
				t.Errorf("WorkloadEndpoint: %v: %s", err, out)
			}
			for _, dst := range []string{podIP(t, podB), "198.18.1.2"} {
				if out, err := podA.Run("ping", "-c", "2", "-W", "2", "-i", "0.2", dst); err != nil {
					t.Errorf("ping %s from pod-a: %v\n%s", dst, err, out)
				}
			}
			if v != "0.3.1" { // CHECK arrived in 0.4.0
				if err := r.check(rtA); err != nil {
					t.Errorf("CHECK: %v", err)
				}
				r.node.MustRun(t, "ip", "route", "del", ipA+"/32")
				if err := r.check(rtA); cniCode(err) != ErrEndpoint || !strings.Contains(err.Error(), "no host route") {
					t.Errorf("CHECK after the host route was deleted: %v, want code %d naming the route", err, ErrEndpoint)
				}
			}
			for i := range 2 {
				if err := r.del(rtA); err != nil {
					t.Errorf("DEL #%d: %v", i+1, err)
				}
			}
			if out, err := r.node.Run("ip", "link", "show", host); err == nil {
				t.Errorf("host veth left after DEL: %s", out)
			}
			if out, err := r.ctl("get", "workloadendpoints", "node-a.default.pod-a.eth0"); err == nil || !strings.Contains(out, "not found") {
				t.Errorf("WorkloadEndpoint after DEL: %v: %s, want not found", err, out)
			}
			var info ipam.IPInfo
			if out, err := r.ctl("ipam", "show", "--ip", ipA, "-o", "json"); err != nil || json.Unmarshal([]byte(out), &info) != nil || info.Allocated {
				t.Errorf("%s after DEL: %v: %s, want free", ipA, err, out)
			}
			// pod-b still has its endpoint, so nothing is leaked even with no grace.
			var rep ipam.Report
			if out, err := r.ctl("ipam", "check", "--grace", "0s", "-o", "json"); err != nil || json.Unmarshal([]byte(out), &rep) != nil || !rep.Clean() {
				t.Errorf("ipam check after DEL: %v: %s", err, out)
			}
		})
	}
}

// A failed ADD leaks nothing: the pod already has an eth0, so wiring fails after
// the address was assigned; the address is released and no endpoint is written.
func TestPluginAddRollsBack(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	p := nstest.New(t, "pod")
	p.MustRun(t, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")
	_, err := r.add(podRT(p, "pod-x"))
	if cniCode(err) != ErrWiring {
		t.Fatalf("ADD into a pod that has an eth0: %v, want code %d", err, ErrWiring)
	}
	var pools []ipam.PoolUsage
	if out, err := r.ctl("ipam", "show", "-o", "json"); err != nil || json.Unmarshal([]byte(out), &pools) != nil || len(pools) != 1 || pools[0].InUse != 0 {
		t.Errorf("after the failed ADD: %v: %s, want no address in use", err, out)
	}
	if out, _ := r.ctl("get", "workloadendpoints"); strings.Contains(out, "pod-x") {
		t.Errorf("the failed ADD left an endpoint: %s", out)
	}
	if out, err := r.node.Run("ip", "link", "show", HostVethName("default", "pod-x", "cid-pod-x")); err == nil {
		t.Errorf("the failed ADD left the host veth: %s", out)
	}
}

// STATUS (CNI 1.1): fine with etcd and a pool; error 50 when no pool serves the
// node, the node is not registered, or etcd does not answer.
func TestPluginStatus(t *testing.T) {
	r := newRuntime(t, "1.1.0")
	status := func(list *libcni.NetworkConfigList) error {
		return r.node.Do(func() error { return r.lib().GetStatusNetworkList(context.Background(), list) })
	}
	if err := status(r.list); err != nil {
		t.Fatalf("STATUS: %v", err)
	}
	poolFile := filepath.Join(t.TempDir(), "pool.yaml")
	os.WriteFile(poolFile, []byte("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16, disabled: true}\n"), 0o600)
	if out, err := r.ctl("apply", "-f", poolFile); err != nil {
		t.Fatalf("disable the pool: %v: %s", err, out)
	}
	if err := status(r.list); cniCode(err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "no IPv4 pool serves node node-a") {
		t.Errorf("STATUS with the only pool disabled: %v, want code 50", err)
	}
	// A dual-stack network also needs an IPv6 pool.
	dual, err := libcni.ConfListFromBytes([]byte(strings.Replace(string(r.list.Bytes), `"type": "margay-ipam"`, `"type": "margay-ipam", "assign_ipv6": "true"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(poolFile, []byte("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16}\n"), 0o600)
	if out, err := r.ctl("apply", "-f", poolFile); err != nil {
		t.Fatalf("enable the pool: %v: %s", err, out)
	}
	if err := status(dual); cniCode(err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "no IPv6 pool serves node node-a") || !strings.Contains(err.Error(), "no IPv6 pools exist") {
		t.Errorf("dual-stack STATUS without an IPv6 pool: %v, want code 50", err)
	}
	os.WriteFile(poolFile, []byte("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16, disabled: true}\n"), 0o600)
	if out, err := r.ctl("apply", "-f", poolFile); err != nil {
		t.Fatalf("disable the pool: %v: %s", err, out)
	}
	unregistered, err := libcni.ConfListFromBytes([]byte(strings.Replace(string(r.list.Bytes), `"node-a"`, `"node-z"`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	if err := status(unregistered); cniCode(err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "node node-z is not registered") {
		t.Errorf("STATUS for a node without a Node resource: %v, want code 50", err)
	}
	down, err := libcni.ConfListFromBytes([]byte(`{"cniVersion": "1.1.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": "http://127.0.0.1:1", "nodename": "node-a", "timeout_seconds": 2, "mtu": 1500, "ipam": {"type": "margay-ipam"}}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if err := status(down); cniCode(err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "unreachable") {
		t.Errorf("STATUS with etcd down: %v, want code 50", err)
	}
}

// log_file_path: JSON lines, each with the container ID, from the plugin and the
// IPAM code it runs in process.
func TestPluginLogFile(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	logFile := filepath.Join(t.TempDir(), "cni.log")
	r.list = confList(t, fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "log_file_path": %q, "mtu": 1500, "ipam": {"type": "margay-ipam"}}]}`, r.etcd, logFile))
	p := nstest.New(t, "pod")
	rt := podRT(p, "pod-log")
	if _, err := r.add(rt); err != nil {
		t.Fatal(err)
	}
	if err := r.del(rt); err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(logFile)
	if err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(string(data)), "\n")
	var msgs []string
	for _, l := range lines {
		var rec struct {
			Msg         string `json:"msg"`
			ContainerID string `json:"containerID"`
		}
		if err := json.Unmarshal([]byte(l), &rec); err != nil || rec.ContainerID != "cid-pod-log" {
			t.Errorf("log line %q: want JSON with containerID cid-pod-log", l)
		}
		msgs = append(msgs, rec.Msg)
	}
	if all := strings.Join(msgs, ","); strings.Count(all, "ADD") != 1 || strings.Count(all, "DEL") != 1 {
		t.Errorf("log messages %v: want one ADD and one DEL", msgs)
	}
}

// GC (CNI 1.1) removes a pod the runtime no longer lists even when libcni's cache
// lost it (a fresh cache here), and leaves the listed pod alone.
func TestPluginGC(t *testing.T) {
	r := newRuntime(t, "1.1.0")
	podA, podB := nstest.New(t, "pod"), nstest.New(t, "pod")
	resA, err := r.add(podRT(podA, "pod-a"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.add(podRT(podB, "pod-b")); err != nil {
		t.Fatal(err)
	}
	lostCache := libcni.NewCNIConfigWithCacheDir([]string{binDir}, t.TempDir(), nil)
	err = r.node.Do(func() error {
		return lostCache.GCNetworkList(context.Background(), r.list, &libcni.GCArgs{
			ValidAttachments: []types.GCAttachment{{ContainerID: "cid-pod-b", IfName: "eth0"}}})
	})
	if err != nil {
		t.Fatalf("GC: %v", err)
	}
	hostA := HostVethName("default", "pod-a", "cid-pod-a")
	if out, err := r.node.Run("ip", "link", "show", hostA); err == nil {
		t.Errorf("GC left pod-a's veth: %s", out)
	}
	if out, err := r.ctl("get", "workloadendpoints", "-o", "json"); err != nil || strings.Contains(out, "pod-a") || !strings.Contains(out, "pod-b") {
		t.Errorf("endpoints after GC: %v: %s; want only pod-b's", err, out)
	}
	var info ipam.IPInfo
	ipA := resA.IPs[0].Address.IP.String()
	if out, err := r.ctl("ipam", "show", "--ip", ipA, "-o", "json"); err != nil || json.Unmarshal([]byte(out), &info) != nil || info.Allocated {
		t.Errorf("pod-a's %s after GC: %v: %s, want free", ipA, err, out)
	}
	if out, err := podB.Run("ping", "-c", "1", "-W", "2", "198.18.1.2"); err != nil {
		t.Errorf("pod-b lost its network in GC: %v\n%s", err, out)
	}
}

// With "mtu": 0 the pod MTU comes from the agent's file, wherever mtu_file
// says the agent writes it.
func TestPluginMTUFile(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	file := filepath.Join(t.TempDir(), "mtu")
	conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "mtu": 0, "mtu_file": %q, "ipam": {"type": "margay-ipam"}}]}`, r.etcd, file)
	var err error
	if r.list, err = libcni.ConfListFromBytes([]byte(conf)); err != nil {
		t.Fatal(err)
	}
	p := nstest.New(t, "pod")
	if _, err := r.add(podRT(p, "early")); cniCode(err) != types.ErrTryAgainLater || !strings.Contains(err.Error(), "writes it to "+file) {
		t.Errorf("ADD before the file exists: %v, want code 11 naming %s", err, file)
	}
	os.WriteFile(file, []byte("1400\n"), 0o644)
	if _, err := r.add(podRT(p, "web")); err != nil {
		t.Fatal(err)
	}
	if out := p.MustRun(t, "ip", "-o", "link", "show", "eth0"); !strings.Contains(out, " mtu 1400 ") {
		t.Errorf("pod eth0 with mtu_file saying 1400: %s", out)
	}
	if err := r.del(podRT(p, "web")); err != nil {
		t.Error(err)
	}
}

// dualStack adds an IPv6 pool, gives the node an IPv6 address and makes the
// plugin assign both families.
func (r *runtime) dualStack(cniVersion string) {
	t := r.t
	poolFile := filepath.Join(t.TempDir(), "pool6.yaml")
	os.WriteFile(poolFile, []byte("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: pods-v6}\nspec: {cidr: 'fd00:244::/48'}\n"), 0o600)
	if out, err := r.ctl("apply", "-f", poolFile); err != nil {
		t.Fatalf("create the v6 pool: %v: %s", err, out)
	}
	r.node.MustRun(t, "ip", "-6", "addr", "add", "fd00:18:1::2/64", "dev", "uplink0", "nodad")
	conf := fmt.Sprintf(`{"cniVersion": %q, "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "mtu": 1440,
		 "ipam": {"type": "margay-ipam", "assign_ipv4": "true", "assign_ipv6": "true"}}]}`, cniVersion, r.etcd)
	var err error
	if r.list, err = libcni.ConfListFromBytes([]byte(conf)); err != nil {
		t.Fatal(err)
	}
}

// Dual stack in every spec version: both addresses on eth0, the IPv6 default
// route via the host veth's link-local address, v6 pod to pod and pod to node,
// CHECK noticing a lost v6 route, and DEL removing both.
func TestPluginDualStack(t *testing.T) {
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			r := newRuntime(t, v)
			r.dualStack(v)
			podA, podB := nstest.New(t, "pod"), nstest.New(t, "pod")
			rtA, rtB := podRT(podA, "pod-a"), podRT(podB, "pod-b")
			resA, err := r.add(rtA)
			if err != nil {
				t.Fatalf("ADD pod-a: %v", err)
			}
			resB, err := r.add(rtB)
			if err != nil {
				t.Fatalf("ADD pod-b: %v", err)
			}
			if len(resA.IPs) != 2 || resA.IPs[1].Address.IP.To4() != nil || *resA.IPs[1].Interface != 1 {
				t.Fatalf("ips %+v: want an IPv4 and an IPv6 address on interface 1", resA.IPs)
			}
			v4, v6 := resA.IPs[0].Address.IP.String(), resA.IPs[1].Address.IP.String()
			gws := map[string]string{}
			for _, rt := range resA.Routes {
				gws[rt.Dst.String()] = rt.GW.String()
			}
			if gws["0.0.0.0/0"] != "169.254.1.1" || gws["::/0"] != "fe80::ecee:eeff:feee:eeee" || len(gws) != 2 {
				t.Errorf("result routes %v: want the v4 and v6 defaults", gws)
			}
			if got := podA.MustRun(t, "ip", "-o", "-6", "addr", "show", "eth0", "scope", "global"); !strings.Contains(got, v6+"/128") || strings.Contains(got, "tentative") {
				t.Errorf("pod eth0: %q, want %s/128, not tentative", got, v6)
			}
			if got := podA.MustRun(t, "ip", "-6", "route", "show", "default"); !strings.Contains(got, "via fe80::ecee:eeff:feee:eeee dev eth0") {
				t.Errorf("pod v6 default route %q", got)
			}
			var wep api.WorkloadEndpoint
			out, err := r.ctl("get", "workloadendpoints", "node-a.default.pod-a.eth0", "-o", "json")
			if err != nil || json.Unmarshal([]byte(out), &wep) != nil || strings.Join(wep.Spec.IPNetworks, ",") != v4+"/32,"+v6+"/128" {
				t.Errorf("WorkloadEndpoint: %v: %s", err, out)
			}
			for _, dst := range []string{resB.IPs[1].Address.IP.String(), "fd00:18:1::2", resB.IPs[0].Address.IP.String()} {
				if out, err := podA.Run("ping", "-c", "2", "-W", "2", "-i", "0.2", dst); err != nil {
					t.Errorf("ping %s from pod-a: %v\n%s", dst, err, out)
				}
			}
			if v != "0.3.1" {
				if err := r.check(rtA); err != nil {
					t.Errorf("CHECK: %v", err)
				}
				r.node.MustRun(t, "ip", "-6", "route", "del", v6+"/128")
				if err := r.check(rtA); cniCode(err) != ErrEndpoint || !strings.Contains(err.Error(), "no host route to "+v6) {
					t.Errorf("CHECK after the v6 host route was deleted: %v, want code %d naming it", err, ErrEndpoint)
				}
			}
			if err := r.del(rtA); err != nil {
				t.Errorf("DEL: %v", err)
			}
			for _, ip := range []string{v4, v6} {
				var info ipam.IPInfo
				if out, err := r.ctl("ipam", "show", "--ip", ip, "-o", "json"); err != nil || json.Unmarshal([]byte(out), &info) != nil || info.Allocated {
					t.Errorf("%s after DEL: %v: %s, want free", ip, err, out)
				}
			}
		})
	}
}
