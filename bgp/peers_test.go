package bgp

import (
	"fmt"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/api"
)

type nodeOpt func(*api.Node)

func asNum(n uint32) *api.ASNumber { a := api.ASNumber(n); return &a }

func withAS(as uint32) nodeOpt { return func(n *api.Node) { n.Spec.BGP.ASNumber = asNum(as) } }

func withRR(clusterID string) nodeOpt {
	return func(n *api.Node) { n.Spec.BGP.RouteReflectorClusterID = clusterID }
}

func withLabels(kv ...string) nodeOpt {
	return func(n *api.Node) {
		n.Metadata.Labels = map[string]string{}
		for i := 0; i+1 < len(kv); i += 2 {
			n.Metadata.Labels[kv[i]] = kv[i+1]
		}
	}
}

// node returns a Node; cidr "" leaves spec.bgp.ipv4Address unset.
func node(name, cidr string, opts ...nodeOpt) *api.Node {
	n := api.NewNode(name)
	n.Spec.BGP = &api.NodeBGPSpec{IPv4Address: cidr}
	for _, o := range opts {
		o(n)
	}
	return n
}

func bgpPeer(name string, spec api.BGPPeerSpec) *api.BGPPeer {
	p := api.NewBGPPeer(name)
	p.Spec = spec
	return p
}

func dur(d time.Duration) *api.Duration { return &api.Duration{Duration: d} }

func defaults() api.BGPSettings { return api.ResolveBGP(nil, nil) }

