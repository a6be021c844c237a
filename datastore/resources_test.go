package datastore

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/margay-dev/margay/api"
)

var poolKind = api.KindOf(api.NewIPPool(""))

func newPool(name, cidr string) *api.IPPool {
	p := api.NewIPPool(name)
	p.Spec.CIDR = cidr
	return p
}

// modRevision reads the raw etcd ModRevision of key, or fails the test.
func modRevision(t *testing.T, s *Store, key string) int64 {
	t.Helper()
	resp, err := s.Get(testCtx(t), key)
	if err != nil {
		t.Fatalf("get %s: %v", key, err)
	}
	if len(resp.Kvs) != 1 {
		t.Fatalf("get %s: %d keys, want 1", key, len(resp.Kvs))
	}
	return resp.Kvs[0].ModRevision
}

func rvInt(t *testing.T, r api.Resource) int64 {
	t.Helper()
	rv := r.GetMetadata().ResourceVersion
	n, err := strconv.ParseInt(rv, 10, 64)
	if err != nil || n <= 0 {
		t.Fatalf("%s: resourceVersion %q is not a positive number", api.Ref(r), rv)
	}
	return n
}

func TestCRUD(t *testing.T) {
	_, s := startStore(t)
	ctx := testCtx(t)
	key := ResourceKey(poolKind, "p1")

	// Create.
	created, err := s.Create(ctx, newPool("p1", "10.244.0.0/16"))
	if err != nil {
		t.Fatalf("create p1: %v", err)
	}
	createdRV := rvInt(t, created)
	if got := modRevision(t, s, key); got != createdRV {
		t.Errorf("create returned resourceVersion %d, etcd ModRevision is %d", createdRV, got)
	}

	// Get: defaults applied, resourceVersion is the ModRevision.
	got, err := Get[*api.IPPool](ctx, s, "p1")
	if err != nil {
		t.Fatalf("get p1: %v", err)
	}
	want := newPool("p1", "10.244.0.0/16")
	want.Spec.BlockSize = 26
	want.Spec.IPIPMode = api.EncapNever
	want.Spec.VXLANMode = api.EncapNever
	want.Spec.NodeSelector = "all()"
	want.Metadata.ResourceVersion = strconv.FormatInt(createdRV, 10)
	if fmt.Sprintf("%+v", got) != fmt.Sprintf("%+v", want) {
		t.Errorf("get p1:\n got  %+v\n want %+v", got, want)
	}

	// The resourceVersion is not stored in the value: it is the ModRevision.
	resp, err := s.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	var raw map[string]any
	if err := json.Unmarshal(resp.Kvs[0].Value, &raw); err != nil {
		t.Fatalf("stored value is not JSON: %v: %s", err, resp.Kvs[0].Value)
	}
	if raw["apiVersion"] != api.APIVersion || raw["kind"] != api.KindIPPool {
		t.Errorf("stored value lacks apiVersion/kind: %s", resp.Kvs[0].Value)
	}
	if md, _ := raw["metadata"].(map[string]any); md["resourceVersion"] != nil {
		t.Errorf("stored value carries a resourceVersion: %s", resp.Kvs[0].Value)
	}

	// Create again: already exists.
	_, err = s.Create(ctx, newPool("p1", "10.244.0.0/16"))
	if !errors.Is(err, ErrAlreadyExists) {
		t.Fatalf("second create of p1: err = %v, want ErrAlreadyExists", err)
	}
	if !strings.Contains(err.Error(), `"p1"`) {
		t.Errorf("already-exists error does not name the pool: %v", err)
	}

	// Update with the current resourceVersion: works and bumps it.
	upd := *got
	upd.Spec.NATOutgoing = true
	updated, err := s.Update(ctx, &upd)
	if err != nil {
		t.Fatalf("update p1 at its current resourceVersion: %v", err)
	}
	updatedRV := rvInt(t, updated)
	if updatedRV <= createdRV {
		t.Errorf("update: resourceVersion %d did not grow past %d", updatedRV, createdRV)
	}
	if got := modRevision(t, s, key); got != updatedRV {
		t.Errorf("update returned resourceVersion %d, etcd ModRevision is %d", updatedRV, got)
	}
	if g, err := Get[*api.IPPool](ctx, s, "p1"); err != nil || !g.Spec.NATOutgoing || g.Metadata.ResourceVersion != updated.GetMetadata().ResourceVersion {
		t.Errorf("get after update = %+v, %v; want natOutgoing and resourceVersion %d", g, err, updatedRV)
	}

	// Update with the stale resourceVersion: a conflict that says what to do.
	stale := *got // still at createdRV
	stale.Spec.Disabled = true
	_, err = s.Update(ctx, &stale)
	if !errors.Is(err, ErrConflict) {
		t.Fatalf("update at stale resourceVersion: err = %v, want ErrConflict", err)
	}
	var ce *ConflictError
	if !errors.As(err, &ce) || ce.Expected != strconv.FormatInt(createdRV, 10) || ce.Actual != strconv.FormatInt(updatedRV, 10) {
		t.Errorf("conflict error = %#v, want Expected %d Actual %d", ce, createdRV, updatedRV)
	}
	for _, w := range []string{"stale", "get it again"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("conflict message %q does not say %q", err, w)
		}
	}
	if g, _ := Get[*api.IPPool](ctx, s, "p1"); g.Spec.Disabled {
		t.Errorf("the stale update was stored")
	}

	// Update without a resourceVersion.
	norv := *got
	norv.Metadata.ResourceVersion = ""
	if _, err = s.Update(ctx, &norv); err == nil || !strings.Contains(err.Error(), "resourceVersion") {
		t.Errorf("update without resourceVersion: err = %v, want an error about resourceVersion", err)
	}

	// Update of a pool that does not exist.
	ghost := newPool("ghost", "10.99.0.0/16")
	ghost.Metadata.ResourceVersion = "5"
	if _, err = s.Update(ctx, ghost); !errors.Is(err, ErrNotFound) {
		t.Errorf("update of a missing pool: err = %v, want ErrNotFound", err)
	}

	// Delete with a stale or malformed resourceVersion.
	if _, err = s.Delete(ctx, poolKind, "p1", strconv.FormatInt(createdRV, 10)); !errors.Is(err, ErrConflict) {
		t.Fatalf("delete at stale resourceVersion: err = %v, want ErrConflict", err)
	}
	if _, err = s.Delete(ctx, poolKind, "p1", "abc"); err == nil || errors.Is(err, ErrNotFound) {
		t.Errorf("delete with resourceVersion abc: err = %v, want a bad-resourceVersion error", err)
	}
	if _, err := Get[*api.IPPool](ctx, s, "p1"); err != nil {
		t.Fatalf("p1 is gone after failed deletes: %v", err)
	}

	// Delete at the current resourceVersion returns the deleted object.
	deleted, err := s.Delete(ctx, poolKind, "p1", updated.GetMetadata().ResourceVersion)
	if err != nil {
		t.Fatalf("delete p1: %v", err)
	}
	dp, ok := deleted.(*api.IPPool)
	if !ok || dp.Metadata.Name != "p1" || dp.Spec.CIDR != "10.244.0.0/16" || !dp.Spec.NATOutgoing ||
		dp.Metadata.ResourceVersion != updated.GetMetadata().ResourceVersion {
		t.Errorf("delete returned %+v, want p1 as last stored (resourceVersion %d)", deleted, updatedRV)
	}

	// Gone.
	if _, err := Get[*api.IPPool](ctx, s, "p1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("get after delete: err = %v, want ErrNotFound", err)
	}
	if _, err := s.Delete(ctx, poolKind, "p1", ""); !errors.Is(err, ErrNotFound) {
		t.Errorf("second delete: err = %v, want ErrNotFound", err)
	}
	if _, err := s.Delete(ctx, poolKind, "p1", updated.GetMetadata().ResourceVersion); !errors.Is(err, ErrNotFound) {
		t.Errorf("second delete with resourceVersion: err = %v, want ErrNotFound", err)
	}
	// The name is free again.
	if _, err := s.Create(ctx, newPool("p1", "10.244.0.0/16")); err != nil {
		t.Errorf("create p1 after delete: %v", err)
	}
	// Delete without a resourceVersion deletes whatever is stored.
	if _, err := s.Delete(ctx, poolKind, "p1", ""); err != nil {
		t.Errorf("unconditional delete: %v", err)
	}
}

