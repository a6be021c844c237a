package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/test/etcdtest"
)

// env is one etcd, one store and a clock the test controls.
type env struct {
	t     *testing.T
	store *datastore.Store
	now   time.Time
}

// newEnv starts etcd with the pools and Nodes n1 and n2, the nodes the tests
// assign on.
func newEnv(t *testing.T, pools ...*api.IPPool) *env {
	srv := etcdtest.StartT(t)
	e := &env{t: t, store: newStore(t, srv), now: time.Now()}
	for _, p := range pools {
		mustCreate(t, e.store, p)
	}
	mustCreate(t, e.store, api.NewNode("n1"))
	mustCreate(t, e.store, api.NewNode("n2"))
	return e
}

func (e *env) alloc() *Allocator {
	return New(e.store, Options{Now: func() time.Time { return e.now }})
}

func (e *env) assign(a *Allocator, handle, node string) Assigned {
	e.t.Helper()
	got, err := a.AutoAssign(context.Background(), AssignArgs{Handle: handle, Node: node})
	if err != nil {
		e.t.Fatalf("assign %s on %s: %v", handle, node, err)
	}
	return got[0]
}

func (e *env) configure(f func(*api.IPAMConfigurationSpec)) {
	e.t.Helper()
	if _, err := Configure(context.Background(), e.store, f); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) check(grace time.Duration) *Report {
	e.t.Helper()
	r, err := e.alloc().Check(context.Background(), grace)
	if err != nil {
		e.t.Fatal(err)
	}
	return r
}

func ptrTo[T any](v T) *T { return &v }

func sized(name, cidr string, blockSize int) *api.IPPool {
	p := pool(name, cidr)
	p.Spec.BlockSize = blockSize
	return p
}

func TestClaimsBlocksInOrder(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	a := e.alloc()
	first := e.assign(a, "h0", "n1")
	for i := 1; i < 65; i++ {
		e.assign(a, "h"+string(rune('A'+i%26))+strings.Repeat("x", i), "n1")
	}
	u, err := a.Usage(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Blocks) != 2 || u.Pools[0].InUse != 65 || u.Pools[0].Blocks != 2 {
		t.Fatalf("usage %+v: want 65 addresses in 2 blocks", u)
	}
	for _, b := range u.Blocks {
		if b.Affinity != "n1" {
			t.Errorf("block %s owned by %q, want n1", b.CIDR, b.Affinity)
		}
	}
	if first.Block != u.Blocks[0].CIDR && first.Block != u.Blocks[1].CIDR {
		t.Errorf("first address %v is in neither block", first)
	}
	resp, err := e.store.Get(context.Background(), datastore.AffinityPrefix("n1"), clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	for _, kv := range resp.Kvs {
		if !strings.Contains(string(kv.Value), `"confirmed"`) {
			t.Errorf("affinity %s is %s, want confirmed", kv.Key, kv.Value)
		}
	}
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("check: %+v", r)
	}
}

func TestBorrowingAndStrictAffinity(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/26")) // a single block
	a := e.alloc()
	e.assign(a, "h1", "n1")

	e.configure(func(s *api.IPAMConfigurationSpec) { s.StrictAffinity = true })
	_, err := e.alloc().AutoAssign(context.Background(), AssignArgs{Handle: "h2", Node: "n2"})
	if !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "strictAffinity is on") {
		t.Fatalf("strict affinity, no block for n2: err = %v, want ErrNoSpace naming strictAffinity", err)
	}

	e.configure(func(s *api.IPAMConfigurationSpec) { s.StrictAffinity = false })
	got := e.assign(e.alloc(), "h2", "n2")
	u, err := a.Usage(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(u.Borrowed) != 1 || u.Borrowed[0].IP != got.IP || u.Borrowed[0].Node != "n2" || u.Borrowed[0].BlockOwner != "n1" {
		t.Errorf("borrowed = %+v, want %s borrowed by n2 from n1", u.Borrowed, got.IP)
	}
}

func TestMaxBlocksPerHost(t *testing.T) {
	e := newEnv(t, sized("p", "10.0.0.0/24", 30)) // 64 blocks of 4
	e.configure(func(s *api.IPAMConfigurationSpec) { s.StrictAffinity = true; s.MaxBlocksPerHost = ptrTo(2) })
	a := e.alloc()
	for i := range 8 {
		e.assign(a, "h"+string(rune('a'+i)), "n1")
	}
	_, err := a.AutoAssign(context.Background(), AssignArgs{Handle: "h9", Node: "n1"})
	if !errors.Is(err, ErrNoSpace) {
		t.Fatalf("9th address with 2 blocks of 4: err = %v, want ErrNoSpace", err)
	}
	u, _ := a.Usage(context.Background())
	if len(u.Blocks) != 2 {
		t.Errorf("%d blocks claimed, want maxBlocksPerHost=2", len(u.Blocks))
	}
	// Without strict affinity the node borrows instead, once another node has room.
	e.configure(func(s *api.IPAMConfigurationSpec) { s.StrictAffinity = false })
	e.assign(e.alloc(), "other", "n2")
	got := e.assign(e.alloc(), "h9", "n1")
	if info, _ := a.LookupIP(context.Background(), got.IP); info.BlockOwner != "n2" {
		t.Errorf("n1's 9th address %s is in a block of %q, want n2's", got.IP, info.BlockOwner)
	}
}