func noMesh() api.BGPSettings {
	s := defaults()
	s.NodeToNodeMeshEnabled = false
	return s
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

// meshPeer is a mesh peer with the default settings, as seen from n1, which has
// the lowest address and so is passive.
func meshPeer(name, ip string) Peer {
	return Peer{Address: addr(ip), Port: 179, ASNumber: 64512, Type: Mesh, Name: name, MaxRestartTime: 120 * time.Second, Passive: true}
}

// passiveFrom sets Passive as node self sees its node peers: it waits for those
// with higher addresses.
func passiveFrom(self string, ps []Peer) []Peer {
	out := append([]Peer(nil), ps...)
	for i := range out {
		out[i].Passive = addr(self).Less(out[i].Address)
	}
	return out
}

func with(p Peer, f func(*Peer)) Peer { f(&p); return p }

// The usual three-node cluster: self is n1.
var (
	n1 = node("n1", "198.18.1.11/24")
	n2 = node("n2", "198.18.1.12/24")
	n3 = node("n3", "198.18.2.13/24")
)

func TestDesiredPeers(t *testing.T) {
	tor := func(name string, spec api.BGPPeerSpec) *api.BGPPeer {
		if spec.PeerIP == "" {
			spec.PeerIP = "198.18.1.1"
		}
		if spec.ASNumber == nil {
			spec.ASNumber = asNum(65001)
		}
		return bgpPeer(name, spec)
	}
	torPeer := Peer{Address: addr("198.18.1.1"), Port: 179, ASNumber: 65001, Type: Global, Name: "tor", MaxRestartTime: 120 * time.Second}

	runPeerCases(t, []peerCase{
		{
			name: "mesh on", self: "n1", nodes: []*api.Node{n3, n1, n2}, settings: defaults(),
			want: []Peer{meshPeer("n2", "198.18.1.12"), meshPeer("n3", "198.18.2.13")},
		},
		{
			name: "mesh off", self: "n1", nodes: []*api.Node{n1, n2, n3}, settings: noMesh(),
			want: []Peer{},
		},
		{
			name: "mesh settings", self: "n1", nodes: []*api.Node{n1, n2},
			settings: api.BGPSettings{ASNumber: 64600, NodeToNodeMeshEnabled: true, ListenPort: 1790, NodeMeshPassword: "pw", NodeMeshMaxRestartTime: 30 * time.Second},
			want:     []Peer{{Address: addr("198.18.1.12"), Port: 1790, ASNumber: 64600, Type: Mesh, Name: "n2", Password: "pw", MaxRestartTime: 30 * time.Second, Passive: true}},
		},
		{
			name: "node AS overrides the default", self: "n1",
			nodes:    []*api.Node{node("n1", "198.18.1.11/24", withAS(65010)), node("n2", "198.18.1.12/24", withAS(65020)), n3},
			settings: defaults(),
			want: []Peer{
				with(meshPeer("n2", "198.18.1.12"), func(p *Peer) { p.ASNumber = 65020 }),
				meshPeer("n3", "198.18.2.13"),
			},
		},
		{
			name: "nodes without an address are left out", self: "n1",
			nodes:    []*api.Node{n1, node("n2", ""), {Metadata: api.ObjectMeta{Name: "n4"}}, n3},
			settings: defaults(),
			want:     []Peer{meshPeer("n3", "198.18.2.13")},
		},
		{
			name: "node with a bad address", self: "n1",
			nodes: []*api.Node{n1, node("n2", "198.18.1.12"), n3}, settings: defaults(),
			want:     []Peer{meshPeer("n3", "198.18.2.13")},
			problems: []string{`node "n2": spec.bgp.ipv4Address "198.18.1.12" must be the node's IPv4 address with its subnet's prefix length`},
		},
		{
			name: "self without an address", self: "n1",
			nodes: []*api.Node{node("n1", ""), n2}, settings: defaults(),
			problems: []string{`node "n1" has no spec.bgp.ipv4Address`},
		},
		{
			name: "self not in the datastore", self: "n9",
			nodes: []*api.Node{n1, n2}, settings: defaults(),
			problems: []string{`node "n9" is not in the datastore`},
		},
		{
			name: "never peers with its own address", self: "n1",
			nodes:    []*api.Node{n1, node("n2", "198.18.1.11/24")},
			peers:    []*api.BGPPeer{tor("self", api.BGPPeerSpec{PeerIP: "198.18.1.11"}), bgpPeer("all", api.BGPPeerSpec{PeerSelector: "all()"})},
			settings: defaults(),
			want:     []Peer{},
			problems: []string{`nodes "n1" and "n2" both have BGP address 198.18.1.11`},
		},
		{
			name: "two nodes with one address", self: "n1",
			nodes: []*api.Node{n1, node("n2", "198.18.1.12/24"), node("n4", "198.18.1.12/24")}, settings: defaults(),
			want:     []Peer{meshPeer("n2", "198.18.1.12")},
			problems: []string{`nodes "n2" and "n4" both have BGP address 198.18.1.12`},
		},
		{
			name: "a route reflector leaves the mesh as a target", self: "n1",
			nodes:    []*api.Node{n1, n2, node("n3", "198.18.2.13/24", withRR("224.0.0.1"))},
			settings: defaults(),
			want:     []Peer{meshPeer("n2", "198.18.1.12")},
		},
		{
			name: "a route reflector leaves the mesh as a source", self: "n1",
			nodes:    []*api.Node{node("n1", "198.18.1.11/24", withRR("224.0.0.1")), n2, n3},
			settings: defaults(),
			want:     []Peer{},
		},
		{
			name: "global peer", self: "n1", nodes: []*api.Node{n1, n2},
			peers:    []*api.BGPPeer{tor("tor", api.BGPPeerSpec{})},
			settings: defaults(),
			want:     []Peer{torPeer, meshPeer("n2", "198.18.1.12")},
		},
		{
			name: "global peer with port and session settings", self: "n1", nodes: []*api.Node{n1},
			peers: []*api.BGPPeer{tor("tor", api.BGPPeerSpec{PeerIP: "198.18.1.1:1179", Password: "s3cret",
				KeepaliveTime: dur(10 * time.Second), HoldTime: dur(30 * time.Second), MaxRestartTime: dur(300 * time.Second)})},
			settings: defaults(),
			want: []Peer{with(torPeer, func(p *Peer) {
				p.Port, p.Password, p.KeepaliveTime, p.HoldTime, p.MaxRestartTime = 1179, "s3cret", 10*time.Second, 30*time.Second, 300*time.Second
			})},
		},
		{
			name: "a maxPrefixes limit goes with the peer's session", self: "n1", nodes: []*api.Node{n1, n2},
			peers:    []*api.BGPPeer{tor("tor", api.BGPPeerSpec{MaxPrefixes: func() *int { v := 100; return &v }()})},
			settings: defaults(),
			want:     []Peer{with(torPeer, func(p *Peer) { p.MaxPrefixes = 100 }), meshPeer("n2", "198.18.1.12")},
		},
		{
			name: "node-specific peer for this node", self: "n1", nodes: []*api.Node{n1, n2},
			peers:    []*api.BGPPeer{tor("tor", api.BGPPeerSpec{Node: "n1"})},
			settings: noMesh(),
			want:     []Peer{with(torPeer, func(p *Peer) { p.Type = NodeSpecific })},
		},
		{
			name: "node-specific peer for another node", self: "n1", nodes: []*api.Node{n1, n2},
			peers:    []*api.BGPPeer{tor("tor", api.BGPPeerSpec{Node: "n2"})},
			settings: noMesh(),
			want:     []Peer{},
		},
		{
			name: "nodeSelector matches this node", self: "n1",
			nodes:    []*api.Node{node("n1", "198.18.1.11/24", withLabels("rack", "a")), n2},
			peers:    []*api.BGPPeer{tor("tor", api.BGPPeerSpec{NodeSelector: "rack == 'a'"}), tor("tor-b", api.BGPPeerSpec{NodeSelector: "rack == 'b'", PeerIP: "198.18.1.2"})},
			settings: noMesh(),
			want:     []Peer{with(torPeer, func(p *Peer) { p.Type = NodeSpecific })},
		},
		{
			name: "bad selectors are problems", self: "n1", nodes: []*api.Node{n1, n2},
			peers: []*api.BGPPeer{
				tor("bad-node-sel", api.BGPPeerSpec{NodeSelector: "rack == "}),
				bgpPeer("bad-peer-sel", api.BGPPeerSpec{PeerSelector: "has(("}),
			},
			settings: noMesh(),
			want:     []Peer{},
			problems: []string{`BGPPeer "bad-node-sel": spec.nodeSelector "rack == "`, `BGPPeer "bad-peer-sel": spec.peerSelector "has(("`},
		},
		{
			name: "invalid BGPPeers are problems", self: "n1", nodes: []*api.Node{n1},
			peers: []*api.BGPPeer{
				bgpPeer("both", api.BGPPeerSpec{PeerIP: "198.18.1.1", PeerSelector: "all()", ASNumber: asNum(1)}),
				bgpPeer("neither", api.BGPPeerSpec{}),
				bgpPeer("bad-ip", api.BGPPeerSpec{PeerIP: "tor.example", ASNumber: asNum(1)}),
				bgpPeer("v6", api.BGPPeerSpec{PeerIP: "2001:db8::1", ASNumber: asNum(1)}),
				bgpPeer("link-local", api.BGPPeerSpec{PeerIP: "fe80::1", ASNumber: asNum(1)}),
				bgpPeer("no-as", api.BGPPeerSpec{PeerIP: "198.18.1.1"}),
			},
			settings: defaults(),
			want:     []Peer{},
			problems: []string{
				`BGPPeer "bad-ip": spec.peerIP "tor.example" is not an IP address`,
				`BGPPeer "both": set either spec.peerIP or spec.peerSelector`,
				`BGPPeer "neither": set spec.peerIP or spec.peerSelector`,
				`BGPPeer "link-local": spec.peerIP "fe80::1" must be a global unicast address`,
				`BGPPeer "no-as": spec.asNumber is required`,
				`BGPPeer "v6": peer 2001:db8::1 needs this node's spec.bgp.ipv6Address (margay-node --ip6)`,
			},
		},
		{
			name: "peerSelector picks other nodes with their AS", self: "n1",
			nodes: []*api.Node{
				node("n1", "198.18.1.11/24", withLabels("edge", "true")),
				node("n2", "198.18.1.12/24", withLabels("edge", "true"), withAS(65020)),
				n3,
			},
			peers:    []*api.BGPPeer{bgpPeer("edges", api.BGPPeerSpec{PeerSelector: "edge == 'true'", Password: "pw"})},
			settings: noMesh(),
			want: []Peer{
				{Address: addr("198.18.1.12"), Port: 179, ASNumber: 65020, Type: Global, Name: "n2", Password: "pw", MaxRestartTime: 120 * time.Second, Passive: true},
				// Every node peers with the edge nodes, so n1, an edge node, peers
				// back with every node (Calico's reverse peering).
				{Address: addr("198.18.2.13"), Port: 179, ASNumber: 64512, Type: NodeSpecific, Name: "n3", Password: "pw", MaxRestartTime: 120 * time.Second, Passive: true},
			},
		},
		{
			name: "peerSelector on a node that is not selected", self: "n3",
			nodes:    []*api.Node{node("n1", "198.18.1.11/24", withLabels("edge", "true")), n2, n3},
			peers:    []*api.BGPPeer{bgpPeer("edges", api.BGPPeerSpec{NodeSelector: "!has(edge)", PeerSelector: "edge == 'true'"})},
			settings: noMesh(),
			want:     []Peer{{Address: addr("198.18.1.11"), Port: 179, ASNumber: 64512, Type: NodeSpecific, Name: "n1", MaxRestartTime: 120 * time.Second}},
		},
		{
			name: "explicit peer wins over the mesh", self: "n1", nodes: []*api.Node{n1, n2, n3},
			peers:    []*api.BGPPeer{bgpPeer("to-n2", api.BGPPeerSpec{PeerIP: "198.18.1.12", ASNumber: asNum(64512), HoldTime: dur(9 * time.Second)})},
			settings: defaults(),
			want: []Peer{
				{Address: addr("198.18.1.12"), Port: 179, ASNumber: 64512, Type: Global, Name: "to-n2", HoldTime: 9 * time.Second, MaxRestartTime: 120 * time.Second, Passive: true},
				meshPeer("n3", "198.18.2.13"),
			},
		},
		{
			name: "conflicting BGPPeers: first by name wins", self: "n1", nodes: []*api.Node{n1},
			peers: []*api.BGPPeer{
				tor("tor-b", api.BGPPeerSpec{ASNumber: asNum(65002)}),
				tor("tor", api.BGPPeerSpec{}),
			},
			settings: defaults(),
			want:     []Peer{torPeer},
			problems: []string{`BGPPeer "tor-b": peer 198.18.1.1 is already configured differently by BGPPeer "tor"`},
		},
		{
			name: "identical BGPPeers are no conflict", self: "n1", nodes: []*api.Node{n1},
			peers:    []*api.BGPPeer{tor("tor-b", api.BGPPeerSpec{}), tor("tor", api.BGPPeerSpec{})},
			settings: defaults(),
			want:     []Peer{torPeer},
		},
	})
}

// peerCase is one DesiredPeers call and what it must return.
type peerCase struct {
	name     string
	self     string
	nodes    []*api.Node
	peers    []*api.BGPPeer
	settings api.BGPSettings
	want     []Peer
	problems []string // substrings, one per expected problem
}

func runPeerCases(t *testing.T, cases []peerCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, problems := DesiredPeers(tc.self, tc.nodes, tc.peers, tc.settings)
			checkPeers(t, got, tc.want)
			checkProblems(t, problems, tc.problems)
		})
	}
}

