package ipam

import (
	"context"
	"errors"
	"math/big"
	"net/netip"
	"strings"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// Usage summarises pools, blocks and borrowed addresses, for `margayctl ipam show`.
type Usage struct {
	Pools    []PoolUsage  `json:"pools"`
	Blocks   []BlockUsage `json:"blocks"`
	Borrowed []IPInfo     `json:"borrowed"`
}

// PoolUsage is one pool's occupancy.
type PoolUsage struct {
	Name string `json:"name"`
	CIDR string `json:"cidr"`
	// Size is exact: an IPv6 pool can hold more addresses than an int64.
	Size   *big.Int `json:"size"`
	InUse  int      `json:"inUse"`
	Blocks int      `json:"blocks"`
}

// BlockUsage is one block's occupancy.
type BlockUsage struct {
	CIDR     netip.Prefix `json:"cidr"`
	Pool     string       `json:"pool,omitempty"`
	Affinity string       `json:"affinity,omitempty"`
	Size     int          `json:"size"`
	InUse    int          `json:"inUse"`
	Borrowed int          `json:"borrowed"`
}

// IPInfo says who holds an address.
type IPInfo struct {
	IP         netip.Addr        `json:"ip"`
	Pool       string            `json:"pool,omitempty"`
	Block      netip.Prefix      `json:"block,omitzero"`
	BlockOwner string            `json:"blockOwner,omitempty"`
	Allocated  bool              `json:"allocated"`
	Handle     string            `json:"handle,omitempty"`
	Node       string            `json:"node,omitempty"`
	Sequence   uint64            `json:"seq,omitempty"`
	Attrs      map[string]string `json:"attrs,omitempty"`
	Time       *time.Time        `json:"time,omitempty"`
}

func poolName(pools []*api.IPPool, c netip.Prefix) string {
	if p := poolOf(pools, c); p != nil {
		return p.Metadata.Name
	}
	return ""
}

func info(pools []*api.IPPool, b *Block, ord int) IPInfo {
	in := IPInfo{IP: b.addr(ord), Pool: poolName(pools, b.CIDR), Block: b.CIDR, BlockOwner: b.Affinity}
	if al := b.Allocations[ord]; al != nil {
		t := al.Time
		in.Allocated, in.Handle, in.Node, in.Sequence, in.Attrs, in.Time = true, al.Handle, al.Node, al.Sequence, al.Attrs, &t
	}
	return in
}

// Usage reads the occupancy of every pool and block at one revision.
func (a *Allocator) Usage(ctx context.Context) (*Usage, error) {
	s, err := a.loadState(ctx)
	if err != nil {
		return nil, err
	}
	u := &Usage{}
	idx := map[string]int{}
	for _, p := range s.pools {
		idx[p.Metadata.Name] = len(u.Pools)
		u.Pools = append(u.Pools, PoolUsage{Name: p.Metadata.Name, CIDR: p.Spec.CIDR, Size: poolSize(p.Prefix())})
	}
	for _, vb := range s.blocks {
		b := vb.v
		bu := BlockUsage{CIDR: b.CIDR, Pool: poolName(s.pools, b.CIDR), Affinity: b.Affinity, Size: len(b.Allocations), InUse: b.InUse()}
		for ord, al := range b.Allocations {
			if al != nil && al.Node != b.Affinity {
				bu.Borrowed++
				u.Borrowed = append(u.Borrowed, info(s.pools, b, ord))
			}
		}
		if i, ok := idx[bu.Pool]; ok {
			u.Pools[i].InUse += bu.InUse
			u.Pools[i].Blocks++
		}
		u.Blocks = append(u.Blocks, bu)
	}
	return u, nil
}

// poolSize is the number of addresses in p.
func poolSize(p netip.Prefix) *big.Int {
	return new(big.Int).Lsh(big.NewInt(1), uint(p.Addr().BitLen()-p.Bits()))
}

// LookupIP says who holds ip, or that nobody does.
func (a *Allocator) LookupIP(ctx context.Context, ip netip.Addr) (*IPInfo, error) {
	pools, err := datastore.List[*api.IPPool](ctx, a.store)
	if err != nil {
		return nil, err
	}
	b, err := a.blockOf(ctx, ip)
	if errors.Is(err, ErrNotAllocated) {
		in := &IPInfo{IP: ip}
		for _, p := range pools {
			if p.Prefix().Contains(ip) {
				in.Pool = p.Metadata.Name
			}
		}
		return in, nil
	}
	if err != nil {
		return nil, err
	}
	ord, _ := b.v.ordinal(ip)
	in := info(pools, b.v, ord)
	return &in, nil
}

// PodHandles returns the pod handles (k8s-pod-network.<containerID>) holding
// addresses for node, each with the time of its newest allocation, for CNI GC.
func (a *Allocator) PodHandles(ctx context.Context, node string) (map[string]time.Time, error) {
	s, err := a.loadState(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]time.Time{}
	for _, b := range s.blocks {
		for _, al := range b.v.Allocations {
			if al != nil && al.Node == node && strings.HasPrefix(al.Handle, PodHandlePrefix) && al.Time.After(out[al.Handle]) {
				out[al.Handle] = al.Time
			}
		}
	}
	return out, nil
}
