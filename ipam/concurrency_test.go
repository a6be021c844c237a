package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/test/etcdtest"
)

// The concurrency suite: 8 nodes × 32 goroutines, each goroutine with its own
// Allocator (as separate CNI processes would be), allocate 3000 addresses from a /20
// of /26 blocks, release half, allocate again; then every invariant is audited.
//
// With -short (the -race run of `make test`) it runs at a tenth of the size: the race
// detector slows the etcd client twentyfold, and the full size then takes minutes.
// `make test` also runs the full size without -race.
func TestConcurrentAllocation(t *testing.T) {
	workers, scale := 32, 1
	if testing.Short() {
		workers, scale = 4, 10
	}
	cases := []struct {
		name    string
		pool    string
		pool6   string // a dual-stack case: each pod gets an address of each family
		strict  bool
		total   int
		restart bool // restart etcd in the middle of the first phase
	}{
		{name: "default", pool: "10.10.0.0/20", total: 3000},
		{name: "strict-affinity", pool: "10.10.0.0/20", strict: true, total: 3000},
		// 4 blocks of each family for 8 nodes: half the nodes get no block and
		// must borrow; the second phase also has to reuse cooling addresses.
		{name: "borrowing-dual-stack", pool: "10.10.0.0/24", pool6: "fd00:10::/120", total: 200},
		{name: "etcd-restart-dual-stack", pool: "10.10.0.0/20", pool6: "fd00:10::/112", total: 3000, restart: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			srv := etcdtest.StartT(t)
			store := newStore(t, srv)
			ctx := context.Background()
			mustCreate(t, store, pool("p", tc.pool))
			want := []FamilyPools{{Family: IPv4}}
			if tc.pool6 != "" {
				mustCreate(t, store, pool("p6", tc.pool6))
				want = append(want, FamilyPools{Family: IPv6})
			}
			if tc.strict {
				if _, err := Configure(ctx, store, func(s *api.IPAMConfigurationSpec) { s.StrictAffinity = true }); err != nil {
					t.Fatal(err)
				}
			}
			const nodes = 8
			for i := range nodes {
				mustCreate(t, store, api.NewNode(fmt.Sprintf("node-%d", i)))
			}
			total := tc.total
			if total > 1000 {
				total /= scale
			}
			var (
				mu   sync.Mutex
				held []heldAddr
				seq  atomic.Int64
				// failed counts ADDs that failed retryably and were cleaned up.
				failed atomic.Int64
				// spanned counts ADDs under way for the whole etcd outage.
				spanned atomic.Int64
				outage  window
			)
			// allocate runs the workers until every node has assigned its quota.
			// Quotas are per node, so that with strict affinity no node needs more
			// blocks than the pool can give it.
			allocate := func(quota map[string]int, midway func()) {
				var wg sync.WaitGroup
				var done, errs atomic.Int64
				var once sync.Once
				total := 0
				left := map[string]*atomic.Int64{}
				for node, q := range quota {
					total += q
					left[node] = new(atomic.Int64)
					left[node].Store(int64(q))
				}
				for w := range nodes * workers {
					node := fmt.Sprintf("node-%d", w%nodes)
					wg.Go(func() {
						a := New(store, Options{})
						for left[node].Add(-1) >= 0 {
							if done.Add(1) > int64(total/3) && midway != nil {
								once.Do(midway)
							}
							began := time.Now()
							h, got, err := addPod(ctx, a, node, want, func() string { return fmt.Sprintf("k8s-pod-network.c%d", seq.Add(1)) }, &failed)
							if outage.spans(began, time.Now()) {
								spanned.Add(1)
							}
							if err != nil {
								errs.Add(1)
								t.Errorf("assign %s on %s: %v", h, node, err)
								return
							}
							mu.Lock()
							held = append(held, heldAddr{h, node, got})
							mu.Unlock()
						}
					})
				}
				wg.Wait()
				if errs.Load() > 0 {
					t.FailNow()
				}
			}
			var midway func()
			if tc.restart {
				midway = func() {
					outage.open()
					srv.Stop()
					time.Sleep(500 * time.Millisecond)
					if err := srv.Restart(); err != nil {
						t.Errorf("restart etcd: %v", err)
					}
					outage.close()
				}
			}
			quota := map[string]int{}
			for i := range total {
				quota[fmt.Sprintf("node-%d", i%nodes)]++
			}
			start := time.Now()
			allocate(quota, midway)
			t.Logf("phase 1: %d pods in %s, %d etcd round trips, %d failed ADDs retried, %d ADDs under way through the etcd outage",
				len(held), time.Since(start), store.RoundTrips(), failed.Load(), spanned.Load())
			// Whether an ADD fails or just waits for etcd depends on which
			// request was in flight at the kill; either way some must have
			// been under way, or the restart tested nothing.
			if tc.restart && spanned.Load() == 0 {
				t.Errorf("etcd was restarted, yet no ADD was under way through the outage: the restart did not happen mid-run")
			}
			audit(t, store, held, tc.strict)

			// Release half of every node's addresses, by handle, concurrently.
			var release, kept []heldAddr
			count := map[string]int{}
			clear(quota)
			for _, h := range held {
				if count[h.node]++; count[h.node]%2 == 0 {
					release = append(release, h)
					quota[h.node]++
				} else {
					kept = append(kept, h)
				}
			}
			held = kept
			var wg sync.WaitGroup
			for i := range workers {
				wg.Go(func() {
					a := New(store, Options{})
					for j := i; j < len(release); j += workers {
						ips, err := a.ReleaseByHandle(ctx, release[j].handle)
						if err != nil || !slices.Equal(ips, release[j].ips()) {
							t.Errorf("release %s: got %v, %v; want %v", release[j].handle, ips, err, release[j].ips())
						}
					}
				})
			}
			wg.Wait()
			audit(t, store, held, tc.strict)

			start = time.Now()
			allocate(quota, nil)
			t.Logf("phase 2: %d pods in %s, %d etcd round trips", len(release), time.Since(start), store.RoundTrips())
			rep := audit(t, store, held, tc.strict)
			if rep.Allocations != total*len(want) {
				t.Errorf("%d allocations stored, want %d", rep.Allocations, total*len(want))
			}
			// A claim cut short by the restart stays pending until its node's next
			// assignment or a check 30 s on settles it; nothing else may be left.
			later := New(store, Options{Now: func() time.Time { return time.Now().Add(time.Minute) }})
			if rep, err := later.Check(ctx, DefaultLeakGrace); err != nil {
				t.Fatal(err)
			} else if !rep.Clean() {
				pending := 0
				for _, f := range rep.BadAffinities {
					if strings.HasPrefix(f.Reason, "claim left pending") {
						pending++
					}
				}
				if !tc.restart || pending != rep.Problems() {
					t.Errorf("a minute later ipam check finds more than pending claims of the restart: %+v", rep)
				}
				if _, err := later.Repair(ctx, rep); err != nil {
					t.Errorf("repair the pending claims: %v", err)
				}
				t.Logf("%d claims the restart cut short, repaired", pending)
				audit(t, store, held, tc.strict)
			}
			if strings.HasPrefix(tc.name, "borrowing") {
				u, err := New(store, Options{}).Usage(ctx)
				if err != nil {
					t.Fatal(err)
				}
				borrowed := map[Family]int{}
				for _, b := range u.Borrowed {
					borrowed[FamilyOf(b.IP)]++
				}
				for _, f := range want {
					if borrowed[f.Family] == 0 {
						t.Errorf("no %s address was borrowed, but only 4 blocks exist for 8 nodes", f.Family)
					}
				}
			}
		})
	}
}

