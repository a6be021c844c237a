// Package calc decides a node's data plane. Compute is a pure function from what
// the node knows (pools, nodes, its blocks and pods, the BGP best paths) to the
// routes, advertisements, ipsets, iptables rules and sysctls it should have. The
// reconcilers in felix apply the result; nothing here touches the kernel.
package calc

import (
	"cmp"
	"fmt"
	"maps"
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
	// UnderlayMTU is the MTU of the node's uplink; 0 means 1500.
	UnderlayMTU int
	// Gateways maps next hops outside NodeIP's subnet to the address through
	// which the kernel reaches them (itself if on a link): a direct route
	// cannot name an off-link next hop, so it is resolved recursively, as
	// BIRD's "gateway recursive" does for Calico.
	Gateways map[netip.Addr]netip.Addr
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
	Tunnel                     // a remote prefix: through tunnel Dev to Gw, onlink
)

func (k RouteKind) String() string {
	return [...]string{"blackhole", "local", "via", "tunnel"}[k]
}

// Route is one kernel route margay owns.
type Route struct {
	Dst  netip.Prefix
	Kind RouteKind
	Dev  string     // Local: the pod's host veth; Tunnel: the tunnel device
	Gw   netip.Addr // Via: the next hop; Tunnel: the remote end (IPIP: the node, VXLAN: its tunnel address)
	Src  netip.Addr // Tunnel: this node's tunnel address, so replies come back through the tunnel
}

func (r Route) String() string {
	switch r.Kind {
	case Local:
		return fmt.Sprintf("%s dev %s", r.Dst, r.Dev)
	case Via:
		return fmt.Sprintf("%s via %s", r.Dst, r.Gw)
	case Tunnel:
		s := fmt.Sprintf("%s via %s dev %s onlink", r.Dst, r.Gw, r.Dev)
		if r.Src.IsValid() {
			s += " src " + r.Src.String()
		}
		return s
	}
	return "blackhole " + r.Dst.String()
}

// Tunnel devices and their overheads.
const (
	IPIPDevice    = "tunl0"
	VXLANDevice   = "vxlan.margay"
	VXLANVNI      = 4096
	VXLANPort     = 4789
	IPIPOverhead  = 20
	VXLANOverhead = 50
)

// TunnelDevice is a tunnel device the node needs.
type TunnelDevice struct {
	Addr netip.Addr // this node's tunnel address; invalid until IPAM gave one
	MAC  string     // VXLAN: the device's MAC
	MTU  int
}

