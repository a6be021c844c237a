package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/datastore"
)

// Handle ID forms whose owner check can judge.
const (
	PodHandlePrefix = "k8s-pod-network."
)

// DefaultLeakGrace is how old an allocation must be before check calls it leaked:
// a pod's address is assigned before its WorkloadEndpoint is written.
const DefaultLeakGrace = 15 * time.Minute

// PodHandle is the handle of a pod's addresses.
func PodHandle(containerID string) string { return PodHandlePrefix + containerID }

// TunnelKind is the encapsulation a tunnel address is for.
type TunnelKind string

// Tunnel kinds: the device each is the address of.
const (
	TunnelIPIP    TunnelKind = "ipip"    // tunl0
	TunnelVXLAN   TunnelKind = "vxlan"   // vxlan.margay
	TunnelVXLANV6 TunnelKind = "vxlanV6" // vxlan-v6.margay, an IPv6 address
)

// tunnelHandlePrefixes start the handles of the tunnel addresses, as Calico's.
var tunnelHandlePrefixes = map[TunnelKind]string{
	TunnelIPIP:    "ipip-tunnel-addr-",
	TunnelVXLAN:   "vxlan-tunnel-addr-",
	TunnelVXLANV6: "vxlan-v6-tunnel-addr-",
}

// TunnelHandle is the handle of a node's tunnel address.
func TunnelHandle(kind TunnelKind, node string) string { return tunnelHandlePrefixes[kind] + node }

// Family is the family of the kind's addresses.
func (k TunnelKind) Family() Family {
	if k == TunnelVXLANV6 {
		return IPv6
	}
	return IPv4
}

// tunnelNode is the node whose tunnel address handle h is, ok false if it
// is none.
func tunnelNode(h string) (node string, ok bool) {
	for _, p := range tunnelHandlePrefixes {
		if n, ok := strings.CutPrefix(h, p); ok {
			return n, true
		}
	}
	return "", false
}

// Report is what Check found. A clean report has every slice empty.
type Report struct {
	Revision    int64 `json:"revision"`
	Blocks      int   `json:"blocks"`
	Allocations int   `json:"allocations"`
	Handles     int   `json:"handles"`
	// Leaked: in use, past the grace period, by an owner that no longer exists.
	Leaked []Finding `json:"leaked"`
	// Unreferenced: in use in a block but not listed in its handle.
	Unreferenced []Finding `json:"unreferenced"`
	// OrphanHandles: handles listing addresses they do not hold, or none.
	OrphanHandles []Finding `json:"orphanHandles"`
	// BadAffinities: affinities without their block, stale pending claims,
	// blocks whose owner has no affinity, and blocks of deleted nodes.
	BadAffinities []Finding `json:"badAffinities"`
}

// Finding is one problem.
type Finding struct {
	IP       netip.Addr   `json:"ip,omitzero"`
	Block    netip.Prefix `json:"block,omitzero"`
	Handle   string       `json:"handle,omitempty"`
	Node     string       `json:"node,omitempty"`
	Sequence uint64       `json:"seq,omitempty"`
	// Pod is the namespace/name the CNI plugin recorded with the address.
	Pod      string `json:"pod,omitempty"`
	Reason   string `json:"reason"`
	rev      int64  // of the handle, the affinity or the block the finding is about
	blockRev int64  // of the block, for affinity findings (0: no block)
	fix      fixKind
	gone     string // the deleted node the finding is about, which must stay deleted for its fix
	wep      wepRef // a leaked address's WorkloadEndpoint on a deleted node, to delete with it
}

// DeletedNode is the deleted node the finding is about, or "".
func (f Finding) DeletedNode() string { return f.gone }

// fixKind says how Repair mends an affinity finding.
type fixKind int

const (
	fixDeleteAffinity  fixKind = iota
	fixConfirmAffinity         // a claim that stopped after writing its block
	fixCreateAffinity          // a block whose owner lost its affinity
	fixReleaseGone             // a deleted node's affinity and block ownership
)

// Clean reports whether nothing was found.
func (r *Report) Clean() bool { return r.Problems() == 0 }

// Problems counts the findings.
func (r *Report) Problems() int {
	return len(r.Leaked) + len(r.Unreferenced) + len(r.OrphanHandles) + len(r.BadAffinities)
}

