package datastore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// kv is what a handler mirrors of one key.
type kv struct {
	Value  string
	ModRev int64
}

// recorder is a Handler that mirrors the prefix and checks the syncer's promises
// as events arrive.
type recorder struct {
	mu          sync.Mutex
	state       map[string]kv
	delivered   map[string]map[int64]bool // key -> ModRevisions of delivered puts
	puts, dels  int
	syncs       int
	stateAtSync map[string]kv
	problems    []string
	onSync      func() // called (without the lock) on OnSync, if set
}

func newRecorder() *recorder {
	return &recorder{state: map[string]kv{}, delivered: map[string]map[int64]bool{}}
}

func (r *recorder) OnEvent(ev Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch ev.Type {
	case EventPut:
		r.puts++
		if r.delivered[ev.Key] == nil {
			r.delivered[ev.Key] = map[int64]bool{}
		}
		if r.delivered[ev.Key][ev.ModRevision] {
			r.problems = append(r.problems, fmt.Sprintf("duplicate put of %s at revision %d", ev.Key, ev.ModRevision))
		}
		r.delivered[ev.Key][ev.ModRevision] = true
		if old, ok := r.state[ev.Key]; ok && ev.ModRevision <= old.ModRev {
			r.problems = append(r.problems, fmt.Sprintf("put of %s at revision %d after revision %d", ev.Key, ev.ModRevision, old.ModRev))
		}
		r.state[ev.Key] = kv{string(ev.Value), ev.ModRevision}
	case EventDelete:
		r.dels++
		old, ok := r.state[ev.Key]
		switch {
		case !ok:
			r.problems = append(r.problems, fmt.Sprintf("delete of %s, which was not present", ev.Key))
		case old.ModRev != ev.ModRevision:
			r.problems = append(r.problems, fmt.Sprintf("delete of %s carries revision %d, the last delivered put was at %d", ev.Key, ev.ModRevision, old.ModRev))
		}
		if len(ev.Value) != 0 {
			r.problems = append(r.problems, fmt.Sprintf("delete of %s carries a value", ev.Key))
		}
		delete(r.state, ev.Key)
	default:
		r.problems = append(r.problems, fmt.Sprintf("unknown event type %v", ev.Type))
	}
}

func (r *recorder) OnSync() {
	r.mu.Lock()
	r.syncs++
	r.stateAtSync = maps.Clone(r.state)
	f := r.onSync
	r.mu.Unlock()
	if f != nil {
		f()
	}
}

func (r *recorder) snapshot() (state map[string]kv, syncs int, problems []string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.state), r.syncs, slices.Clone(r.problems)
}

// etcdState reads prefix from etcd.
func etcdState(ctx context.Context, s *Store, prefix string) (map[string]kv, error) {
	resp, err := s.Get(ctx, prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := map[string]kv{}
	for _, x := range resp.Kvs {
		out[string(x.Key)] = kv{string(x.Value), x.ModRevision}
	}
	return out, nil
}

// waitConverged waits until the recorder mirrors etcd's state of prefix exactly.
func waitConverged(t *testing.T, s *Store, rec *recorder, prefix, phase string) {
	t.Helper()
	ctx := testCtx(t)
	waitFor(t, 20*time.Second, "the syncer to converge "+phase, func() (bool, string) {
		want, err := etcdState(ctx, s, prefix)
		if err != nil {
			return false, err.Error()
		}
		got, _, _ := rec.snapshot()
		if maps.Equal(got, want) {
			return true, ""
		}
		return false, fmt.Sprintf("\nmirrored %v\netcd     %v", got, want)
	})
}

func checkRecorder(t *testing.T, rec *recorder) {
	t.Helper()
	_, syncs, problems := rec.snapshot()
	for _, p := range problems {
		t.Error(p)
	}
	if syncs != 1 {
		t.Errorf("OnSync called %d times, want exactly 1", syncs)
	}
}

// runSyncer runs y in a goroutine. The returned stop cancels it and checks that
// Run returned context.Canceled promptly; it also runs at cleanup.
func runSyncer(t *testing.T, y *Syncer) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- y.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if !errors.Is(err, context.Canceled) {
					t.Errorf("Syncer.Run returned %v after cancel, want context.Canceled", err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("Syncer.Run did not return within 10s of cancel")
			}
		})
	}
	t.Cleanup(stop)
	return stop
}

