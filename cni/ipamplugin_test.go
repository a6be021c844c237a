package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/nstest"
)

type ipamEnv struct {
	t     *testing.T
	store *datastore.Store
	etcd  string
	netns string // the pod's network namespace, as the runtime would pass it
}

func newIPAMEnv(t *testing.T, poolCIDR string, blockSize int) *ipamEnv {
	// skel refuses a CNI_NETNS that is the plugin's own namespace: give it a pod's.
	pod := nstest.New(t, "pod")
	srv := etcdtest.StartT(t)
	s, err := datastore.New(datastore.Config{Endpoints: srv.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	p := api.NewIPPool("pods")
	p.Spec.CIDR, p.Spec.BlockSize = poolCIDR, blockSize
	// The node the plugin runs on, and another, as their agents register them.
	for _, r := range []api.Resource{p, api.NewNode("node-a"), api.NewNode("node-b")} {
		if _, err := s.Create(context.Background(), r); err != nil {
			t.Fatal(err)
		}
	}
	return &ipamEnv{t: t, store: s, etcd: srv.Endpoints()[0], netns: pod.Path}
}

func (e *ipamEnv) conf(cniVersion string, extra map[string]any) []byte {
	c := map[string]any{"cniVersion": cniVersion, "name": "k8s-pod-network", "type": "margay-ipam",
		"etcd_endpoints": e.etcd, "nodename": "node-a", "ipam": map[string]any{"type": "margay-ipam"}}
	for k, v := range extra {
		c[k] = v
	}
	b, _ := json.Marshal(c)
	return b
}

func (e *ipamEnv) cniArgs(cmd, containerID string) *invoke.Args {
	return &invoke.Args{Command: cmd, ContainerID: containerID, NetNS: e.netns, IfName: "eth0",
		Path: binDir, PluginArgsStr: "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=" + containerID}
}

func (e *ipamEnv) add(conf []byte, containerID string) (*current.Result, error) {
	r, err := invoke.ExecPluginWithResult(context.Background(), filepath.Join(binDir, "margay-ipam"), conf, e.cniArgs("ADD", containerID), nil)
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(r)
}

func (e *ipamEnv) run(cmd string, conf []byte, containerID string) error {
	return invoke.ExecPluginWithoutResult(context.Background(), filepath.Join(binDir, "margay-ipam"), conf, e.cniArgs(cmd, containerID), nil)
}

func (e *ipamEnv) held(containerID string) []ipam.Assigned {
	h, err := ipam.New(e.store, ipam.Options{}).IPsByHandle(context.Background(), ipam.PodHandle(containerID))
	if err != nil {
		e.t.Fatal(err)
	}
	return h
}

func withPrev(t *testing.T, conf []byte, r *current.Result, cniVersion string) []byte {
	t.Helper()
	prev, err := r.GetAsVersion(cniVersion)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(prev)
	var m map[string]any
	json.Unmarshal(conf, &m)
	m["prevResult"] = json.RawMessage(raw)
	b, _ := json.Marshal(m)
	return b
}

// Every supported spec version: ADD, ADD again (same address), CHECK, DEL, DEL again.
func TestIPAMPluginVersions(t *testing.T) {
	e := newIPAMEnv(t, "10.244.0.0/16", 26)
	pool := netip.MustParsePrefix("10.244.0.0/16")
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			id := "c-" + v
			conf := e.conf(v, nil)
			r, err := e.add(conf, id)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if len(r.IPs) != 1 {
				t.Fatalf("ADD result %+v: want one address", r)
			}
			ip, _ := netip.AddrFromSlice(r.IPs[0].Address.IP.To4())
			if ones, _ := r.IPs[0].Address.Mask.Size(); ones != 32 || !pool.Contains(ip) {
				t.Errorf("ADD gave %s, want a /32 in %s", &r.IPs[0].Address, pool)
			}
			again, err := e.add(conf, id)
			if err != nil || !again.IPs[0].Address.IP.Equal(r.IPs[0].Address.IP) {
				t.Errorf("repeated ADD gave %v, %v; want the same %s", again, err, ip)
			}
			if held := e.held(id); len(held) != 1 || held[0].IP != ip {
				t.Errorf("handle holds %v, want [%s]", held, ip)
			}
			if v != "0.3.1" { // CHECK arrived in 0.4.0
				if err := e.run("CHECK", withPrev(t, conf, r, v), id); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			for i := range 2 {
				if err := e.run("DEL", conf, id); err != nil {
					t.Errorf("DEL #%d: %v", i+1, err)
				}
			}
			if held := e.held(id); len(held) != 0 {
				t.Errorf("after DEL the handle holds %v", held)
			}
		})
	}
	vi, err := invoke.GetVersionInfo(context.Background(), filepath.Join(binDir, "margay-ipam"), nil)
	if err != nil || !slices.Equal(vi.SupportedVersions(), []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"}) {
		t.Errorf("VERSION: %v, %v", vi, err)
	}
}