// Check audits the IPAM state at one revision. An allocation is leaked when its pod
// has no WorkloadEndpoint (or its tunnel's node no Node) and it is older than grace,
// or at once when the node it was assigned on, or its pod's node, was deleted.
func (a *Allocator) Check(ctx context.Context, grace time.Duration) (*Report, error) {
	s, err := a.loadState(ctx)
	if err != nil {
		return nil, err
	}
	return analyze(s, a.opts.Now(), grace), nil
}

// analyze is Check's pure core.
func analyze(s *state, now time.Time, grace time.Duration) *Report {
	r := &Report{Revision: s.rev, Blocks: len(s.blocks), Handles: len(s.handles)}
	type holding struct {
		seq    uint64
		handle string
	}
	held := map[netip.Addr]holding{} // address -> allocation, for the handle audit
	owners := map[netip.Prefix]string{}
	for _, b := range s.blocks {
		owners[b.v.CIDR] = b.v.Affinity
		for ord, al := range b.v.Allocations {
			if al == nil {
				continue
			}
			r.Allocations++
			ip := b.v.addr(ord)
			held[ip] = holding{al.Sequence, al.Handle}
			f := Finding{IP: ip, Block: b.v.CIDR, Handle: al.Handle, Node: al.Node, Sequence: al.Sequence}
			if pod := al.Attrs["pod"]; pod != "" {
				f.Pod = al.Attrs["namespace"] + "/" + pod
			}
			if !handleLists(s.handles[al.Handle], ip, al.Sequence) {
				f.Reason = "allocated in its block but not listed in handle " + al.Handle
				r.Unreferenced = append(r.Unreferenced, f)
			}
			if why, gone, wep := leakReason(s, al, now, grace); why != "" {
				f.Reason, f.gone, f.wep = why, gone, wep
				r.Leaked = append(r.Leaked, f)
			}
		}
	}
	for id, h := range s.handles {
		var stale []string
		for _, ip := range h.v.IPs {
			if got := held[ip.IP]; got.handle != id || got.seq != ip.Sequence {
				stale = append(stale, ip.IP.String())
			}
		}
		switch {
		case len(h.v.IPs) == 0:
			r.OrphanHandles = append(r.OrphanHandles, Finding{Handle: id, Reason: "handle holds no addresses", rev: h.rev})
		case len(stale) > 0:
			r.OrphanHandles = append(r.OrphanHandles, Finding{Handle: id, Reason: "handle lists addresses it does not hold: " + strings.Join(stale, ", "), rev: h.rev})
		}
	}
	affine := map[string]bool{}
	blockRev := map[netip.Prefix]int64{}
	for _, b := range s.blocks {
		blockRev[b.v.CIDR] = b.rev
	}
	for _, e := range s.affinities {
		affine[e.node+"/"+e.cidr.String()] = true
		f := Finding{Node: e.node, Block: e.cidr, rev: e.af.rev, blockRev: blockRev[e.cidr]}
		owner, exists := owners[e.cidr]
		switch {
		case s.gone(e.node):
			f.Reason = "node " + e.node + " no longer exists"
			f.fix, f.gone = fixReleaseGone, e.node
		case e.af.v.State == affinityPending && now.Sub(e.af.v.Created) > pendingAffinityTimeout:
			f.Reason = "claim left pending since " + e.af.v.Created.Format(time.RFC3339)
			if exists && owner == e.node {
				f.fix = fixConfirmAffinity
			}
		case !exists && e.af.v.State != affinityPending:
			f.Reason = "affinity to a block that does not exist"
		case exists && owner != e.node && e.af.v.State != affinityPending:
			f.Reason = fmt.Sprintf("affinity to a block owned by %q", owner)
		default:
			continue
		}
		r.BadAffinities = append(r.BadAffinities, f)
	}
	for _, b := range s.blocks {
		if b.v.Affinity == "" || affine[b.v.Affinity+"/"+b.v.CIDR.String()] {
			continue
		}
		f := Finding{Node: b.v.Affinity, Block: b.v.CIDR, Reason: "block is owned by a node without an affinity to it", blockRev: b.rev, fix: fixCreateAffinity}
		if s.gone(b.v.Affinity) {
			f.Reason, f.fix, f.gone = "block is owned by node "+b.v.Affinity+", which no longer exists", fixReleaseGone, b.v.Affinity
		}
		r.BadAffinities = append(r.BadAffinities, f)
	}
	return r
}

func handleLists(h *versioned[Handle], ip netip.Addr, seq uint64) bool {
	if h == nil {
		return false
	}
	for _, x := range h.v.IPs {
		if x.IP == ip && x.Sequence == seq {
			return true
		}
	}
	return false
}

