package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/datastore"
)

// ReleaseByHandle frees every address held under handle and deletes the handle. A
// handle that does not exist is not an error (CNI DEL must be idempotent). Only
// allocations that still carry this handle and the sequence recorded in it are
// freed, so a stale release never frees an address someone else now holds.
func (a *Allocator) ReleaseByHandle(ctx context.Context, handleID string) ([]netip.Addr, error) {
	var released []netip.Addr
	hkey := datastore.HandleKey(handleID)
	for attempt := 0; ; attempt++ {
		if attempt >= a.opts.MaxAttempts {
			return released, fmt.Errorf("%w: releasing handle %s", ErrContention, handleID)
		}
		if err := datastore.Backoff(ctx, attempt); err != nil {
			return released, err
		}
		resp, err := a.store.Get(ctx, hkey)
		if err != nil {
			return released, err
		}
		h, err := decode[Handle](only(resp.Kvs))
		if err != nil {
			return released, err
		}
		if h.v == nil {
			return released, nil
		}
		if len(h.v.IPs) == 0 {
			if _, err := a.store.Txn(ctx, []clientv3.Cmp{revIs(hkey, h.rev)}, []clientv3.Op{clientv3.OpDelete(hkey)}, nil); err != nil {
				return released, err
			}
			continue
		}
		// One block per transaction: a handle rarely spans blocks.
		block := h.v.IPs[0].Block
		var targets []Assigned
		for _, ip := range h.v.IPs {
			if ip.Block == block {
				targets = append(targets, ip)
			}
		}
		freed, err := a.releaseInBlock(ctx, block, handleID, targets, h, nil)
		if errors.Is(err, errRetry) {
			continue
		}
		if err != nil {
			return released, err
		}
		released = append(released, freed...)
		if len(targets) == len(h.v.IPs) {
			return released, nil // that transaction deleted the handle
		}
		attempt = -1
	}
}

// releaseInBlock frees targets in block (where they still match handle and
// sequence) and removes them from the handle, in one transaction, which g (if
// not nil) also conditions and adds to. If the block empties and its owner has
// other blocks, the owner's affinity is released too; the block itself stays,
// ownerless, so its free list keeps the reuse cooldown.
func (a *Allocator) releaseInBlock(ctx context.Context, cidr netip.Prefix, handleID string, targets []Assigned, h *versioned[Handle], g *goneGuard) ([]netip.Addr, error) {
	bkey := datastore.BlockKey(cidr)
	resp, err := a.store.Get(ctx, bkey)
	if err != nil {
		return nil, err
	}
	b, err := decode[Block](only(resp.Kvs))
	if err != nil {
		return nil, err
	}
	nh := Handle{ID: handleID}
	if h.v != nil {
		nh.IPs = append(nh.IPs, h.v.IPs...)
	}
	var freed []netip.Addr
	cmps := []clientv3.Cmp{revIs(bkey, b.rev), revIs(datastore.HandleKey(handleID), h.rev)}
	var ops []clientv3.Op
	if b.v != nil {
		nb := cloneBlock(b.v)
		now := a.opts.Now()
		for _, t := range targets {
			if nb.release(t.IP, handleID, t.Sequence, now) != nil {
				freed = append(freed, t.IP)
			}
		}
		if len(freed) > 0 {
			acmps, aops, err := a.maybeReleaseAffinity(ctx, nb)
			if err != nil {
				return nil, err
			}
			cmps = append(cmps, acmps...)
			ops = append(ops, clientv3.OpPut(bkey, mustJSON(nb)))
			ops = append(ops, aops...)
		}
	}
	// Targets that were not ours any more are stale entries: drop them as well.
	for _, t := range targets {
		nh.remove(t.IP)
	}
	if h.v != nil {
		if len(nh.IPs) == 0 {
			ops = append(ops, clientv3.OpDelete(datastore.HandleKey(handleID)))
		} else {
			ops = append(ops, clientv3.OpPut(datastore.HandleKey(handleID), mustJSON(nh)))
		}
	}
	if g != nil {
		cmps, ops = append(cmps, g.cmps()...), append(ops, g.ops()...)
	}
	tresp, err := a.store.Txn(ctx, cmps, ops, nil)
	if err != nil {
		return nil, err
	}
	if !tresp.Succeeded {
		return nil, errRetry
	}
	return freed, nil
}

