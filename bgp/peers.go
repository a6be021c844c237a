// Package bgp is margay's embedded BGP speaker: the pure computation of a node's
// peer set from the datastore (node-to-node mesh, route reflectors, BGPPeer
// resources), and a thin wrapper over GoBGP that applies that set, advertises the
// node's prefixes and reports the best paths learned from peers.
package bgp

import (
	"fmt"
	"net/netip"
	"slices"
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
	// Passive: wait for the peer to connect. Between two nodes only the one with
	// the higher address connects (Calico's "mesh is unidirectional"): when both
	// do, GoBGP's 5 s idle hold after a reset makes each side close the other's
	// attempts in turn, and a reset session took 20 s to return in a test.
	Passive bool
}

// description is the GoBGP peer description that carries Type and Name, so that
// tools reading the gRPC API (margayctl node status, gobgp neighbor) can show them.
func (p Peer) description() string { return p.Type.token() + " " + p.Name }

// ParseDescription parses a GoBGP peer description written by this package,
// "<mesh|global|node> <name>". ok is false for any other description.
func ParseDescription(desc string) (t PeerType, name string, ok bool) {
	tok, name, _ := strings.Cut(desc, " ")
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
	addr      netip.Addr
	as        uint32
	clusterID string
	labels    map[string]string
}