// leakReason says why al is leaked, or "", and the deleted node that makes it
// so, if any. The grace period covers an ADD that has assigned but not yet
// written its WorkloadEndpoint, which kubelet may still finish on a node whose
// agent is gone. A pod whose endpoint names a deleted node, and a deleted
// node's tunnel address, have nothing in flight: they go at once.
func leakReason(s *state, al *Allocation, now time.Time, grace time.Duration) (why, gone string, wep wepRef) {
	old := now.Sub(al.Time) >= grace
	switch h := al.Handle; {
	case strings.HasPrefix(h, PodHandlePrefix):
		id := strings.TrimPrefix(h, PodHandlePrefix)
		w, ok := s.weps[id]
		switch {
		case ok && s.gone(w.node):
			return "pod of node " + w.node + ", which no longer exists", w.node, w
		case !ok && old && s.gone(al.Node):
			return "assigned on node " + al.Node + ", which no longer exists", al.Node, wepRef{}
		case !ok && old:
			return "no WorkloadEndpoint has container " + id, "", wepRef{}
		}
	default:
		if node, ok := tunnelNode(h); ok && s.gone(node) {
			return "tunnel address of node " + node + ", which no longer exists", node, wepRef{}
		}
	}
	return "", "", wepRef{}
}

// goneGuard conditions a write on a node staying deleted: no Node resource and
// no agent holding its name (an agent registers its node again at once). A
// pod's endpoint on that node, if any, is deleted in the same write, and only
// as it was audited.
type goneGuard struct {
	node string
	wep  wepRef
}

func (g *goneGuard) cmps() []clientv3.Cmp {
	c := []clientv3.Cmp{revIs(datastore.ResourceKey(nodeKind, g.node), 0), revIs(datastore.AgentsPrefix+g.node, 0)}
	if g.wep.key != "" {
		c = append(c, revIs(g.wep.key, g.wep.rev))
	}
	return c
}

func (g *goneGuard) ops() []clientv3.Op {
	if g.wep.key == "" {
		return nil
	}
	return []clientv3.Op{clientv3.OpDelete(g.wep.key)}
}

// guardBroken says why g no longer holds, if it does not.
func (a *Allocator) guardBroken(ctx context.Context, g *goneGuard) error {
	ops := []clientv3.Op{clientv3.OpGet(datastore.ResourceKey(nodeKind, g.node), clientv3.WithKeysOnly()),
		clientv3.OpGet(datastore.AgentsPrefix+g.node, clientv3.WithKeysOnly())}
	if g.wep.key != "" {
		ops = append(ops, clientv3.OpGet(g.wep.key, clientv3.WithKeysOnly()))
	}
	resp, err := a.store.Txn(ctx, nil, ops, nil)
	if err != nil {
		return err
	}
	switch {
	case len(resp.Responses[0].GetResponseRange().Kvs) > 0:
		return fmt.Errorf("node %s exists again: left as it is", g.node)
	case len(resp.Responses[1].GetResponseRange().Kvs) > 0:
		return fmt.Errorf("node %s has a running margay-node again: left as it is", g.node)
	case g.wep.key != "" && (only(resp.Responses[2].GetResponseRange().Kvs) == nil || only(resp.Responses[2].GetResponseRange().Kvs).ModRevision != g.wep.rev):
		return fmt.Errorf("the WorkloadEndpoint at %s changed since the check; check again", g.wep.key)
	}
	return nil
}