// logBuffer is a goroutine-safe sink for the syncer's log.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func put(t *testing.T, s *Store, key, val string) {
	t.Helper()
	if _, err := s.Txn(testCtx(t), nil, []clientv3.Op{clientv3.OpPut(key, val)}, nil); err != nil {
		t.Fatalf("put %s: %v", key, err)
	}
}

func del(t *testing.T, s *Store, key string) {
	t.Helper()
	if _, err := s.Txn(testCtx(t), nil, []clientv3.Op{clientv3.OpDelete(key)}, nil); err != nil {
		t.Fatalf("delete %s: %v", key, err)
	}
}

// compactNow compacts etcd's history up to its current revision.
func compactNow(t *testing.T, s *Store) int64 {
	t.Helper()
	ctx := testCtx(t)
	resp, err := s.Get(ctx, "/", clientv3.WithCountOnly())
	if err != nil {
		t.Fatal(err)
	}
	rev := resp.Header.Revision
	if err := s.Compact(ctx, rev); err != nil {
		t.Fatalf("compact at %d: %v", rev, err)
	}
	return rev
}

// TestSyncer follows a prefix through puts, updates, deletes, an etcd restart and a
// compaction, and checks that the handler mirrors etcd exactly, sees no duplicate
// and no phantom delete, and is told it is in sync exactly once.
func TestSyncer(t *testing.T) {
	// Mostly waiting: embedded etcd takes about 7 s to stop while a watch stream
	// is open (it waits for the stream up to its request timeout).
	t.Parallel()
	srv, w := startStore(t) // w writes
	prefix := Prefix + "test/"
	k := func(n string) string { return prefix + n }

	// Keys near the prefix that the syncer must ignore.
	put(t, w, Prefix+"testx/a", "outside")
	put(t, w, Prefix+"test", "outside")
	put(t, w, Prefix+"other/test/a", "outside")
	// Keys present before the syncer starts.
	put(t, w, k("a"), "a1")
	put(t, w, k("b"), "b1")
	put(t, w, k("c"), "c1")

	// The syncer has its own Store with a short request timeout, so it notices an
	// etcd outage quickly.
	r := newStore(t, Config{Endpoints: srv.Endpoints(), RequestTimeout: time.Second, DialTimeout: time.Second})
	rec := newRecorder()
	var logs logBuffer
	y := r.NewSyncer(prefix, rec, slog.New(slog.NewTextHandler(&logs, nil)))
	stop := runSyncer(t, y)

	waitFor(t, 10*time.Second, "OnSync", func() (bool, string) {
		_, syncs, _ := rec.snapshot()
		return syncs > 0, "not called"
	})
	waitConverged(t, w, rec, prefix, "after the initial list")
	rec.mu.Lock()
	if len(rec.stateAtSync) != 3 {
		t.Errorf("OnSync came with %d keys delivered, want the 3 listed before it: %v", len(rec.stateAtSync), rec.stateAtSync)
	}
	rec.mu.Unlock()

	// Live changes.
	put(t, w, k("d"), "d1")
	put(t, w, k("a"), "a2")
	put(t, w, k("a"), "a3")
	del(t, w, k("b"))
	put(t, w, k("b"), "b2") // re-created
	del(t, w, k("c"))
	del(t, w, k("never-existed")) // a delete of nothing must not reach the handler
	put(t, w, Prefix+"testx/a", "outside2")
	waitConverged(t, w, rec, prefix, "after live changes")

	// etcd restarts; the syncer carries on.
	t0 := time.Now()
	srv.Stop()
	t.Logf("%s: stopped", time.Since(t0))
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: restarted", time.Since(t0))
	put(t, w, k("a"), "a4")
	del(t, w, k("d"))
	put(t, w, k("e"), "e1")
	t.Logf("%s: restarted and written", time.Since(t0))
	waitConverged(t, w, rec, prefix, "after an etcd restart")
	t.Logf("%s: converged", time.Since(t0))

	// Another outage, then: write, compact at the latest revision and write
	// again. Whether the syncer's watch resumed before the compaction or gets
	// ErrCompacted and lists again, it must end up exact.
	srv.Stop()
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	put(t, w, k("f"), "f1")
	del(t, w, k("e"))
	put(t, w, k("b"), "b3")
	compactNow(t, w)
	put(t, w, k("g"), "g1")
	put(t, w, k("a"), "a5")
	t.Logf("%s: restarted, written and compacted", time.Since(t0))
	waitConverged(t, w, rec, prefix, "after an outage and a compaction")
	t.Logf("%s: converged", time.Since(t0))

	stop()
	checkRecorder(t, rec)
	// (a) is waitConverged above; now the end state explicitly.
	got, _, _ := rec.snapshot()
	want := map[string]string{k("a"): "a5", k("b"): "b3", k("f"): "f1", k("g"): "g1"}
	if len(got) != len(want) {
		t.Errorf("final mirror has keys %v, want %v", slices.Sorted(maps.Keys(got)), slices.Sorted(maps.Keys(want)))
	}
	for key, v := range want {
		if got[key].Value != v {
			t.Errorf("final mirror %s = %q, want %q", key, got[key].Value, v)
		}
	}
	t.Logf("syncer log:\n%s", logs.String())
}