func (n *nodeInfo) isReflector() bool { return n.clusterID != "" }

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
//   - Of two peering nodes, the one with the lower address is passive.
//
// Nodes without a BGP address are left out. Self's own address is never a peer.
// When several sources name one address, an explicit BGPPeer wins over the mesh and
// the BGPPeer first by name wins over the others; a conflict with different session
// settings is reported. Invalid input is reported in problems and skipped, never
// fatal. The result is sorted by address.
func DesiredPeers(self string, nodes []*api.Node, peers []*api.BGPPeer, s api.BGPSettings) (out []Peer, problems []string) {
	problemf := func(format string, args ...any) { problems = append(problems, fmt.Sprintf(format, args...)) }

	sorted := make([]*api.Node, 0, len(nodes))
	for _, n := range nodes {
		if n != nil {
			sorted = append(sorted, n)
		}
	}
	sort.Slice(sorted, func(i, j int) bool { return sorted[i].Metadata.Name < sorted[j].Metadata.Name })

	var me *nodeInfo
	var others []*nodeInfo // by name
	byAddr := map[netip.Addr]*nodeInfo{}
	for _, n := range sorted {
		info := &nodeInfo{name: n.Metadata.Name, as: uint32(s.ASNumber), labels: n.Metadata.Labels}
		if b := n.Spec.BGP; b != nil {
			if b.ASNumber != nil {
				info.as = uint32(*b.ASNumber)
			}
			info.clusterID = b.RouteReflectorClusterID
			if b.IPv4Address != "" {
				p, err := netip.ParsePrefix(b.IPv4Address)
				if err != nil || !p.Addr().Is4() {
					problemf("node %q: spec.bgp.ipv4Address %q is not an IPv4 CIDR such as 198.18.1.2/24; leaving the node out of BGP", info.name, b.IPv4Address)
				} else {
					info.addr = p.Addr()
				}
			}
		}
		if info.name == self {
			me = info
			continue
		}
		if !info.addr.IsValid() {
			continue
		}
		if prev, dup := byAddr[info.addr]; dup {
			problemf("nodes %q and %q both have BGP address %s; peering with %q only", prev.name, info.name, info.addr, prev.name)
			continue
		}
		byAddr[info.addr] = info
		others = append(others, info)
	}
	if me == nil {
		problemf("node %q is not in the datastore; it has no BGP peers until its Node resource exists", self)
		return nil, problems
	}
	if !me.addr.IsValid() {
		problemf("node %q has no spec.bgp.ipv4Address; it has no BGP peers until one is set", self)
		return nil, problems
	}
	if n, dup := byAddr[me.addr]; dup {
		problemf("nodes %q and %q both have BGP address %s; not peering with %q", me.name, n.name, me.addr, n.name)
		delete(byAddr, me.addr)
		others = slices.DeleteFunc(others, func(o *nodeInfo) bool { return o == n })
	}

	// rrClient applies the reflector rule to a peer at addr with AS as.
	rrClient := func(addr netip.Addr, as uint32) bool {
		n, ok := byAddr[addr]
		return ok && me.isReflector() && as == me.as && n.clusterID != me.clusterID
	}
	// passive: of two nodes, the lower address waits for the higher to connect.
	passive := func(addr netip.Addr) bool {
		_, isNode := byAddr[addr]
		return isNode && me.addr.Less(addr)
	}

	chosen := map[netip.Addr]Peer{}
	source := map[netip.Addr]string{} // BGPPeer that claimed each address
	addExplicit := func(from string, p Peer) {
		if p.Address == me.addr {
			return
		}
		if prev, ok := chosen[p.Address]; ok {
			if !sameSession(prev, p) {
				problemf("BGPPeer %q: peer %s is already configured differently by BGPPeer %q; using %q", from, p.Address, source[p.Address], source[p.Address])
			}
			return
		}
		chosen[p.Address] = p
		source[p.Address] = from
	}

	sortedPeers := make([]*api.BGPPeer, 0, len(peers))
	for _, p := range peers {
		if p != nil {
			sortedPeers = append(sortedPeers, p)
		}
	}
	sort.Slice(sortedPeers, func(i, j int) bool { return sortedPeers[i].Metadata.Name < sortedPeers[j].Metadata.Name })

	for _, bp := range sortedPeers {
		name, sp := bp.Metadata.Name, &bp.Spec

		// The local side: the nodes the BGPPeer configures.
		typ := Global
		var nodeSel api.Selector
		switch {
		case sp.Node != "":
			typ = NodeSpecific
		case sp.NodeSelector != "":
			typ = NodeSpecific
			var err error
			if nodeSel, err = api.ParseSelector(sp.NodeSelector); err != nil {
				problemf("BGPPeer %q: spec.nodeSelector %q: %v; ignoring the peer", name, sp.NodeSelector, err)
				continue
			}
		}
		onLocalSide := func(n *nodeInfo) bool {
			switch {
			case sp.Node != "":
				return n.name == sp.Node
			case nodeSel != nil:
				return nodeSel.Matches(n.labels)
			}
			return true
		}

		// The remote side: one address, or the nodes a selector picks.
		var peerSel api.Selector
		var peerAddr netip.Addr
		var peerPort int
		switch {
		case sp.PeerIP != "" && sp.PeerSelector != "":
			problemf("BGPPeer %q: set either spec.peerIP or spec.peerSelector, not both; ignoring the peer", name)
			continue
		case sp.PeerIP != "":
			var err error
			if peerAddr, peerPort, err = bp.PeerAddr(); err != nil {
				problemf("BGPPeer %q: spec.peerIP %q %v; ignoring the peer", name, sp.PeerIP, err)
				continue
			}
			if !peerAddr.Is4() {
				problemf("BGPPeer %q: spec.peerIP %q: only IPv4 peers are supported; ignoring the peer", name, sp.PeerIP)
				continue
			}
			if sp.ASNumber == nil {
				problemf("BGPPeer %q: spec.asNumber is required with spec.peerIP; ignoring the peer", name)
				continue
			}
		case sp.PeerSelector != "":
			var err error
			if peerSel, err = api.ParseSelector(sp.PeerSelector); err != nil {
				problemf("BGPPeer %q: spec.peerSelector %q: %v; ignoring the peer", name, sp.PeerSelector, err)
				continue
			}
		default:
			problemf("BGPPeer %q: set spec.peerIP or spec.peerSelector; ignoring the peer", name)
			continue
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
		nodePeer := func(n *nodeInfo, t PeerType) Peer {
			p := base
			p.Address, p.Port, p.ASNumber, p.Type, p.Name = n.addr, s.ListenPort, n.as, t, n.name
			p.RouteReflectorClient = rrClient(n.addr, n.as)
			p.Passive = passive(n.addr)
			return p
		}

		if onLocalSide(me) {
			if peerSel == nil {
				p := base
				p.Address, p.Port, p.ASNumber, p.Type, p.Name = peerAddr, peerPort, uint32(*sp.ASNumber), typ, name
				p.RouteReflectorClient = rrClient(peerAddr, p.ASNumber)
				p.Passive = passive(peerAddr)
				addExplicit(name, p)
			} else {
				for _, n := range others {
					if peerSel.Matches(n.labels) {
						addExplicit(name, nodePeer(n, typ))
					}
				}
			}
		}

		// The reverse direction, as Calico does: a session needs configuring at both
		// ends, so a node on the remote side peers with the nodes of the local side.
		// This is what gives a route reflector its clients from the usual single
		// BGPPeer "nodeSelector: all(), peerSelector: route-reflector == 'true'".
		remoteIsMe := false
		if peerSel != nil {
			remoteIsMe = peerSel.Matches(me.labels)
		} else {
			_, err := netip.ParseAddr(sp.PeerIP) // no error: no port given, any port matches
			remoteIsMe = peerAddr == me.addr && uint32(*sp.ASNumber) == me.as && (err == nil || peerPort == s.ListenPort)
		}
		if remoteIsMe {
			for _, n := range others {
				if onLocalSide(n) {
					addExplicit(name, nodePeer(n, NodeSpecific))
				}
			}
		}
	}

	if s.NodeToNodeMeshEnabled && !me.isReflector() {
		restart := s.NodeMeshMaxRestartTime
		if restart == 0 {
			restart = api.DefaultMaxRestartTime
		}
		for _, n := range others {
			if n.isReflector() || n.addr == me.addr {
				continue
			}
			if _, taken := chosen[n.addr]; taken {
				continue
			}
			chosen[n.addr] = Peer{
				Address:        n.addr,
				Port:           s.ListenPort,
				ASNumber:       n.as,
				Type:           Mesh,
				Name:           n.name,
				Password:       s.NodeMeshPassword,
				MaxRestartTime: restart,
				Passive:        passive(n.addr),
			}
		}
	}

	out = make([]Peer, 0, len(chosen))
	for _, p := range chosen {
		out = append(out, p)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Address.Less(out[j].Address) })
	return out, problems
}

// sameSession reports whether a and b ask for the same BGP session, whatever their
// origin. Calico's usual route-reflector setup has two BGPPeers naming the same
// reflectors; that is not a conflict.
func sameSession(a, b Peer) bool {
	return a.Port == b.Port && a.ASNumber == b.ASNumber && a.Password == b.Password &&
		a.KeepaliveTime == b.KeepaliveTime && a.HoldTime == b.HoldTime &&
		a.MaxRestartTime == b.MaxRestartTime && a.RouteReflectorClient == b.RouteReflectorClient &&
		a.Passive == b.Passive
}

func duration(d *api.Duration) time.Duration {
	if d == nil {
		return 0
	}
	return d.Duration
}
