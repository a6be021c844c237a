package datastore

import (
	"context"
	"log/slog"
	"math/rand/v2"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/api"
)

// EventType says what happened to a key.
type EventType int

// Event types.
const (
	EventPut EventType = iota
	EventDelete
)

func (t EventType) String() string {
	if t == EventDelete {
		return "delete"
	}
	return "put"
}

// Event is one change to one key. For a delete, Value is empty and ModRevision is
// the last revision the syncer saw the key at.
type Event struct {
	Type        EventType
	Key         string
	Value       []byte
	ModRevision int64
}

// Handler receives a syncer's output. Events come in revision order for one key;
// OnSync is called once, after the first full listing has been delivered.
type Handler interface {
	OnEvent(Event)
	OnSync()
}

// Syncer mirrors a key prefix: it lists, then watches from the listed revision. When
// the watch breaks (etcd restart, lost leader, compaction) it lists again and emits
// only the difference from what it already delivered, so a handler sees every change
// exactly once and never a duplicate.
type Syncer struct {
	store   *Store
	prefix  string
	handler Handler
	seen    map[string]int64 // key -> ModRevision delivered
	log     *slog.Logger
	synced  bool
}

// NewSyncer returns a syncer of prefix that calls h from Run's goroutine.
func (s *Store) NewSyncer(prefix string, h Handler, log *slog.Logger) *Syncer {
	if log == nil {
		log = slog.Default()
	}
	return &Syncer{store: s, prefix: prefix, handler: h, seen: map[string]int64{}, log: log.With("prefix", prefix)}
}

// Run syncs until ctx is done, then returns ctx's error.
func (y *Syncer) Run(ctx context.Context) error {
	backoff := 100 * time.Millisecond
	for {
		rev, err := y.resync(ctx)
		if err == nil {
			started := time.Now()
			err = y.watch(ctx, rev)
			if time.Since(started) > 10*time.Second {
				backoff = 100 * time.Millisecond // it worked for a while: not a tight failure loop
			}
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		y.log.Warn("datastore sync interrupted; listing again", "err", err, "retryIn", backoff)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff + rand.N(backoff/2)):
		}
		backoff = min(backoff*2, 5*time.Second)
	}
}

// resync lists the prefix and emits the difference from what was delivered.
func (y *Syncer) resync(ctx context.Context) (int64, error) {
	resp, err := y.store.Get(ctx, y.prefix, clientv3.WithPrefix())
	if err != nil {
		return 0, err
	}
	present := make(map[string]bool, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		present[k] = true
		y.put(k, kv.Value, kv.ModRevision)
	}
	for k, rev := range y.seen {
		if !present[k] {
			delete(y.seen, k)
			y.handler.OnEvent(Event{Type: EventDelete, Key: k, ModRevision: rev})
		}
	}
	if !y.synced {
		y.synced = true
		y.handler.OnSync()
	}
	return resp.Header.Revision, nil
}

func (y *Syncer) put(key string, value []byte, modRev int64) {
	if y.seen[key] == modRev {
		return
	}
	y.seen[key] = modRev
	y.handler.OnEvent(Event{Type: EventPut, Key: key, Value: value, ModRevision: modRev})
}

// watch follows changes after rev until the watch breaks.
func (y *Syncer) watch(ctx context.Context, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range y.store.client.Watch(wctx, y.prefix, clientv3.WithPrefix(), clientv3.WithRev(rev+1)) {
		if err := wr.Err(); err != nil {
			return err
		}
		for _, ev := range wr.Events {
			k := string(ev.Kv.Key)
			switch ev.Type {
			case clientv3.EventTypePut:
				y.put(k, ev.Kv.Value, ev.Kv.ModRevision)
			case clientv3.EventTypeDelete:
				if last, ok := y.seen[k]; ok {
					delete(y.seen, k)
					y.handler.OnEvent(Event{Type: EventDelete, Key: k, ModRevision: last})
				}
			}
		}
	}
	return ctx.Err()
}

// DecodeEvent reads a put event on a resource key of kind k.
func DecodeEvent(k api.KindInfo, ev Event) (api.Resource, error) {
	return decodeKV(k, ev.Value, ev.ModRevision)
}