// VXLANPeer is a remote node reached through VXLAN: a permanent neighbour entry
// (TunnelAddr -> MAC) and a forwarding entry (MAC -> NodeIP).
type VXLANPeer struct {
	Node       string
	TunnelAddr netip.Addr
	MAC        string
	NodeIP     netip.Addr
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
	// PodMTU is the MTU new pods get (written to the file the CNI plugin reads).
	PodMTU int
	// IPIP and VXLAN are the tunnel devices a pool's mode needs, nil for none.
	IPIP, VXLAN *TunnelDevice
	VXLANPeers  []VXLANPeer
	// Problems are what margay cannot do right and so leaves out or warns about.
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
	nodes := map[netip.Addr]*api.Node{}
	var self *api.Node
	for _, n := range in.Nodes {
		if a, ok := nodeAddr(n); ok {
			nodes[a.Addr()] = n
		}
		if n.Metadata.Name == in.Node {
			self = n
		}
	}
	out.IPIP, out.VXLAN = tunnels(in, self)
	out.PodMTU = PodMTU(underlayMTU(in), in.Pools)
	if in.NodeIP.Bits() == 32 && usesCrossSubnet(in.Pools) {
		out.Problems = append(out.Problems, fmt.Sprintf("this node's address %s has no subnet: with CrossSubnet every peer looks cross-subnet and all traffic is encapsulated; give the node's address with its subnet's prefix length (--ip)", in.NodeIP))
	}
	peers := map[string]VXLANPeer{}
	for _, p := range in.Paths {
		dst := p.Prefix.Masked()
		if local[dst] {
			continue // ours: a peer reflected it back
		}
		pool := poolOf(dst, in.Pools)
		if pool == nil {
			continue // only pod addresses are margay's business
		}
		if !p.NextHop.Is4() {
			out.Problems = append(out.Problems, fmt.Sprintf("%s: next hop %s is not an IPv4 address", dst, p.NextHop))
			continue
		}
		cross := !in.NodeIP.Contains(p.NextHop)
		switch {
		case encapsulates(pool.Spec.IPIPMode, cross):
			r := Route{Dst: dst, Kind: Tunnel, Dev: IPIPDevice, Gw: p.NextHop}
			if out.IPIP != nil {
				r.Src = out.IPIP.Addr
			}
			out.Routes = append(out.Routes, r)
		case encapsulates(pool.Spec.VXLANMode, cross):
			n := nodes[p.NextHop]
			peer, problem := vxlanPeer(n, p.NextHop)
			if problem != "" {
				out.Problems = append(out.Problems, fmt.Sprintf("%s: %s; not routed", dst, problem))
				continue
			}
			peers[peer.Node] = peer
			r := Route{Dst: dst, Kind: Tunnel, Dev: VXLANDevice, Gw: peer.TunnelAddr}
			if out.VXLAN != nil {
				r.Src = out.VXLAN.Addr
			}
			out.Routes = append(out.Routes, r)
		case !cross:
			out.Routes = append(out.Routes, Route{Dst: dst, Kind: Via, Gw: p.NextHop})
		default:
			// Encapsulation Never across subnets: the underlay's routers must
			// know the pods (a ToR peering with the nodes), so the route goes
			// through the gateway towards the next hop.
			gw, ok := in.Gateways[p.NextHop]
			if !ok {
				out.Problems = append(out.Problems, fmt.Sprintf("%s: next hop %s is outside this node's subnet %s and the kernel has no route to it; not routed", dst, p.NextHop, in.NodeIP.Masked()))
				continue
			}
			out.Routes = append(out.Routes, Route{Dst: dst, Kind: Via, Gw: gw})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(peers)) {
		out.VXLANPeers = append(out.VXLANPeers, peers[name])
	}
	slices.SortFunc(out.Routes, func(a, b Route) int { return comparePrefix(a.Dst, b.Dst) })
	slices.SortFunc(out.Advertise, comparePrefix)
	out.IPSets = ipsets(in)
	out.Chains, out.Jumps = rules(in)
	return out
}

// encapsulates applies a pool's mode to one destination.
func encapsulates(m api.EncapMode, crossSubnet bool) bool {
	return m == api.EncapAlways || m == api.EncapCrossSubnet && crossSubnet
}

func usesCrossSubnet(pools []*api.IPPool) bool {
	for _, p := range pools {
		if p.Spec.IPIPMode == api.EncapCrossSubnet || p.Spec.VXLANMode == api.EncapCrossSubnet {
			return true
		}
	}
	return false
}

func underlayMTU(in Input) int {
	if in.UnderlayMTU == 0 {
		return 1500
	}
	return in.UnderlayMTU
}

// PodMTU is the underlay's MTU less the largest encapsulation overhead an
// enabled pool may need (disabled pools give no new pods).
func PodMTU(underlay int, pools []*api.IPPool) int {
	overhead := 0
	for _, p := range pools {
		if p.Spec.Disabled {
			continue
		}
		if p.Spec.IPIPMode.Enabled() {
			overhead = max(overhead, IPIPOverhead)
		}
		if p.Spec.VXLANMode.Enabled() {
			overhead = max(overhead, VXLANOverhead)
		}
	}
	return underlay - overhead
}

// tunnels are the devices the pools' modes need, with this node's addresses.
func tunnels(in Input, self *api.Node) (ipip, vxlan *TunnelDevice) {
	underlay := underlayMTU(in)
	for _, p := range in.Pools {
		if p.Spec.IPIPMode.Enabled() && ipip == nil {
			ipip = &TunnelDevice{MTU: underlay - IPIPOverhead}
			if self != nil && self.Spec.BGP != nil {
				ipip.Addr, _ = netip.ParseAddr(self.Spec.BGP.IPv4IPIPTunnelAddr)
			}
		}
		if p.Spec.VXLANMode.Enabled() && vxlan == nil {
			vxlan = &TunnelDevice{MTU: underlay - VXLANOverhead}
			if self != nil {
				vxlan.Addr, _ = netip.ParseAddr(self.Spec.IPv4VXLANTunnelAddr)
				vxlan.MAC = self.Spec.VXLANTunnelMACAddr
			}
		}
	}
	return ipip, vxlan
}

// vxlanPeer is the remote end for a path through next hop nh, or why there is
// none yet.
func vxlanPeer(n *api.Node, nh netip.Addr) (VXLANPeer, string) {
	if n == nil {
		return VXLANPeer{}, fmt.Sprintf("next hop %s is no known node, so it has no VXLAN tunnel", nh)
	}
	addr, err := netip.ParseAddr(n.Spec.IPv4VXLANTunnelAddr)
	if err != nil || n.Spec.VXLANTunnelMACAddr == "" {
		return VXLANPeer{}, fmt.Sprintf("node %s has no VXLAN tunnel address and MAC yet", n.Metadata.Name)
	}
	return VXLANPeer{Node: n.Metadata.Name, TunnelAddr: addr, MAC: n.Spec.VXLANTunnelMACAddr, NodeIP: nh}, ""
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
