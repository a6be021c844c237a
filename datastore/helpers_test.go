package datastore

import (
	"context"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/etcdtest"
)

// startStore starts a real embedded etcd for the test and a Store connected to it.
// Both are closed when the test ends (the Store first).
func startStore(t *testing.T) (*etcdtest.Server, *Store) {
	t.Helper()
	srv := etcdtest.StartT(t)
	return srv, newStore(t, Config{Endpoints: srv.Endpoints()})
}

// newStore connects a Store and closes it when the test ends.
func newStore(t *testing.T, cfg Config) *Store {
	t.Helper()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New(%+v): %v", cfg, err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// testCtx is a context bounded well below the test binary's timeout, so a hang
// shows up as a failure of the test that hung.
func testCtx(t *testing.T) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 45*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond every 10 ms until it holds or the deadline passes; on timeout
// it fails the test with the last description cond returned.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		ok, desc := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s: %s", timeout, what, desc)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
