// Package bgp is margay's embedded BGP speaker: the pure computation of a node's
// peer set from the datastore (node-to-node mesh, route reflectors, BGPPeer
// resources), and a thin wrapper over GoBGP that applies that set, advertises the
// node's prefixes and reports the best paths learned from peers.
package bgp

import (
	"fmt"
	"net/netip"
	"sort"
	"strings"
	"time"

	"github.com/margay-dev/margay/api"
)

// PeerType says where a peering comes from. The zero value is not a valid type, so
// a peer whose origin is unknown (one added with the gobgp CLI) is never shown as
// a mesh peer.
type PeerType int

// Peer types, as calicoctl node status names them.
const (
	Mesh PeerType = iota + 1
	Global
	NodeSpecific
)

// String returns the name calicoctl node status uses.
func (t PeerType) String() string {
	switch t {
	case Mesh:
		return "node-to-node mesh"
	case Global:
		return "global"
	case NodeSpecific:
		return "node specific"
	}
	return fmt.Sprintf("PeerType(%d)", int(t))
}

// token is the short form of t in a GoBGP peer description.
func (t PeerType) token() string {
	switch t {
	case Mesh:
		return "mesh"
	case Global:
		return "global"
	case NodeSpecific:
		return "node"
	}
	return ""
}

// Peer is one BGP session the node wants.
type Peer struct {
	Address netip.Addr
	Port    int // 179 by default
	// ASNumber is the peer's AS; equal to ours makes it iBGP.
	ASNumber uint32
	Type     PeerType
	// Name is the peer node's name (mesh and peerSelector peers) or the BGPPeer's name.
	Name     string
	Password string // TCP MD5; "" for none
	// KeepaliveTime and HoldTime are 0 for GoBGP's defaults (30 s and 90 s).
	KeepaliveTime, HoldTime time.Duration
	// MaxRestartTime is the graceful-restart time we ask the peer to keep our
	// routes for while this node's agent restarts.
	MaxRestartTime time.Duration
	// RouteReflectorClient: this node reflects routes to this peer.
	RouteReflectorClient bool
	// MaxPrefixes is the most prefixes the peer may send (0: no limit): one
	// more closes the session, which GoBGP then keeps down.
	MaxPrefixes uint32
	// Passive: wait for the peer to connect. Between two nodes only the one with
	// the higher address connects (Calico's "mesh is unidirectional"): when both
	// do, GoBGP's 5 s idle hold after a reset makes each side close the other's
	// attempts in turn, and a reset session took 20 s to return in a test.
	Passive bool
}

// description is the GoBGP peer description that carries Type and Name, so that
// tools reading the gRPC API (margayctl node status, gobgp neighbor) can show them.
func (p Peer) description() string { return p.Type.token() + " " + p.Name }

// heldMark ends the description of a peer held down for maxPrefixes.
const heldMark = "(held down: maxPrefixes exceeded)"

// ParseDescription parses a GoBGP peer description written by this package,
// "<mesh|global|node> <name>", perhaps followed by heldMark. ok is false for
// any other description.
func ParseDescription(desc string) (t PeerType, name string, ok bool) {
	tok, rest, _ := strings.Cut(desc, " ")
	name, _, _ = strings.Cut(rest, " ")
	for _, c := range []PeerType{Mesh, Global, NodeSpecific} {
		if tok == c.token() {
			return c, name, true
		}
	}
	return 0, "", false
}

// nodeInfo is what the peer computation needs from a Node.
type nodeInfo struct {
	name      string
	addr      netip.Addr // invalid: no IPv4 address
	addr6     netip.Addr // invalid: no IPv6 address
	as        uint32
	clusterID string
	labels    map[string]string
}

func (n *nodeInfo) isReflector() bool { return n.clusterID != "" }

// hasAddr reports whether a is one of n's BGP addresses.
func (n *nodeInfo) hasAddr(a netip.Addr) bool { return a == n.addr || a == n.addr6 }

// ownAddr is n's address of a's family, invalid when n has none.
func (n *nodeInfo) ownAddr(a netip.Addr) netip.Addr {
	if a.Is4() {
		return n.addr
	}
	return n.addr6
}