// TestDesiredPeersFamilies: nodes peer over IPv4 when both can, otherwise over
// IPv6; BGPPeers of either family need the node's address of that family.
func TestDesiredPeersFamilies(t *testing.T) {
	v6 := func(cidr string) nodeOpt { return func(n *api.Node) { n.Spec.BGP.IPv6Address = cidr } }
	dual1 := node("n1", "198.18.1.11/24", v6("fd00:18:1::11/64"))
	dual2 := node("n2", "198.18.1.12/24", v6("fd00:18:1::12/64"))
	only6 := func(name, cidr string, opts ...nodeOpt) *api.Node { return node(name, "", append(opts, v6(cidr))...) }
	tor6 := bgpPeer("tor6", api.BGPPeerSpec{PeerIP: "fd00:18:1::1", ASNumber: asNum(65001)})
	tor6Peer := Peer{Address: addr("fd00:18:1::1"), Port: 179, ASNumber: 65001, Type: Global, Name: "tor6", MaxRestartTime: 120 * time.Second}

	runPeerCases(t, []peerCase{
		{
			name: "dual-stack nodes peer over IPv4", self: "n1",
			nodes: []*api.Node{dual1, dual2}, settings: defaults(),
			want: []Peer{meshPeer("n2", "198.18.1.12")},
		},
		{
			name: "an IPv6-only node peers over IPv6", self: "n1",
			nodes: []*api.Node{dual1, dual2, only6("n3", "fd00:18:2::13/64")}, settings: defaults(),
			want: []Peer{meshPeer("n2", "198.18.1.12"), meshPeer("n3", "fd00:18:2::13")},
		},
		{
			name: "IPv6-only self: passive towards higher IPv6 addresses", self: "n3",
			nodes:    []*api.Node{dual1, only6("n3", "fd00:18:1::13/64"), only6("n4", "fd00:18:1::14/64"), node("n5", "198.18.1.15/24")},
			settings: defaults(),
			want: []Peer{
				with(meshPeer("n1", "fd00:18:1::11"), func(p *Peer) { p.Passive = false }),
				meshPeer("n4", "fd00:18:1::14"),
			},
		},
		{
			name: "an IPv6 BGPPeer on a dual-stack node", self: "n1",
			nodes: []*api.Node{dual1}, peers: []*api.BGPPeer{tor6}, settings: defaults(),
			want: []Peer{tor6Peer},
		},
		{
			name: "an IPv6 BGPPeer on an IPv4-only node", self: "n1",
			nodes: []*api.Node{n1}, peers: []*api.BGPPeer{tor6}, settings: defaults(),
			want:     []Peer{},
			problems: []string{`BGPPeer "tor6": peer fd00:18:1::1 needs this node's spec.bgp.ipv6Address (margay-node --ip6)`},
		},
		{
			name: "an IPv4 BGPPeer on an IPv6-only node", self: "n3",
			nodes:    []*api.Node{only6("n3", "fd00:18:1::13/64")},
			peers:    []*api.BGPPeer{bgpPeer("tor", api.BGPPeerSpec{PeerIP: "198.18.1.1", ASNumber: asNum(65001)}), tor6},
			settings: defaults(),
			want:     []Peer{tor6Peer},
			problems: []string{`BGPPeer "tor": peer 198.18.1.1 needs this node's spec.bgp.ipv4Address (margay-node --ip)`},
		},
		{
			name: "reverse peering to a node's IPv6 address", self: "n3",
			nodes:    []*api.Node{only6("n3", "fd00:18:1::13/64"), only6("n4", "fd00:18:1::14/64")},
			peers:    []*api.BGPPeer{bgpPeer("to-n3", api.BGPPeerSpec{Node: "n4", PeerIP: "[fd00:18:1::13]:179", ASNumber: asNum(64512)})},
			settings: noMesh(),
			want:     []Peer{{Address: addr("fd00:18:1::14"), Port: 179, ASNumber: 64512, Type: NodeSpecific, Name: "n4", MaxRestartTime: 120 * time.Second, Passive: true}},
		},
		{
			name: "IPv6-only route reflector with IPv6-only clients", self: "rr",
			nodes:    []*api.Node{only6("rr", "fd00:18:1::fe/64", withRR("224.0.0.1"), withLabels("rr", "true")), only6("n3", "fd00:18:1::13/64"), dual1},
			peers:    []*api.BGPPeer{bgpPeer("to-rr", api.BGPPeerSpec{PeerSelector: "rr == 'true'"})},
			settings: noMesh(),
			want: []Peer{
				{Address: addr("fd00:18:1::11"), Port: 179, ASNumber: 64512, Type: NodeSpecific, Name: "n1", MaxRestartTime: 120 * time.Second, RouteReflectorClient: true},
				{Address: addr("fd00:18:1::13"), Port: 179, ASNumber: 64512, Type: NodeSpecific, Name: "n3", MaxRestartTime: 120 * time.Second, RouteReflectorClient: true},
			},
		},
		{
			name: "a node's IPv6 address taken by another", self: "n1",
			nodes: []*api.Node{dual1, only6("n3", "fd00:18:1::11/64")}, settings: defaults(),
			want:     []Peer{},
			problems: []string{`nodes "n1" and "n3" both have BGP address fd00:18:1::11`},
		},
		{
			name: "a bad IPv6 address leaves IPv4 working", self: "n1",
			nodes: []*api.Node{dual1, node("n2", "198.18.1.12/24", v6("fe80::12/64"))}, settings: defaults(),
			want:     []Peer{meshPeer("n2", "198.18.1.12")},
			problems: []string{`node "n2": spec.bgp.ipv6Address "fe80::12/64" must be the node's global IPv6 address`},
		},
		{
			name: "no common family", self: "n1",
			nodes: []*api.Node{n1, only6("n3", "fd00:18:1::13/64")}, settings: defaults(),
			want: []Peer{},
		},
	})
}