// Repair fixes what a report found: it releases leaked addresses (only if they are
// still held by the same handle and sequence) with the WorkloadEndpoints of deleted
// nodes, relinks unreferenced allocations to their handles, prunes orphan handles,
// and mends or deletes bad affinities. It returns how many fixes it made and the
// errors.
func (a *Allocator) Repair(ctx context.Context, r *Report) (int, error) {
	fixed := 0
	var errs []error
	gone := map[string]bool{} // endpoints deleted with an earlier address of their pod
	for _, f := range r.Leaked {
		var g *goneGuard
		if f.gone != "" {
			g = &goneGuard{node: f.gone, wep: f.wep}
			if gone[g.wep.key] {
				g.wep = wepRef{}
			}
		}
		err := a.releaseExact(ctx, f.IP, f.Handle, f.Sequence, g)
		if errors.Is(err, ErrNotAllocated) && g != nil && g.wep.key != "" {
			// The address went meanwhile; its endpoint still goes, as audited.
			_, err = a.store.Txn(ctx, g.cmps(), g.ops(), nil)
		}
		if err != nil && !errors.Is(err, ErrNotAllocated) {
			errs = append(errs, err)
			continue
		}
		if g != nil && g.wep.key != "" {
			gone[g.wep.key] = true
		}
		fixed++
	}
	for _, f := range r.Unreferenced {
		if err := a.relink(ctx, f); err != nil {
			errs = append(errs, err)
			continue
		}
		fixed++
	}
	for _, f := range r.OrphanHandles {
		if err := a.pruneHandle(ctx, f.Handle); err != nil {
			errs = append(errs, err)
			continue
		}
		fixed++
	}
	for _, f := range r.BadAffinities {
		if err := a.fixAffinity(ctx, f); err != nil {
			errs = append(errs, err)
			continue
		}
		fixed++
	}
	return fixed, errors.Join(errs...)
}

// fixAffinity mends one affinity finding, provided neither the affinity nor its
// block changed since the audit.
func (a *Allocator) fixAffinity(ctx context.Context, f Finding) error {
	if f.fix == fixReleaseGone {
		return a.releaseGone(ctx, f.Node, f.Block)
	}
	akey, bkey := datastore.AffinityKey(f.Node, f.Block), datastore.BlockKey(f.Block)
	cmps := []clientv3.Cmp{revIs(akey, f.rev), revIs(bkey, f.blockRev)}
	op := clientv3.OpDelete(akey)
	if f.fix != fixDeleteAffinity {
		// Give the owner its affinity rather than strand a block it holds.
		op = clientv3.OpPut(akey, mustJSON(affinity{State: affinityConfirmed, Created: a.opts.Now().UTC()}))
	}
	resp, err := a.store.Txn(ctx, cmps, []clientv3.Op{op}, nil)
	if err == nil && !resp.Succeeded {
		err = fmt.Errorf("affinity of %s to %s changed since the check; check again", f.Node, f.Block)
	}
	return err
}

