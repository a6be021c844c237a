package ipam

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// AssignArgs says what to allocate.
type AssignArgs struct {
	// Handle groups the addresses for release: "k8s-pod-network.<containerID>" for
	// a pod, TunnelHandle for a tunnel address.
	Handle string
	Node   string
	// Family is the family of the addresses: IPv4 (the default when unset) or IPv6.
	Family Family
	// Num is how many addresses to assign (default 1). Assignment is all or nothing.
	Num int
	// Pools restricts the pools, by name or CIDR, in order of preference. They
	// must be of Family.
	Pools []string
	// Attrs are recorded with each allocation (pod, namespace, ...).
	Attrs map[string]string
	// NewHandle fails the assignment with ErrHandleExists if the handle already
	// holds addresses, instead of adding to them.
	NewHandle bool
}

// AutoAssign assigns args.Num new addresses to args.Handle on args.Node: from the
// node's blocks, else from a newly claimed block, else (strictAffinity off) from
// another node's block. Addresses freed less than the cooldown ago are used only
// when nothing else is free.
func (a *Allocator) AutoAssign(ctx context.Context, args AssignArgs) ([]Assigned, error) {
	if args.Handle == "" || args.Node == "" {
		return nil, fmt.Errorf("assign needs a handle and a node (handle %q, node %q)", args.Handle, args.Node)
	}
	if strings.Contains(args.Node, "/") {
		return nil, fmt.Errorf("node name %q must not contain '/'", args.Node)
	}
	switch args.Family {
	case 0:
		args.Family = IPv4
	case IPv4, IPv6:
	default:
		return nil, fmt.Errorf("family %d: use ipam.IPv4 or ipam.IPv6", args.Family)
	}
	num := max(args.Num, 1)
	nc := a.node(args.Node)
	nc.mu.Lock()
	defer nc.mu.Unlock()

	var out []Assigned
	c := &call{handle: &versioned[Handle]{}}
	conflicts := 0
	for len(out) < num {
		got, err := a.assignOnce(ctx, nc, args, c, num-len(out))
		if errors.Is(err, errRetry) {
			conflicts++
			if conflicts >= a.opts.MaxAttempts {
				err = fmt.Errorf("%w: %d conflicting writes while assigning for %s on node %s; try again", ErrContention, conflicts, args.Handle, args.Node)
			} else if err = datastore.Backoff(ctx, conflicts); err == nil {
				continue
			}
		}
		if err != nil {
			if len(out) > 0 {
				a.rollback(nc.name, args.Handle, out)
			}
			return nil, err
		}
		out = append(out, got...)
	}
	return out, nil
}

// call is what one AutoAssign call carries between its attempts.
type call struct {
	handle *versioned[Handle]
	// othersRead: every block has been read once in this call. Later attempts use
	// the cache, which a lost compare-and-swap refreshes block by block.
	othersRead bool
	// refreshed: the cache was dropped once in this call, so a "no space" answer
	// rests on fresh reads.
	refreshed bool
}

// errRetry means a compare-and-swap lost; the cache was refreshed and the caller
// should try again.
var errRetry = errors.New("retry")

// rollback releases a partial assignment. It uses a fresh context: the caller's may
// be what ran out.
func (a *Allocator) rollback(node, handle string, got []Assigned) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, g := range got {
		if err := a.releaseExact(ctx, g.IP, handle, g.Sequence, nil); err != nil && !errors.Is(err, ErrNotAllocated) {
			a.opts.Logger.Error("could not roll back a partial assignment; ipam check will find it", "ip", g.IP, "handle", handle, "node", node, "err", err)
		}
	}
}

