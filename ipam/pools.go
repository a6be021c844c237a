package ipam

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"iter"
	"net/netip"
	"strings"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// eligiblePools picks the pools of family f a node may allocate from, in the
// order to try them. With names, only those pools (in that order, each matched by
// name or CIDR); else every pool of the family, sorted by name. Disabled pools and
// pools whose nodeSelector rejects the node are skipped; if nothing is left the
// error says why for each pool.
func eligiblePools(all []*api.IPPool, f Family, names []string, nodeLabels map[string]string) ([]*api.IPPool, error) {
	var candidates []*api.IPPool
	for _, n := range names {
		var found *api.IPPool
		for _, p := range all {
			if p.Metadata.Name == n || p.Spec.CIDR == n {
				found = p
				break
			}
		}
		if found == nil {
			return nil, fmt.Errorf("IP pool %q does not exist", n)
		}
		if pf := FamilyOf(found.Prefix().Addr()); pf != f {
			return nil, fmt.Errorf("IP pool %q (%s) is %s and cannot serve an %s address", n, found.Spec.CIDR, pf, f)
		}
		candidates = append(candidates, found)
	}
	if len(names) == 0 {
		for _, p := range all {
			if FamilyOf(p.Prefix().Addr()) == f {
				candidates = append(candidates, p)
			}
		}
	}
	var out []*api.IPPool
	var why []string
	for _, p := range candidates {
		switch {
		case p.Spec.Disabled:
			why = append(why, fmt.Sprintf("%s is disabled", p.Metadata.Name))
		case !p.Selects(nodeLabels):
			why = append(why, fmt.Sprintf("%s's nodeSelector %q does not select this node", p.Metadata.Name, p.Spec.NodeSelector))
		default:
			out = append(out, p)
		}
	}
	if len(out) == 0 {
		if len(candidates) == 0 {
			return nil, fmt.Errorf("no %s pools exist; create one with margayctl apply", f)
		}
		return nil, fmt.Errorf("no usable %s pool: %s", f, strings.Join(why, "; "))
	}
	return out, nil
}

// poolOf returns the pool containing cidr among pools, or nil.
func poolOf(pools []*api.IPPool, cidr netip.Prefix) *api.IPPool {
	for _, p := range pools {
		if pp := p.Prefix(); pp.Bits() <= cidr.Bits() && pp.Contains(cidr.Addr()) {
			return p
		}
	}
	return nil
}

// overlapsAny reports whether c overlaps a block in taken, whose longest prefix is
// finest bits. Blocks of a deleted pool stay, and a pool recreated with another
// blockSize must not cut blocks across them.
func overlapsAny(c netip.Prefix, taken map[netip.Prefix]bool, finest int) bool {
	minBits, _ := api.BlockSizeRange(c.Addr().Is6())
	for bits := minBits; bits <= c.Bits(); bits++ {
		if taken[netip.PrefixFrom(c.Addr(), bits).Masked()] {
			return true
		}
	}
	if finest <= c.Bits() {
		return false // the usual case: every block is this size or larger
	}
	for t := range taken {
		if t.Bits() > c.Bits() && c.Contains(t.Addr()) {
			return true
		}
	}
	return false
}

// finestBits is the longest prefix among the taken blocks of family f.
func finestBits(taken map[netip.Prefix]bool, f Family) int {
	finest := 0
	for t := range taken {
		if FamilyOf(t.Addr()) == f {
			finest = max(finest, t.Bits())
		}
	}
	return finest
}

// maxCandidateBits bounds the block index: an IPv6 pool can hold 2^80 blocks,
// and the first 2^62 of them are more than any cluster claims.
const maxCandidateBits = 62

// blockCandidates lists the block CIDRs of pool for which free is true, starting at
// an offset derived from the node name, so nodes claiming at once rarely collide.
// It is lazy: a /8 pool of /32 blocks has 2^24 candidates.
func blockCandidates(pool *api.IPPool, free func(netip.Prefix) bool, node string) iter.Seq[netip.Prefix] {
	pfx := pool.Prefix()
	size := pool.Spec.BlockSize
	n := uint64(1) << min(size-pfx.Bits(), maxCandidateBits)
	shift := pfx.Addr().BitLen() - size
	h := fnv.New64a()
	h.Write([]byte(node))
	start := h.Sum64() % n
	return func(yield func(netip.Prefix) bool) {
		for i := range n {
			cidr := netip.PrefixFrom(offset(pfx.Addr(), (start+i)%n, shift), size)
			if free(cidr) && !yield(cidr) {
				return
			}
		}
	}
}

// UsablePools returns the pools of family f node may assign from (names restricts
// them, as in AssignArgs.Pools), or an error saying why there are none.
func UsablePools(ctx context.Context, store *datastore.Store, node string, f Family, names []string) ([]*api.IPPool, error) {
	pools, err := datastore.List[*api.IPPool](ctx, store)
	if err != nil {
		return nil, err
	}
	n, err := datastore.Get[*api.Node](ctx, store, node)
	switch {
	case errors.Is(err, datastore.ErrNotFound):
		return nil, unknownNode(node)
	case err != nil:
		return nil, err
	}
	return eligiblePools(pools, f, names, n.Metadata.Labels)
}

// unknownNode is ErrUnknownNode for node, with the likely causes.
func unknownNode(node string) error {
	return fmt.Errorf("%w: %q has no Node resource; margay-node writes it when it starts, under its --nodename, which must be the CNI configuration's nodename", ErrUnknownNode, node)
}
