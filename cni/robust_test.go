package cni

import (
	"encoding/json"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/nstest"
)

// CHECK notices a changed pod address and a released reservation.
func TestPluginCheckDetects(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	p := nstest.New(t, "pod")
	rt := podRT(p, "pod-c")
	res, err := r.add(rt)
	if err != nil {
		t.Fatal(err)
	}
	ip := res.IPs[0].Address.IP.String()
	p.MustRun(t, "ip", "addr", "del", ip+"/32", "dev", "eth0")
	p.MustRun(t, "ip", "addr", "add", "10.244.250.250/32", "dev", "eth0")
	if err := r.check(rt); cniCode(err) != ErrEndpoint || !strings.Contains(err.Error(), "lacks address "+ip) {
		t.Errorf("CHECK after the pod's address changed: %v", err)
	}
	p.MustRun(t, "ip", "addr", "del", "10.244.250.250/32", "dev", "eth0")
	p.MustRun(t, "ip", "addr", "add", ip+"/32", "dev", "eth0")
	p.MustRun(t, "ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0", "onlink")
	if err := r.check(rt); err != nil {
		t.Fatalf("CHECK after repairing: %v", err)
	}
	if out, err := r.ctl("ipam", "release", "--ip", ip); err != nil {
		t.Fatalf("release: %v: %s", err, out)
	}
	if err := r.check(rt); cniCode(err) != ErrReservation {
		t.Errorf("CHECK after the reservation was released: %v, want code %d", err, ErrReservation)
	}
}

// DEL still succeeds, and cleans up, when the pod's namespace is already gone.
func TestPluginDelAfterNetnsGone(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	p := nstest.New(t, "pod")
	rt := podRT(p, "pod-gone")
	res, err := r.add(rt)
	if err != nil {
		t.Fatal(err)
	}
	p.MustRun(t, "true")
	if out, err := r.node.Run("ip", "netns", "del", p.Name); err != nil { // ip netns works from any namespace
		t.Fatalf("delete the pod netns: %v: %s", err, out)
	}
	if err := r.del(rt); err != nil {
		t.Fatalf("DEL after the netns was deleted: %v", err)
	}
	var info ipam.IPInfo
	ip := res.IPs[0].Address.IP.String()
	if out, err := r.ctl("ipam", "show", "--ip", ip, "-o", "json"); err != nil || json.Unmarshal([]byte(out), &info) != nil || info.Allocated {
		t.Errorf("%s after DEL: %v: %s, want free", ip, err, out)
	}
	if out, err := r.node.Run("ip", "link", "show", HostVethName("default", "pod-gone", "cid-pod-gone")); err == nil {
		t.Errorf("veth left: %s", out)
	}
}

// ADD with etcd down fails within timeout_seconds, asks for a retry, and leaks
// nothing: no veth, and no address once etcd is back.
func TestPluginAddEtcdDown(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	r.list = confList(t, fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "timeout_seconds": 3, "ipam": {"type": "margay-ipam"}}]}`, r.etcd))
	p := nstest.New(t, "pod")
	r.srv.Stop()
	start := time.Now()
	_, err := r.add(podRT(p, "pod-down"))
	took := time.Since(start)
	if cniCode(err) != types.ErrTryAgainLater || took > 8*time.Second {
		t.Errorf("ADD with etcd down: %v after %s; want code 11 within the 3 s timeout (and the plugin's cleanup)", err, took)
	}
	if out, err := r.node.Run("ip", "link", "show", HostVethName("default", "pod-down", "cid-pod-down")); err == nil {
		t.Errorf("veth left: %s", out)
	}
	if err := r.srv.Restart(); err != nil {
		t.Fatal(err)
	}
	var pools []ipam.PoolUsage
	if out, err := r.ctl("ipam", "show", "-o", "json"); err != nil || json.Unmarshal([]byte(out), &pools) != nil || pools[0].InUse != 0 {
		t.Errorf("addresses in use after the failed ADD: %v: %s", err, out)
	}
}

// 50 ADDs at once on one node, then 50 DELs at once: no duplicate address, no
// veth or route left, a clean ipam check.
func TestPluginConcurrentAddDel(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	const n = 50
	pods := make([]*nstest.NS, n)
	for i := range pods {
		pods[i] = nstest.New(t, "pod")
	}
	ips := make([]string, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			res, err := r.add(podRT(pods[i], fmt.Sprintf("pod-%d", i)))
			if err != nil {
				t.Errorf("ADD %d: %v", i, err)
				return
			}
			ips[i] = res.IPs[0].Address.IP.String()
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, ip := range ips {
		if seen[ip] {
			t.Errorf("%s assigned twice", ip)
		}
		seen[ip] = true
	}
	if got := strings.Count(r.node.MustRun(t, "ip", "-o", "link", "show"), ": mgy"); got != n {
		t.Errorf("%d mgy veths after %d ADDs", got, n)
	}
	for i := range n {
		wg.Go(func() {
			if err := r.del(podRT(pods[i], fmt.Sprintf("pod-%d", i))); err != nil {
				t.Errorf("DEL %d: %v", i, err)
			}
		})
	}
	wg.Wait()
	if out := r.node.MustRun(t, "ip", "-o", "link", "show"); strings.Contains(out, ": mgy") {
		t.Errorf("veths left after DEL: %s", out)
	}
	if out := r.node.MustRun(t, "ip", "route", "show", "10.244.0.0/16", "root", "10.244.0.0/16"); out != "" {
		t.Errorf("routes left after DEL: %s", out)
	}
	var rep ipam.Report
	if out, err := r.ctl("ipam", "check", "--grace", "0s", "-o", "json"); err != nil || json.Unmarshal([]byte(out), &rep) != nil || !rep.Clean() || rep.Allocations != 0 {
		t.Errorf("ipam check after 50 DELs: %v: %s", err, out)
	}
}