// assignOnce makes one attempt to assign up to num addresses from a single block.
func (a *Allocator) assignOnce(ctx context.Context, nc *nodeCache, args AssignArgs, c *call, num int) ([]Assigned, error) {
	handle := c.handle
	if nc.snap == nil {
		s, err := a.loadSnapshot(ctx, nc.name)
		if err != nil {
			return nil, err
		}
		if s.nodeRev == 0 {
			return nil, unknownNode(nc.name)
		}
		nc.snap = s
	}
	snap := nc.snap
	pools, err := eligiblePools(snap.pools, args.Family, args.Pools, snap.nodeLabels)
	if err != nil {
		return nil, fmt.Errorf("node %s: %w", nc.name, err)
	}
	affine, err := a.affineBlocks(ctx, nc, pools)
	if err != nil {
		return nil, err
	}
	if nc.snap == nil { // a pending claim was settled: look again
		return nil, errRetry
	}
	now := a.opts.Now()
	cool := a.opts.ReuseCooldown
	for _, b := range affine {
		if b.v.Available(now, cool) > 0 {
			return a.commit(ctx, nc, b, true, args, handle, num, false)
		}
	}
	canClaim := snap.config.MaxBlocks() == 0 || snap.blocksOf(args.Family) < snap.config.MaxBlocks()
	if canClaim {
		if claimed, err := a.claimUnused(ctx, nc, args.Family, pools); err != nil || claimed {
			if err == nil {
				err = errRetry // assign from the new block on the next pass
			}
			return nil, err
		}
	}
	// Every CIDR is taken: look at the other blocks of the pools.
	others, err := a.otherBlocks(ctx, nc, pools, !c.othersRead)
	if err != nil {
		return nil, err
	}
	c.othersRead = true
	if canClaim {
		for _, b := range others {
			if b.v.Affinity == "" && b.v.Empty() {
				if _, err := a.claim(ctx, nc, b.v.CIDR, b); err != nil {
					return nil, err
				}
				return nil, errRetry
			}
		}
	}
	var borrowable []*versioned[Block]
	if !snap.config.Spec.StrictAffinity {
		borrowable = others
		if b := pick(borrowable, func(b *Block) bool { return b.Available(now, cool) > 0 }); b != nil {
			return a.commit(ctx, nc, b, false, args, handle, num, false)
		}
	}
	// Last resort: addresses still cooling down, oldest-freed first in each block.
	hasFree := func(b *Block) bool { return len(b.Free) > 0 }
	if b := pick(affine, hasFree); b != nil {
		return a.commit(ctx, nc, b, true, args, handle, num, true)
	}
	if b := pick(borrowable, hasFree); b != nil {
		return a.commit(ctx, nc, b, false, args, handle, num, true)
	}
	if !c.refreshed {
		// The cache may hide space freed since it was read: read everything again
		// before saying there is none.
		c.refreshed, c.othersRead = true, false
		nc.snap, nc.taken = nil, nil
		clear(nc.blocks)
		return nil, errRetry
	}
	names := make([]string, len(pools))
	for i, p := range pools {
		names[i] = fmt.Sprintf("%s (%s)", p.Metadata.Name, p.Spec.CIDR)
	}
	hint := "add a pool or free addresses"
	if snap.config.Spec.StrictAffinity {
		hint += "; strictAffinity is on, so other nodes' blocks are not borrowed"
	}
	return nil, fmt.Errorf("%w for node %s in %s: %s", ErrNoSpace, nc.name, strings.Join(names, ", "), hint)
}

// pick returns a random block of bs that satisfies ok, or nil. Random, so that
// allocators that all fell back to the same blocks spread out instead of colliding.
func pick(bs []*versioned[Block], ok func(*Block) bool) *versioned[Block] {
	var fit []*versioned[Block]
	for _, b := range bs {
		if ok(b.v) {
			fit = append(fit, b)
		}
	}
	if len(fit) == 0 {
		return nil
	}
	return fit[rand.IntN(len(fit))]
}

