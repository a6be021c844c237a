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
	// NodeIP6 is the node's IPv6 address with its subnet's prefix length
	// (spec.bgp.ipv6Address); invalid when the node has none, and then no IPv6
	// prefix is advertised or routed to other nodes.
	NodeIP6 netip.Prefix
	Pools   []*api.IPPool
	Nodes   []*api.Node // every node, this one included
	// Blocks are this node's confirmed affine blocks.
	Blocks    []netip.Prefix
	Endpoints []Endpoint // this node's pods
	// Owners are whose every block and pod address is, across the cluster:
	// a path inside a pool is followed only towards its owner.
	Owners Owners
	// Paths are every path learned from BGP peers, best or not.
	Paths []api.BGPPath
	// RandomFully: iptables and the kernel support MASQUERADE --random-fully.
	RandomFully bool
	// UnderlayMTU is the MTU of the node's uplink; 0 means 1500.
	UnderlayMTU int
	// Gateways maps next hops outside NodeIP's subnet to the address through
	// which the kernel reaches them (itself if on a link): a direct route
	// cannot name an off-link next hop, so it is resolved recursively, as
	// BIRD's "gateway recursive" does for Calico.
	Gateways map[netip.Addr]netip.Addr
	// Policy is the network policy to enforce on this node's endpoints.
	Policy Policy
}

// Endpoint is one local pod interface.
type Endpoint struct {
	Name      string         // WorkloadEndpoint name
	Interface string         // host end of the veth
	IPs       []netip.Prefix // the pod's /32s
}

// Owners says which node each pod prefix belongs to. This node's blocks and
// pods count as its own whether or not they are listed here.
type Owners struct {
	Blocks map[netip.Prefix]string // confirmed block affinities: block -> node
	Pods   map[netip.Addr]string   // WorkloadEndpoint addresses -> node
}

// IgnoredPath is a path inside a pool that does not lead to its prefix's
// owner, and so is not routed: a hijack, a stale or misconfigured peer.
type IgnoredPath struct {
	Path api.BGPPath
	// Owner is the node the prefix, or the block it falls in, belongs to; ""
	// for none. Claimant is the node at the path's next hop, the one the path
	// claims owns the prefix; "" when the next hop is no node (a ToR).
	Owner, Claimant string
	Reason          string
}

func (p IgnoredPath) String() string {
	return fmt.Sprintf("%s via %s from peer %s %s", p.Path.Prefix, p.Path.NextHop, p.Path.Peer, p.Reason)
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

// Tunnel devices and their overheads. IPv6 has a VXLAN device of its own,
// over the IPv6 underlay: its outer header is 20 bytes longer.
const (
	IPIPDevice      = "tunl0"
	VXLANDevice     = "vxlan.margay"
	VXLANV6Device   = "vxlan-v6.margay"
	VXLANVNI        = 4096
	VXLANPort       = 4789
	IPIPOverhead    = 20
	VXLANOverhead   = 50
	VXLANV6Overhead = 70
)

// TunnelDevice is a tunnel device the node needs.
type TunnelDevice struct {
	Addr netip.Addr // this node's tunnel address; invalid until IPAM gave one
	MAC  string     // VXLAN: the device's MAC
	MTU  int
}

// VXLANPeer is a remote node reached through VXLAN: a permanent neighbour entry
// (TunnelAddr -> MAC) and a forwarding entry (MAC -> NodeIP), all of one
// family.
type VXLANPeer struct {
	Node       string
	TunnelAddr netip.Addr
	MAC        string
	NodeIP     netip.Addr
}

// IPSet is the desired content of one ipset.
type IPSet struct {
	Name    string
	Type    string         // "hash:net", "hash:ip" or "hash:ip,port"
	IPv6    bool           // family inet6, else inet
	Members []netip.Prefix // of a hash:net or hash:ip set
	Ports   []IPPort       // of a hash:ip,port set
}

// IPPort is a member of a hash:ip,port set: an address, protocol and port.
type IPPort struct {
	Addr  netip.Addr
	Proto uint8
	Port  uint16
}

func (p IPPort) String() string { return fmt.Sprintf("%s,%d:%d", p.Addr, p.Proto, p.Port) }

func compareIPPort(a, b IPPort) int {
	return cmp.Or(a.Addr.Compare(b.Addr), cmp.Compare(a.Proto, b.Proto), cmp.Compare(a.Port, b.Port))
}

// ipset names, shared with the iptables rules that match on them; the IPv6
// sets have "-v6" after them.
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
	IPSets    []IPSet // of both families
	Chains    []Chain // margay's own iptables chains, in dependency order
	// Chains6 are margay's ip6tables chains, named as the iptables ones.
	Chains6 []Chain
	Jumps   []Jump // from the base chains into margay's, in both families
	Sysctls map[string]string
	// PodMTU is the MTU new pods get (written to the file the CNI plugin reads).
	PodMTU int
	// IPIP, VXLAN and VXLAN6 are the tunnel devices the pools' modes need,
	// nil for none: VXLAN for IPv4 pools, VXLAN6 for IPv6 ones.
	IPIP, VXLAN, VXLAN6     *TunnelDevice
	VXLANPeers, VXLANPeers6 []VXLANPeer
	// Problems are what margay cannot do right and so leaves out or warns about.
	Problems []string
	// Ignored are the learned paths inside a pool that do not lead to their
	// prefix's owner, sorted by prefix.
	Ignored []IgnoredPath
	// Applied lists the policies that apply to each local endpoint, in
	// evaluation order.
	Applied map[string][]PolicyRef
	// PolicyChains names the policy whose rules each policy chain holds.
	PolicyChains map[string]PolicyChain
}