func TestReuseCooldown(t *testing.T) {
	e := newEnv(t, sized("p", "10.0.0.0/30", 30)) // 4 addresses
	a := e.alloc()
	h := []Assigned{e.assign(a, "a", "n1"), e.assign(a, "b", "n1")}
	if _, err := a.ReleaseByHandle(context.Background(), "a"); err != nil {
		t.Fatal(err)
	}
	// Two never-used addresses remain: they go first.
	for _, name := range []string{"c", "d"} {
		if got := e.assign(a, name, "n1"); got.IP == h[0].IP {
			t.Fatalf("%s got %s, freed moments ago, while other addresses were free", name, got.IP)
		}
	}
	// Only the cooling address is left: it is used rather than failing.
	if got := e.assign(a, "e", "n1"); got.IP != h[0].IP {
		t.Errorf("last resort gave %s, want the only free address %s", got.IP, h[0].IP)
	}
	if _, err := a.AutoAssign(context.Background(), AssignArgs{Handle: "f", Node: "n1"}); !errors.Is(err, ErrNoSpace) {
		t.Errorf("full pool: err = %v, want ErrNoSpace", err)
	}
}

// A handle that still lists an address another pod holds now (a DEL that
// lost its handle update, say) cannot free it: release by handle matches the
// sequence too.
func TestStaleHandleCannotFreeReusedAddress(t *testing.T) {
	e := newEnv(t, sized("p", "10.0.0.0/32", 32)) // one address
	ctx := context.Background()
	a := e.alloc()
	old := e.assign(a, "pod1", "n1")
	stale, err := e.store.Get(ctx, datastore.HandleKey("pod1"))
	if err != nil || len(stale.Kvs) != 1 {
		t.Fatalf("read handle pod1: %v", err)
	}
	if _, err := a.ReleaseIP(ctx, old.IP); err != nil {
		t.Fatal(err)
	}
	cur := e.assign(a, "pod2", "n1")
	if cur.IP != old.IP {
		t.Fatalf("pod2 got %s, want the only address %s", cur.IP, old.IP)
	}
	if _, err := e.store.Txn(ctx, nil, []clientv3.Op{clientv3.OpPut(datastore.HandleKey("pod1"), string(stale.Kvs[0].Value))}, nil); err != nil {
		t.Fatal(err)
	}
	if freed, err := a.ReleaseByHandle(ctx, "pod1"); err != nil || len(freed) != 0 {
		t.Errorf("release of the stale handle freed %v, %v; want nothing", freed, err)
	}
	if info, _ := a.LookupIP(ctx, cur.IP); !info.Allocated || info.Handle != "pod2" || info.Sequence != cur.Sequence {
		t.Errorf("after the stale release %s is %+v, want still pod2's", cur.IP, info)
	}
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("the stale handle is not gone: %+v", r)
	}
}

