// Package calc decides a node's data plane. Compute is a pure function from what
// the node knows (pools, nodes, its blocks and pods, the BGP best paths) to the
// routes, advertisements, ipsets, iptables rules and sysctls it should have. The
// reconcilers in felix apply the result; nothing here touches the kernel.
package calc

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"

	"github.com/margay-dev/margay/api"
)

// Input is everything the data plane depends on.
type Input struct {
	Node string
	// NodeIP is this node's address with its subnet's prefix length
	// (Node spec.bgp.ipv4Address): the subnet decides which next hops are direct.
	NodeIP netip.Prefix
	Pools  []*api.IPPool
	Nodes  []*api.Node // every node, this one included
	// Blocks are this node's confirmed affine blocks.
	Blocks    []netip.Prefix
	Endpoints []Endpoint
	Paths     []Path // best paths learned from BGP peers
	// RandomFully: iptables and the kernel support MASQUERADE --random-fully.
	RandomFully bool
}

// Endpoint is one local pod interface.
type Endpoint struct {
	Name      string         // WorkloadEndpoint name
	Interface string         // host end of the veth
	IPs       []netip.Prefix // the pod's /32s
}

// Path is a BGP best path learned from a peer.
type Path struct {
	Prefix  netip.Prefix
	NextHop netip.Addr
}

// RouteKind says how a route leaves the node.
type RouteKind int

// Route kinds.
const (
	Blackhole RouteKind = iota // a local block: addresses not in use go nowhere
	Local                      // a local pod: out of its veth (Dev)
	Via                        // a remote prefix: through next hop Gw
)

func (k RouteKind) String() string {
	return [...]string{"blackhole", "local", "via"}[k]
}

// Route is one kernel route margay owns.
type Route struct {
	Dst  netip.Prefix
	Kind RouteKind
	Dev  string     // Local: the pod's host veth
	Gw   netip.Addr // Via: the next hop
}

func (r Route) String() string {
	switch r.Kind {
	case Local:
		return fmt.Sprintf("%s dev %s", r.Dst, r.Dev)
	case Via:
		return fmt.Sprintf("%s via %s", r.Dst, r.Gw)
	}
	return "blackhole " + r.Dst.String()
}

// IPSet is the desired content of one ipset.
type IPSet struct {
	Name    string
	Type    string // "hash:net" or "hash:ip"
	Members []netip.Prefix
}

// ipset names, shared with the iptables rules that match on them.
const (
	SetMasqPools = "mgy-masq-pools" // pools with natOutgoing
	SetAllPools  = "mgy-all-pools"  // every pool
	SetAllHosts  = "mgy-all-hosts"  // every node's address
)

// Output is the desired data plane.
type Output struct {
	Routes []Route // sorted by Dst
	// Advertise is what BGP announces: the node's blocks and the /32s of local
	// pods whose address is borrowed from another node's block.
	Advertise []netip.Prefix
	IPSets    []IPSet
	Chains    []Chain // margay's own iptables chains, in dependency order
	Jumps     []Jump  // from the base chains into margay's
	Sysctls   map[string]string
	// Problems are remote prefixes margay cannot route right and so leaves out.
	Problems []string
}

