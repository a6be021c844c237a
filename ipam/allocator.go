// Package ipam is margay's block allocator. Pools are cut into blocks; a node claims
// blocks (affinity pending, then confirmed) and hands out addresses from them,
// borrowing from other nodes' blocks when strictAffinity is off. Every write is an
// etcd compare-and-swap transaction, so concurrent allocators on any number of
// nodes never hand out the same address twice.
package ipam

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sort"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// Defaults of Options.
const (
	DefaultReuseCooldown = 60 * time.Second
	DefaultMaxAttempts   = 100
	// pendingAffinityTimeout is how long a pending affinity without its block is
	// presumed to belong to a claim still in progress.
	pendingAffinityTimeout = 30 * time.Second
)

// Options tune an Allocator.
type Options struct {
	// ReuseCooldown keeps a freed address out of use for this long while other
	// addresses are free (Calico issue 6968).
	ReuseCooldown time.Duration
	// MaxAttempts bounds the compare-and-swap retries of one operation.
	MaxAttempts int
	Logger      *slog.Logger
	// Now is the clock; tests replace it.
	Now func() time.Time
}

// Allocator assigns and releases addresses. It caches what it read, so a
// long-lived allocator needs one etcd round trip per address in the steady state; the
// cache is only a hint, since every write is checked against etcd.
type Allocator struct {
	store *datastore.Store
	opts  Options
	mu    sync.Mutex
	nodes map[string]*nodeCache
}

// New returns an Allocator on store.
func New(store *datastore.Store, opts Options) *Allocator {
	if opts.ReuseCooldown == 0 {
		opts.ReuseCooldown = DefaultReuseCooldown
	}
	if opts.MaxAttempts == 0 {
		opts.MaxAttempts = DefaultMaxAttempts
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	return &Allocator{store: store, opts: opts, nodes: map[string]*nodeCache{}}
}

// Errors callers act on.
var (
	// ErrNoSpace: the eligible pools have no free address for this node.
	ErrNoSpace = errors.New("no free addresses")
	// ErrContention: too many concurrent writers; the caller may retry later.
	ErrContention = errors.New("too much contention in the IPAM datastore")
	// ErrHandleExists: AssignArgs.NewHandle was set and the handle holds addresses.
	ErrHandleExists = errors.New("handle already holds addresses")
	// ErrNotAllocated: release of an address that is not in use.
	ErrNotAllocated = errors.New("address is not allocated")
	// ErrUnknownNode: assignment for a node with no Node resource. Blocks are
	// claimed only for registered nodes, so that ipam check can tell a deleted
	// node's blocks from a live one's.
	ErrUnknownNode = errors.New("node is not registered")
)

// nodeCache is what one allocator knows of one node's IPAM state. Its mutex
// serialises this process's allocations for the node: they would otherwise only
// collide on the same block.
type nodeCache struct {
	mu     sync.Mutex
	name   string
	snap   *snapshot
	blocks map[netip.Prefix]*versioned[Block]
	taken  map[netip.Prefix]bool // CIDRs that have a block; nil: not read yet
}

// versioned is a decoded etcd value and its ModRevision (0: absent).
type versioned[T any] struct {
	v   *T
	rev int64
}

// affinity is the value at an affinity key.
type affinity struct {
	State   string    `json:"state"` // pending or confirmed
	Created time.Time `json:"created"`
}

const (
	affinityPending   = "pending"
	affinityConfirmed = "confirmed"
)

// snapshot is the configuration an assignment depends on, read in one transaction.
type snapshot struct {
	pools      []*api.IPPool
	poolRev    map[string]int64 // pool name -> ModRevision
	config     *api.IPAMConfiguration
	configRev  int64
	nodeLabels map[string]string
	nodeRev    int64
	affinities map[netip.Prefix]versioned[affinity]
	affRev     int64 // revision the affinities were listed at
}

// blocksOf counts the node's affinities of family f: maxBlocksPerHost caps each
// family, so that a dual-stack node has as many v4 blocks as a v4-only one.
func (s *snapshot) blocksOf(f Family) int {
	n := 0
	for c := range s.affinities {
		if FamilyOf(c.Addr()) == f {
			n++
		}
	}
	return n
}

// guards are the compares that make a write conditional on the snapshot's view of
// cidr's pool, the IPAM configuration and the node's labels still holding.
func (s *snapshot) guards(node string, cidr netip.Prefix) []clientv3.Cmp {
	p := poolOf(s.pools, cidr)
	return []clientv3.Cmp{
		revIs(datastore.ResourceKey(poolKind, p.Metadata.Name), s.poolRev[p.Metadata.Name]),
		revIs(configKey, s.configRev),
		revIs(datastore.ResourceKey(nodeKind, node), s.nodeRev),
	}
}

func (a *Allocator) node(name string) *nodeCache {
	a.mu.Lock()
	defer a.mu.Unlock()
	nc := a.nodes[name]
	if nc == nil {
		nc = &nodeCache{name: name, blocks: map[netip.Prefix]*versioned[Block]{}}
		a.nodes[name] = nc
	}
	return nc
}

var (
	poolKind   = api.KindOf((*api.IPPool)(nil))
	configKind = api.KindOf((*api.IPAMConfiguration)(nil))
	nodeKind   = api.KindOf((*api.Node)(nil))
	wepKind    = api.KindOf((*api.WorkloadEndpoint)(nil))
	configKey  = datastore.ResourceKey(configKind, api.IPAMConfigName)
)

// loadSnapshot reads pools, the IPAM configuration, the node and its affinities in
// one round trip.
func (a *Allocator) loadSnapshot(ctx context.Context, node string) (*snapshot, error) {
	resp, err := a.store.Txn(ctx, nil, []clientv3.Op{
		clientv3.OpGet(datastore.ResourcePrefix(poolKind), clientv3.WithPrefix()),
		clientv3.OpGet(configKey),
		clientv3.OpGet(datastore.ResourceKey(nodeKind, node)),
		clientv3.OpGet(datastore.AffinityPrefix(node), clientv3.WithPrefix()),
	}, nil)
	if err != nil {
		return nil, err
	}
	s := &snapshot{poolRev: map[string]int64{}, config: api.NewIPAMConfiguration(), affinities: map[netip.Prefix]versioned[affinity]{}, affRev: resp.Header.Revision}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		p, err := decodePool(kv)
		if err != nil {
			return nil, err
		}
		s.pools = append(s.pools, p.v)
		s.poolRev[p.v.Metadata.Name] = p.rev
	}
	sort.Slice(s.pools, func(i, j int) bool { return s.pools[i].Metadata.Name < s.pools[j].Metadata.Name })
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		if err := json.Unmarshal(kvs[0].Value, s.config); err != nil {
			return nil, fmt.Errorf("stored IPAM configuration is corrupt: %w", err)
		}
		s.config.SetDefaults()
		s.configRev = kvs[0].ModRevision
	}
	if kvs := resp.Responses[2].GetResponseRange().Kvs; len(kvs) > 0 {
		var n api.Node
		if err := json.Unmarshal(kvs[0].Value, &n); err == nil {
			s.nodeLabels = n.Metadata.Labels
		}
		s.nodeRev = kvs[0].ModRevision
	}
	for _, kv := range resp.Responses[3].GetResponseRange().Kvs {
		_, cidr, af, err := decodeAffinity(kv)
		if err != nil {
			return nil, err
		}
		s.affinities[cidr] = *af
	}
	return s, nil
}