func TestStaleReleaseCannotFreeReusedAddress(t *testing.T) {
	e := newEnv(t, sized("p", "10.0.0.0/32", 32)) // one address
	a := e.alloc()
	old := e.assign(a, "pod", "n1")
	if _, err := a.ReleaseIP(context.Background(), old.IP); err != nil {
		t.Fatal(err)
	}
	cur := e.assign(a, "pod", "n1") // same handle, same address, new sequence
	if cur.IP != old.IP || cur.Sequence == old.Sequence {
		t.Fatalf("reassignment %v vs %v: want the same address with a new sequence", cur, old)
	}
	if err := a.releaseExact(context.Background(), old.IP, "pod", old.Sequence, nil); !errors.Is(err, ErrNotAllocated) {
		t.Errorf("stale release: err = %v, want ErrNotAllocated", err)
	}
	if err := a.releaseExact(context.Background(), old.IP, "other", 0, nil); !errors.Is(err, ErrNotAllocated) {
		t.Errorf("release by the wrong handle: err = %v, want ErrNotAllocated", err)
	}
	if info, _ := a.LookupIP(context.Background(), cur.IP); !info.Allocated || info.Sequence != cur.Sequence {
		t.Errorf("after stale releases %s is %+v, want still held at sequence %d", cur.IP, info, cur.Sequence)
	}
	// Release by handle is idempotent.
	for range 2 {
		if _, err := a.ReleaseByHandle(context.Background(), "pod"); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.ReleaseIP(context.Background(), cur.IP); !errors.Is(err, ErrNotAllocated) {
		t.Errorf("release of a free address: err = %v, want ErrNotAllocated", err)
	}
}

func TestEmptyBlockAffinityReleased(t *testing.T) {
	e := newEnv(t, sized("p", "10.0.0.0/29", 30)) // 2 blocks of 4
	a := e.alloc()
	var hs []string
	for i := range 6 {
		h := "h" + string(rune('a'+i))
		e.assign(a, h, "n1")
		hs = append(hs, h)
	}
	u, _ := a.Usage(context.Background())
	second := u.Blocks[0].CIDR
	for _, b := range u.Blocks {
		if b.InUse == 2 {
			second = b.CIDR
		}
	}
	for _, h := range hs[4:] {
		if _, err := a.ReleaseByHandle(context.Background(), h); err != nil {
			t.Fatal(err)
		}
	}
	u, _ = a.Usage(context.Background())
	for _, b := range u.Blocks {
		if b.CIDR == second && b.Affinity != "" {
			t.Errorf("empty non-last block %s still owned by %q", b.CIDR, b.Affinity)
		}
	}
	// The node's last block keeps its affinity even when empty.
	for _, h := range hs[:4] {
		a.ReleaseByHandle(context.Background(), h)
	}
	u, _ = a.Usage(context.Background())
	owned := 0
	for _, b := range u.Blocks {
		if b.Affinity == "n1" {
			owned++
		}
	}
	if owned != 1 {
		t.Errorf("n1 owns %d blocks after releasing everything, want 1 (its last)", owned)
	}
	// Another node takes over the ownerless block when no CIDR is unused.
	e.assign(e.alloc(), "x", "n2")
	u, _ = a.Usage(context.Background())
	if len(u.Blocks) != 2 || (u.Blocks[0].Affinity != "n2" && u.Blocks[1].Affinity != "n2") {
		t.Errorf("blocks %+v: want n2 to own the released block", u.Blocks)
	}
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("check: %+v", r)
	}
}

func TestTunnelAddress(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"), pool("p6", "fd00:244::/120"))
	a := e.alloc()
	ctx := context.Background()
	ip1, err := a.EnsureTunnelAddr(ctx, "n1", TunnelIPIP, nil)
	if err != nil {
		t.Fatal(err)
	}
	ip2, err := a.EnsureTunnelAddr(ctx, "n1", TunnelIPIP, nil)
	if err != nil || ip2 != ip1 {
		t.Fatalf("second EnsureTunnelAddr = %s, %v; want %s again", ip2, err, ip1)
	}
	if held, _ := a.IPsByHandle(ctx, "ipip-tunnel-addr-n1"); len(held) != 1 || held[0].IP != ip1 {
		t.Errorf("handle ipip-tunnel-addr-n1 holds %v", held)
	}
	vx, err := a.EnsureTunnelAddr(ctx, "n1", TunnelVXLAN, nil)
	if err != nil || vx == ip1 || !vx.Is4() {
		t.Errorf("vxlan tunnel address %s, %v: want a second IPv4 address", vx, err)
	}
	vx6, err := a.EnsureTunnelAddr(ctx, "n1", TunnelVXLANV6, nil)
	if err != nil || !netip.MustParsePrefix("fd00:244::/120").Contains(vx6) {
		t.Errorf("vxlan-v6 tunnel address %s, %v: want one of pool p6", vx6, err)
	}
	if held, _ := a.IPsByHandle(ctx, "vxlan-v6-tunnel-addr-n1"); len(held) != 1 || held[0].IP != vx6 {
		t.Errorf("handle vxlan-v6-tunnel-addr-n1 holds %v", held)
	}
	// With the Node resource they are in use, however old; once the node is
	// deleted they are leaked at once.
	e.now = e.now.Add(time.Hour)
	if r := e.check(time.Minute); !r.Clean() {
		t.Errorf("with Node n1: %+v", r)
	}
	if _, err := e.store.Delete(ctx, nodeKind, "n1", ""); err != nil {
		t.Fatal(err)
	}
	if r := e.check(DefaultLeakGrace); len(r.Leaked) != 3 {
		t.Errorf("Node n1 deleted: %d leaked, want the 3 tunnel addresses: %+v", len(r.Leaked), r)
	}
}

