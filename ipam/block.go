package ipam

import (
	"net/netip"
	"time"
)

// Block is a slice of a pool (a /26 by default) that one node usually owns. It is
// stored as JSON at datastore.BlockKey(CIDR) and changed only by compare-and-swap.
type Block struct {
	CIDR netip.Prefix `json:"cidr"`
	// Affinity is the node that owns the block, "" when nobody does (the node
	// released it, or was deleted, while addresses were still in use).
	Affinity string `json:"affinity,omitempty"`
	// Sequence counts allocations; each allocation records the value it got, so a
	// release naming an older sequence cannot free a reused address.
	Sequence uint64 `json:"sequence"`
	// Allocations is indexed by ordinal (address - CIDR base); nil means free.
	Allocations []*Allocation `json:"allocations"`
	// Free is the FIFO of free ordinals: never-used ones first, then freed ones in
	// the order they were freed, so a freed address is reused as late as possible.
	Free []FreeOrdinal `json:"free"`
}

// Allocation is one address in use.
type Allocation struct {
	Handle   string            `json:"handle"`
	Sequence uint64            `json:"seq"`
	Node     string            `json:"node,omitempty"`
	Attrs    map[string]string `json:"attrs,omitempty"`
	Time     time.Time         `json:"time"`
}

// FreeOrdinal is a free address and when it was freed (zero: never used).
type FreeOrdinal struct {
	Ordinal  int   `json:"o"`
	Released int64 `json:"t,omitempty"` // unix seconds
}

func newBlock(cidr netip.Prefix, affinity string) *Block {
	n := blockLen(cidr)
	b := &Block{CIDR: cidr, Affinity: affinity, Allocations: make([]*Allocation, n), Free: make([]FreeOrdinal, n)}
	for i := range b.Free {
		b.Free[i].Ordinal = i
	}
	return b
}

func blockLen(cidr netip.Prefix) int { return 1 << (cidr.Addr().BitLen() - cidr.Bits()) }

func (b *Block) addr(ord int) netip.Addr { return offset(b.CIDR.Addr(), uint64(ord), 0) }

// ordinal is ip's index in the block. A block holds at most 2^12 addresses
// (api.MinBlockSize and MinBlockSizeV6), so the low word is the whole difference.
func (b *Block) ordinal(ip netip.Addr) (int, bool) {
	if !b.CIDR.Contains(ip) {
		return 0, false
	}
	return int(toU128(ip).sub(toU128(b.CIDR.Addr())).lo), true
}

// InUse counts allocated addresses.
func (b *Block) InUse() int { return len(b.Allocations) - len(b.Free) }

// Empty reports whether no address is allocated.
func (b *Block) Empty() bool { return len(b.Free) == len(b.Allocations) }

// cooled reports whether a free ordinal may be handed out now.
func (f FreeOrdinal) cooled(now time.Time, cooldown time.Duration) bool {
	return f.Released == 0 || now.Sub(time.Unix(f.Released, 0)) >= cooldown
}

// Available counts the addresses assign would hand out without breaking the cooldown.
// Freed ordinals sit behind never-used ones and in release order, so the cooled ones
// form a prefix of the FIFO.
func (b *Block) Available(now time.Time, cooldown time.Duration) int {
	n := 0
	for _, f := range b.Free {
		if !f.cooled(now, cooldown) {
			break
		}
		n++
	}
	return n
}

// assign takes up to num addresses from the front of the FIFO for handle. Unless
// ignoreCooldown, it stops at the first address freed less than cooldown ago.
func (b *Block) assign(num int, handle, node string, attrs map[string]string, now time.Time, cooldown time.Duration, ignoreCooldown bool) []Assigned {
	var out []Assigned
	for len(out) < num && len(b.Free) > 0 {
		f := b.Free[0]
		if !ignoreCooldown && !f.cooled(now, cooldown) {
			break
		}
		b.Free = b.Free[1:]
		b.Sequence++
		b.Allocations[f.Ordinal] = &Allocation{Handle: handle, Sequence: b.Sequence, Node: node, Attrs: attrs, Time: now.UTC().Truncate(time.Second)}
		out = append(out, Assigned{IP: b.addr(f.Ordinal), Block: b.CIDR, Sequence: b.Sequence})
	}
	return out
}

// release frees ip if it is allocated to handle with the given sequence (0 matches
// any sequence, "" any handle). It returns the freed allocation, or nil.
func (b *Block) release(ip netip.Addr, handle string, seq uint64, now time.Time) *Allocation {
	ord, ok := b.ordinal(ip)
	if !ok {
		return nil
	}
	a := b.Allocations[ord]
	if a == nil || (handle != "" && a.Handle != handle) || (seq != 0 && a.Sequence != seq) {
		return nil
	}
	b.Allocations[ord] = nil
	b.Free = append(b.Free, FreeOrdinal{Ordinal: ord, Released: now.Unix()})
	return a
}

// Assigned is an address handed out, with what is needed to release exactly it.
type Assigned struct {
	IP       netip.Addr   `json:"ip"`
	Block    netip.Prefix `json:"block"`
	Sequence uint64       `json:"seq"`
}

// Handle lists the addresses held under one handle ID, for release by handle.
type Handle struct {
	ID  string     `json:"id"`
	IPs []Assigned `json:"ips"`
}

func (h *Handle) remove(ip netip.Addr) {
	for i, a := range h.IPs {
		if a.IP == ip {
			h.IPs = append(h.IPs[:i], h.IPs[i+1:]...)
			return
		}
	}
}
