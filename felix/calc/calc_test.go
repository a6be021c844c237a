package calc

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/margay-dev/margay/api"
)

func pool(name, cidr string, mut func(*api.IPPoolSpec)) *api.IPPool {
	p := api.NewIPPool(name)
	p.Spec.CIDR = cidr
	if mut != nil {
		mut(&p.Spec)
	}
	p.SetDefaults()
	return p
}

func node(name, addr string) *api.Node {
	n := api.NewNode(name)
	n.Spec.BGP = &api.NodeBGPSpec{IPv4Address: addr}
	return n
}

func pfx(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// path is the best path to prefix, sent by the next hop itself.
func path(prefix, nh string) api.BGPPath {
	a := netip.MustParseAddr(nh)
	return api.BGPPath{Prefix: pfx(prefix), NextHop: a, Peer: a, Best: true}
}

// relayed is path sent by peer instead of the next hop; best or not.
func relayed(p api.BGPPath, peer string, best bool) api.BGPPath {
	p.Peer, p.Best = netip.MustParseAddr(peer), best
	return p
}

func routes(rs []Route) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.String())
	}
	return out
}

func TestComputeRoutes(t *testing.T) {
	never := pool("never", "10.244.0.0/16", nil)
	cross := pool("cross", "10.245.0.0/16", func(s *api.IPPoolSpec) { s.IPIPMode = api.EncapCrossSubnet })
	vx := pool("vx", "10.246.0.0/16", func(s *api.IPPoolSpec) { s.VXLANMode = api.EncapAlways })
	self := node("n1", "198.18.1.2/24")
	self.Spec.BGP.IPv4IPIPTunnelAddr = "10.245.1.1"
	self.Spec.IPv4VXLANTunnelAddr, self.Spec.VXLANTunnelMACAddr = "10.246.1.1", "66:00:00:00:00:01"
	n3 := node("n3", "198.18.2.2/24")
	n3.Spec.IPv4VXLANTunnelAddr, n3.Spec.VXLANTunnelMACAddr = "10.246.3.1", "66:00:00:00:00:03"
	base := Input{
		Node:   "n1",
		NodeIP: pfx("198.18.1.2/24"),
		Pools:  []*api.IPPool{never, cross, vx},
		Nodes:  []*api.Node{self, node("n2", "198.18.1.3/24"), n3},
		Owners: Owners{Blocks: map[netip.Prefix]string{
			pfx("10.244.2.0/26"): "n2", pfx("10.245.2.0/26"): "n2", pfx("10.246.2.0/26"): "n2",
			pfx("10.244.3.0/26"): "n3", pfx("10.245.3.0/26"): "n3", pfx("10.246.3.0/26"): "n3",
			pfx("10.244.4.0/26"): "gone",
		}, Pods: map[netip.Addr]string{netip.MustParseAddr("10.244.1.5"): "n2"}},
	}
	tests := []struct {
		name     string
		mut      func(*Input)
		want     []string
		adv      []string
		problems []string // substrings, one per problem
		ignored  []string
	}{
		{
			name: "nothing yet",
			want: nil,
		},
		{
			name: "local block and its pods",
			mut: func(in *Input) {
				in.Blocks = []netip.Prefix{pfx("10.244.1.0/26")}
				in.Endpoints = []Endpoint{{Name: "a", Interface: "mgya", IPs: []netip.Prefix{pfx("10.244.1.1/32")}}}
			},
			want: []string{"blackhole 10.244.1.0/26", "10.244.1.1/32 dev mgya"},
			adv:  []string{"10.244.1.0/26"},
		},
		{
			name: "a borrowed address is routed and advertised as a /32",
			mut: func(in *Input) {
				in.Blocks = []netip.Prefix{pfx("10.244.1.0/26")}
				in.Endpoints = []Endpoint{{Name: "b", Interface: "mgyb", IPs: []netip.Prefix{pfx("10.244.9.7/32")}}}
			},
			want: []string{"blackhole 10.244.1.0/26", "10.244.9.7/32 dev mgyb"},
			adv:  []string{"10.244.1.0/26", "10.244.9.7/32"},
		},
		{
			name: "same subnet: direct under Never and CrossSubnet, through the tunnel under Always",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{path("10.244.2.0/26", "198.18.1.3"), path("10.245.2.0/26", "198.18.1.3"), path("10.246.2.0/26", "198.18.1.3")}
			},
			want:     []string{"10.244.2.0/26 via 198.18.1.3", "10.245.2.0/26 via 198.18.1.3"},
			problems: []string{"10.246.2.0/26: node n2 has no VXLAN tunnel address and MAC yet; not routed"},
		},
		{
			name: "cross subnet: Never via the gateway, IPIP CrossSubnet through tunl0, VXLAN Always through vxlan.margay",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{path("10.244.3.0/26", "198.18.2.2"), path("10.245.3.0/26", "198.18.2.2"), path("10.246.3.0/26", "198.18.2.2")}
				in.Gateways = map[netip.Addr]netip.Addr{netip.MustParseAddr("198.18.2.2"): netip.MustParseAddr("198.18.1.1")}
			},
			want: []string{"10.244.3.0/26 via 198.18.1.1", "10.245.3.0/26 via 198.18.2.2 dev tunl0 onlink src 10.245.1.1",
				"10.246.3.0/26 via 10.246.3.1 dev vxlan.margay onlink src 10.246.1.1"},
		},
		{
			name: "cross subnet under Never with no route to the next hop is reported, not routed",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{path("10.244.3.0/26", "198.18.2.2")}
			},
			problems: []string{"10.244.3.0/26: next hop 198.18.2.2 is outside this node's subnet 198.18.1.0/24 and the kernel has no route to it"},
		},
		{
			name: "a /32 node address under Never reaches an on-link next hop directly",
			mut: func(in *Input) {
				in.NodeIP = pfx("198.18.1.2/32")
				in.Paths = []api.BGPPath{path("10.244.2.0/26", "198.18.1.3")}
				in.Gateways = map[netip.Addr]netip.Addr{netip.MustParseAddr("198.18.1.3"): netip.MustParseAddr("198.18.1.3")}
			},
			want:     []string{"10.244.2.0/26 via 198.18.1.3"},
			problems: []string{"198.18.1.2/32 has no subnet"},
		},
		{
			name: "a block of no node is not routed, whoever sends it",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{path("10.246.9.0/26", "198.18.9.9"), path("10.244.9.0/26", "198.18.1.3")}
			},
			ignored: []string{"10.244.9.0/26 via 198.18.1.3 from peer 198.18.1.3 is no block or pod address of any node (claimed by n2)",
				"10.246.9.0/26 via 198.18.9.9 from peer 198.18.9.9 is no block or pod address of any node"},
		},
		{
			name: "a ToR's more specific prefix inside a block, the block itself, and a borrowed /32 are not followed; the owners' paths are",
			mut: func(in *Input) {
				tor := "198.18.1.1"
				in.Paths = []api.BGPPath{
					path("10.244.2.0/28", tor),
					path("10.244.2.0/26", tor), relayed(path("10.244.2.0/26", "198.18.1.3"), "198.18.1.3", false),
					path("10.244.1.5/32", tor), relayed(path("10.244.1.5/32", "198.18.1.3"), "198.18.1.3", false),
					path("10.244.3.0/26", tor),
				}
			},
			want: []string{"10.244.1.5/32 via 198.18.1.3", "10.244.2.0/26 via 198.18.1.3"},
			ignored: []string{
				"10.244.1.5/32 via 198.18.1.1 from peer 198.18.1.1 belongs to node n2 at 198.18.1.3",
				"10.244.2.0/26 via 198.18.1.1 from peer 198.18.1.1 belongs to node n2 at 198.18.1.3",
				"10.244.2.0/28 via 198.18.1.1 from peer 198.18.1.1 is no block or pod address; it falls in a block of node n2",
				"10.244.3.0/26 via 198.18.1.1 from peer 198.18.1.1 belongs to node n3 at 198.18.2.2",
			},
		},
		{
			name: "a rogue node's best path to another node's block is passed over for the owner's",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{path("10.244.2.0/26", "198.18.2.2"), relayed(path("10.244.2.0/26", "198.18.1.3"), "198.18.1.3", false)}
			},
			want:    []string{"10.244.2.0/26 via 198.18.1.3"},
			ignored: []string{"10.244.2.0/26 via 198.18.2.2 from peer 198.18.2.2 belongs to node n2 at 198.18.1.3 (claimed by n3)"},
		},
		{
			name: "a route reflector's path is followed when its next hop is the owner",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{relayed(path("10.244.3.0/26", "198.18.2.2"), "198.18.1.3", true)}
				in.Gateways = map[netip.Addr]netip.Addr{netip.MustParseAddr("198.18.2.2"): netip.MustParseAddr("198.18.1.1")}
			},
			want: []string{"10.244.3.0/26 via 198.18.1.1"},
		},
		{
			name: "the block of a node without an address is not routed",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{path("10.244.4.0/26", "198.18.1.9")}
			},
			ignored: []string{"10.244.4.0/26 via 198.18.1.9 from peer 198.18.1.9 belongs to node gone, which has no BGP address"},
		},
		{
			name: "nothing overrides this node's own block, not even a more specific prefix",
			mut: func(in *Input) {
				in.Blocks = []netip.Prefix{pfx("10.244.1.0/26")}
				in.Paths = []api.BGPPath{path("10.244.1.0/28", "198.18.1.1"), path("10.244.1.0/26", "198.18.1.1"), relayed(path("10.244.1.0/26", "198.18.1.2"), "198.18.1.3", false)}
			},
			want: []string{"blackhole 10.244.1.0/26"},
			adv:  []string{"10.244.1.0/26"},
			ignored: []string{
				"10.244.1.0/26 via 198.18.1.1 from peer 198.18.1.1 is this node's own",
				"10.244.1.0/28 via 198.18.1.1 from peer 198.18.1.1 is no block or pod address; it falls in a block of node n1",
			},
		},
		{
			name: "a /32 node address under CrossSubnet is warned about",
			mut: func(in *Input) {
				in.NodeIP = pfx("198.18.1.2/32")
				in.Paths = []api.BGPPath{path("10.245.2.0/26", "198.18.1.3")}
			},
			want:     []string{"10.245.2.0/26 via 198.18.1.3 dev tunl0 onlink src 10.245.1.1"},
			problems: []string{"198.18.1.2/32 has no subnet"},
		},
		{
			name: "a remote /32 borrowed from our block wins by length; our own prefixes reflected back are ignored",
			mut: func(in *Input) {
				in.Blocks = []netip.Prefix{pfx("10.244.1.0/26")}
				in.Endpoints = []Endpoint{{Name: "a", Interface: "mgya", IPs: []netip.Prefix{pfx("10.244.1.1/32")}}}
				in.Paths = []api.BGPPath{path("10.244.1.5/32", "198.18.1.3"), path("10.244.1.0/26", "198.18.1.3"), path("10.244.1.1/32", "198.18.1.3")}
			},
			want: []string{"blackhole 10.244.1.0/26", "10.244.1.1/32 dev mgya", "10.244.1.5/32 via 198.18.1.3"},
			adv:  []string{"10.244.1.0/26"},
			ignored: []string{
				"10.244.1.0/26 via 198.18.1.3 from peer 198.18.1.3 is this node's own (claimed by n2)",
				"10.244.1.1/32 via 198.18.1.3 from peer 198.18.1.3 is this node's own (claimed by n2)",
			},
		},
		{
			name: "our own prefixes reflected back with us as next hop are dropped silently",
			mut: func(in *Input) {
				in.Blocks = []netip.Prefix{pfx("10.244.1.0/26")}
				in.Endpoints = []Endpoint{{Name: "b", Interface: "mgyb", IPs: []netip.Prefix{pfx("10.244.9.7/32")}}}
				in.Paths = []api.BGPPath{relayed(path("10.244.1.0/26", "198.18.1.2"), "198.18.1.3", true), relayed(path("10.244.9.7/32", "198.18.1.2"), "198.18.1.3", true)}
			},
			want: []string{"blackhole 10.244.1.0/26", "10.244.9.7/32 dev mgyb"},
			adv:  []string{"10.244.1.0/26", "10.244.9.7/32"},
		},
		{
			name: "prefixes outside every pool are not margay's",
			mut: func(in *Input) {
				in.Paths = []api.BGPPath{path("0.0.0.0/0", "198.18.1.1"), path("192.168.0.0/24", "198.18.1.3")}
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := base
			if tc.mut != nil {
				tc.mut(&in)
			}
			out := Compute(in)
			if got := routes(out.Routes); !slices.Equal(got, tc.want) {
				t.Errorf("routes\n got %q\nwant %q", got, tc.want)
			}
			var adv []string
			for _, p := range out.Advertise {
				adv = append(adv, p.String())
			}
			if !slices.Equal(adv, tc.adv) {
				t.Errorf("advertise %q, want %q", adv, tc.adv)
			}
			if len(out.Problems) != len(tc.problems) {
				t.Fatalf("problems %q, want %d", out.Problems, len(tc.problems))
			}
			for i, p := range tc.problems {
				if !strings.Contains(out.Problems[i], p) {
					t.Errorf("problem %q, want it to contain %q", out.Problems[i], p)
				}
			}
			var ignored []string
			for _, p := range out.Ignored {
				s := p.String()
				if p.Claimant != "" {
					s += " (claimed by " + p.Claimant + ")"
				}
				ignored = append(ignored, s)
			}
			if !slices.Equal(ignored, tc.ignored) {
				t.Errorf("ignored\n got %q\nwant %q", ignored, tc.ignored)
			}
		})
	}
}