// A deleted node's pod address without an endpoint may be an ADD kubelet is
// still finishing there: it waits for the grace period like any other.
func TestDeletedNodeYoungAddress(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	ctx := context.Background()
	got := e.assign(e.alloc(), PodHandle("c1"), "n1")
	if _, err := e.store.Delete(ctx, nodeKind, "n1", ""); err != nil {
		t.Fatal(err)
	}
	if r := e.check(DefaultLeakGrace); len(r.Leaked) != 0 || len(r.BadAffinities) != 1 {
		t.Errorf("a young address of deleted n1: want only its block reported: %+v", r)
	}
	e.now = e.now.Add(DefaultLeakGrace)
	if r := e.check(DefaultLeakGrace); len(r.Leaked) != 1 || r.Leaked[0].IP != got.IP || !strings.Contains(r.Leaked[0].Reason, "n1, which no longer exists") {
		t.Errorf("past the grace period: want %s leaked: %+v", got.IP, r)
	}
}

// A pod of a deleted node with two addresses: both go, and its endpoint once.
func TestDeletedNodePodWithTwoAddresses(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	ctx := context.Background()
	got, err := e.alloc().AutoAssign(ctx, AssignArgs{Handle: PodHandle("c1"), Node: "n1", Num: 2})
	if err != nil {
		t.Fatal(err)
	}
	w := api.NewWorkloadEndpoint("n1-k8s-web-eth0")
	w.Spec = api.WorkloadEndpointSpec{Node: "n1", ContainerID: "c1", InterfaceName: "mgy1", IPNetworks: []string{got[0].IP.String() + "/32", got[1].IP.String() + "/32"}}
	mustCreate(t, e.store, w)
	if _, err := e.store.Delete(ctx, nodeKind, "n1", ""); err != nil {
		t.Fatal(err)
	}
	r, fixed, err := e.alloc().ReleaseNode(ctx, "n1")
	if err != nil || fixed != 3 || len(r.Leaked) != 2 {
		t.Fatalf("ReleaseNode: fixed %d, %v: %+v", fixed, err, r)
	}
	if r := e.check(0); !r.Clean() || r.Allocations != 0 {
		t.Errorf("after ReleaseNode: %+v", r)
	}
	if _, err := e.store.GetResource(ctx, api.KindOf(w), w.Metadata.Name); !errors.Is(err, datastore.ErrNotFound) {
		t.Errorf("the endpoint is still there: %v", err)
	}
}

// Blocks are claimed only for registered nodes.
func TestAssignNeedsNode(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	_, err := e.alloc().AutoAssign(context.Background(), AssignArgs{Handle: "h", Node: "n9"})
	if !errors.Is(err, ErrUnknownNode) || !strings.Contains(err.Error(), `"n9" has no Node resource`) {
		t.Errorf("assign on an unregistered node: %v, want ErrUnknownNode naming it", err)
	}
	if r := e.check(0); r.Blocks != 0 || len(r.BadAffinities) != 0 {
		t.Errorf("the refused assignment left state behind: %+v", r)
	}
}