// loadBlocks reads the given blocks into the cache in one round trip.
func (a *Allocator) loadBlocks(ctx context.Context, nc *nodeCache, cidrs []netip.Prefix) error {
	if len(cidrs) == 0 {
		return nil
	}
	ops := make([]clientv3.Op, len(cidrs))
	for i, c := range cidrs {
		ops[i] = clientv3.OpGet(datastore.BlockKey(c))
	}
	resp, err := a.store.Txn(ctx, nil, ops, nil)
	if err != nil {
		return err
	}
	for i, c := range cidrs {
		vb, err := decode[Block](only(resp.Responses[i].GetResponseRange().Kvs))
		if err != nil {
			return err
		}
		nc.blocks[c] = vb
	}
	return nil
}

// decode reads a stored JSON value and its ModRevision; a nil kv is an absent key.
func decode[T any](kv *mvccpb.KeyValue) (*versioned[T], error) {
	if kv == nil {
		return &versioned[T]{}, nil
	}
	v := new(T)
	if err := json.Unmarshal(kv.Value, v); err != nil {
		return nil, fmt.Errorf("stored value at %s is corrupt: %w", kv.Key, err)
	}
	return &versioned[T]{v, kv.ModRevision}, nil
}

// only returns the single result of a Get of one key, or nil.
func only(kvs []*mvccpb.KeyValue) *mvccpb.KeyValue {
	if len(kvs) == 0 {
		return nil
	}
	return kvs[0]
}

// decodePool reads a stored pool with its defaults applied.
func decodePool(kv *mvccpb.KeyValue) (*versioned[api.IPPool], error) {
	p, err := decode[api.IPPool](kv)
	if err == nil && p.v != nil {
		p.v.SetDefaults()
	}
	return p, err
}

// decodeAffinity reads an affinity and the node and block its key names.
func decodeAffinity(kv *mvccpb.KeyValue) (string, netip.Prefix, *versioned[affinity], error) {
	node, cidr, err := datastore.ParseAffinityKey(string(kv.Key))
	if err != nil {
		return "", netip.Prefix{}, nil, err
	}
	af, err := decode[affinity](kv)
	return node, cidr, af, err
}

func mustJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // our own plain structs always marshal
	}
	return string(b)
}

// revIs compares a key's ModRevision; rev 0 asserts the key is absent.
func revIs(key string, rev int64) clientv3.Cmp {
	return clientv3.Compare(clientv3.ModRevision(key), "=", rev)
}

// AffinityConfirmed reads an affinity key and value as a watcher sees them: the
// node, the block, and whether the claim is confirmed. A pending claim is not the
// node's yet, so it must not be advertised or routed.
func AffinityConfirmed(key string, value []byte) (node string, block netip.Prefix, confirmed bool, err error) {
	node, block, err = datastore.ParseAffinityKey(key)
	if err != nil {
		return "", netip.Prefix{}, false, err
	}
	var af affinity
	if err := json.Unmarshal(value, &af); err != nil {
		return "", netip.Prefix{}, false, fmt.Errorf("affinity %s: %w", key, err)
	}
	return node, block, af.State == affinityConfirmed, nil
}