func TestComputeTunnels(t *testing.T) {
	self := node("n1", "198.18.1.2/24")
	self.Spec.IPv4VXLANTunnelAddr, self.Spec.VXLANTunnelMACAddr = "10.246.1.1", "66:00:00:00:00:01"
	n2 := node("n2", "198.18.2.2/24")
	n2.Spec.IPv4VXLANTunnelAddr, n2.Spec.VXLANTunnelMACAddr = "10.246.2.1", "66:00:00:00:00:02"
	in := Input{Node: "n1", NodeIP: pfx("198.18.1.2/24"), UnderlayMTU: 9000, Nodes: []*api.Node{self, n2},
		Pools:  []*api.IPPool{pool("vx", "10.246.0.0/16", func(s *api.IPPoolSpec) { s.VXLANMode = api.EncapCrossSubnet })},
		Owners: Owners{Blocks: map[netip.Prefix]string{pfx("10.246.2.0/26"): "n2", pfx("10.246.2.64/26"): "n2"}},
		Paths:  []api.BGPPath{path("10.246.2.0/26", "198.18.2.2"), path("10.246.2.64/26", "198.18.2.2")}}
	out := Compute(in)
	if out.IPIP != nil || out.VXLAN == nil || out.VXLAN.MTU != 8950 || out.VXLAN.Addr.String() != "10.246.1.1" || out.VXLAN.MAC != "66:00:00:00:00:01" {
		t.Errorf("tunnels: ipip %+v, vxlan %+v", out.IPIP, out.VXLAN)
	}
	want := []VXLANPeer{{Node: "n2", TunnelAddr: netip.MustParseAddr("10.246.2.1"), MAC: "66:00:00:00:00:02", NodeIP: netip.MustParseAddr("198.18.2.2")}}
	if !slices.Equal(out.VXLANPeers, want) {
		t.Errorf("VXLAN peers %+v, want %+v", out.VXLANPeers, want)
	}
	in.Pools = []*api.IPPool{pool("ipip", "10.246.0.0/16", func(s *api.IPPoolSpec) { s.IPIPMode = api.EncapAlways })}
	in.UnderlayMTU = 0
	if out := Compute(in); out.IPIP == nil || out.IPIP.MTU != 1480 || out.IPIP.Addr.IsValid() || out.VXLAN != nil || len(out.VXLANPeers) != 0 {
		t.Errorf("IPIP pool: ipip %+v, vxlan %+v, peers %v", out.IPIP, out.VXLAN, out.VXLANPeers)
	}
}