// maybeReleaseAffinity returns the compares and ops that release the owner's
// affinity to nb if nb is now empty and the owner has another confirmed block,
// clearing nb.Affinity. The compare on that other affinity keeps two releases at
// once from leaving the owner with no block.
func (a *Allocator) maybeReleaseAffinity(ctx context.Context, nb *Block) ([]clientv3.Cmp, []clientv3.Op, error) {
	if !nb.Empty() || nb.Affinity == "" {
		return nil, nil, nil
	}
	resp, err := a.store.Get(ctx, datastore.AffinityPrefix(nb.Affinity), clientv3.WithPrefix())
	if err != nil {
		return nil, nil, err
	}
	akey := datastore.AffinityKey(nb.Affinity, nb.CIDR)
	for _, kv := range resp.Kvs {
		_, _, af, err := decodeAffinity(kv)
		if err != nil || string(kv.Key) == akey || af.v.State != affinityConfirmed {
			continue
		}
		a.opts.Logger.Info("releasing empty block", "node", nb.Affinity, "block", nb.CIDR)
		nb.Affinity = ""
		return []clientv3.Cmp{revIs(string(kv.Key), kv.ModRevision)}, []clientv3.Op{clientv3.OpDelete(akey)}, nil
	}
	return nil, nil, nil
}

// ReleaseIP frees ip whoever holds it, and removes it from its handle. It returns
// the allocation that was freed, or ErrNotAllocated.
func (a *Allocator) ReleaseIP(ctx context.Context, ip netip.Addr) (*Allocation, error) {
	return a.release(ctx, ip, "", 0, nil)
}

// releaseExact frees ip only if handle still holds it with sequence seq, and,
// with g, only while g holds.
func (a *Allocator) releaseExact(ctx context.Context, ip netip.Addr, handle string, seq uint64, g *goneGuard) error {
	_, err := a.release(ctx, ip, handle, seq, g)
	return err
}

func (a *Allocator) release(ctx context.Context, ip netip.Addr, handle string, seq uint64, g *goneGuard) (*Allocation, error) {
	for attempt := 0; attempt < a.opts.MaxAttempts; attempt++ {
		if err := datastore.Backoff(ctx, attempt); err != nil {
			return nil, err
		}
		if g != nil && attempt > 0 {
			if err := a.guardBroken(ctx, g); err != nil {
				return nil, err
			}
		}
		b, err := a.blockOf(ctx, ip)
		if err != nil {
			return nil, err
		}
		ord, _ := b.v.ordinal(ip)
		alloc := b.v.Allocations[ord]
		if alloc == nil || (handle != "" && alloc.Handle != handle) || (seq != 0 && alloc.Sequence != seq) {
			return nil, fmt.Errorf("%w: %s", ErrNotAllocated, ip)
		}
		hresp, err := a.store.Get(ctx, datastore.HandleKey(alloc.Handle))
		if err != nil {
			return nil, err
		}
		h, err := decode[Handle](only(hresp.Kvs))
		if err != nil {
			return nil, err
		}
		target := []Assigned{{IP: ip, Block: b.v.CIDR, Sequence: alloc.Sequence}}
		freed, err := a.releaseInBlock(ctx, b.v.CIDR, alloc.Handle, target, h, g)
		if errors.Is(err, errRetry) {
			continue
		}
		if err != nil {
			return nil, err
		}
		if len(freed) == 0 {
			continue // it changed between our reads; look again
		}
		return alloc, nil
	}
	return nil, fmt.Errorf("%w: releasing %s", ErrContention, ip)
}

// blockOf finds and reads the block containing ip.
func (a *Allocator) blockOf(ctx context.Context, ip netip.Addr) (*versioned[Block], error) {
	resp, err := a.store.Get(ctx, datastore.BlocksPrefix, clientv3.WithPrefix(), clientv3.WithKeysOnly())
	if err != nil {
		return nil, err
	}
	for _, kv := range resp.Kvs {
		c, err := datastore.ParseBlockKey(string(kv.Key))
		if err != nil || !c.Contains(ip) {
			continue
		}
		bresp, err := a.store.Get(ctx, string(kv.Key))
		if err != nil {
			return nil, err
		}
		b, err := decode[Block](only(bresp.Kvs))
		if err != nil {
			return nil, err
		}
		if b.v != nil {
			return b, nil
		}
	}
	return nil, fmt.Errorf("%w: %s is in no allocated block", ErrNotAllocated, ip)
}

// IPsByHandle returns the addresses held under handle (none if it does not exist).
func (a *Allocator) IPsByHandle(ctx context.Context, handleID string) ([]Assigned, error) {
	resp, err := a.store.Get(ctx, datastore.HandleKey(handleID))
	if err != nil {
		return nil, err
	}
	h, err := decode[Handle](only(resp.Kvs))
	if err != nil || h.v == nil {
		return nil, err
	}
	return h.v.IPs, nil
}