// A deleted node's addresses, its pods' endpoints and its blocks: check reports
// them at once, and ReleaseNode frees them without touching anyone else's.
func TestDeletedNode(t *testing.T) {
	e := newEnv(t, sized("p", "10.0.0.0/25", 26)) // two blocks: n1's and n2's
	ctx := context.Background()
	a := e.alloc()
	pod := e.assign(a, PodHandle("c1"), "n1")
	w := api.NewWorkloadEndpoint("n1-k8s-web-eth0")
	w.Spec = api.WorkloadEndpointSpec{Node: "n1", ContainerID: "c1", InterfaceName: "mgy1", IPNetworks: []string{pod.IP.String() + "/32"}}
	mustCreate(t, e.store, w)
	tunnel, err := a.EnsureTunnelAddr(ctx, "n1", TunnelVXLAN, nil)
	if err != nil {
		t.Fatal(err)
	}
	other := e.assign(a, PodHandle("c2"), "n2") // n2's own block, and its pod without an endpoint yet
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Fatalf("before the deletion: %+v", r)
	}
	if _, _, err := a.ReleaseNode(ctx, "n1"); err == nil || !strings.Contains(err.Error(), "still has its Node") {
		t.Errorf("ReleaseNode of a live node: %v, want a refusal", err)
	}
	if _, err := e.store.Delete(ctx, nodeKind, "n1", ""); err != nil {
		t.Fatal(err)
	}
	r := e.check(DefaultLeakGrace)
	if len(r.Leaked) != 2 || len(r.BadAffinities) != 1 || r.BadAffinities[0].Block != pod.Block ||
		!strings.Contains(r.BadAffinities[0].Reason, "n1 no longer exists") {
		t.Fatalf("after deleting n1, want its pod and tunnel addresses leaked and its block reported: %+v", r)
	}

	// Node back, or its agent running again, between the check and the repair:
	// nothing of it is touched.
	mustCreate(t, e.store, api.NewNode("n1"))
	if fixed, err := a.Repair(ctx, r); fixed != 0 || err == nil || !strings.Contains(err.Error(), "node n1 exists again") {
		t.Errorf("repair after n1 came back: fixed %d, %v; want a refusal", fixed, err)
	}
	if _, err := e.store.Delete(ctx, nodeKind, "n1", ""); err != nil {
		t.Fatal(err)
	}
	held := datastore.AgentsPrefix + "n1"
	if _, err := e.store.Txn(ctx, nil, []clientv3.Op{clientv3.OpPut(held, "198.18.1.2")}, nil); err != nil {
		t.Fatal(err)
	}
	if fixed, err := a.Repair(ctx, r); fixed != 0 || err == nil || !strings.Contains(err.Error(), "running margay-node again") {
		t.Errorf("repair with n1's agent running: fixed %d, %v; want a refusal", fixed, err)
	}
	if _, err := e.store.Txn(ctx, nil, []clientv3.Op{clientv3.OpDelete(held)}, nil); err != nil {
		t.Fatal(err)
	}
	if info, _ := a.LookupIP(ctx, pod.IP); !info.Allocated {
		t.Fatalf("a refused repair released %s", pod.IP)
	}
	if _, err := e.store.GetResource(ctx, api.KindOf(w), w.Metadata.Name); err != nil {
		t.Fatalf("a refused repair deleted the endpoint: %v", err)
	}

	rel, fixed, err := a.ReleaseNode(ctx, "n1")
	if err != nil || fixed != 3 || len(rel.Leaked) != 2 || len(rel.BadAffinities) != 1 {
		t.Fatalf("ReleaseNode: fixed %d, %v: %+v", fixed, err, rel)
	}
	for _, ip := range []netip.Addr{pod.IP, tunnel} {
		if _, err := a.ReleaseIP(ctx, ip); !errors.Is(err, ErrNotAllocated) {
			t.Errorf("%s of the deleted node is still allocated: %v", ip, err)
		}
	}
	if _, err := e.store.GetResource(ctx, api.KindOf(w), w.Metadata.Name); !errors.Is(err, datastore.ErrNotFound) {
		t.Errorf("the deleted node's WorkloadEndpoint is still there: %v", err)
	}
	// n2's pod is young: still not leaked. A day on, it is, and nothing else.
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("after ReleaseNode: %+v", r)
	}
	e.now = e.now.Add(24 * time.Hour)
	if r := e.check(DefaultLeakGrace); len(r.Leaked) != 1 || r.Leaked[0].IP != other.IP || r.Problems() != 1 {
		t.Errorf("a day later, want only n2's pod without an endpoint: %+v", r)
	}
	// The ownerless block goes to the next node that needs one.
	mustCreate(t, e.store, api.NewNode("n3"))
	if got := e.assign(e.alloc(), "n3-pod", "n3"); got.Block != pod.Block {
		t.Errorf("n3 got an address in %s, want n1's old block %s", got.Block, pod.Block)
	}
	if r := e.check(DefaultLeakGrace); r.Problems() != 1 {
		t.Errorf("after n3 took the block over: %+v", r)
	}
}

func TestCheckFindsAndRepairs(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	ctx := context.Background()
	a := e.alloc()
	live := e.assign(a, PodHandle("live"), "n1")
	leak := e.assign(a, PodHandle("gone"), "n1")
	unref := e.assign(a, PodHandle("unref"), "n1")
	w := api.NewWorkloadEndpoint("n1-k8s-default-live-eth0")
	w.Spec = api.WorkloadEndpointSpec{Node: "n1", ContainerID: "live", InterfaceName: "mgy0", IPNetworks: []string{live.IP.String() + "/32"}}
	mustCreate(t, e.store, w)
	w2 := api.NewWorkloadEndpoint("n1-k8s-default-unref-eth0")
	w2.Spec = api.WorkloadEndpointSpec{Node: "n1", ContainerID: "unref", InterfaceName: "mgy1", IPNetworks: []string{unref.IP.String() + "/32"}}
	mustCreate(t, e.store, w2)

	put := func(key string, v any) {
		if _, err := e.store.Txn(ctx, nil, []clientv3.Op{clientv3.OpPut(key, mustJSON(v))}, nil); err != nil {
			t.Fatal(err)
		}
	}
	// Damage: a handle that lists an address it does not hold, an allocation whose
	// handle is gone, an affinity to a block that does not exist, a claim left pending.
	put(datastore.HandleKey("ghost"), Handle{ID: "ghost", IPs: []Assigned{{IP: netip.MustParseAddr("10.0.0.200"), Block: netip.MustParsePrefix("10.0.0.192/26"), Sequence: 1}}})
	if _, err := e.store.Txn(ctx, nil, []clientv3.Op{clientv3.OpDelete(datastore.HandleKey(PodHandle("unref")))}, nil); err != nil {
		t.Fatal(err)
	}
	put(datastore.AffinityKey("n9", netip.MustParsePrefix("10.0.0.128/26")), affinity{State: affinityConfirmed, Created: e.now})
	put(datastore.AffinityKey("n8", netip.MustParsePrefix("10.0.0.64/26")), affinity{State: affinityPending, Created: e.now.Add(-time.Hour)})

	e.now = e.now.Add(time.Hour)
	r := e.check(time.Minute)
	if len(r.Leaked) != 1 || r.Leaked[0].IP != leak.IP {
		t.Errorf("leaked = %+v, want only %s", r.Leaked, leak.IP)
	}
	if len(r.Unreferenced) != 1 || r.Unreferenced[0].IP != unref.IP {
		t.Errorf("unreferenced = %+v, want %s", r.Unreferenced, unref.IP)
	}
	if len(r.OrphanHandles) != 1 || r.OrphanHandles[0].Handle != "ghost" {
		t.Errorf("orphan handles = %+v, want ghost", r.OrphanHandles)
	}
	if len(r.BadAffinities) != 2 {
		t.Errorf("bad affinities = %+v, want n9's dangling one and n8's stale pending one", r.BadAffinities)
	}
	fixed, err := a.Repair(ctx, r)
	if err != nil || fixed != 5 {
		t.Fatalf("repair fixed %d, err %v; want 5", fixed, err)
	}
	if r := e.check(time.Minute); !r.Clean() {
		t.Errorf("after repair: %+v", r)
	}
	if held, _ := a.IPsByHandle(ctx, PodHandle("unref")); len(held) != 1 || held[0].IP != unref.IP {
		t.Errorf("unreferenced allocation was not linked back: %v", held)
	}
	if info, _ := a.LookupIP(ctx, live.IP); !info.Allocated {
		t.Errorf("repair freed the live pod's %s", live.IP)
	}
}