// affineBlocks returns the node's confirmed blocks in pools, in pool order then
// address order, loading any it has not cached. It also settles pending affinities
// left by an interrupted claim.
func (a *Allocator) affineBlocks(ctx context.Context, nc *nodeCache, pools []*api.IPPool) ([]*versioned[Block], error) {
	snap := nc.snap // settlePending may drop nc.snap
	var cidrs, missing []netip.Prefix
	for c := range snap.affinities {
		if poolOf(pools, c) != nil {
			cidrs = append(cidrs, c)
			if b := nc.blocks[c]; b == nil || b.v == nil {
				missing = append(missing, c) // absent blocks too: a claimer may have written it since
			}
		}
	}
	if err := a.loadBlocks(ctx, nc, missing); err != nil {
		return nil, err
	}
	slices.SortFunc(cidrs, func(x, y netip.Prefix) int {
		px, py := poolOf(pools, x), poolOf(pools, y)
		if px != py {
			return slices.Index(pools, px) - slices.Index(pools, py)
		}
		return x.Addr().Compare(y.Addr())
	})
	var out []*versioned[Block]
	for _, c := range cidrs {
		af := snap.affinities[c]
		b := nc.blocks[c]
		if af.v.State == affinityPending {
			if err := a.settlePending(ctx, nc, c, af, b); err != nil {
				return nil, err
			}
			continue // the snapshot is reloaded on the next pass
		}
		if b.v != nil && b.v.Affinity == nc.name {
			out = append(out, b)
		}
	}
	return out, nil
}

// settlePending finishes or abandons a claim that a crashed or concurrent
// allocator left pending: confirm it if the block is ours, drop it if the block is
// someone else's or never appeared.
func (a *Allocator) settlePending(ctx context.Context, nc *nodeCache, cidr netip.Prefix, af versioned[affinity], b *versioned[Block]) error {
	// Both writes check the block too: a claimer may be between its steps, and a
	// block it just took must not lose its affinity.
	akey, bkey := datastore.AffinityKey(nc.name, cidr), datastore.BlockKey(cidr)
	cmps := []clientv3.Cmp{revIs(akey, af.rev), revIs(bkey, b.rev)}
	var ops []clientv3.Op
	switch {
	case b.v != nil && b.v.Affinity == nc.name:
		ops = []clientv3.Op{clientv3.OpPut(akey, mustJSON(affinity{State: affinityConfirmed, Created: af.v.Created}))}
	case b.v != nil || a.opts.Now().Sub(af.v.Created) > pendingAffinityTimeout:
		ops = []clientv3.Op{clientv3.OpDelete(akey)}
	default:
		return nil // another allocator is claiming it right now
	}
	resp, err := a.store.Txn(ctx, cmps, ops, nil)
	if err != nil || !resp.Succeeded {
		delete(nc.blocks, cidr) // what we decided on may be stale: read it again
	}
	nc.snap = nil
	return err
}

// otherBlocks returns the blocks in pools that the node does not own, in pool
// order: read afresh (refreshing the taken CIDRs too) when read is set, else from
// the cache.
func (a *Allocator) otherBlocks(ctx context.Context, nc *nodeCache, pools []*api.IPPool, read bool) ([]*versioned[Block], error) {
	if read {
		resp, err := a.store.Get(ctx, datastore.BlocksPrefix, clientv3.WithPrefix())
		if err != nil {
			return nil, err
		}
		nc.taken = map[netip.Prefix]bool{}
		for i := range resp.Kvs {
			vb, err := decode[Block](resp.Kvs[i])
			if err != nil {
				return nil, err
			}
			nc.taken[vb.v.CIDR] = true
			nc.blocks[vb.v.CIDR] = vb
		}
	}
	var out []*versioned[Block]
	for _, vb := range nc.blocks {
		if vb.v != nil && vb.v.Affinity != nc.name && poolOf(pools, vb.v.CIDR) != nil {
			out = append(out, vb)
		}
	}
	slices.SortFunc(out, func(x, y *versioned[Block]) int {
		if d := slices.Index(pools, poolOf(pools, x.v.CIDR)) - slices.Index(pools, poolOf(pools, y.v.CIDR)); d != 0 {
			return d
		}
		return x.v.CIDR.Addr().Compare(y.v.CIDR.Addr())
	})
	return out, nil
}