// Compute decides the node's data plane.
func Compute(in Input) Output {
	out := Output{Sysctls: map[string]string{"net/ipv4/ip_forward": "1"}}
	local := map[netip.Prefix]bool{}
	// IPv6 prefixes are advertised only with an IPv6 next hop to give them.
	unadvertised := 0
	advertise := func(p netip.Prefix) {
		if p.Addr().Is4() || in.NodeIP6.IsValid() {
			out.Advertise = append(out.Advertise, p)
		} else {
			unadvertised++
		}
	}
	for _, b := range in.Blocks {
		local[b] = true
		out.Routes = append(out.Routes, Route{Dst: b, Kind: Blackhole})
		advertise(b)
	}
	for _, ep := range in.Endpoints {
		for _, ip := range ep.IPs {
			ip = ip.Masked()
			if local[ip] {
				continue // the same address twice: the first endpoint keeps it
			}
			local[ip] = true
			out.Routes = append(out.Routes, Route{Dst: ip, Kind: Local, Dev: ep.Interface})
			if !inAny(ip, in.Blocks) {
				advertise(ip) // borrowed
			}
		}
	}
	if unadvertised > 0 {
		out.Problems = append(out.Problems, fmt.Sprintf("%d IPv6 blocks or pod addresses are not advertised: this node has no IPv6 address; give it one with margay-node --ip6", unadvertised))
	}
	if in.NodeIP6.IsValid() {
		out.Sysctls["net/ipv6/conf/all/forwarding"] = "1"
	}
	nodes := map[string]*api.Node{}
	for _, n := range in.Nodes {
		nodes[n.Metadata.Name] = n
	}
	self := nodes[in.Node]
	out.IPIP, out.VXLAN, out.VXLAN6 = tunnels(in, self)
	out.PodMTU = PodMTU(underlayMTU(in), in.Pools)
	if in.NodeIP.Bits() == 32 && usesCrossSubnet(in.Pools) {
		out.Problems = append(out.Problems, fmt.Sprintf("this node's address %s has no subnet: with CrossSubnet every peer looks cross-subnet and all traffic is encapsulated; give the node's address with its subnet's prefix length (--ip)", in.NodeIP))
	}
	peers, peers6 := map[string]VXLANPeer{}, map[string]VXLANPeer{}
	own := owners(in, local)
	routed := map[netip.Prefix]bool{}
	for _, p := range sortedPaths(in.Paths) {
		dst := p.Prefix.Masked()
		pool := poolOf(dst, in.Pools)
		if pool == nil {
			continue // only pod addresses are margay's business
		}
		self := in.NodeIP
		if dst.Addr().Is6() {
			self = in.NodeIP6
		}
		owner, ignored := own.follow(p, self.Addr())
		if ignored != nil {
			out.Ignored = append(out.Ignored, *ignored)
		}
		if owner == "" || routed[dst] {
			continue // the first path that leads to the owner wins, best first
		}
		routed[dst] = true
		if p.NextHop.Is4() != dst.Addr().Is4() || p.NextHop.Is4In6() {
			out.Problems = append(out.Problems, fmt.Sprintf("%s: next hop %s is not an address of the prefix's family", dst, p.NextHop))
			continue
		}
		cross := !self.Contains(p.NextHop)
		switch {
		case encapsulates(pool.Spec.IPIPMode, cross):
			r := Route{Dst: dst, Kind: Tunnel, Dev: IPIPDevice, Gw: p.NextHop}
			if out.IPIP != nil {
				r.Src = out.IPIP.Addr
			}
			out.Routes = append(out.Routes, r)
		case encapsulates(pool.Spec.VXLANMode, cross):
			peer, problem := vxlanPeer(nodes[owner], p.NextHop)
			if problem != "" {
				out.Problems = append(out.Problems, fmt.Sprintf("%s: %s; not routed", dst, problem))
				continue
			}
			dev, r := out.VXLAN, Route{Dst: dst, Kind: Tunnel, Dev: VXLANDevice, Gw: peer.TunnelAddr}
			if dst.Addr().Is6() {
				dev, r.Dev = out.VXLAN6, VXLANV6Device
				peers6[peer.Node] = peer
			} else {
				peers[peer.Node] = peer
			}
			if dev != nil {
				r.Src = dev.Addr
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
				out.Problems = append(out.Problems, fmt.Sprintf("%s: next hop %s is outside this node's subnet %s and the kernel has no route to it; not routed", dst, p.NextHop, self.Masked()))
				continue
			}
			out.Routes = append(out.Routes, Route{Dst: dst, Kind: Via, Gw: gw})
		}
	}
	for _, name := range slices.Sorted(maps.Keys(peers)) {
		out.VXLANPeers = append(out.VXLANPeers, peers[name])
	}
	for _, name := range slices.Sorted(maps.Keys(peers6)) {
		out.VXLANPeers6 = append(out.VXLANPeers6, peers6[name])
	}
	slices.SortFunc(out.Routes, func(a, b Route) int { return comparePrefix(a.Dst, b.Dst) })
	slices.SortFunc(out.Advertise, comparePrefix)
	out.IPSets = append(ipsets(in, ipv4), ipsets(in, ipv6)...)
	out.Chains, out.Jumps = rules(in, ipv4)
	out.Chains6, _ = rules(in, ipv6) // the same jumps
	plan := policyRules(in.Endpoints, in.Policy)
	out.IPSets = append(out.IPSets, plan.sets...)
	// Policy chains go first: MGY-FORWARD, in out.Chains, refers to them.
	out.Chains = append(plan.chains, out.Chains...)
	out.Chains6 = append(plan.chains6, out.Chains6...)
	out.Problems = append(out.Problems, plan.problems...)
	out.Applied = plan.applied
	out.PolicyChains = plan.policyChains
	return out
}