func TestComputeIPSetsAndRules(t *testing.T) {
	in := Input{
		Node:   "n1",
		NodeIP: pfx("198.18.1.2/24"),
		Pools: []*api.IPPool{
			pool("nat", "10.244.0.0/16", func(s *api.IPPoolSpec) { s.NATOutgoing = true }),
			pool("nonat", "10.250.0.0/16", nil),
			pool("old", "10.251.0.0/16", func(s *api.IPPoolSpec) { s.NATOutgoing, s.Disabled = true, true }),
		},
		Nodes:       []*api.Node{node("n2", "198.18.1.3/24"), node("n1", "198.18.1.2/24"), api.NewNode("no-address")},
		Endpoints:   []Endpoint{{Name: "a", Interface: "mgya", IPs: []netip.Prefix{pfx("10.244.1.1/32")}}},
		RandomFully: true,
	}
	out := Compute(in)
	sets := map[string][]string{}
	for _, s := range out.IPSets {
		for _, m := range s.Members {
			sets[s.Name] = append(sets[s.Name], m.String())
		}
	}
	for name, want := range map[string][]string{
		SetMasqPools: {"10.244.0.0/16", "10.251.0.0/16"}, // a disabled pool's pods still need NAT
		SetAllPools:  {"10.244.0.0/16", "10.250.0.0/16", "10.251.0.0/16"},
		SetAllHosts:  {"198.18.1.2/32", "198.18.1.3/32"},
	} {
		if !slices.Equal(sets[name], want) {
			t.Errorf("ipset %s = %q, want %q", name, sets[name], want)
		}
	}
	chains := map[string][]string{}
	for _, c := range out.Chains {
		for _, r := range c.Rules {
			chains[c.Name] = append(chains[c.Name], strings.Join(r, " "))
		}
	}
	if got := chains[ChainFromWL]; len(got) != 4 || !strings.HasPrefix(got[0], "-p 4 ") || !strings.Contains(got[1], "--dport 4789") ||
		!strings.Contains(got[2], "-s 10.244.1.1/32 -i mgya -j RETURN") || !strings.HasSuffix(got[3], "-j DROP") {
		t.Errorf("%s = %q: want tunnel packets dropped, the pod's own source returned, then DROP", ChainFromWL, got)
	}
	if got := chains[ChainToWL]; len(got) != 2 || got[0] != "-o mgya -j RETURN" || !strings.HasSuffix(got[1], "-j DROP") {
		t.Errorf("%s = %q: want the known interface returned, then DROP", ChainToWL, got)
	}
	if got := chains[ChainPostrouting]; len(got) != 1 || !strings.Contains(got[0], SetMasqPools+" src") ||
		!strings.Contains(got[0], "! --match-set "+SetAllPools+" dst") || !strings.HasSuffix(got[0], "-j MASQUERADE --random-fully") {
		t.Errorf("%s = %q", ChainPostrouting, got)
	}
	in.RandomFully = false
	for _, c := range Compute(in).Chains {
		if c.Name == ChainPostrouting && slices.Contains(c.Rules[0], "--random-fully") {
			t.Errorf("--random-fully without support: %q", c.Rules[0])
		}
	}
	if len(out.Jumps) != 3 {
		t.Errorf("jumps %v", out.Jumps)
	}
	if out.Sysctls["net/ipv4/ip_forward"] != "1" {
		t.Errorf("sysctls %v", out.Sysctls)
	}
}