// DesiredPeers computes the BGP sessions of node self with Calico's rules:
//
//   - With the node-to-node mesh enabled, self peers with every other node, except
//     that route reflectors (nodes with a routeReflectorClusterID) take no part in
//     the mesh.
//   - A BGPPeer applies to self when its node is self, its nodeSelector matches
//     self's labels, or it sets neither (a global peer). It names one peer by
//     peerIP, or every other node matching its peerSelector.
//   - As in Calico, a BGPPeer between nodes works both ways: when self is on its
//     remote side (matched by peerSelector, or at peerIP in the given AS), self
//     peers with the nodes on its local side.
//   - When self is a route reflector, a peer that is a node, in self's AS, and not
//     a reflector of self's own cluster, is a route-reflector client.
//   - Two nodes peer over IPv4 when both have an IPv4 address (the session
//     carries IPv6 too, as MP-BGP), otherwise over IPv6 when both have one.
//   - Of two peering nodes, the one with the lower address is passive.
//
// Nodes without a BGP address are left out. Self's own address is never a peer.
// When several sources name one address, an explicit BGPPeer wins over the mesh and
// the BGPPeer first by name wins over the others; a conflict with different session
// settings is reported. Invalid input is reported in problems and skipped, never
// fatal. The result is sorted by address.
func DesiredPeers(self string, nodes []*api.Node, peers []*api.BGPPeer, s api.BGPSettings) (out []Peer, problems []string) {
	ps := &peerSet{settings: s, chosen: map[netip.Addr]Peer{}, source: map[netip.Addr]string{}}
	if ps.loadNodes(self, nodes) {
		for _, bp := range byName(peers, func(p *api.BGPPeer) string { return p.Metadata.Name }) {
			ps.addBGPPeer(bp)
		}
		if s.NodeToNodeMeshEnabled && !ps.me.isReflector() {
			ps.addMesh()
		}
	}
	out = make([]Peer, 0, len(ps.chosen))
	for _, p := range ps.chosen {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Address.Less(out[j].Address) })
	return out, ps.problems
}

// peerSet is DesiredPeers' work in progress.
type peerSet struct {
	settings api.BGPSettings
	me       *nodeInfo
	others   []*nodeInfo // every other node with a BGP address, by name
	byAddr   map[netip.Addr]*nodeInfo
	chosen   map[netip.Addr]Peer
	source   map[netip.Addr]string // the BGPPeer that claimed each address
	problems []string
}

func (ps *peerSet) problemf(format string, args ...any) {
	ps.problems = append(ps.problems, fmt.Sprintf(format, args...))
}

// byName is the non-nil items sorted by name.
func byName[T any](items []*T, name func(*T) string) []*T {
	out := make([]*T, 0, len(items))
	for _, it := range items {
		if it != nil {
			out = append(out, it)
		}
	}
	sort.Slice(out, func(i, j int) bool { return name(out[i]) < name(out[j]) })
	return out
}

// loadNodes finds self and the other nodes. It reports false, with the
// problem, when self cannot peer at all.
func (ps *peerSet) loadNodes(self string, nodes []*api.Node) bool {
	ps.byAddr = map[netip.Addr]*nodeInfo{}
	var infos []*nodeInfo
	for _, n := range byName(nodes, func(n *api.Node) string { return n.Metadata.Name }) {
		info := ps.nodeInfo(n)
		if info.name == self {
			ps.me = info
			continue
		}
		if info.addr, info.addr6 = ps.claim(info, info.addr), ps.claim(info, info.addr6); info.addr.IsValid() || info.addr6.IsValid() {
			infos = append(infos, info)
		}
	}
	me := ps.me
	if me == nil {
		ps.problemf("node %q is not in the datastore; it has no BGP peers until its Node resource exists", self)
		return false
	}
	if !me.addr.IsValid() && !me.addr6.IsValid() {
		ps.problemf("node %q has no spec.bgp.ipv4Address or ipv6Address; it has no BGP peers until one is set", self)
		return false
	}
	for _, a := range []netip.Addr{me.addr, me.addr6} {
		if n, dup := ps.byAddr[a]; dup {
			ps.problemf("nodes %q and %q both have BGP address %s; not peering with %q", me.name, n.name, a, n.name)
			delete(ps.byAddr, n.addr)
			delete(ps.byAddr, n.addr6)
			n.addr, n.addr6 = netip.Addr{}, netip.Addr{}
		}
	}
	for _, n := range infos {
		if ps.peerAddr(n).IsValid() {
			ps.others = append(ps.others, n)
		}
	}
	return true
}

// nodeInfo is what n says of itself; a malformed address is reported and left
// out.
func (ps *peerSet) nodeInfo(n *api.Node) *nodeInfo {
	info := &nodeInfo{name: n.Metadata.Name, as: uint32(ps.settings.ASNumber), labels: n.Metadata.Labels}
	b := n.Spec.BGP
	if b == nil {
		return info
	}
	if b.ASNumber != nil {
		info.as = uint32(*b.ASNumber)
	}
	info.clusterID = b.RouteReflectorClusterID
	if addr, err := n.BGPAddress(); err != nil {
		ps.problemf("node %q: spec.bgp.ipv4Address %q %v; leaving it out of BGP", info.name, b.IPv4Address, err)
	} else {
		info.addr = addr.Addr()
	}
	if addr, err := n.BGPAddressV6(); err != nil {
		ps.problemf("node %q: spec.bgp.ipv6Address %q %v; leaving it out of BGP", info.name, b.IPv6Address, err)
	} else {
		info.addr6 = addr.Addr()
	}
	return info
}