// commit writes an assignment from block b together with the handle, in one
// transaction that also checks the pool, the IPAM configuration and (for an affine
// block) the affinity have not changed. On a lost race it refreshes the cache from
// the transaction's else branch and returns errRetry.
func (a *Allocator) commit(ctx context.Context, nc *nodeCache, b *versioned[Block], affine bool, args AssignArgs, handle *versioned[Handle], num int, ignoreCooldown bool) ([]Assigned, error) {
	nb := cloneBlock(b.v)
	got := nb.assign(num, args.Handle, nc.name, args.Attrs, a.opts.Now(), a.opts.ReuseCooldown, ignoreCooldown)
	h := Handle{ID: args.Handle}
	if handle.v != nil {
		h.IPs = slices.Clone(handle.v.IPs)
	}
	h.IPs = append(h.IPs, got...)

	bkey, hkey := datastore.BlockKey(b.v.CIDR), datastore.HandleKey(args.Handle)
	cmps := append(nc.snap.guards(nc.name, b.v.CIDR), revIs(bkey, b.rev), revIs(hkey, handle.rev))
	if affine {
		cmps = append(cmps, revIs(datastore.AffinityKey(nc.name, b.v.CIDR), nc.snap.affinities[b.v.CIDR].rev))
	}
	resp, err := a.store.Txn(ctx, cmps,
		[]clientv3.Op{clientv3.OpPut(bkey, mustJSON(nb)), clientv3.OpPut(hkey, mustJSON(h))},
		[]clientv3.Op{clientv3.OpGet(bkey), clientv3.OpGet(hkey)})
	if err != nil {
		return nil, err
	}
	if !resp.Succeeded {
		fb, err := decode[Block](only(resp.Responses[0].GetResponseRange().Kvs))
		if err != nil {
			return nil, err
		}
		fh, err := decode[Handle](only(resp.Responses[1].GetResponseRange().Kvs))
		if err != nil {
			return nil, err
		}
		if args.NewHandle && fh.v != nil {
			return nil, fmt.Errorf("%w: %s", ErrHandleExists, args.Handle)
		}
		if fb.rev == b.rev && fh.rev == handle.rev {
			nc.snap = nil // the pool, the configuration or the affinity changed
		}
		nc.blocks[b.v.CIDR] = fb
		*handle = *fh
		return nil, errRetry
	}
	rev := resp.Header.Revision
	nc.blocks[b.v.CIDR] = &versioned[Block]{nb, rev}
	*handle = versioned[Handle]{&h, rev}
	return got, nil
}

func cloneBlock(b *Block) *Block {
	c := *b
	c.Allocations = slices.Clone(b.Allocations)
	c.Free = slices.Clone(b.Free)
	return &c
}