func TestPodMTU(t *testing.T) {
	mk := func(ipip, vxlan api.EncapMode, disabled bool) *api.IPPool {
		p := api.NewIPPool("p")
		p.Spec = api.IPPoolSpec{CIDR: "10.0.0.0/16", IPIPMode: ipip, VXLANMode: vxlan, Disabled: disabled}
		return p
	}
	for _, tc := range []struct {
		pools []*api.IPPool
		want  int
	}{
		{nil, 1500},
		{[]*api.IPPool{mk(api.EncapNever, api.EncapNever, false)}, 1500},
		{[]*api.IPPool{mk(api.EncapCrossSubnet, api.EncapNever, false)}, 1480},
		{[]*api.IPPool{mk(api.EncapAlways, api.EncapNever, false), mk(api.EncapNever, api.EncapCrossSubnet, false)}, 1450},
		{[]*api.IPPool{mk(api.EncapNever, api.EncapAlways, true)}, 1500},
	} {
		if got := PodMTU(1500, tc.pools); got != tc.want {
			t.Errorf("PodMTU(1500, %d pools) = %d, want %d", len(tc.pools), got, tc.want)
		}
	}
}

// A dual-stack node without an IPv6 address of its own: v6 blocks and pods
// get their local routes but no v6 prefix reaches BGP, and a problem says so.
// Each family's ipsets and chains hold that family's addresses only: one
// address of the other would fail the whole table.
func TestComputeDualStackFamilies(t *testing.T) {
	in := Input{
		Node:   "n1",
		NodeIP: pfx("198.18.1.2/24"),
		Pools: []*api.IPPool{
			pool("v4", "10.244.0.0/16", func(s *api.IPPoolSpec) { s.NATOutgoing = true }),
			pool("v6", "fd00:244::/48", func(s *api.IPPoolSpec) { s.NATOutgoing = true }),
		},
		Nodes:     []*api.Node{node("n1", "198.18.1.2/24")},
		Blocks:    []netip.Prefix{pfx("10.244.1.0/26"), pfx("fd00:244::/122")},
		Endpoints: []Endpoint{{Name: "a", Interface: "mgya", IPs: []netip.Prefix{pfx("10.244.1.1/32"), pfx("fd00:244::1/128"), pfx("fd00:244:0:1::9/128")}}},
	}
	out := Compute(in)
	want := []string{"blackhole 10.244.1.0/26", "10.244.1.1/32 dev mgya", "blackhole fd00:244::/122", "fd00:244::1/128 dev mgya", "fd00:244:0:1::9/128 dev mgya"}
	if got := routes(out.Routes); !slices.Equal(got, want) {
		t.Errorf("routes %q, want %q", got, want)
	}
	if !slices.Equal(out.Advertise, []netip.Prefix{pfx("10.244.1.0/26")}) {
		t.Errorf("advertised %v, want the IPv4 block only", out.Advertise)
	}
	members := map[string]string{}
	for _, s := range out.IPSets {
		if s.IPv6 != strings.HasSuffix(s.Name, "-v6") {
			t.Errorf("ipset %s: IPv6 %v", s.Name, s.IPv6)
		}
		for _, m := range s.Members {
			if m.Addr().Is6() != s.IPv6 {
				t.Errorf("ipset %s (IPv6 %v) has member %s", s.Name, s.IPv6, m)
			}
		}
		members[s.Name] = fmt.Sprint(s.Members)
	}
	for name, want := range map[string]string{
		SetMasqPools: "[10.244.0.0/16]", SetMasqPools + "-v6": "[fd00:244::/48]",
		SetAllHosts: "[198.18.1.2/32]", SetAllHosts + "-v6": "[]",
	} {
		if members[name] != want {
			t.Errorf("ipset %s: %s, want %s", name, members[name], want)
		}
	}
	text := func(cs []Chain) string {
		var b strings.Builder
		for _, c := range cs {
			for _, r := range c.Rules {
				fmt.Fprintf(&b, "-A %s %s\n", c.Name, strings.Join(r, " "))
			}
		}
		return b.String()
	}
	v4, v6 := text(out.Chains), text(out.Chains6)
	for _, c := range []struct {
		rules, want string
		has         bool
	}{
		{v4, "-A MGY-FROM-WL -s 10.244.1.1/32 -i mgya -j RETURN", true},
		{v4, "fd00:", false},
		{v4, "icmp6", false},
		{v4, "--match-set mgy-all-hosts src", true},
		{v6, "-A MGY-FROM-WL -s fd00:244::1/128 -i mgya -j RETURN\n-A MGY-FROM-WL -s fd00:244:0:1::9/128 -i mgya -j RETURN", true},
		{v6, "10.244.", false},
		{v6, "-A MGY-INPUT -i mgy+ -p ipv6-icmp -m icmp6 --icmpv6-type 135", true},
		{v6, "-A MGY-INPUT -p udp -m udp --dport 4789 -m set --match-set mgy-all-hosts-v6 src -j ACCEPT", true},
		{v6, "-A MGY-INPUT -p 4", false}, // no IPIP over IPv6
		{v6, "-A MGY-POSTROUTING -m set --match-set mgy-masq-pools-v6 src -m set ! --match-set mgy-all-pools-v6 dst -j MASQUERADE", true},
	} {
		if strings.Contains(c.rules, c.want) != c.has {
			t.Errorf("rules contain %q: %v, want %v; rules:\n%s", c.want, !c.has, c.has, c.rules)
		}
	}
	if len(out.Problems) != 1 || !strings.Contains(out.Problems[0], "2 IPv6 blocks or pod addresses are not advertised: this node has no IPv6 address") {
		t.Errorf("problems %q, want the unadvertised IPv6 prefixes", out.Problems)
	}
	if _, ok := out.Sysctls["net/ipv6/conf/all/forwarding"]; ok {
		t.Errorf("IPv6 forwarding set on a node without an IPv6 address")
	}
}