// TestSyncerCompactedWhileListing makes the syncer's first watch start below the
// compaction revision, deterministically: the handler's OnSync blocks while the test
// changes the prefix and compacts. The watch must fail with ErrCompacted, and the
// syncer must list again and deliver only the difference.
func TestSyncerCompactedWhileListing(t *testing.T) {
	_, w := startStore(t)
	prefix := Prefix + "test/"
	k := func(n string) string { return prefix + n }
	for _, n := range []string{"a", "b", "c", "d"} {
		put(t, w, k(n), n+"1")
	}

	rec := newRecorder()
	entered, release := make(chan struct{}), make(chan struct{})
	rec.onSync = func() {
		close(entered)
		<-release
	}
	var logs logBuffer
	y := w.NewSyncer(prefix, rec, slog.New(slog.NewTextHandler(&logs, nil)))
	stop := runSyncer(t, y)

	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("OnSync was not called")
	}
	before, _, _ := rec.snapshot()
	put(t, w, k("a"), "a2")
	del(t, w, k("b"))
	put(t, w, k("e"), "e1")
	put(t, w, k("f"), "f1")
	del(t, w, k("f")) // created and deleted while the syncer was not looking
	compacted := compactNow(t, w)
	close(release)

	waitConverged(t, w, rec, prefix, "after the compaction")
	waitFor(t, 5*time.Second, "the compaction to be logged", func() (bool, string) {
		l := logs.String()
		return strings.Contains(l, "compacted"), l
	})
	stop()
	checkRecorder(t, rec)

	rec.mu.Lock()
	defer rec.mu.Unlock()
	// Only the difference was delivered: 4 initial puts, then a2 and e1, and one
	// delete (b); f never reaches the handler, c and d are not re-delivered.
	if rec.puts != 6 || rec.dels != 1 {
		t.Errorf("delivered %d puts and %d deletes, want 6 and 1", rec.puts, rec.dels)
	}
	if rec.delivered[k("f")] != nil {
		t.Errorf("f, created and deleted while compacted away, was delivered")
	}
	if len(before) != 4 {
		t.Errorf("at OnSync %d keys were delivered, want 4", len(before))
	}
	t.Logf("compacted at %d; log:\n%s", compacted, logs.String())
}

// TestSyncerWatchCompacted checks the watch itself: started below the compaction
// revision it returns ErrCompacted rather than silently skipping history.
func TestSyncerWatchCompacted(t *testing.T) {
	_, s := startStore(t)
	prefix := Prefix + "test/"
	put(t, s, prefix+"a", "1")
	resp, err := s.Get(testCtx(t), prefix, clientv3.WithPrefix())
	if err != nil {
		t.Fatal(err)
	}
	put(t, s, prefix+"a", "2")
	put(t, s, prefix+"a", "3")
	compactNow(t, s)

	y := s.NewSyncer(prefix, newRecorder(), nil)
	err = y.watch(testCtx(t), resp.Header.Revision)
	if !errors.Is(err, rpctypes.ErrCompacted) {
		t.Errorf("watch from a compacted revision returned %v, want ErrCompacted", err)
	}
}

// TestSyncerCancelWhileUnavailable checks that Run returns promptly on cancel even
// when etcd never answered.
func TestSyncerCancelWhileUnavailable(t *testing.T) {
	t.Parallel()
	s := newStore(t, Config{Endpoints: []string{"http://127.0.0.1:1"}, RequestTimeout: 200 * time.Millisecond, DialTimeout: 200 * time.Millisecond})
	rec := newRecorder()
	y := s.NewSyncer(Prefix+"test/", rec, slog.New(slog.DiscardHandler))
	stop := runSyncer(t, y)
	time.Sleep(700 * time.Millisecond) // a few failed lists and backoffs
	start := time.Now()
	stop()
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("Run took %s to return after cancel", d)
	}
	if _, syncs, _ := rec.snapshot(); syncs != 0 {
		t.Errorf("OnSync called %d times without etcd", syncs)
	}
}