func TestSettlesPendingAffinity(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	ctx := context.Background()
	cidr := netip.MustParsePrefix("10.0.0.64/26")
	// An allocator died after writing its block but before confirming.
	b := newBlock(cidr, "n1")
	if _, err := e.store.Txn(ctx, nil, []clientv3.Op{
		clientv3.OpPut(datastore.BlockKey(cidr), mustJSON(b)),
		clientv3.OpPut(datastore.AffinityKey("n1", cidr), mustJSON(affinity{State: affinityPending, Created: e.now})),
	}, nil); err != nil {
		t.Fatal(err)
	}
	got := e.assign(e.alloc(), "h", "n1")
	if got.Block != cidr {
		t.Errorf("assigned from %s, want the recovered block %s", got.Block, cidr)
	}
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("check: %+v", r)
	}
}

func TestCacheFollowsPoolChanges(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	ctx := context.Background()
	a := e.alloc()
	e.assign(a, "h1", "n1")
	p, err := datastore.Get[*api.IPPool](ctx, e.store, "p")
	if err != nil {
		t.Fatal(err)
	}
	p.Spec.Disabled = true
	if _, err := e.store.Update(ctx, p); err != nil {
		t.Fatal(err)
	}
	// The warm allocator's cached pool is stale; its write must notice.
	if _, err := a.AutoAssign(ctx, AssignArgs{Handle: "h2", Node: "n1"}); err == nil || !strings.Contains(err.Error(), "p is disabled") {
		t.Errorf("assign from a disabled pool: err = %v, want it refused", err)
	}
}

// The steady state — the node already has a block with room — must cost at most 2
// etcd round trips per address for a long-lived allocator.
func TestSteadyStateRoundTrips(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	a := e.alloc()
	e.assign(a, "warm", "n1")
	before := e.store.RoundTrips()
	const n = 20
	for i := range n {
		e.assign(a, "h"+strings.Repeat("x", i), "n1")
	}
	if per := float64(e.store.RoundTrips()-before) / n; per > 2 {
		t.Errorf("%.2f round trips per address in the steady state, want <= 2", per)
	}
}

// A pool deleted with blocks still in use and recreated with another blockSize must
// not cut new blocks across the old ones.
func TestRecreatedPoolDoesNotOverlapOldBlocks(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	ctx := context.Background()
	old := e.assign(e.alloc(), "old", "n1")
	if _, err := e.store.Delete(ctx, poolKind, "p", ""); err != nil {
		t.Fatal(err)
	}
	mustCreate(t, e.store, sized("p", "10.0.0.0/24", 24))
	seen := map[netip.Addr]bool{old.IP: true}
	for i := range 20 {
		got, err := e.alloc().AutoAssign(ctx, AssignArgs{Handle: "new" + strings.Repeat("x", i), Node: "n2"})
		if err != nil {
			t.Fatal(err)
		}
		if seen[got[0].IP] {
			t.Fatalf("%s handed out twice", got[0].IP)
		}
		seen[got[0].IP] = true
	}
	u, _ := e.alloc().Usage(ctx)
	for i, x := range u.Blocks {
		for _, y := range u.Blocks[i+1:] {
			if x.CIDR.Overlaps(y.CIDR) {
				t.Errorf("blocks %s and %s overlap", x.CIDR, y.CIDR)
			}
		}
	}
}