func TestList(t *testing.T) {
	_, s := startStore(t)
	ctx := testCtx(t)

	if pools, err := List[*api.IPPool](ctx, s); err != nil || len(pools) != 0 {
		t.Fatalf("list of no pools = %v, %v; want empty", pools, err)
	}
	for _, p := range []*api.IPPool{
		newPool("pool-c", "10.3.0.0/16"),
		newPool("pool-a", "10.1.0.0/16"),
		newPool("pool-b", "10.2.0.0/16"),
		newPool("a-first", "10.4.0.0/16"),
	} {
		if _, err := s.Create(ctx, p); err != nil {
			t.Fatalf("create %s: %v", p.Metadata.Name, err)
		}
	}
	// Another kind, which List[*api.IPPool] must not return.
	if _, err := s.Create(ctx, api.NewNode("node1")); err != nil {
		t.Fatalf("create node: %v", err)
	}

	pools, err := List[*api.IPPool](ctx, s)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, p := range pools {
		names = append(names, p.Metadata.Name)
		if p.Spec.BlockSize != 26 || p.Metadata.ResourceVersion == "" {
			t.Errorf("listed %s without defaults or resourceVersion: %+v", p.Metadata.Name, p)
		}
		if rv := rvInt(t, p); rv != modRevision(t, s, ResourceKey(poolKind, p.Metadata.Name)) {
			t.Errorf("listed %s at resourceVersion %d, not its ModRevision", p.Metadata.Name, rv)
		}
	}
	if want := []string{"a-first", "pool-a", "pool-b", "pool-c"}; !slices.Equal(names, want) {
		t.Errorf("List = %v, want %v", names, want)
	}

	nodes, err := List[*api.Node](ctx, s)
	if err != nil || len(nodes) != 1 || nodes[0].Metadata.Name != "node1" {
		t.Errorf("List[*api.Node] = %v, %v; want [node1]", nodes, err)
	}
}