// TestDesiredPeersRouteReflector is Calico's route-reflector setup: mesh off, one
// BGPPeer from every node to the reflectors, which must give the reflectors their
// clients (the reverse direction) and the reflectors a session with each other.
func TestDesiredPeersRouteReflector(t *testing.T) {
	nodes := []*api.Node{
		node("rr1", "198.18.1.2/24", withRR("224.0.0.1"), withLabels("route-reflector", "true")),
		node("rr2", "198.18.2.2/24", withRR("224.0.0.1"), withLabels("route-reflector", "true")),
		node("rr3", "198.18.2.3/24", withRR("224.0.0.3"), withLabels("route-reflector", "true")),
		node("n1", "198.18.1.11/24"),
		node("n2", "198.18.2.12/24"),
		node("ext", "198.18.2.20/24", withAS(65020)),
	}
	peers := []*api.BGPPeer{
		bgpPeer("peer-with-route-reflectors", api.BGPPeerSpec{NodeSelector: "all()", PeerSelector: "route-reflector == 'true'"}),
	}
	p := func(name, ip string, as uint32, client bool) Peer {
		return Peer{Address: addr(ip), Port: 179, ASNumber: as, Type: NodeSpecific, Name: name,
			MaxRestartTime: api.DefaultMaxRestartTime, RouteReflectorClient: client}
	}
	ips := map[string]string{"rr1": "198.18.1.2", "n1": "198.18.1.11", "ext": "198.18.2.20"}
	tests := []struct {
		self string
		want []Peer
	}{
		{"n1", []Peer{p("rr1", "198.18.1.2", 64512, false), p("rr2", "198.18.2.2", 64512, false), p("rr3", "198.18.2.3", 64512, false)}},
		{"ext", []Peer{p("rr1", "198.18.1.2", 64512, false), p("rr2", "198.18.2.2", 64512, false), p("rr3", "198.18.2.3", 64512, false)}},
		// rr2 shares rr1's cluster: not a client. rr3 is in another cluster: a client
		// (Calico's rule). ext is in another AS: route reflection is iBGP only.
		{"rr1", []Peer{
			p("n1", "198.18.1.11", 64512, true),
			p("rr2", "198.18.2.2", 64512, false),
			p("rr3", "198.18.2.3", 64512, true),
			p("n2", "198.18.2.12", 64512, true),
			p("ext", "198.18.2.20", 65020, false),
		}},
	}
	for _, tc := range tests {
		t.Run(tc.self, func(t *testing.T) {
			for _, mesh := range []bool{false, true} {
				s := defaults()
				s.NodeToNodeMeshEnabled = mesh
				got, problems := DesiredPeers(tc.self, nodes, peers, s)
				want := tc.want
				if mesh && tc.self == "n1" {
					// The mesh adds the non-reflectors; the BGPPeer keeps the reflectors.
					want = append(append([]Peer(nil), want...),
						meshPeer("n2", "198.18.2.12"),
						with(meshPeer("ext", "198.18.2.20"), func(p *Peer) { p.ASNumber = 65020 }))
				}
				if mesh && tc.self == "ext" {
					want = append(append([]Peer(nil), want...), meshPeer("n1", "198.18.1.11"), meshPeer("n2", "198.18.2.12"))
				}
				checkPeers(t, got, sortedPeers(passiveFrom(ips[tc.self], want)))
				checkProblems(t, problems, nil)
			}
		})
	}
}