// claim records that a (if valid) is n's; it returns a, or the invalid Addr
// when an earlier node has it.
func (ps *peerSet) claim(n *nodeInfo, a netip.Addr) netip.Addr {
	if !a.IsValid() {
		return a
	}
	if prev, dup := ps.byAddr[a]; dup {
		ps.problemf("nodes %q and %q both have BGP address %s; peering with %q there only", prev.name, n.name, a, prev.name)
		return netip.Addr{}
	}
	ps.byAddr[a] = n
	return a
}

// peerAddr is the address self peers with node n at: IPv4 when both have
// one, else IPv6 when both have one, else none.
func (ps *peerSet) peerAddr(n *nodeInfo) netip.Addr {
	switch {
	case ps.me.addr.IsValid() && n.addr.IsValid():
		return n.addr
	case ps.me.addr6.IsValid() && n.addr6.IsValid():
		return n.addr6
	}
	return netip.Addr{}
}

// rrClient applies the reflector rule to a peer at addr with AS as.
func (ps *peerSet) rrClient(addr netip.Addr, as uint32) bool {
	n, ok := ps.byAddr[addr]
	return ok && ps.me.isReflector() && as == ps.me.as && n.clusterID != ps.me.clusterID
}

// passive: of two nodes, the lower address waits for the higher to connect.
func (ps *peerSet) passive(addr netip.Addr) bool {
	_, isNode := ps.byAddr[addr]
	return isNode && ps.me.ownAddr(addr).Less(addr)
}

// add takes p from BGPPeer from, unless an earlier BGPPeer took its address.
func (ps *peerSet) add(from string, p Peer) {
	if ps.me.hasAddr(p.Address) {
		return
	}
	if !ps.me.ownAddr(p.Address).IsValid() {
		f, flag := "ipv4Address", "--ip"
		if p.Address.Is6() {
			f, flag = "ipv6Address", "--ip6"
		}
		ps.problemf("BGPPeer %q: peer %s needs this node's spec.bgp.%s (margay-node %s); leaving the peer out", from, p.Address, f, flag)
		return
	}
	if prev, ok := ps.chosen[p.Address]; ok {
		if !sameSession(prev, p) {
			ps.problemf("BGPPeer %q: peer %s is already configured differently by BGPPeer %q; using %q", from, p.Address, ps.source[p.Address], ps.source[p.Address])
		}
		return
	}
	ps.chosen[p.Address] = p
	ps.source[p.Address] = from
}

// nodePeer is a session with node n with base's settings.
func (ps *peerSet) nodePeer(base Peer, n *nodeInfo, t PeerType) Peer {
	p := base
	p.Address, p.Port, p.ASNumber, p.Type, p.Name = ps.peerAddr(n), ps.settings.ListenPort, n.as, t, n.name
	p.RouteReflectorClient = ps.rrClient(p.Address, n.as)
	p.Passive = ps.passive(p.Address)
	return p
}

// peerSide is one side of a BGPPeer: the nodes it configures (local) or
// what they peer with (remote).
type peerSide struct {
	node string       // local: this node only
	sel  api.Selector // local: nodeSelector; remote: peerSelector
	// remote without a selector: peerIP and its port; explicitPort says
	// peerIP gave one.
	addr         netip.Addr
	port         int
	explicitPort bool
}

func (side peerSide) hasNode(n *nodeInfo) bool {
	switch {
	case side.node != "":
		return n.name == side.node
	case side.sel != nil:
		return side.sel.Matches(n.labels)
	}
	return true
}

// sides parses a BGPPeer's two sides; ok is false, with the problem, when the
// BGPPeer cannot be used.
func (ps *peerSet) sides(bp *api.BGPPeer) (local, remote peerSide, ok bool) {
	name, sp := bp.Metadata.Name, &bp.Spec
	local.node = sp.Node
	if sp.Node == "" && sp.NodeSelector != "" {
		var err error
		if local.sel, err = api.ParseSelector(sp.NodeSelector); err != nil {
			ps.problemf("BGPPeer %q: spec.nodeSelector %q: %v; ignoring the peer", name, sp.NodeSelector, err)
			return local, remote, false
		}
	}
	switch {
	case sp.PeerIP != "" && sp.PeerSelector != "":
		ps.problemf("BGPPeer %q: set either spec.peerIP or spec.peerSelector, not both; ignoring the peer", name)
		return local, remote, false
	case sp.PeerIP != "":
		var err error
		if remote.addr, remote.port, err = bp.PeerAddr(); err != nil {
			ps.problemf("BGPPeer %q: spec.peerIP %q %v; ignoring the peer", name, sp.PeerIP, err)
			return local, remote, false
		}
		if sp.ASNumber == nil {
			ps.problemf("BGPPeer %q: spec.asNumber is required with spec.peerIP; ignoring the peer", name)
			return local, remote, false
		}
		_, err = netip.ParseAddr(sp.PeerIP) // no error: no port given
		remote.explicitPort = err != nil
	case sp.PeerSelector != "":
		var err error
		if remote.sel, err = api.ParseSelector(sp.PeerSelector); err != nil {
			ps.problemf("BGPPeer %q: spec.peerSelector %q: %v; ignoring the peer", name, sp.PeerSelector, err)
			return local, remote, false
		}
	default:
		ps.problemf("BGPPeer %q: set spec.peerIP or spec.peerSelector; ignoring the peer", name)
		return local, remote, false
	}
	return local, remote, true
}