// sortedPaths is paths by prefix, each prefix's best path first.
func sortedPaths(paths []api.BGPPath) []api.BGPPath {
	out := slices.Clone(paths)
	slices.SortStableFunc(out, func(a, b api.BGPPath) int {
		if c := comparePrefix(a.Prefix.Masked(), b.Prefix.Masked()); c != 0 {
			return c
		}
		switch {
		case a.Best && !b.Best:
			return -1
		case b.Best && !a.Best:
			return 1
		}
		return 0
	})
	return out
}

// ownership is who may be the next hop of each prefix inside a pool.
type ownership struct {
	self   string
	blocks map[netip.Prefix]string
	pods   map[netip.Addr]string
	addrs  map[string]netip.Addr // node -> IPv4 BGP address
	addrs6 map[string]netip.Addr // node -> IPv6 BGP address
	names  map[netip.Addr]string // BGP address (either family) -> node
}

// owners merges in.Owners with this node's own blocks and pods (local).
func owners(in Input, local map[netip.Prefix]bool) ownership {
	o := ownership{self: in.Node, blocks: maps.Clone(in.Owners.Blocks), pods: maps.Clone(in.Owners.Pods),
		addrs: map[string]netip.Addr{}, addrs6: map[string]netip.Addr{}, names: map[netip.Addr]string{}}
	if o.blocks == nil {
		o.blocks = map[netip.Prefix]string{}
	}
	if o.pods == nil {
		o.pods = map[netip.Addr]string{}
	}
	for _, b := range in.Blocks {
		o.blocks[b] = in.Node
	}
	for p := range local {
		if p.IsSingleIP() {
			o.pods[p.Addr()] = in.Node
		}
	}
	for _, n := range in.Nodes {
		if a, ok := nodeAddr(n); ok {
			o.addrs[n.Metadata.Name] = a.Addr()
			o.names[a.Addr()] = n.Metadata.Name
		}
		if a, err := n.BGPAddressV6(); err == nil && a.IsValid() {
			o.addrs6[n.Metadata.Name] = a.Addr()
			o.names[a.Addr()] = n.Metadata.Name
		}
	}
	return o
}