// claimUnused claims a CIDR that has no block yet, in the first pool that has one.
// Blocks are never deleted, so the cached set of taken CIDRs only grows: a CIDR it
// wrongly thinks free makes the claim fail and the set reload.
func (a *Allocator) claimUnused(ctx context.Context, nc *nodeCache, f Family, pools []*api.IPPool) (bool, error) {
	if nc.taken == nil {
		resp, err := a.store.Get(ctx, datastore.BlocksPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
		if err != nil {
			return false, err
		}
		nc.taken = map[netip.Prefix]bool{}
		for _, kv := range resp.Kvs {
			if c, err := datastore.ParseBlockKey(string(kv.Key)); err == nil {
				nc.taken[c] = true
			}
		}
	}
	finest := finestBits(nc.taken, f)
	free := func(c netip.Prefix) bool {
		_, mine := nc.snap.affinities[c] // e.g. a claim of ours still pending
		return !mine && !overlapsAny(c, nc.taken, finest)
	}
	for _, p := range pools {
		for cidr := range blockCandidates(p, free, nc.name) {
			return a.claim(ctx, nc, cidr, nil)
		}
	}
	return false, nil
}

// claim runs the three claim steps for cidr. existing is the ownerless empty block to
// take over, or nil for a new one. A lost race reloads the snapshot and reports true
// so the caller looks again.
func (a *Allocator) claim(ctx context.Context, nc *nodeCache, cidr netip.Prefix, existing *versioned[Block]) (bool, error) {
	snap := nc.snap
	nc.snap = nil // whatever happens, the affinities change
	akey, bkey := datastore.AffinityKey(nc.name, cidr), datastore.BlockKey(cidr)
	now := a.opts.Now().UTC()
	// 1. Pending affinity, provided the node claimed nothing since the snapshot
	// (which keeps maxBlocksPerHost exact) and the block is still as we saw it.
	brev := int64(0)
	if existing != nil {
		brev = existing.rev
	}
	resp, err := a.store.Txn(ctx, append(snap.guards(nc.name, cidr),
		revIs(akey, 0),
		revIs(bkey, brev),
		clientv3.Compare(clientv3.ModRevision(datastore.AffinityPrefix(nc.name)), "<", snap.affRev+1).WithPrefix(),
	), []clientv3.Op{clientv3.OpPut(akey, mustJSON(affinity{State: affinityPending, Created: now}))}, nil)
	if err != nil || !resp.Succeeded {
		nc.taken = nil
		delete(nc.blocks, cidr) // it may be stale; read it again
		return err == nil, err
	}
	arev := resp.Header.Revision
	// 2. The block, owned by us, if nobody took it meanwhile.
	nb := newBlock(cidr, nc.name)
	if existing != nil {
		nb = cloneBlock(existing.v)
		nb.Affinity = nc.name
	}
	resp, err = a.store.Txn(ctx, []clientv3.Cmp{revIs(bkey, brev), revIs(akey, arev)},
		[]clientv3.Op{clientv3.OpPut(bkey, mustJSON(nb))}, nil)
	if err != nil {
		return false, err
	}
	if !resp.Succeeded {
		nc.taken = nil
		delete(nc.blocks, cidr)
		_, err := a.store.Txn(ctx, []clientv3.Cmp{revIs(akey, arev)}, []clientv3.Op{clientv3.OpDelete(akey)}, nil)
		return true, err
	}
	if nc.taken != nil {
		nc.taken[cidr] = true
	}
	// 3. Confirm. If this fails, the next snapshot finds the pending affinity with our
	// block and confirms it.
	_, err = a.store.Txn(ctx, []clientv3.Cmp{revIs(akey, arev)},
		[]clientv3.Op{clientv3.OpPut(akey, mustJSON(affinity{State: affinityConfirmed, Created: now}))}, nil)
	if err != nil {
		return false, err
	}
	a.opts.Logger.Info("claimed block", "node", nc.name, "block", cidr)
	return true, nil
}

// FamilyPools asks for one address of Family, from Pools (by name or CIDR, in
// order) or from every pool of the family when Pools is empty.
type FamilyPools struct {
	Family Family
	Pools  []string
}

// AssignPerFamily gives args.Handle one address of each family in want, as a
// dual-stack pod needs. What the handle already holds is kept: a repeated ADD gets
// the same addresses, and one cut short between the families gets the one it
// lacks. If a family cannot be served, the addresses this call assigned are
// released again, so the handle is left as it was. args.Family, Pools, Num and
// NewHandle are set per family. The result is sorted, IPv4 first.
func (a *Allocator) AssignPerFamily(ctx context.Context, args AssignArgs, want []FamilyPools) ([]Assigned, error) {
	var held, got []Assigned
	known := false // held is what the handle holds
	has := func(f Family) bool {
		return known && slices.ContainsFunc(held, func(x Assigned) bool { return FamilyOf(x.IP) == f })
	}
	for _, w := range want {
		if has(w.Family) {
			continue
		}
		args.Family, args.Pools, args.Num, args.NewHandle = w.Family, w.Pools, 1, !known
		r, err := a.AutoAssign(ctx, args)
		if errors.Is(err, ErrHandleExists) {
			if held, err = a.IPsByHandle(ctx, args.Handle); err == nil {
				known = true
				if has(w.Family) {
					continue
				}
				args.NewHandle = false
				r, err = a.AutoAssign(ctx, args)
			}
		}
		if err != nil {
			if len(got) > 0 {
				a.rollback(args.Node, args.Handle, got)
			}
			return nil, err
		}
		got, held, known = append(got, r...), append(held, r...), true
	}
	slices.SortFunc(held, func(x, y Assigned) int { return x.IP.Compare(y.IP) })
	return held, nil
}