func TestValidation(t *testing.T) {
	_, s := startStore(t)
	ctx := testCtx(t)

	p1, err := s.Create(ctx, newPool("p1", "10.244.0.0/16"))
	if err != nil {
		t.Fatal(err)
	}

	bad := newPool("small-blocks", "10.10.0.0/16")
	bad.Spec.BlockSize = 19
	noName := newPool("", "10.11.0.0/16")
	linkLocal := newPool("ll", "169.254.0.0/16")
	for _, tc := range []struct {
		name   string
		pool   *api.IPPool
		field  string
		detail string // a fragment of the message
	}{
		{"blockSize 19", bad, "spec.blockSize", "out of range"},
		{"no name", noName, "metadata.name", "required"},
		{"link-local", linkLocal, "spec.cidr", "169.254"},
		{"overlaps p1 from inside", newPool("p2", "10.244.128.0/17"), "spec.cidr", `overlaps IPPool "p1" (10.244.0.0/16)`},
		{"overlaps p1 from outside", newPool("p3", "10.0.0.0/8"), "spec.cidr", `overlaps IPPool "p1"`},
		{"same cidr as p1", newPool("p4", "10.244.0.0/16"), "spec.cidr", `overlaps IPPool "p1"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := s.Create(ctx, tc.pool)
			var ve *api.ValidationError
			if !errors.As(err, &ve) {
				t.Fatalf("create: err = %v (%T), want *api.ValidationError", err, err)
			}
			found := false
			for _, f := range ve.Fields {
				found = found || (f.Field == tc.field && strings.Contains(f.Error(), tc.detail))
			}
			if !found {
				t.Errorf("error %q has no %s field error mentioning %q", err, tc.field, tc.detail)
			}
			if tc.pool.Metadata.Name != "" {
				if _, err := s.GetResource(ctx, poolKind, tc.pool.Metadata.Name); !errors.Is(err, ErrNotFound) {
					t.Errorf("rejected pool was stored (get: %v)", err)
				}
			}
		})
	}

	// A pool next to p1 is fine.
	if _, err := s.Create(ctx, newPool("p5", "10.245.0.0/16")); err != nil {
		t.Errorf("create non-overlapping p5: %v", err)
	}

	// Immutable fields on update.
	for _, tc := range []struct {
		name   string
		change func(p *api.IPPool)
		field  string
	}{
		{"cidr", func(p *api.IPPool) { p.Spec.CIDR = "10.244.0.0/17" }, "spec.cidr"},
		{"blockSize", func(p *api.IPPool) { p.Spec.BlockSize = 28 }, "spec.blockSize"},
	} {
		t.Run("immutable "+tc.name, func(t *testing.T) {
			cur, err := Get[*api.IPPool](ctx, s, "p1")
			if err != nil {
				t.Fatal(err)
			}
			tc.change(cur)
			_, err = s.Update(ctx, cur)
			var ve *api.ValidationError
			if !errors.As(err, &ve) || !strings.Contains(err.Error(), tc.field) || !strings.Contains(err.Error(), "immutable") {
				t.Fatalf("update changing %s: err = %v, want a ValidationError saying %s is immutable", tc.name, err, tc.field)
			}
			if got := rvInt(t, mustGet(t, s, "p1")); strconv.FormatInt(got, 10) != p1.GetMetadata().ResourceVersion {
				t.Errorf("rejected update changed p1's resourceVersion to %d", got)
			}
		})
	}

	// A manifest as people write it, without the defaulted fields, updates fine:
	// an omitted blockSize is the default, not an attempt to change it.
	t.Run("update omitting defaulted fields", func(t *testing.T) {
		cur := mustGet(t, s, "p1")
		m := newPool("p1", "10.244.0.0/16")
		m.Spec.NATOutgoing = true
		m.Metadata.ResourceVersion = cur.Metadata.ResourceVersion
		if _, err := s.Update(ctx, m); err != nil {
			t.Fatalf("update without blockSize: %v", err)
		}
		got := mustGet(t, s, "p1")
		if got.Spec.BlockSize != 26 || !got.Spec.NATOutgoing {
			t.Errorf("after update p1 = %+v, want blockSize 26 and natOutgoing", got.Spec)
		}
	})

	// An update that is itself invalid is rejected by Validate.
	cur := mustGet(t, s, "p1")
	cur.Spec.IPIPMode = api.EncapAlways
	cur.Spec.VXLANMode = api.EncapAlways
	var ve *api.ValidationError
	if _, err := s.Update(ctx, cur); !errors.As(err, &ve) {
		t.Errorf("update enabling both IPIP and VXLAN: err = %v, want *api.ValidationError", err)
	}
	// A valid update of p1 does not trip over p1 itself in the overlap check.
	cur = mustGet(t, s, "p1")
	cur.Spec.IPIPMode = api.EncapCrossSubnet
	if _, err := s.Update(ctx, cur); err != nil {
		t.Errorf("valid update of p1: %v", err)
	}
}

func mustGet(t *testing.T, s *Store, name string) *api.IPPool {
	t.Helper()
	p, err := Get[*api.IPPool](testCtx(t), s, name)
	if err != nil {
		t.Fatalf("get %s: %v", name, err)
	}
	return p
}

// TestConcurrentOverlappingCreates races creates of mutually overlapping pools. The
// overlap check reads the pools at one revision and the write is conditional on no
// pool having changed since, so whatever the interleaving, the stored pools never
// overlap.
func TestConcurrentOverlappingCreates(t *testing.T) {
	_, s := startStore(t)
	ctx := testCtx(t)
	cidrs := []string{
		"10.0.0.0/16", "10.0.0.0/17", "10.0.128.0/17", "10.0.0.0/18",
		"10.0.64.0/18", "10.0.128.0/18", "10.0.192.0/18", "10.0.0.0/15",
	}
	// Each goroutine uses its own Store, so the creates really travel in parallel
	// over separate connections.
	stores := make([]*Store, len(cidrs))
	for i := range stores {
		stores[i] = newStore(t, Config{Endpoints: s.Endpoints()})
		if err := stores[i].Ping(ctx); err != nil {
			t.Fatal(err)
		}
	}
	const rounds = 5
	for round := range rounds {
		start := make(chan struct{})
		errs := make([]error, len(cidrs))
		var wg sync.WaitGroup
		for i, cidr := range cidrs {
			wg.Go(func() {
				<-start
				_, errs[i] = stores[i].Create(ctx, newPool(fmt.Sprintf("r%d-p%d", round, i), cidr))
			})
		}
		close(start)
		wg.Wait()

		stored, err := List[*api.IPPool](ctx, s)
		if err != nil {
			t.Fatal(err)
		}
		succeeded := map[string]bool{}
		for i, err := range errs {
			name := fmt.Sprintf("r%d-p%d", round, i)
			var ve *api.ValidationError
			switch {
			case err == nil:
				succeeded[name] = true
			case errors.As(err, &ve) && strings.Contains(err.Error(), "overlaps"):
			case strings.Contains(err.Error(), "kept changing"):
				// Retries exhausted: allowed, the pool was not stored.
			default:
				t.Errorf("round %d: create %s (%s): unexpected error %v", round, name, cidrs[i], err)
			}
		}
		if len(succeeded) == 0 {
			t.Errorf("round %d: no create succeeded", round)
		}
		for i, p := range stored {
			if !succeeded[p.Metadata.Name] {
				t.Errorf("round %d: %s (%s) is stored but its create failed", round, p.Metadata.Name, p.Spec.CIDR)
			}
			for _, q := range stored[i+1:] {
				if netip.MustParsePrefix(p.Spec.CIDR).Overlaps(netip.MustParsePrefix(q.Spec.CIDR)) {
					t.Errorf("round %d: stored pools %s (%s) and %s (%s) overlap", round, p.Metadata.Name, p.Spec.CIDR, q.Metadata.Name, q.Spec.CIDR)
				}
			}
		}
		if len(stored) != len(succeeded) {
			t.Errorf("round %d: %d pools stored, %d creates succeeded", round, len(stored), len(succeeded))
		}
		t.Logf("round %d: stored %d pools: %v", round, len(stored), poolCIDRs(stored))
		for _, p := range stored {
			if _, err := s.Delete(ctx, poolKind, p.Metadata.Name, ""); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func poolCIDRs(ps []*api.IPPool) []string {
	var out []string
	for _, p := range ps {
		out = append(out, p.Spec.CIDR)
	}
	return out
}

// A value that is not a resource is reported as corrupt, naming the key, and is
// not mistaken for a missing resource.
func TestCorruptValue(t *testing.T) {
	_, s := startStore(t)
	ctx := testCtx(t)
	if _, err := s.Create(ctx, newPool("good", "10.1.0.0/16")); err != nil {
		t.Fatal(err)
	}
	put(t, s, ResourceKey(poolKind, "bad"), "{not json")

	_, err := Get[*api.IPPool](ctx, s, "bad")
	if err == nil || errors.Is(err, ErrNotFound) || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("get of a corrupt value: err = %v, want a corrupt-value error", err)
	}
	_, err = List[*api.IPPool](ctx, s)
	if err == nil || !strings.Contains(err.Error(), ResourceKey(poolKind, "bad")) {
		t.Errorf("list with a corrupt value: err = %v, want an error naming the key", err)
	}
}