// TestDesiredPeersReversePeerIP: a BGPPeer on n1 naming n2 by peerIP and AS makes
// n2 peer back with n1, as in Calico; with a port that is not n2's, it does not.
func TestDesiredPeersReversePeerIP(t *testing.T) {
	nodes := []*api.Node{n1, n2, n3}
	for _, tc := range []struct {
		peerIP string
		as     uint32
		want   []Peer
	}{
		{"198.18.1.12", 64512, []Peer{{Address: addr("198.18.1.11"), Port: 179, ASNumber: 64512, Type: NodeSpecific, Name: "n1", MaxRestartTime: api.DefaultMaxRestartTime}}},
		{"198.18.1.12:179", 64512, []Peer{{Address: addr("198.18.1.11"), Port: 179, ASNumber: 64512, Type: NodeSpecific, Name: "n1", MaxRestartTime: api.DefaultMaxRestartTime}}},
		{"198.18.1.12:1179", 64512, []Peer{}},
		{"198.18.1.12", 65000, []Peer{}},
	} {
		t.Run(fmt.Sprintf("%s AS %d", tc.peerIP, tc.as), func(t *testing.T) {
			peers := []*api.BGPPeer{bgpPeer("n1-to-n2", api.BGPPeerSpec{Node: "n1", PeerIP: tc.peerIP, ASNumber: asNum(tc.as)})}
			got, problems := DesiredPeers("n2", nodes, peers, noMesh())
			checkPeers(t, got, tc.want)
			checkProblems(t, problems, nil)
		})
	}
}