// first keeps failure messages short.
func first(fs []Finding) []Finding { return fs[:min(len(fs), 3)] }

// heldAddr is a pod's handle and what it holds, one address per family.
type heldAddr struct {
	handle, node string
	as           []Assigned
}

func (h heldAddr) ips() []netip.Addr {
	var out []netip.Addr
	for _, a := range h.as {
		out = append(out, a.IP)
	}
	return out
}

// addPod does what kubelet does for a pod: ADD; if that fails retryably (contention,
// etcd restarting), DEL the attempt's handle until that succeeds, then ADD again
// with a new container ID. A write that etcd applied just before it died is thus
// cleaned up, never leaked.
func addPod(ctx context.Context, a *Allocator, node string, want []FamilyPools, newHandle func() string, failures *atomic.Int64) (string, []Assigned, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		h := newHandle()
		got, err := a.AssignPerFamily(ctx, AssignArgs{Handle: h, Node: node}, want)
		if err == nil && len(got) != len(want) {
			return h, got, fmt.Errorf("assigned %v, want one address of each of %d families", got, len(want))
		}
		if err == nil || !retryable(err) || time.Now().After(deadline) {
			return h, got, err
		}
		failures.Add(1)
		for {
			_, err := a.ReleaseByHandle(ctx, h)
			if err == nil {
				break
			}
			if !retryable(err) || time.Now().After(deadline) {
				return h, nil, fmt.Errorf("release after failed assign: %w", err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
}

// window is a span of time that opens and closes once, read concurrently.
type window struct {
	mu         sync.Mutex
	start, end time.Time
}

func (w *window) open()  { w.mu.Lock(); w.start = time.Now(); w.mu.Unlock() }
func (w *window) close() { w.mu.Lock(); w.end = time.Now(); w.mu.Unlock() }

// spans tells whether [from, to] covers the whole closed window.
func (w *window) spans(from, to time.Time) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return !w.end.IsZero() && !from.After(w.start) && !to.Before(w.end)
}

func retryable(err error) bool {
	return errors.Is(err, ErrContention) || errors.Is(err, datastore.ErrUnavailable)
}

// audit checks every invariant of the stored state against what the test holds.
// With strict, no address may be borrowed.
func audit(t *testing.T, store *datastore.Store, held []heldAddr, strict bool) *Report {
	t.Helper()
	ctx := context.Background()
	a := New(store, Options{})
	s, err := a.loadState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[netip.Addr]string{}
	addrs := 0
	for _, h := range held {
		for _, as := range h.as {
			addrs++
			if prev, dup := seen[as.IP]; dup {
				t.Errorf("duplicate IP %s: held by %s and %s", as.IP, prev, h.handle)
			}
			seen[as.IP] = h.handle
			ok := false
			for _, p := range s.pools {
				ok = ok || p.Prefix().Contains(as.IP)
			}
			if !ok {
				t.Errorf("%s is in no pool", as.IP)
			}
		}
		ips, err := a.IPsByHandle(ctx, h.handle)
		slices.SortFunc(ips, func(x, y Assigned) int { return x.IP.Compare(y.IP) })
		if err != nil || !slices.Equal(ips, h.as) {
			t.Errorf("handle %s lists %v (%v), want %v", h.handle, ips, err, h.as)
		}
	}
	stored := 0
	for _, b := range s.blocks {
		owned := 0
		for ord, al := range b.v.Allocations {
			if al == nil {
				continue
			}
			stored++
			if seen[b.v.addr(ord)] != al.Handle {
				t.Errorf("block %s holds %s for %s, which the test does not hold", b.v.CIDR, b.v.addr(ord), al.Handle)
			}
			if al.Node == b.v.Affinity {
				owned++
			}
		}
		if len(b.v.Free)+b.v.InUse() != len(b.v.Allocations) {
			t.Errorf("block %s: free list and allocations disagree", b.v.CIDR)
		}
		if strict && owned != b.v.InUse() {
			t.Errorf("strict affinity, yet block %s of %q lends %d of its %d addresses", b.v.CIDR, b.v.Affinity, b.v.InUse()-owned, b.v.InUse())
		}
	}
	// Affinities and block owners agree, and no node has more blocks of a family
	// than allowed.
	type nodeFamily struct {
		node string
		f    Family
	}
	perNode := map[nodeFamily]int{}
	for _, e := range s.affinities {
		perNode[nodeFamily{e.node, FamilyOf(e.cidr.Addr())}]++
		if e.af.v.State != affinityConfirmed {
			continue // a claim in progress; Check judges how old it is
		}
		i, found := slices.BinarySearchFunc(s.blocks, e.cidr, func(b *versioned[Block], c netip.Prefix) int { return b.v.CIDR.Addr().Compare(c.Addr()) })
		if !found || s.blocks[i].v.Affinity != e.node {
			t.Errorf("%s has a confirmed affinity to %s, whose block does not name it", e.node, e.cidr)
		}
	}
	for nf, n := range perNode {
		if n > api.DefaultMaxBlocksPerHost {
			t.Errorf("%s has %d %s block affinities, more than maxBlocksPerHost %d", nf.node, n, nf.f, api.DefaultMaxBlocksPerHost)
		}
	}
	if stored != addrs {
		t.Errorf("%d allocations stored, test holds %d", stored, addrs)
	}
	rep, err := a.Check(ctx, 0)
	if err != nil {
		t.Fatal(err)
	}
	// With no grace every pod allocation lacks a WorkloadEndpoint; nothing else may
	// be wrong.
	if len(rep.Leaked) != stored || len(rep.Unreferenced)+len(rep.OrphanHandles)+len(rep.BadAffinities) != 0 {
		t.Errorf("ipam check with no grace: %d leaked (want %d), unreferenced %v, orphan handles %v, bad affinities %v",
			len(rep.Leaked), stored, first(rep.Unreferenced), first(rep.OrphanHandles), first(rep.BadAffinities))
	}
	if rep2, err := a.Check(ctx, DefaultLeakGrace); err != nil || !rep2.Clean() {
		t.Errorf("ipam check is not clean (err %v): leaked %v", err, first(rep2.Leaked))
	}
	return rep
}

func newStore(t testing.TB, srv *etcdtest.Server) *datastore.Store {
	t.Helper()
	s, err := datastore.New(datastore.Config{Endpoints: srv.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func pool(name, cidr string) *api.IPPool {
	p := api.NewIPPool(name)
	p.Spec.CIDR = cidr
	return p
}

func mustCreate(t testing.TB, s *datastore.Store, r api.Resource) {
	t.Helper()
	if _, err := s.Create(context.Background(), r); err != nil {
		t.Fatal(err)
	}
}
