package agent

import (
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/ipam"
)

// view is the agent's in-memory copy of what it watches in etcd. Syncers write
// it; the reconcile loop reads consistent snapshots of it.
type view struct {
	mu       sync.Mutex
	node     string
	pools    map[string]*api.IPPool
	nodes    map[string]*api.Node
	configs  map[string]*api.BGPConfiguration
	peers    map[string]*api.BGPPeer
	eps      map[string]*api.WorkloadEndpoint // every node's
	blocks   map[netip.Prefix]string          // confirmed affinities: block -> node
	policies map[string]*api.NetworkPolicy
	globals  map[string]*api.GlobalNetworkPolicy
	tiers    map[string]*api.Tier
	synced   map[string]bool
	watchers int
	kick     func()
	log      *slog.Logger
}

func newView(node string, kick func(), log *slog.Logger) *view {
	return &view{node: node, pools: map[string]*api.IPPool{}, nodes: map[string]*api.Node{},
		configs: map[string]*api.BGPConfiguration{}, peers: map[string]*api.BGPPeer{},
		eps: map[string]*api.WorkloadEndpoint{}, blocks: map[netip.Prefix]string{},
		policies: map[string]*api.NetworkPolicy{}, globals: map[string]*api.GlobalNetworkPolicy{}, tiers: map[string]*api.Tier{},
		synced: map[string]bool{}, kick: kick, log: log}
}

// handler feeds one syncer's events into the view.
type handler struct {
	v      *view
	prefix string
	event  func(datastore.Event) // called with v.mu held
}

func (h *handler) OnEvent(ev datastore.Event) {
	h.v.mu.Lock()
	h.event(ev)
	h.v.mu.Unlock()
	h.v.kick()
}

func (h *handler) OnSync() {
	h.v.mu.Lock()
	h.v.synced[h.prefix] = true
	h.v.mu.Unlock()
	h.v.kick()
}

// resourceHandler keeps a map of one kind's resources up to date.
func resourceHandler[R api.Resource](v *view, m map[string]R, keep func(R) bool) *handler {
	k := api.KindOf(*new(R))
	prefix := datastore.ResourcePrefix(k)
	v.watchers++
	return &handler{v: v, prefix: prefix, event: func(ev datastore.Event) {
		name := strings.TrimPrefix(ev.Key, prefix)
		if ev.Type == datastore.EventDelete {
			delete(m, name)
			return
		}
		r, err := datastore.DecodeEvent(k, ev)
		if err != nil {
			v.log.Error("ignoring a resource that does not decode", "key", ev.Key, "err", err)
			delete(m, name)
			return
		}
		if rr := r.(R); keep == nil || keep(rr) {
			m[name] = rr
		} else {
			delete(m, name)
		}
	}}
}

// handlers are the syncers' handlers for everything the agent watches.
func (v *view) handlers() []*handler {
	hs := []*handler{
		resourceHandler(v, v.pools, nil),
		resourceHandler(v, v.nodes, nil),
		resourceHandler(v, v.configs, nil),
		resourceHandler(v, v.peers, nil),
		// Every node's endpoints and affinities: a path inside a pool is
		// followed only towards the node that owns its prefix, and policy
		// selectors match endpoints on any node.
		resourceHandler(v, v.eps, nil),
		resourceHandler(v, v.policies, nil),
		resourceHandler(v, v.globals, nil),
		resourceHandler(v, v.tiers, nil),
	}
	v.watchers++
	hs = append(hs, &handler{v: v, prefix: datastore.AffinitiesPrefix, event: func(ev datastore.Event) {
		node, block, err := datastore.ParseAffinityKey(ev.Key)
		if err != nil {
			return
		}
		confirmed := false
		if ev.Type != datastore.EventDelete {
			if _, _, confirmed, err = ipam.AffinityConfirmed(ev.Key, ev.Value); err != nil {
				v.log.Error("ignoring an affinity that does not decode", "key", ev.Key, "err", err)
			}
		}
		switch {
		case confirmed:
			v.blocks[block] = node
		case v.blocks[block] == node:
			delete(v.blocks, block)
		}
	}})
	return hs
}

// snapshot is what one reconcile works from.
type snapshot struct {
	synced  bool
	self    *api.Node
	pools   []*api.IPPool
	nodes   []*api.Node
	configs map[string]*api.BGPConfiguration
	peers   []*api.BGPPeer
	eps     []calc.Endpoint // this node's
	blocks  []netip.Prefix  // this node's
	owners  calc.Owners
	policy  calc.Policy
}

func (v *view) snapshot() snapshot {
	v.mu.Lock()
	defer v.mu.Unlock()
	s := snapshot{synced: len(v.synced) == v.watchers, self: v.nodes[v.node], configs: map[string]*api.BGPConfiguration{}}
	s.pools = sortedValues(v.pools)
	s.nodes = sortedValues(v.nodes)
	s.peers = sortedValues(v.peers)
	for k, c := range v.configs {
		s.configs[k] = c
	}
	s.owners = calc.Owners{Blocks: make(map[netip.Prefix]string, len(v.blocks)), Pods: make(map[netip.Addr]string, len(v.eps))}
	s.policy = calc.Policy{Tiers: sortedValues(v.tiers), Policies: sortedValues(v.policies), Globals: sortedValues(v.globals)}
	s.policy.Endpoints = sortedValues(v.eps)
	for _, w := range s.policy.Endpoints {
		ep := calc.Endpoint{Name: w.Metadata.Name, Interface: w.Spec.InterfaceName}
		for _, n := range w.Spec.IPNetworks {
			if p, err := netip.ParsePrefix(n); err == nil {
				ep.IPs = append(ep.IPs, p)
				s.owners.Pods[p.Addr()] = w.Spec.Node
			}
		}
		if w.Spec.Node == v.node {
			s.eps = append(s.eps, ep)
		}
	}
	for b, n := range v.blocks {
		s.owners.Blocks[b] = n
		if n == v.node {
			s.blocks = append(s.blocks, b)
		}
	}
	return s
}

func sortedValues[R any](m map[string]R) []R {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	out := make([]R, 0, len(m))
	for _, k := range keys {
		out = append(out, m[k])
	}
	return out
}