func cniCode(err error) uint {
	var te *types.Error
	if errors.As(err, &te) {
		return te.Code
	}
	return 0
}

func TestIPAMPluginErrors(t *testing.T) {
	e := newIPAMEnv(t, "10.9.0.0/32", 32) // one address
	conf := e.conf("1.0.0", nil)
	r, err := e.add(conf, "first")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.add(conf, "second"); cniCode(err) != ErrNoAddresses {
		t.Errorf("ADD with the pool full: err = %v, want code %d", err, ErrNoAddresses)
	}
	// CHECK notices a reservation released behind the plugin's back.
	if _, err := ipam.New(e.store, ipam.Options{}).ReleaseByHandle(context.Background(), ipam.PodHandle("first")); err != nil {
		t.Fatal(err)
	}
	if err := e.run("CHECK", withPrev(t, conf, r, "1.0.0"), "first"); cniCode(err) != ErrReservation {
		t.Errorf("CHECK after release: err = %v, want code %d", err, ErrReservation)
	}
	if err := e.run("CHECK", conf, "first"); cniCode(err) != types.ErrInvalidNetworkConfig {
		t.Errorf("CHECK without prevResult: err = %v, want code 7", err)
	}
	var bad map[string]any
	json.Unmarshal(conf, &bad)
	delete(bad, "etcd_endpoints")
	badConf, _ := json.Marshal(bad)
	if _, err := e.add(badConf, "x"); cniCode(err) != types.ErrInvalidNetworkConfig {
		t.Errorf("ADD without etcd_endpoints: err = %v, want code 7", err)
	}
	// An unreachable etcd fails within the configured timeout, asking for a retry.
	down := e.conf("1.0.0", map[string]any{"etcd_endpoints": "http://127.0.0.1:1", "timeout_seconds": 2})
	start := time.Now()
	_, err = e.add(down, "y")
	if cniCode(err) != types.ErrTryAgainLater || time.Since(start) > 5*time.Second {
		t.Errorf("ADD with etcd down: err = %v after %s, want code 11 within the 2s timeout", err, time.Since(start))
	}
	if err := e.run("DEL", down, "y"); cniCode(err) != types.ErrTryAgainLater {
		t.Errorf("DEL with etcd down: err = %v, want code 11", err)
	}
	// A node whose margay-node has not registered it yet: try again later.
	unregistered := e.conf("1.0.0", map[string]any{"nodename": "node-new"})
	if _, err := e.add(unregistered, "z"); cniCode(err) != types.ErrTryAgainLater || !strings.Contains(err.Error(), "is margay-node running?") {
		t.Errorf("ADD on an unregistered node: err = %v, want code 11 asking whether margay-node runs", err)
	}
}