func TestParseDescription(t *testing.T) {
	for _, p := range []Peer{
		{Type: Mesh, Name: "node-2"},
		{Type: Global, Name: "tor"},
		{Type: NodeSpecific, Name: "rack-a-tor"},
		{Type: Global, Name: ""},
	} {
		typ, name, ok := ParseDescription(p.description())
		if !ok || typ != p.Type || name != p.Name {
			t.Errorf("ParseDescription(%q) = %v, %q, %v; want %v, %q, true", p.description(), typ, name, ok, p.Type, p.Name)
		}
		held := p.description() + " " + heldMark
		if typ, name, ok := ParseDescription(held); !ok || typ != p.Type || name != p.Name {
			t.Errorf("ParseDescription(%q) = %v, %q, %v; want %v, %q, true", held, typ, name, ok, p.Type, p.Name)
		}
	}
	for _, d := range []string{"", "peer from the gobgp CLI", "meshy n2", "Mesh n2"} {
		if typ, name, ok := ParseDescription(d); ok {
			t.Errorf("ParseDescription(%q) = %v, %q, true; want ok false", d, typ, name)
		}
	}
	want := map[PeerType]string{Mesh: "node-to-node mesh", Global: "global", NodeSpecific: "node specific", 0: "PeerType(0)"}
	for typ, s := range want {
		if typ.String() != s {
			t.Errorf("PeerType(%d).String() = %q, want %q", int(typ), typ.String(), s)
		}
	}
}