// addBGPPeer adds the sessions one BGPPeer gives self.
func (ps *peerSet) addBGPPeer(bp *api.BGPPeer) {
	local, remote, ok := ps.sides(bp)
	if !ok {
		return
	}
	name, sp := bp.Metadata.Name, &bp.Spec
	typ := Global
	if sp.Node != "" || sp.NodeSelector != "" {
		typ = NodeSpecific
	}
	base := Peer{
		Password:       sp.Password,
		KeepaliveTime:  duration(sp.KeepaliveTime),
		HoldTime:       duration(sp.HoldTime),
		MaxRestartTime: duration(sp.MaxRestartTime),
	}
	if base.MaxRestartTime == 0 {
		base.MaxRestartTime = api.DefaultMaxRestartTime
	}
	if sp.MaxPrefixes != nil {
		base.MaxPrefixes = uint32(*sp.MaxPrefixes)
	}
	me := ps.me
	if local.hasNode(me) {
		if remote.sel == nil {
			p := base
			p.Address, p.Port, p.ASNumber, p.Type, p.Name = remote.addr, remote.port, uint32(*sp.ASNumber), typ, name
			p.RouteReflectorClient = ps.rrClient(remote.addr, p.ASNumber)
			p.Passive = ps.passive(remote.addr)
			ps.add(name, p)
		} else {
			for _, n := range ps.others {
				if remote.sel.Matches(n.labels) {
					ps.add(name, ps.nodePeer(base, n, typ))
				}
			}
		}
	}
	// The reverse direction, as Calico does: a session needs configuring at both
	// ends, so a node on the remote side peers with the nodes of the local side.
	// This is what gives a route reflector its clients from the usual single
	// BGPPeer "nodeSelector: all(), peerSelector: route-reflector == 'true'".
	var remoteIsMe bool
	if remote.sel != nil {
		remoteIsMe = remote.sel.Matches(me.labels)
	} else {
		remoteIsMe = me.hasAddr(remote.addr) && uint32(*sp.ASNumber) == me.as &&
			(!remote.explicitPort || remote.port == ps.settings.ListenPort)
	}
	if remoteIsMe {
		for _, n := range ps.others {
			if local.hasNode(n) {
				ps.add(name, ps.nodePeer(base, n, NodeSpecific))
			}
		}
	}
}

// addMesh peers with every other node that no BGPPeer took and that is not a
// route reflector.
func (ps *peerSet) addMesh() {
	s := ps.settings
	restart := s.NodeMeshMaxRestartTime
	if restart == 0 {
		restart = api.DefaultMaxRestartTime
	}
	for _, n := range ps.others {
		if n.isReflector() {
			continue
		}
		addr := ps.peerAddr(n)
		if _, taken := ps.chosen[addr]; taken {
			continue
		}
		ps.chosen[addr] = Peer{
			Address:        addr,
			Port:           s.ListenPort,
			ASNumber:       n.as,
			Type:           Mesh,
			Name:           n.name,
			Password:       s.NodeMeshPassword,
			MaxRestartTime: restart,
			Passive:        ps.passive(addr),
		}
	}
}

// sameSession reports whether a and b ask for the same BGP session, whatever their
// origin. Calico's usual route-reflector setup has two BGPPeers naming the same
// reflectors; that is not a conflict.
func sameSession(a, b Peer) bool {
	return a.Port == b.Port && a.ASNumber == b.ASNumber && a.Password == b.Password &&
		a.KeepaliveTime == b.KeepaliveTime && a.HoldTime == b.HoldTime &&
		a.MaxRestartTime == b.MaxRestartTime && a.RouteReflectorClient == b.RouteReflectorClient &&
		a.Passive == b.Passive && a.MaxPrefixes == b.MaxPrefixes
}

func duration(d *api.Duration) time.Duration {
	if d == nil {
		return 0
	}
	return d.Duration
}