// 30 ADDs at once on one node, each its own process, as kubelet starting 30 pods.
func TestIPAMPluginConcurrentAdds(t *testing.T) {
	e := newIPAMEnv(t, "10.244.0.0/16", 26)
	conf := e.conf("1.0.0", nil)
	const n = 30
	ips := make([]string, n)
	lat := make([]time.Duration, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			start := time.Now()
			r, err := e.add(conf, fmt.Sprintf("pod-%d", i))
			lat[i] = time.Since(start)
			if err != nil {
				t.Errorf("ADD %d: %v", i, err)
				return
			}
			ips[i] = r.IPs[0].Address.IP.String()
		})
	}
	wg.Wait()
	seen := map[string]bool{}
	for _, ip := range ips {
		if ip != "" && seen[ip] {
			t.Errorf("%s assigned twice", ip)
		}
		seen[ip] = true
	}
	slices.Sort(lat)
	t.Logf("30 concurrent margay-ipam ADDs: p50 %s, max %s", lat[n/2].Round(time.Millisecond), lat[n-1].Round(time.Millisecond))
	rep, err := ipam.New(e.store, ipam.Options{}).Check(context.Background(), ipam.DefaultLeakGrace)
	if err != nil || !rep.Clean() || rep.Allocations != n {
		t.Errorf("after 30 ADDs: %d allocations, clean %v, err %v", rep.Allocations, rep.Clean(), err)
	}
}