func sortedPeers(ps []Peer) []Peer {
	out := append([]Peer(nil), ps...)
	for i := range out {
		for j := i + 1; j < len(out); j++ {
			if out[j].Address.Less(out[i].Address) {
				out[i], out[j] = out[j], out[i]
			}
		}
	}
	return out
}

func checkPeers(t *testing.T, got, want []Peer) {
	t.Helper()
	if len(got) == 0 && len(want) == 0 {
		return
	}
	if !reflect.DeepEqual(got, want) {
		var b strings.Builder
		fmt.Fprintf(&b, "got %d peers:\n", len(got))
		for _, p := range got {
			fmt.Fprintf(&b, "  %+v\n", p)
		}
		fmt.Fprintf(&b, "want %d:\n", len(want))
		for _, p := range want {
			fmt.Fprintf(&b, "  %+v\n", p)
		}
		t.Error(b.String())
	}
}

// checkProblems wants exactly one problem containing each of want, in any order.
func checkProblems(t *testing.T, got, want []string) {
	t.Helper()
	used := make([]bool, len(got))
next:
	for _, w := range want {
		for i, g := range got {
			if !used[i] && strings.Contains(g, w) {
				used[i] = true
				continue next
			}
		}
		t.Errorf("no problem contains %q; problems: %q", w, got)
	}
	for i, g := range got {
		if !used[i] {
			t.Errorf("unexpected problem: %s", g)
		}
	}
}