// Compute decides the node's data plane.
func Compute(in Input) Output {
	out := Output{Sysctls: map[string]string{"net/ipv4/ip_forward": "1"}}
	local := map[netip.Prefix]bool{}
	for _, b := range in.Blocks {
		local[b] = true
		out.Routes = append(out.Routes, Route{Dst: b, Kind: Blackhole})
		out.Advertise = append(out.Advertise, b)
	}
	for _, ep := range in.Endpoints {
		for _, ip := range ep.IPs {
			ip = ip.Masked()
			if local[ip] {
				continue // the same /32 twice: the first endpoint keeps it
			}
			local[ip] = true
			out.Routes = append(out.Routes, Route{Dst: ip, Kind: Local, Dev: ep.Interface})
			if !inAny(ip, in.Blocks) {
				out.Advertise = append(out.Advertise, ip) // borrowed
			}
		}
	}
	nodeIPs := map[netip.Addr]string{}
	for _, n := range in.Nodes {
		if a, ok := nodeAddr(n); ok {
			nodeIPs[a.Addr()] = n.Metadata.Name
		}
	}
	for _, p := range in.Paths {
		dst := p.Prefix.Masked()
		if local[dst] {
			continue // ours: a peer reflected it back
		}
		pool := poolOf(dst, in.Pools)
		if pool == nil {
			continue // only pod addresses are margay's business
		}
		switch {
		case !p.NextHop.Is4():
			out.Problems = append(out.Problems, fmt.Sprintf("%s: next hop %s is not an IPv4 address", dst, p.NextHop))
		case in.NodeIP.Contains(p.NextHop):
			out.Routes = append(out.Routes, Route{Dst: dst, Kind: Via, Gw: p.NextHop})
		case pool.Spec.IPIPMode.Enabled() || pool.Spec.VXLANMode.Enabled():
			who := "next hop " + p.NextHop.String()
			if n, ok := nodeIPs[p.NextHop]; ok {
				who = "node " + n + " (" + p.NextHop.String() + ")"
			}
			out.Problems = append(out.Problems, fmt.Sprintf("%s: %s is outside this node's subnet %s and pool %s encapsulates; encapsulated routes are not supported yet, so it is not routed",
				dst, who, in.NodeIP.Masked(), pool.Metadata.Name))
		default:
			// Encapsulation Never: the underlay is expected to know the way.
			out.Routes = append(out.Routes, Route{Dst: dst, Kind: Via, Gw: p.NextHop})
		}
	}
	slices.SortFunc(out.Routes, func(a, b Route) int { return comparePrefix(a.Dst, b.Dst) })
	slices.SortFunc(out.Advertise, comparePrefix)
	out.IPSets = ipsets(in)
	out.Chains, out.Jumps = rules(in)
	return out
}

func nodeAddr(n *api.Node) (netip.Prefix, bool) {
	if n.Spec.BGP == nil {
		return netip.Prefix{}, false
	}
	p, err := netip.ParsePrefix(n.Spec.BGP.IPv4Address)
	return p, err == nil && p.Addr().Is4()
}

func inAny(p netip.Prefix, in []netip.Prefix) bool {
	for _, b := range in {
		if b.Bits() <= p.Bits() && b.Contains(p.Addr()) {
			return true
		}
	}
	return false
}

// poolOf is the pool that contains p, nil if none does.
func poolOf(p netip.Prefix, pools []*api.IPPool) *api.IPPool {
	for _, pool := range pools {
		c := pool.Prefix()
		if c.IsValid() && c.Bits() <= p.Bits() && c.Contains(p.Addr()) {
			return pool
		}
	}
	return nil
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Bits(), b.Bits())
}

func ipsets(in Input) []IPSet {
	masq := IPSet{Name: SetMasqPools, Type: "hash:net"}
	all := IPSet{Name: SetAllPools, Type: "hash:net"}
	for _, p := range in.Pools {
		c := p.Prefix()
		if !c.IsValid() {
			continue
		}
		all.Members = append(all.Members, c)
		if p.Spec.NATOutgoing { // a disabled pool's pods still need their NAT
			masq.Members = append(masq.Members, c)
		}
	}
	hosts := IPSet{Name: SetAllHosts, Type: "hash:ip"}
	for _, n := range in.Nodes {
		if a, ok := nodeAddr(n); ok {
			hosts.Members = append(hosts.Members, netip.PrefixFrom(a.Addr(), 32))
		}
	}
	for _, s := range []*IPSet{&masq, &all, &hosts} {
		slices.SortFunc(s.Members, comparePrefix)
		s.Members = slices.Compact(s.Members)
	}
	return []IPSet{masq, all, hosts}
}