// With its IPv6 address a node advertises its v6 prefixes and routes other
// nodes' v6 blocks: directly in its v6 subnet, through the kernel's gateway
// across it, never towards a next hop that is not the owner's v6 address, and
// not through VXLAN before the owner has its IPv6 VXLAN address.
func TestComputeIPv6Routes(t *testing.T) {
	n2, n3, n4 := node("n2", "198.18.1.3/24"), node("n3", "198.18.2.3/24"), node("n4", "198.18.1.4/24")
	n2.Spec.BGP.IPv6Address = "fd00:18:1::3/64"
	n3.Spec.BGP.IPv6Address = "fd00:18:2::3/64"
	n4.Spec.BGP.IPv6Address = "fd00:18:1::4/64"
	in := Input{
		Node:    "n1",
		NodeIP:  pfx("198.18.1.2/24"),
		NodeIP6: pfx("fd00:18:1::2/64"),
		Pools: []*api.IPPool{
			pool("v6", "fd00:244::/48", nil),
			pool("v6-vxlan", "fd00:245::/48", func(s *api.IPPoolSpec) { s.VXLANMode = api.EncapAlways }),
		},
		Nodes:  []*api.Node{node("n1", "198.18.1.2/24"), n2, n3, n4},
		Blocks: []netip.Prefix{pfx("fd00:244::/122")},
		Owners: Owners{Blocks: map[netip.Prefix]string{
			pfx("fd00:244::40/122"): "n2", pfx("fd00:244::80/122"): "n3", pfx("fd00:244::c0/122"): "n4", pfx("fd00:245::/122"): "n2",
		}},
		Paths: []api.BGPPath{
			path("fd00:244::40/122", "fd00:18:1::3"),
			path("fd00:244::80/122", "fd00:18:2::3"),
			path("fd00:244::c0/122", "fd00:18:1::3"), // n4's block with n2 as next hop
			path("fd00:245::/122", "fd00:18:1::3"),
			path("fd00:244::100/122", "198.18.1.3"), // a v4 next hop for a v6 prefix
		},
		Gateways: map[netip.Addr]netip.Addr{netip.MustParseAddr("fd00:18:2::3"): netip.MustParseAddr("fd00:18:1::1")},
	}
	out := Compute(in)
	want := []string{"blackhole fd00:244::/122", "fd00:244::40/122 via fd00:18:1::3", "fd00:244::80/122 via fd00:18:1::1"}
	if got := routes(out.Routes); !slices.Equal(got, want) {
		t.Errorf("routes %q, want %q", got, want)
	}
	if !slices.Equal(out.Advertise, []netip.Prefix{pfx("fd00:244::/122")}) {
		t.Errorf("advertised %v, want the v6 block", out.Advertise)
	}
	if len(out.Ignored) != 2 || out.Ignored[0].Path.Prefix != pfx("fd00:244::c0/122") || out.Ignored[0].Claimant != "n2" || !strings.Contains(out.Ignored[0].Reason, "belongs to node n4 at fd00:18:1::4") {
		t.Errorf("ignored %v: want n4's block via n2 refused", out.Ignored)
	}
	problems := strings.Join(out.Problems, "\n")
	if !strings.Contains(problems, "fd00:245::/122: node n2 has no IPv6 VXLAN tunnel address and MAC yet; not routed") {
		t.Errorf("problems %q: want the VXLAN pool's block reported", out.Problems)
	}
	if out.Sysctls["net/ipv6/conf/all/forwarding"] != "1" {
		t.Errorf("sysctls %v: want IPv6 forwarding", out.Sysctls)
	}
}