// releaseGone deletes a deleted node's affinity to cidr and clears the block's
// owner, provided the node stays deleted. Unlike the other fixes it reads the
// affinity and the block afresh rather than comparing with the audit: releasing
// the node's leaked addresses just before changes the block.
func (a *Allocator) releaseGone(ctx context.Context, node string, cidr netip.Prefix) error {
	akey, bkey := datastore.AffinityKey(node, cidr), datastore.BlockKey(cidr)
	g := &goneGuard{node: node}
	for attempt := 0; attempt < a.opts.MaxAttempts; attempt++ {
		if err := datastore.Backoff(ctx, attempt); err != nil {
			return err
		}
		if err := a.guardBroken(ctx, g); err != nil {
			return err
		}
		resp, err := a.store.Txn(ctx, nil, []clientv3.Op{clientv3.OpGet(akey), clientv3.OpGet(bkey)}, nil)
		if err != nil {
			return err
		}
		b, err := decode[Block](only(resp.Responses[1].GetResponseRange().Kvs))
		if err != nil {
			return err
		}
		cmps := append(g.cmps(), revIs(bkey, b.rev))
		var ops []clientv3.Op
		if kv := only(resp.Responses[0].GetResponseRange().Kvs); kv != nil {
			cmps = append(cmps, revIs(akey, kv.ModRevision))
			ops = append(ops, clientv3.OpDelete(akey))
		}
		if b.v != nil && b.v.Affinity == node {
			nb := cloneBlock(b.v)
			nb.Affinity = "" // ownerless: another node takes it over or borrows from it
			ops = append(ops, clientv3.OpPut(bkey, mustJSON(nb)))
		}
		if len(ops) == 0 {
			return nil
		}
		tresp, err := a.store.Txn(ctx, cmps, ops, nil)
		if err != nil {
			return err
		}
		if tresp.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("%w: releasing %s of deleted node %s", ErrContention, cidr, node)
}

// relink adds an allocation missing from its handle back to the handle, if the
// block still holds it for that handle and sequence (a leaked one may have been
// released just before).
func (a *Allocator) relink(ctx context.Context, f Finding) error {
	hkey, bkey := datastore.HandleKey(f.Handle), datastore.BlockKey(f.Block)
	for attempt := 0; attempt < a.opts.MaxAttempts; attempt++ {
		if err := datastore.Backoff(ctx, attempt); err != nil {
			return err
		}
		resp, err := a.store.Txn(ctx, nil, []clientv3.Op{clientv3.OpGet(hkey), clientv3.OpGet(bkey)}, nil)
		if err != nil {
			return err
		}
		h, err := decode[Handle](only(resp.Responses[0].GetResponseRange().Kvs))
		if err != nil {
			return err
		}
		b, err := decode[Block](only(resp.Responses[1].GetResponseRange().Kvs))
		if err != nil {
			return err
		}
		if b.v == nil {
			return nil
		}
		if ord, ok := b.v.ordinal(f.IP); !ok || b.v.Allocations[ord] == nil ||
			b.v.Allocations[ord].Handle != f.Handle || b.v.Allocations[ord].Sequence != f.Sequence {
			return nil // no longer allocated as found: nothing to link
		}
		nh := Handle{ID: f.Handle}
		if h.v != nil {
			nh.IPs = append(nh.IPs, h.v.IPs...)
			nh.remove(f.IP)
		}
		nh.IPs = append(nh.IPs, Assigned{IP: f.IP, Block: f.Block, Sequence: f.Sequence})
		tresp, err := a.store.Txn(ctx, []clientv3.Cmp{revIs(hkey, h.rev), revIs(bkey, b.rev)}, []clientv3.Op{clientv3.OpPut(hkey, mustJSON(nh))}, nil)
		if err != nil {
			return err
		}
		if tresp.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("%w: relinking %s to %s", ErrContention, f.IP, f.Handle)
}

// pruneHandle drops the addresses a handle lists but does not hold, deleting the
// handle if nothing is left. The block reads are checked in the same transaction.
func (a *Allocator) pruneHandle(ctx context.Context, id string) error {
	hkey := datastore.HandleKey(id)
	for attempt := 0; attempt < a.opts.MaxAttempts; attempt++ {
		if err := datastore.Backoff(ctx, attempt); err != nil {
			return err
		}
		resp, err := a.store.Get(ctx, hkey)
		if err != nil {
			return err
		}
		h, err := decode[Handle](only(resp.Kvs))
		if err != nil || h.v == nil {
			return err
		}
		cmps := []clientv3.Cmp{revIs(hkey, h.rev)}
		nh := Handle{ID: id}
		for _, ip := range h.v.IPs {
			bresp, err := a.store.Get(ctx, datastore.BlockKey(ip.Block))
			if err != nil {
				return err
			}
			b, err := decode[Block](only(bresp.Kvs))
			if err != nil {
				return err
			}
			cmps = append(cmps, revIs(datastore.BlockKey(ip.Block), b.rev))
			if b.v != nil {
				if ord, ok := b.v.ordinal(ip.IP); ok && b.v.Allocations[ord] != nil &&
					b.v.Allocations[ord].Handle == id && b.v.Allocations[ord].Sequence == ip.Sequence {
					nh.IPs = append(nh.IPs, ip)
				}
			}
		}
		op := clientv3.OpPut(hkey, mustJSON(nh))
		if len(nh.IPs) == 0 {
			op = clientv3.OpDelete(hkey)
		}
		tresp, err := a.store.Txn(ctx, cmps, []clientv3.Op{op}, nil)
		if err != nil {
			return err
		}
		if tresp.Succeeded {
			return nil
		}
	}
	return fmt.Errorf("%w: pruning handle %s", ErrContention, id)
}

// ReleaseNode frees what a deleted node held: the addresses assigned on it
// (deleting its pods' WorkloadEndpoints), its tunnel addresses, and its blocks,
// which become ownerless. The Node resource must already be gone. It returns
// what it found about the node and how many of those it fixed.
func (a *Allocator) ReleaseNode(ctx context.Context, node string) (*Report, int, error) {
	s, err := a.loadState(ctx)
	if err != nil {
		return nil, 0, err
	}
	if !s.gone(node) {
		return nil, 0, fmt.Errorf("node %s still has its Node resource: delete that first", node)
	}
	all := analyze(s, a.opts.Now(), DefaultLeakGrace)
	r := &Report{Revision: all.Revision}
	for _, f := range all.Leaked {
		if f.gone == node || f.Node == node {
			r.Leaked = append(r.Leaked, f)
		}
	}
	for _, f := range all.BadAffinities {
		if f.Node == node && f.fix == fixReleaseGone {
			r.BadAffinities = append(r.BadAffinities, f)
		}
	}
	n, err := a.Repair(ctx, r)
	return r, n, err
}
