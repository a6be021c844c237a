package datastore

import (
	"bytes"
	"context"
	"log/slog"
	"strings"
	"testing"
	"time"
)

// A held key refuses another holder while its holder lives, lets the same holder
// take it again at once (a restart), and frees itself when the holder goes
// silent for the lease's TTL.
func TestHold(t *testing.T) {
	_, s := startStore(t)
	ctx := testCtx(t)
	key := AgentsPrefix + "node1"
	aCtx, stopA := context.WithCancel(ctx)
	if err := s.Hold(aCtx, key, "198.18.1.2", 2*time.Second, slog.Default()); err != nil {
		t.Fatal(err)
	}
	err := s.Hold(ctx, key, "198.18.1.9", 2*time.Second, slog.Default())
	if h, ok := err.(*HeldError); !ok || h.Holder != "198.18.1.2" {
		t.Fatalf("second holder: %v, want a HeldError naming 198.18.1.2", err)
	}
	time.Sleep(3 * time.Second) // longer than the TTL: the keep-alive must be working
	if err := s.Hold(ctx, key, "198.18.1.9", 2*time.Second, slog.Default()); !IsHeld(err) {
		t.Fatalf("after the TTL with the holder alive: %v, want held", err)
	}
	restartCtx, stopRestart := context.WithCancel(ctx)
	defer stopRestart()
	if err := s.Hold(restartCtx, key, "198.18.1.2", 2*time.Second, slog.Default()); err != nil {
		t.Fatalf("the same holder again: %v", err)
	}
	stopA()
	stopRestart()
	deadline := time.Now().Add(10 * time.Second)
	for {
		err := s.Hold(ctx, key, "198.18.1.9", 2*time.Second, slog.Default())
		if err == nil {
			break
		}
		if !IsHeld(err) || time.Now().After(deadline) {
			t.Fatalf("after the holder went away: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// A holder that stops cleanly (closes its Store) frees the key at once, not
// after the TTL, and its keeper stops rather than take the key again.
func TestHoldReleasedOnClose(t *testing.T) {
	srv, other := startStore(t)
	ctx := testCtx(t)
	key := AgentsPrefix + "node1"
	holder, err := New(Config{Endpoints: srv.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	var logged bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logged, nil))
	if err := holder.Hold(ctx, key, "198.18.1.2", 3*time.Second, log); err != nil {
		t.Fatal(err)
	}
	if err := other.Hold(ctx, key, "198.18.1.9", time.Minute, slog.Default()); !IsHeld(err) {
		t.Fatalf("while held: %v, want held", err)
	}
	holder.Close()
	if err := other.Hold(ctx, key, "198.18.1.9", time.Minute, slog.Default()); err != nil {
		t.Fatalf("right after the holder closed its Store: %v", err)
	}
	time.Sleep(2 * time.Second) // past the keeper's retry interval, ttl/3
	if logged.Len() > 0 {
		t.Errorf("the closed holder's keeper still runs:\n%s", logged.String())
	}
	if err := holder.Hold(ctx, key, "198.18.1.2", time.Minute, log); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("Hold on a closed Store: %v", err)
	}
}