// IPv6 VXLAN, CrossSubnet, beside IPv4 VXLAN: each family has its device,
// tunnel address, MAC and peers; a v6 block in the node's v6 subnet is
// routed directly, one beyond it through vxlan-v6.margay to the owner's v6
// tunnel address, whose forwarding entry is the owner's v6 node address. The
// pod MTU leaves room for the larger IPv6 header.
func TestComputeVXLANIPv6(t *testing.T) {
	tunnelled := func(n *api.Node, addr4, addr6, mac4, mac6 string) *api.Node {
		n.Spec.IPv4VXLANTunnelAddr, n.Spec.IPv6VXLANTunnelAddr = addr4, addr6
		n.Spec.VXLANTunnelMACAddr, n.Spec.VXLANTunnelMACAddrV6 = mac4, mac6
		return n
	}
	n1 := tunnelled(node("n1", "198.18.1.2/24"), "10.244.1.0", "fd00:244::1", "02:00:00:00:00:01", "02:00:00:00:06:01")
	n2 := tunnelled(node("n2", "198.18.1.3/24"), "10.244.2.0", "fd00:244::41", "02:00:00:00:00:02", "02:00:00:00:06:02")
	n3 := tunnelled(node("n3", "198.18.2.3/24"), "10.244.3.0", "fd00:244::81", "02:00:00:00:00:03", "02:00:00:00:06:03")
	for n, a := range map[*api.Node]string{n1: "fd00:18:1::2/64", n2: "fd00:18:1::3/64", n3: "fd00:18:2::3/64"} {
		n.Spec.BGP.IPv6Address = a
	}
	cross := func(s *api.IPPoolSpec) { s.VXLANMode = api.EncapCrossSubnet }
	in := Input{
		Node: "n1", NodeIP: pfx("198.18.1.2/24"), NodeIP6: pfx("fd00:18:1::2/64"),
		Pools:  []*api.IPPool{pool("v4", "10.244.0.0/16", cross), pool("v6", "fd00:244::/48", cross)},
		Nodes:  []*api.Node{n1, n2, n3},
		Blocks: []netip.Prefix{pfx("10.244.1.0/26"), pfx("fd00:244::/122")},
		Owners: Owners{Blocks: map[netip.Prefix]string{
			pfx("10.244.2.0/26"): "n2", pfx("10.244.3.0/26"): "n3", pfx("fd00:244::40/122"): "n2", pfx("fd00:244::80/122"): "n3",
		}},
		Paths: []api.BGPPath{
			path("10.244.2.0/26", "198.18.1.3"), path("10.244.3.0/26", "198.18.2.3"),
			path("fd00:244::40/122", "fd00:18:1::3"), path("fd00:244::80/122", "fd00:18:2::3"),
		},
	}
	out := Compute(in)
	want := []string{
		"blackhole 10.244.1.0/26", "10.244.2.0/26 via 198.18.1.3", "10.244.3.0/26 via 10.244.3.0 dev vxlan.margay onlink src 10.244.1.0",
		"blackhole fd00:244::/122", "fd00:244::40/122 via fd00:18:1::3", "fd00:244::80/122 via fd00:244::81 dev vxlan-v6.margay onlink src fd00:244::1",
	}
	if got := routes(out.Routes); !slices.Equal(got, want) {
		t.Errorf("routes %q, want %q", got, want)
	}
	if out.VXLAN == nil || out.VXLAN.MTU != 1450 || out.VXLAN.MAC != "02:00:00:00:00:01" ||
		out.VXLAN6 == nil || out.VXLAN6.MTU != 1430 || out.VXLAN6.MAC != "02:00:00:00:06:01" || out.VXLAN6.Addr != netip.MustParseAddr("fd00:244::1") {
		t.Errorf("devices %+v and %+v: want vxlan.margay at MTU 1450 and vxlan-v6.margay at 1430 with the node's v6 address and MAC", out.VXLAN, out.VXLAN6)
	}
	if got := fmt.Sprint(out.VXLANPeers6); got != "[{n3 fd00:244::81 02:00:00:00:06:03 fd00:18:2::3}]" {
		t.Errorf("IPv6 VXLAN peers %s", got)
	}
	if got := fmt.Sprint(out.VXLANPeers); got != "[{n3 10.244.3.0 02:00:00:00:00:03 198.18.2.3}]" {
		t.Errorf("IPv4 VXLAN peers %s", got)
	}
	if out.PodMTU != 1430 || len(out.Problems) != 0 {
		t.Errorf("pod MTU %d, problems %q: want 1430 and none", out.PodMTU, out.Problems)
	}
	// Only the IPv6 pool uses VXLAN: no IPv4 device.
	in.Pools[0].Spec.VXLANMode = api.EncapNever
	if out := Compute(in); out.VXLAN != nil || out.VXLAN6 == nil {
		t.Errorf("an IPv6 VXLAN pool alone: devices %+v, %+v; want the IPv6 one only", out.VXLAN, out.VXLAN6)
	}
}