func TestConcurrentTunnelAddress(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	got := make([]netip.Addr, 8)
	errs := make([]error, 8)
	done := make(chan int)
	for i := range got {
		go func() {
			got[i], errs[i] = e.alloc().EnsureTunnelAddr(context.Background(), "n1", TunnelIPIP, nil)
			done <- i
		}()
	}
	for range got {
		<-done
	}
	for i := range got {
		if errs[i] != nil || got[i] != got[0] {
			t.Errorf("caller %d got %s (%v), caller 0 got %s: want one address for all", i, got[i], errs[i], got[0])
		}
	}
	if held, _ := e.alloc().IPsByHandle(context.Background(), TunnelHandle(TunnelIPIP, "n1")); len(held) != 1 {
		t.Errorf("tunnel handle holds %v, want one address", held)
	}
}

// A claim that stopped after writing its block is confirmed by repair, not undone.
func TestRepairConfirmsInterruptedClaim(t *testing.T) {
	e := newEnv(t, pool("p", "10.0.0.0/24"))
	ctx := context.Background()
	cidr := netip.MustParsePrefix("10.0.0.128/26")
	if _, err := e.store.Txn(ctx, nil, []clientv3.Op{
		clientv3.OpPut(datastore.BlockKey(cidr), mustJSON(newBlock(cidr, "n1"))),
		clientv3.OpPut(datastore.AffinityKey("n1", cidr), mustJSON(affinity{State: affinityPending, Created: e.now.Add(-time.Hour)})),
	}, nil); err != nil {
		t.Fatal(err)
	}
	r := e.check(DefaultLeakGrace)
	if len(r.BadAffinities) != 1 {
		t.Fatalf("bad affinities %+v, want the stale pending claim", r.BadAffinities)
	}
	if _, err := e.alloc().Repair(ctx, r); err != nil {
		t.Fatal(err)
	}
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("after repair: %+v", r)
	}
	if got := e.assign(e.alloc(), "h", "n1"); got.Block != cidr {
		t.Errorf("n1 assigned from %s, want its recovered block %s", got.Block, cidr)
	}
}

// Several addresses at once are all or nothing.
func TestAssignSeveral(t *testing.T) {
	e := newEnv(t, sized("p", "10.0.0.0/29", 30)) // 8 addresses in 2 blocks
	ctx := context.Background()
	a := e.alloc()
	got, err := a.AutoAssign(ctx, AssignArgs{Handle: "three", Node: "n1", Num: 3})
	if err != nil || len(got) != 3 {
		t.Fatalf("Num 3: %v, %v", got, err)
	}
	if held, _ := a.IPsByHandle(ctx, "three"); len(held) != 3 {
		t.Errorf("handle holds %v, want 3 addresses", held)
	}
	// 5 are left; asking for 6 fails and leaves nothing behind.
	if _, err := a.AutoAssign(ctx, AssignArgs{Handle: "six", Node: "n1", Num: 6}); !errors.Is(err, ErrNoSpace) {
		t.Fatalf("Num 6 with 5 free: err = %v, want ErrNoSpace", err)
	}
	if held, _ := a.IPsByHandle(ctx, "six"); len(held) != 0 {
		t.Errorf("a failed assignment left %v allocated", held)
	}
	u, _ := a.Usage(ctx)
	if u.Pools[0].InUse != 3 {
		t.Errorf("%d addresses in use after the failed assignment, want 3", u.Pools[0].InUse)
	}
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("check: %+v", r)
	}
}