// owner is the node dst belongs to: for a /32, the node of the pod with that
// address; for a block, its affine node. exact is false when dst is neither,
// and owner then names the node whose block dst falls in, if any.
func (o ownership) owner(dst netip.Prefix) (owner string, exact bool) {
	if dst.IsSingleIP() {
		if n, ok := o.pods[dst.Addr()]; ok {
			return n, true
		}
	}
	if n, ok := o.blocks[dst]; ok {
		return n, true
	}
	for b, n := range o.blocks {
		if b.Bits() <= dst.Bits() && b.Contains(dst.Addr()) {
			return n, false
		}
	}
	return "", false
}

// follow decides a path inside a pool: it is followed only when its prefix is
// a block or pod address of another node and the next hop is that node,
// whichever peer sent it; owner is then that node. Anything else is ignored,
// with the reason, and owner is ""; this
// node's own prefixes reflected back to it (next hop self) are dropped
// silently, as BGP's normal echo.
func (o ownership) follow(p api.BGPPath, selfAddr netip.Addr) (string, *IgnoredPath) {
	dst := p.Prefix.Masked()
	owner, exact := o.owner(dst)
	addrs := o.addrs
	if dst.Addr().Is6() {
		addrs = o.addrs6
	}
	addr, hasAddr := addrs[owner]
	var reason string
	switch {
	case exact && owner == o.self && p.NextHop == selfAddr:
		return "", nil
	case exact && owner == o.self:
		reason = "is this node's own"
	case exact && !hasAddr:
		reason = fmt.Sprintf("belongs to node %s, which has no BGP address", owner)
	case exact && p.NextHop == addr:
		return owner, nil
	case exact:
		reason = fmt.Sprintf("belongs to node %s at %s", owner, addr)
	case owner != "":
		reason = fmt.Sprintf("is no block or pod address; it falls in a block of node %s", owner)
	default:
		reason = "is no block or pod address of any node"
	}
	return "", &IgnoredPath{Path: p, Owner: owner, Claimant: o.names[p.NextHop], Reason: reason}
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
		switch {
		case p.Spec.VXLANMode.Enabled() && p.IsIPv6():
			overhead = max(overhead, VXLANV6Overhead)
		case p.Spec.VXLANMode.Enabled():
			overhead = max(overhead, VXLANOverhead)
		}
	}
	return underlay - overhead
}