// margay-ipam's own GC releases this node's pod addresses whose container the
// runtime no longer lists, sparing the listed ones and any younger than a minute
// (an ADD in flight).
func TestIPAMPluginGC(t *testing.T) {
	e := newIPAMEnv(t, "10.244.0.0/16", 26)
	ctx := context.Background()
	hourAgo := ipam.New(e.store, ipam.Options{Now: func() time.Time { return time.Now().Add(-time.Hour) }})
	for _, c := range []string{"stale", "live"} {
		if _, err := hourAgo.AutoAssign(ctx, ipam.AssignArgs{Handle: ipam.PodHandle(c), Node: "node-a"}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := ipam.New(e.store, ipam.Options{}).AutoAssign(ctx, ipam.AssignArgs{Handle: ipam.PodHandle("fresh"), Node: "node-a"}); err != nil {
		t.Fatal(err)
	}
	if _, err := hourAgo.AutoAssign(ctx, ipam.AssignArgs{Handle: ipam.PodHandle("other-node"), Node: "node-b"}); err != nil {
		t.Fatal(err)
	}
	conf := e.conf("1.1.0", map[string]any{"cni.dev/valid-attachments": []map[string]string{{"containerID": "live", "ifname": "eth0"}}})
	if err := e.run("GC", conf, ""); err != nil {
		t.Fatalf("GC: %v", err)
	}
	for c, want := range map[string]int{"stale": 0, "live": 1, "fresh": 1, "other-node": 1} {
		if got := len(e.held(c)); got != want {
			t.Errorf("after GC %s holds %d addresses, want %d", c, got, want)
		}
	}
}

// margay-ipam run with CNI_NETNS its own namespace assigns nothing: skel
// refuses such a call only after ADD, which would leave the address assigned.
func TestIPAMPluginOwnNetNS(t *testing.T) {
	e := newIPAMEnv(t, "10.244.0.0/16", 26)
	e.netns = fmt.Sprintf("/proc/%d/ns/net", os.Getpid()) // the plugin inherits this namespace
	conf := e.conf("1.0.0", nil)
	for _, cmd := range []string{"ADD", "DEL"} {
		var err error
		if cmd == "ADD" {
			_, err = e.add(conf, "c-own")
		} else {
			err = e.run(cmd, conf, "c-own")
		}
		var cniErr *types.Error
		if !errors.As(err, &cniErr) || cniErr.Code != types.ErrInvalidNetNS || !strings.Contains(cniErr.Msg, "plugin's own network namespace") {
			t.Errorf("%s with the plugin's own namespace: %v, want code %d", cmd, err, types.ErrInvalidNetNS)
		}
	}
	if h := e.held("c-own"); len(h) != 0 {
		t.Errorf("the refused ADD holds %v", h)
	}
	rep, err := ipam.New(e.store, ipam.Options{}).Check(context.Background(), 0)
	if err != nil {
		t.Fatal(err)
	}
	if rep.Allocations != 0 || rep.Handles != 0 {
		t.Errorf("ipam check after the refused ADD: %d allocations, %d handles; want none", rep.Allocations, rep.Handles)
	}
}

// Dual stack in every spec version: one address of each family under one
// handle, the same on a repeated ADD, CHECK verifying both, one DEL freeing both.
func TestIPAMPluginDualStack(t *testing.T) {
	e := newIPAMEnv(t, "10.244.0.0/16", 26)
	p6 := api.NewIPPool("pods-v6")
	p6.Spec.CIDR = "fd00:244::/48"
	if _, err := e.store.Create(context.Background(), p6); err != nil {
		t.Fatal(err)
	}
	dual := map[string]any{"ipam": map[string]any{"type": "margay-ipam", "assign_ipv4": "true", "assign_ipv6": "true", "ipv6_pools": []string{"pods-v6"}}}
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			id := "dual-" + v
			conf := e.conf(v, dual)
			r, err := e.add(conf, id)
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if len(r.IPs) != 2 || r.IPs[0].Address.IP.To4() == nil || r.IPs[1].Address.IP.To4() != nil {
				t.Fatalf("ADD result %+v: want an IPv4 then an IPv6 address", r)
			}
			v6, _ := netip.AddrFromSlice(r.IPs[1].Address.IP)
			if ones, bits := r.IPs[1].Address.Mask.Size(); ones != 128 || bits != 128 || !netip.MustParsePrefix("fd00:244::/48").Contains(v6) {
				t.Errorf("ADD gave %s, want a /128 in fd00:244::/48", &r.IPs[1].Address)
			}
			again, err := e.add(conf, id)
			if err != nil || len(again.IPs) != 2 || !again.IPs[1].Address.IP.Equal(r.IPs[1].Address.IP) {
				t.Errorf("repeated ADD gave %v, %v; want the same addresses", again, err)
			}
			if v != "0.3.1" {
				if err := e.run("CHECK", withPrev(t, conf, r, v), id); err != nil {
					t.Errorf("CHECK: %v", err)
				}
				lost := *r
				lost.IPs = r.IPs[:1]
				if err := e.run("CHECK", withPrev(t, conf, &lost, v), id); cniCode(err) != ErrReservation {
					t.Errorf("CHECK with the IPv6 address missing from prevResult: %v, want code %d", err, ErrReservation)
				}
			}
			if err := e.run("DEL", conf, id); err != nil {
				t.Errorf("DEL: %v", err)
			}
			if held := e.held(id); len(held) != 0 {
				t.Errorf("after DEL the handle holds %v", held)
			}
		})
	}
	// IPv6 only, and a pool of the wrong family named.
	only6 := map[string]any{"ipam": map[string]any{"type": "margay-ipam", "assign_ipv4": "false", "assign_ipv6": "true"}}
	r, err := e.add(e.conf("1.0.0", only6), "v6only")
	if err != nil || len(r.IPs) != 1 || r.IPs[0].Address.IP.To4() != nil {
		t.Errorf("IPv6-only ADD = %+v, %v", r, err)
	}
	wrong := map[string]any{"ipam": map[string]any{"type": "margay-ipam", "assign_ipv6": "true", "ipv6_pools": []string{"pods"}}}
	if _, err := e.add(e.conf("1.0.0", wrong), "wrong"); err == nil || !strings.Contains(err.Error(), `IP pool "pods" (10.244.0.0/16) is IPv4 and cannot serve an IPv6 address`) {
		t.Errorf("an IPv4 pool in ipv6_pools: err = %v", err)
	}
	if held := e.held("wrong"); len(held) != 0 {
		t.Errorf("the failed dual-stack ADD left %v", held)
	}
}