func TestDualStack(t *testing.T) {
	e := newEnv(t, pool("v4", "10.0.0.0/24"), pool("v6", "fd00:10::/120"), pool("v6b", "fd00:20::/120"))
	ctx := context.Background()
	a := e.alloc()
	both := []FamilyPools{{Family: IPv4}, {Family: IPv6}}
	got, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "pod", Node: "n1"}, both)
	if err != nil || len(got) != 2 || !got[0].IP.Is4() || !got[1].IP.Is6() {
		t.Fatalf("dual-stack assign = %v, %v; want one IPv4 then one IPv6 address", got, err)
	}
	if !netip.MustParsePrefix("fd00:10::/120").Contains(got[1].IP) || got[1].Block.Bits() != 122 {
		t.Errorf("v6 address %s in block %s: want a /122 of the first v6 pool by name", got[1].IP, got[1].Block)
	}
	// A repeated ADD gets the same two addresses.
	again, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "pod", Node: "n1"}, both)
	if err != nil || !slices.Equal(again, got) {
		t.Errorf("repeated assign = %v, %v; want %v", again, err, got)
	}
	// An ADD cut short after its IPv4 address gets only the IPv6 one it lacks.
	if _, err := a.AutoAssign(ctx, AssignArgs{Handle: "half", Node: "n1"}); err != nil {
		t.Fatal(err)
	}
	half, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "half", Node: "n1"}, both)
	if err != nil || len(half) != 2 || !half[1].IP.Is6() {
		t.Errorf("completing a half assignment = %v, %v", half, err)
	}
	// Pools are per family, by name or CIDR.
	named, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "named", Node: "n2"},
		[]FamilyPools{{Family: IPv4, Pools: []string{"v4"}}, {Family: IPv6, Pools: []string{"fd00:20::/120"}}})
	if err != nil || len(named) != 2 || !netip.MustParsePrefix("fd00:20::/120").Contains(named[1].IP) {
		t.Errorf("assign from named pools = %v, %v", named, err)
	}
	if _, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "wrong", Node: "n2"}, []FamilyPools{{Family: IPv6, Pools: []string{"v4"}}}); err == nil || !strings.Contains(err.Error(), "is IPv4 and cannot serve an IPv6 address") {
		t.Errorf("a v4 pool for v6: err = %v", err)
	}
	// IPv6 only.
	only6, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "v6only", Node: "n2"}, []FamilyPools{{Family: IPv6}})
	if err != nil || len(only6) != 1 || !only6[0].IP.Is6() {
		t.Errorf("IPv6-only assign = %v, %v", only6, err)
	}
	// One release frees both families.
	ips, err := a.ReleaseByHandle(ctx, "pod")
	if err != nil || len(ips) != 2 {
		t.Errorf("release = %v, %v; want both addresses", ips, err)
	}
	for _, g := range got {
		if info, err := a.LookupIP(ctx, g.IP); err != nil || info.Allocated {
			t.Errorf("%s after release: %+v, %v", g.IP, info, err)
		}
	}
	if r := e.check(DefaultLeakGrace); !r.Clean() {
		t.Errorf("check: %+v", r)
	}
}

// When the second family has no space, the first family's new address is
// released again: a failed dual-stack ADD leaks nothing.
func TestDualStackAllOrNothing(t *testing.T) {
	e := newEnv(t, pool("v4", "10.0.0.0/24"), sized("v6", "fd00:10::/127", 127)) // 2 v6 addresses
	e.configure(func(s *api.IPAMConfigurationSpec) { s.StrictAffinity = true })
	ctx := context.Background()
	a := e.alloc()
	both := []FamilyPools{{Family: IPv4}, {Family: IPv6}}
	for _, h := range []string{"a", "b"} {
		if _, err := a.AssignPerFamily(ctx, AssignArgs{Handle: h, Node: "n1"}, both); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "c", Node: "n1"}, both); !errors.Is(err, ErrNoSpace) || !strings.Contains(err.Error(), "v6 (fd00:10::/127)") {
		t.Fatalf("third pod with 2 v6 addresses: err = %v, want ErrNoSpace naming the v6 pool", err)
	}
	if held, _ := a.IPsByHandle(ctx, "c"); len(held) != 0 {
		t.Errorf("the failed assignment left %v", held)
	}
	u, _ := a.Usage(ctx)
	for _, p := range u.Pools {
		if p.InUse != 2 {
			t.Errorf("pool %s: %d in use, want 2", p.Name, p.InUse)
		}
		if want := map[string]int64{"v4": 256, "v6": 2}[p.Name]; p.Size.Int64() != want {
			t.Errorf("pool %s: size %s, want %d", p.Name, p.Size, want)
		}
	}
}

// maxBlocksPerHost caps each family on its own.
func TestMaxBlocksPerFamily(t *testing.T) {
	e := newEnv(t, sized("v4", "10.0.0.0/24", 31), sized("v6", "fd00:10::/120", 127))
	e.configure(func(s *api.IPAMConfigurationSpec) { s.StrictAffinity = true; s.MaxBlocksPerHost = ptrTo(2) })
	ctx := context.Background()
	a := e.alloc()
	both := []FamilyPools{{Family: IPv4}, {Family: IPv6}}
	for i := range 4 {
		if _, err := a.AssignPerFamily(ctx, AssignArgs{Handle: fmt.Sprint("h", i), Node: "n1"}, both); err != nil {
			t.Fatalf("pod %d of 4 (2 blocks of 2 per family): %v", i, err)
		}
	}
	if _, err := a.AssignPerFamily(ctx, AssignArgs{Handle: "h5", Node: "n1"}, []FamilyPools{{Family: IPv6}}); !errors.Is(err, ErrNoSpace) {
		t.Errorf("5th v6 address: err = %v, want ErrNoSpace", err)
	}
}