// tunnels are the devices the pools' modes need, with this node's addresses.
func tunnels(in Input, self *api.Node) (ipip, vxlan, vxlan6 *TunnelDevice) {
	underlay := underlayMTU(in)
	if self == nil {
		self = &api.Node{}
	}
	for _, p := range in.Pools {
		if p.Spec.IPIPMode.Enabled() && ipip == nil {
			ipip = &TunnelDevice{MTU: underlay - IPIPOverhead}
			if self.Spec.BGP != nil {
				ipip.Addr, _ = netip.ParseAddr(self.Spec.BGP.IPv4IPIPTunnelAddr)
			}
		}
		if !p.Spec.VXLANMode.Enabled() {
			continue
		}
		switch {
		case p.IsIPv6() && vxlan6 == nil && in.NodeIP6.IsValid(): // IPv6 is routed only then
			vxlan6 = &TunnelDevice{MTU: underlay - VXLANV6Overhead, MAC: self.Spec.VXLANTunnelMACAddrV6}
			vxlan6.Addr, _ = netip.ParseAddr(self.Spec.IPv6VXLANTunnelAddr)
		case !p.IsIPv6() && vxlan == nil:
			vxlan = &TunnelDevice{MTU: underlay - VXLANOverhead, MAC: self.Spec.VXLANTunnelMACAddr}
			vxlan.Addr, _ = netip.ParseAddr(self.Spec.IPv4VXLANTunnelAddr)
		}
	}
	return ipip, vxlan, vxlan6
}

// vxlanPeer is the remote end for a path to node n through next hop nh, its
// tunnel address and MAC of nh's family, or why there is none yet.
func vxlanPeer(n *api.Node, nh netip.Addr) (VXLANPeer, string) {
	addr, mac, what := n.Spec.IPv4VXLANTunnelAddr, n.Spec.VXLANTunnelMACAddr, "VXLAN"
	if nh.Is6() {
		addr, mac, what = n.Spec.IPv6VXLANTunnelAddr, n.Spec.VXLANTunnelMACAddrV6, "IPv6 VXLAN"
	}
	a, err := netip.ParseAddr(addr)
	if err != nil || a.Is6() != nh.Is6() || mac == "" {
		return VXLANPeer{}, fmt.Sprintf("node %s has no %s tunnel address and MAC yet", n.Metadata.Name, what)
	}
	return VXLANPeer{Node: n.Metadata.Name, TunnelAddr: a, MAC: mac, NodeIP: nh}, ""
}

func nodeAddr(n *api.Node) (netip.Prefix, bool) {
	p, err := n.BGPAddress()
	return p, err == nil && p.IsValid()
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

// ipsets are the sets of one family that margay's own rules match on.
func ipsets(in Input, f family) []IPSet {
	masq := IPSet{Name: f.set(SetMasqPools), Type: "hash:net", IPv6: f.v6}
	all := IPSet{Name: f.set(SetAllPools), Type: "hash:net", IPv6: f.v6}
	for _, p := range in.Pools {
		c := p.Prefix()
		if !f.has(c.Addr()) {
			continue
		}
		all.Members = append(all.Members, c)
		if p.Spec.NATOutgoing { // a disabled pool's pods still need their NAT
			masq.Members = append(masq.Members, c)
		}
	}
	hosts := IPSet{Name: f.set(SetAllHosts), Type: "hash:ip", IPv6: f.v6}
	for _, n := range in.Nodes {
		a, err := n.BGPAddress()
		if f.v6 {
			a, err = n.BGPAddressV6()
		}
		if err == nil && a.IsValid() {
			hosts.Members = append(hosts.Members, netip.PrefixFrom(a.Addr(), a.Addr().BitLen()))
		}
	}
	for _, s := range []*IPSet{&masq, &all, &hosts} {
		slices.SortFunc(s.Members, comparePrefix)
		s.Members = slices.Compact(s.Members)
	}
	return []IPSet{masq, all, hosts}
}
