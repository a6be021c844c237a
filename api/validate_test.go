package api

import (
	"errors"
	"strings"
	"testing"
	"time"
)

// expect reports a failure unless ok; the regression tests of fixed defects use it.
func expect(t *testing.T, ok bool, format string, args ...any) {
	t.Helper()
	if !ok {
		t.Errorf(format, args...)
	}
}

// wantFieldErr asserts that err is a *ValidationError holding a FieldError for
// field whose text contains frag.
func wantFieldErr(t *testing.T, err error, field, frag string) {
	t.Helper()
	if err == nil {
		t.Fatalf("got no error, want one on %s containing %q", field, frag)
	}
	var ve *ValidationError
	if !errors.As(err, &ve) {
		t.Fatalf("error %q is %T, want *ValidationError", err, err)
	}
	for _, f := range ve.Fields {
		if f.Field == field && strings.Contains(f.Error(), frag) {
			if !strings.Contains(err.Error(), f.Error()) {
				t.Fatalf("ValidationError.Error() %q does not include field error %q", err, f.Error())
			}
			return
		}
	}
	t.Fatalf("error %q has no field error on %s containing %q", err, field, frag)
}

func validPool() *IPPool {
	p := NewIPPool("pool-a")
	p.Spec.CIDR = "10.244.0.0/16"
	p.SetDefaults()
	return p
}

func validBGPConfig() *BGPConfiguration {
	return NewBGPConfiguration(GlobalBGPConfigName)
}

func validPeer() *BGPPeer {
	p := NewBGPPeer("tor")
	p.Spec.PeerIP = "198.18.1.1"
	p.Spec.ASNumber = ptr(ASNumber(65001))
	return p
}

func validNode() *Node {
	n := NewNode("node-1")
	n.Spec.BGP = &NodeBGPSpec{IPv4Address: "198.18.1.2/24"}
	return n
}

func validWEP() *WorkloadEndpoint {
	w := NewWorkloadEndpoint("node--1-k8s-pod-eth0")
	w.Spec = WorkloadEndpointSpec{
		Node:          "node-1",
		Namespace:     "default",
		Pod:           "pod",
		ContainerID:   "abc123",
		InterfaceName: "mgy0123456789a",
		IPNetworks:    []string{"10.244.1.5/32"},
		MAC:           "ee:ee:ee:ee:ee:ee",
		Ports:         []EndpointPort{{Name: "http", Port: 8080}, {Name: "dns", Protocol: Protocol{Name: "UDP"}, Port: 53}},
	}
	w.SetDefaults()
	return w
}

func dur(d time.Duration) *Duration { return &Duration{d} }

func TestValidateErrors(t *testing.T) {
	long := strings.Repeat("a", 254)
	pw := strings.Repeat("x", 81)
	tests := []struct {
		name  string
		res   func() Resource
		field string
		frag  string
	}{
		// metadata, shared by every kind.
		{"name missing", func() Resource { p := validPool(); p.Metadata.Name = ""; return p }, "metadata.name", "is required"},
		{"name upper case", func() Resource { p := validPool(); p.Metadata.Name = "Pool_A"; return p }, "metadata.name", "lower-case letters"},
		{"name trailing dash", func() Resource { n := validNode(); n.Metadata.Name = "node-"; return n }, "metadata.name", "starting and ending with a letter or digit"},
		{"name too long", func() Resource { n := validNode(); n.Metadata.Name = long; return n }, "metadata.name", "at most 253 characters"},
		{"bad label key", func() Resource {
			n := validNode()
			n.Metadata.Labels = map[string]string{"bad key!": "x"}
			return n
		}, "metadata.labels", "not a valid label key"},
		{"bad label value", func() Resource {
			n := validNode()
			n.Metadata.Labels = map[string]string{"zone": "a b"}
			return n
		}, "metadata.labels.zone", "not a valid label value"},
		{"wrong apiVersion", func() Resource { p := validPool(); p.APIVersion = "projectcalico.org/v3"; return p }, "apiVersion", `must be "margay.dev/v1"`},
		{"wrong kind", func() Resource { p := validPool(); p.Kind = "Pool"; return p }, "kind", `must be "IPPool"`},

		// IPPool.
		{"pool cidr missing", func() Resource { p := validPool(); p.Spec.CIDR = ""; return p }, "spec.cidr", "is required, for example 10.244.0.0/16"},
		{"pool cidr host bits", func() Resource { p := validPool(); p.Spec.CIDR = "10.244.1.7/16"; return p }, "spec.cidr", "has host bits set; did you mean 10.244.0.0/16?"},
		{"pool cidr host bits /26", func() Resource { p := validPool(); p.Spec.CIDR = "192.168.0.100/26"; return p }, "spec.cidr", "did you mean 192.168.0.64/26?"},
		{"pool cidr bare address", func() Resource { p := validPool(); p.Spec.CIDR = "10.244.0.0"; return p }, "spec.cidr", "is not a CIDR; write it as 10.244.0.0/16"},
		{"pool cidr garbage", func() Resource { p := validPool(); p.Spec.CIDR = "ten.0.0.0/8"; return p }, "spec.cidr", "is not a CIDR"},
		{"pool cidr bad length", func() Resource { p := validPool(); p.Spec.CIDR = "10.0.0.0/33"; return p }, "spec.cidr", "is not a CIDR"},
		{"pool ipv4-mapped ipv6", func() Resource {
			p := validPool()
			p.Spec.CIDR = "::ffff:10.0.0.0/112"
			p.Spec.BlockSize = 122
			return p
		}, "spec.cidr", "holds IPv4-mapped addresses"},
		{"pool v6 link-local", func() Resource { p := validPool(); p.Spec.CIDR = "fe80::/64"; p.Spec.BlockSize = 122; return p }, "spec.cidr", "overlaps fe80::/10, which is reserved for link-local addresses and the pod gateway fe80::ecee:eeff:feee:eeee"},
		{"pool v6 multicast", func() Resource { p := validPool(); p.Spec.CIDR = "ff02::/16"; p.Spec.BlockSize = 122; return p }, "spec.cidr", "which is multicast"},
		{"pool v6 contains link-local", func() Resource { p := validPool(); p.Spec.CIDR = "fe00::/7"; p.Spec.BlockSize = 122; return p }, "spec.cidr", "overlaps fe80::/10"},
		{"pool v6 zone", func() Resource { p := validPool(); p.Spec.CIDR = "fd00::%eth0/64"; p.Spec.BlockSize = 122; return p }, "spec.cidr", "is not a CIDR"},
		{"pool v6 host bits", func() Resource { p := validPool(); p.Spec.CIDR = "fd00:10::1/48"; p.Spec.BlockSize = 122; return p }, "spec.cidr", "did you mean fd00:10::/48?"},
		{"pool v6 v4 blockSize", func() Resource { p := validPool(); p.Spec.CIDR = "fd00:10::/48"; return p }, "spec.blockSize", "is out of range for an IPv6 pool; use 116 to 128"},
		{"pool v6 blockSize too small", func() Resource { p := validPool(); p.Spec.CIDR = "fd00:10::/48"; p.Spec.BlockSize = 115; return p }, "spec.blockSize", "use 116 to 128"},
		{"pool v6 blockSize too large", func() Resource { p := validPool(); p.Spec.CIDR = "fd00:10::/48"; p.Spec.BlockSize = 129; return p }, "spec.blockSize", "use 116 to 128"},
		{"pool v6 block larger than pool", func() Resource { p := validPool(); p.Spec.CIDR = "fd00:10::/120"; p.Spec.BlockSize = 118; return p }, "spec.blockSize", "a /118 block is larger than the pool /120"},
		{"pool v6 ipip", func() Resource {
			p := validPool()
			p.Spec.CIDR, p.Spec.BlockSize, p.Spec.IPIPMode = "fd00:10::/48", 122, EncapCrossSubnet
			return p
		}, "spec.ipipMode", "IPIP carries IPv4 only; set ipipMode: Never and use vxlanMode for an IPv6 pool"},
		{"pool is link-local", func() Resource { p := validPool(); p.Spec.CIDR = "169.254.0.0/16"; return p }, "spec.cidr", "overlaps 169.254.0.0/16, which is reserved"},
		{"pool inside link-local", func() Resource { p := validPool(); p.Spec.CIDR = "169.254.1.0/24"; return p }, "spec.cidr", "pod gateway 169.254.1.1"},
		{"pool contains link-local", func() Resource { p := validPool(); p.Spec.CIDR = "169.0.0.0/8"; return p }, "spec.cidr", "overlaps 169.254.0.0/16"},
		{"blockSize too small", func() Resource { p := validPool(); p.Spec.BlockSize = 19; return p }, "spec.blockSize", "is out of range for an IPv4 pool; use 20 to 32"},
		{"blockSize too large", func() Resource { p := validPool(); p.Spec.BlockSize = 33; return p }, "spec.blockSize", "is out of range for an IPv4 pool; use 20 to 32"},
		{"blockSize negative", func() Resource { p := validPool(); p.Spec.BlockSize = -1; return p }, "spec.blockSize", "use 20 to 32"},
		{"blockSize larger than pool", func() Resource {
			p := validPool()
			p.Spec.CIDR = "10.244.0.0/24"
			p.Spec.BlockSize = 22
			return p
		}, "spec.blockSize", "a /22 block is larger than the pool /24; use a blockSize of at least 24"},
		{"ipip and vxlan both enabled", func() Resource {
			p := validPool()
			p.Spec.IPIPMode = EncapAlways
			p.Spec.VXLANMode = EncapCrossSubnet
			return p
		}, "spec.vxlanMode", "ipipMode is Always; enable at most one of ipipMode and vxlanMode"},
		{"ipipMode lower case", func() Resource { p := validPool(); p.Spec.IPIPMode = "always"; return p }, "spec.ipipMode", "must be Never, CrossSubnet or Always"},
		{"ipipMode empty after defaults removed", func() Resource { p := validPool(); p.Spec.IPIPMode = ""; return p }, "spec.ipipMode", "must be Never, CrossSubnet or Always"},
		{"vxlanMode bad", func() Resource { p := validPool(); p.Spec.VXLANMode = "Sometimes"; return p }, "spec.vxlanMode", "must be Never, CrossSubnet or Always"},
		{"pool nodeSelector syntax", func() Resource { p := validPool(); p.Spec.NodeSelector = "zone = 'a'"; return p }, "spec.nodeSelector", "offset 5"},
		{"pool nodeSelector unterminated", func() Resource { p := validPool(); p.Spec.NodeSelector = "zone == 'a"; return p }, "spec.nodeSelector", "unterminated string"},

		// BGPConfiguration.
		{"bgpconfig bad name", func() Resource { c := validBGPConfig(); c.Metadata.Name = "global"; return c }, "metadata.name", `must be "default" or "node." followed by a node name`},
		{"bgpconfig node. without node", func() Resource { c := validBGPConfig(); c.Metadata.Name = "node."; return c }, "metadata.name", "lower-case letters"},
		{"bgpconfig asNumber 0", func() Resource { c := validBGPConfig(); c.Spec.ASNumber = ptr(ASNumber(0)); return c }, "spec.asNumber", "is out of range; use 1 to 4294967295"},
		{"bgpconfig listenPort 0", func() Resource { c := validBGPConfig(); c.Spec.ListenPort = ptr(0); return c }, "spec.listenPort", "use 1 to 65535"},
		{"bgpconfig listenPort 65536", func() Resource { c := validBGPConfig(); c.Spec.ListenPort = ptr(65536); return c }, "spec.listenPort", "is out of range"},
		{"bgpconfig per-node AS", func() Resource {
			c := validBGPConfig()
			c.Metadata.Name = "node.n1"
			c.Spec.ASNumber = ptr(ASNumber(65001))
			return c
		}, "spec.asNumber", "in its Node's spec.bgp.asNumber"},
		{"bgpconfig per-node mesh", func() Resource {
			c := validBGPConfig()
			c.Metadata.Name = "node.n1"
			c.Spec.NodeToNodeMeshEnabled = ptr(false)
			return c
		}, "spec.nodeToNodeMeshEnabled", "is cluster-wide"},
		{"bgpconfig long password", func() Resource { c := validBGPConfig(); c.Spec.NodeMeshPassword = pw; return c }, "spec.nodeMeshPassword", "80 bytes TCP MD5"},
		{"bgpconfig restart time 0", func() Resource {
			c := validBGPConfig()
			c.Spec.NodeMeshMaxRestartTime = dur(0)
			return c
		}, "spec.nodeMeshMaxRestartTime", "must be positive"},

		// BGPPeer.
		{"peer bad IP", func() Resource { p := validPeer(); p.Spec.PeerIP = "198.18.1.300"; return p }, "spec.peerIP", "is not an IP address; use a.b.c.d, a.b.c.d:port, an IPv6 address or [IPv6]:port"},
		{"peer hostname", func() Resource { p := validPeer(); p.Spec.PeerIP = "tor.example.com"; return p }, "spec.peerIP", "is not an IP address"},
		{"peer non-numeric port", func() Resource { p := validPeer(); p.Spec.PeerIP = "198.18.1.1:bgp"; return p }, "spec.peerIP", "has a bad port; use 1 to 65535"},
		{"peer port 0", func() Resource { p := validPeer(); p.Spec.PeerIP = "198.18.1.1:0"; return p }, "spec.peerIP", "has a bad port"},
		{"peer link-local", func() Resource { p := validPeer(); p.Spec.PeerIP = "fe80::1"; return p }, "spec.peerIP", "must be a global unicast address"},
		{"peer zoned", func() Resource { p := validPeer(); p.Spec.PeerIP = "[fe80::1%eth0]:179"; return p }, "spec.peerIP", "must be a global unicast address"},
		{"peer loopback", func() Resource { p := validPeer(); p.Spec.PeerIP = "127.0.0.1"; return p }, "spec.peerIP", "must be a global unicast address"},
		{"peerIP without asNumber", func() Resource { p := validPeer(); p.Spec.ASNumber = nil; return p }, "spec.asNumber", "is required with peerIP"},
		{"peerIP and peerSelector", func() Resource { p := validPeer(); p.Spec.PeerSelector = "has(rr)"; return p }, "spec.peerSelector", "set either peerIP or peerSelector, not both"},
		{"neither peerIP nor peerSelector", func() Resource { p := validPeer(); p.Spec.PeerIP = ""; return p }, "spec.peerIP", "set peerIP (an external router) or peerSelector (other nodes)"},
		{"node and nodeSelector", func() Resource {
			p := validPeer()
			p.Spec.Node = "node-1"
			p.Spec.NodeSelector = "has(rack)"
			return p
		}, "spec.nodeSelector", "set either node or nodeSelector, not both"},
		{"peer nodeSelector syntax", func() Resource { p := validPeer(); p.Spec.NodeSelector = "rack == "; return p }, "spec.nodeSelector", "offset 8"},
		{"peer peerSelector syntax", func() Resource {
			p := validPeer()
			p.Spec.PeerIP = ""
			p.Spec.ASNumber = nil
			p.Spec.PeerSelector = "has(rr"
			return p
		}, "spec.peerSelector", "offset 6"},
		{"peer asNumber 0", func() Resource { p := validPeer(); p.Spec.ASNumber = ptr(ASNumber(0)); return p }, "spec.asNumber", "is out of range; use 1 to 4294967295"},
		{"peer long password", func() Resource { p := validPeer(); p.Spec.Password = pw; return p }, "spec.password", "80 bytes"},
		{"peer holdTime too short", func() Resource { p := validPeer(); p.Spec.HoldTime = dur(2 * time.Second); return p }, "spec.holdTime", "at least 3s (RFC 4271)"},
		{"peer holdTime negative", func() Resource { p := validPeer(); p.Spec.HoldTime = dur(-time.Second); return p }, "spec.holdTime", "must be 0 (no keepalives)"},
		{"peer keepalive negative", func() Resource { p := validPeer(); p.Spec.KeepaliveTime = dur(-time.Second); return p }, "spec.keepaliveTime", "must not be negative"},
		{"peer keepalive not below hold", func() Resource {
			p := validPeer()
			p.Spec.HoldTime = dur(9 * time.Second)
			p.Spec.KeepaliveTime = dur(9 * time.Second)
			return p
		}, "spec.keepaliveTime", "must be shorter than holdTime 9s"},
		{"peer maxRestartTime 0", func() Resource { p := validPeer(); p.Spec.MaxRestartTime = dur(0); return p }, "spec.maxRestartTime", "must be positive"},
		{"peer maxPrefixes 0", func() Resource { p := validPeer(); p.Spec.MaxPrefixes = ptr(0); return p }, "spec.maxPrefixes", "use 1 to 4294967295, or leave it out for no limit"},
		{"peer maxPrefixes too large", func() Resource { p := validPeer(); p.Spec.MaxPrefixes = ptr(1 << 32); return p }, "spec.maxPrefixes", "is out of range"},

		// Node.
		{"node ipv4Address without mask", func() Resource { n := validNode(); n.Spec.BGP.IPv4Address = "198.18.1.2"; return n }, "spec.bgp.ipv4Address", "with its subnet's prefix length, such as 198.18.1.2/24"},
		{"node ipv4Address garbage", func() Resource { n := validNode(); n.Spec.BGP.IPv4Address = "node-1"; return n }, "spec.bgp.ipv4Address", "IPv4 address"},
		{"node ipv4Address ipv6", func() Resource { n := validNode(); n.Spec.BGP.IPv4Address = "fd00::2/64"; return n }, "spec.bgp.ipv4Address", "IPv4 address"},
		{"node ipv6Address ipv4", func() Resource { n := validNode(); n.Spec.BGP.IPv6Address = "198.18.1.2/24"; return n }, "spec.bgp.ipv6Address", "global IPv6 address with its subnet's prefix length, such as fd00:18:1::2/64"},
		{"node ipv6Address without mask", func() Resource { n := validNode(); n.Spec.BGP.IPv6Address = "fd00:18:1::2"; return n }, "spec.bgp.ipv6Address", "prefix length"},
		{"node ipv6Address link-local", func() Resource { n := validNode(); n.Spec.BGP.IPv6Address = "fe80::2/64"; return n }, "spec.bgp.ipv6Address", "global IPv6 address"},
		{"node ipv6Address mapped", func() Resource { n := validNode(); n.Spec.BGP.IPv6Address = "::ffff:198.18.1.2/120"; return n }, "spec.bgp.ipv6Address", "global IPv6 address"},
		{"node asNumber 0", func() Resource { n := validNode(); n.Spec.BGP.ASNumber = ptr(ASNumber(0)); return n }, "spec.bgp.asNumber", "use 1 to 4294967295"},
		{"node bad routeReflectorClusterID", func() Resource { n := validNode(); n.Spec.BGP.RouteReflectorClusterID = "rr-1"; return n }, "spec.bgp.routeReflectorClusterID", "must be written as an IPv4 address, such as 224.0.0.1"},
		{"node ipv6 routeReflectorClusterID", func() Resource { n := validNode(); n.Spec.BGP.RouteReflectorClusterID = "::1"; return n }, "spec.bgp.routeReflectorClusterID", "IPv4 address"},
		{"node bad ipip tunnel addr", func() Resource { n := validNode(); n.Spec.BGP.IPv4IPIPTunnelAddr = "10.244.0.1/32"; return n }, "spec.bgp.ipv4IPIPTunnelAddr", "must be an IPv4 address"},
		{"node bad vxlan tunnel addr", func() Resource { n := validNode(); n.Spec.IPv4VXLANTunnelAddr = "fd00::1"; return n }, "spec.ipv4VXLANTunnelAddr", "must be an IPv4 address"},
		{"node bad vxlan mac", func() Resource { n := validNode(); n.Spec.VXLANTunnelMACAddr = "66:1f:3a"; return n }, "spec.vxlanTunnelMACAddr", "is not a MAC address such as 66:1f:3a:00:00:01"},
		{"node bad vxlan v6 mac", func() Resource { n := validNode(); n.Spec.VXLANTunnelMACAddrV6 = "66:1f"; return n }, "spec.vxlanTunnelMACAddrV6", "is not a MAC address"},
		{"node v4 vxlan v6 address", func() Resource { n := validNode(); n.Spec.IPv6VXLANTunnelAddr = "10.244.0.1"; return n }, "spec.ipv6VXLANTunnelAddr", "must be an IPv6 address"},
		{"node v6 vxlan v4 address", func() Resource { n := validNode(); n.Spec.IPv4VXLANTunnelAddr = "fd00::1"; return n }, "spec.ipv4VXLANTunnelAddr", "must be an IPv4 address"},

		// WorkloadEndpoint.
		{"wep missing node", func() Resource { w := validWEP(); w.Spec.Node = ""; return w }, "spec.node", "is required"},
		{"wep missing containerID", func() Resource { w := validWEP(); w.Spec.ContainerID = ""; return w }, "spec.containerID", "is required"},
		{"wep missing interfaceName", func() Resource { w := validWEP(); w.Spec.InterfaceName = ""; return w }, "spec.interfaceName", "is required"},
		{"wep ipNetwork not a host", func() Resource { w := validWEP(); w.Spec.IPNetworks = []string{"10.244.1.0/24"}; return w }, "spec.ipNetworks", "must be a host CIDR such as 10.244.1.5/32"},
		{"wep ipNetwork bare address", func() Resource { w := validWEP(); w.Spec.IPNetworks = []string{"10.244.1.5"}; return w }, "spec.ipNetworks", "host CIDR"},
		{"wep bad mac", func() Resource { w := validWEP(); w.Spec.MAC = "not-a-mac"; return w }, "spec.mac", "is not a MAC address"},
		{"wep port name upper case", func() Resource { w := validWEP(); w.Spec.Ports[0].Name = "HTTP"; return w }, "spec.ports[0].name", "must be a port name"},
		{"wep port name digits only", func() Resource { w := validWEP(); w.Spec.Ports[1].Name = "8080"; return w }, "spec.ports[1].name", "with a letter"},
		{"wep port ICMP", func() Resource { w := validWEP(); w.Spec.Ports[0].Protocol = Protocol{Name: "ICMP"}; return w }, "spec.ports[0].protocol", "TCP, UDP, SCTP or UDPLite"},
		{"wep port 0", func() Resource { w := validWEP(); w.Spec.Ports[0].Port = 0; return w }, "spec.ports[0].port", "from 1 to 65535"},

		// IPAMConfiguration.
		{"ipam name not default", func() Resource { c := NewIPAMConfiguration(); c.Metadata.Name = "cluster"; return c }, "metadata.name", `must be "default": there is one IPAM configuration per cluster`},
		{"ipam negative maxBlocksPerHost", func() Resource { c := NewIPAMConfiguration(); c.Spec.MaxBlocksPerHost = ptr(-1); return c }, "spec.maxBlocksPerHost", "must be 0 (no limit) or more"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := tt.res()
			err := r.Validate()
			wantFieldErr(t, err, tt.field, tt.frag)
			if want := "invalid " + Ref(r) + ": "; !strings.HasPrefix(err.Error(), want) {
				t.Errorf("error %q does not start with %q", err, want)
			}
		})
	}
}

// A pool with several problems reports all of them, not just the first.
func TestValidateReportsEveryField(t *testing.T) {
	p := validPool()
	p.Metadata.Name = ""
	p.Spec.CIDR = "10.244.0.1/16"
	p.Spec.BlockSize = 40
	p.Spec.IPIPMode = "Yes"
	err := p.Validate()
	for _, f := range []string{"metadata.name", "spec.cidr", "spec.blockSize", "spec.ipipMode"} {
		wantFieldErr(t, err, f, "")
	}
	var ve *ValidationError
	errors.As(err, &ve)
	if len(ve.Fields) != 4 {
		t.Errorf("got %d field errors, want 4: %v", len(ve.Fields), err)
	}
}

func TestPeerPortOutOfRange(t *testing.T) {
	for _, ip := range []string{"198.18.1.1:65536", "198.18.1.1:99999", "198.18.1.1:-1"} {
		t.Run(ip, func(t *testing.T) {
			p := validPeer()
			p.Spec.PeerIP = ip
			err := p.Validate()
			// It is rejected either way; the message is what is wrong.
			wantFieldErr(t, err, "spec.peerIP", "")
			expect(t, strings.Contains(err.Error(), "has a bad port"),
				"bgp.go parsePeerIP: port %q outside 1-65535 reports %q instead of \"has a bad port\"", ip, err)
		})
	}
}

func TestValidateValid(t *testing.T) {
	tests := []struct {
		name string
		res  func() Resource
	}{
		{"pool minimal", func() Resource { return validPool() }},
		{"pool full", func() Resource {
			p := validPool()
			p.Metadata.Labels = map[string]string{"margay.dev/tier": "edge", "empty": ""}
			p.Spec.CIDR = "192.168.0.0/24"
			p.Spec.BlockSize = 28
			p.Spec.IPIPMode = EncapCrossSubnet
			p.Spec.NATOutgoing = true
			p.Spec.Disabled = true
			p.Spec.NodeSelector = "zone in {'a', 'b'} && !has(edge)"
			return p
		}},
		{"pool vxlan only", func() Resource { p := validPool(); p.Spec.VXLANMode = EncapAlways; return p }},
		{"pool v6", func() Resource {
			p := validPool()
			p.Spec.CIDR, p.Spec.BlockSize, p.Spec.VXLANMode, p.Spec.NATOutgoing = "fd00:10::/48", 122, EncapCrossSubnet, true
			return p
		}},
		{"peer v6", func() Resource { p := validPeer(); p.Spec.PeerIP = "fd00:18:1::1"; return p }},
		{"peer v6 with port", func() Resource { p := validPeer(); p.Spec.PeerIP = "[fd00:18:1::1]:1179"; return p }},
		{"pool v6 blockSize 128", func() Resource { p := validPool(); p.Spec.CIDR, p.Spec.BlockSize = "2001:db8::/64", 128; return p }},
		{"pool blockSize equals pool", func() Resource {
			p := validPool()
			p.Spec.CIDR = "10.9.0.0/20"
			p.Spec.BlockSize = 20
			return p
		}},
		{"pool /32 block", func() Resource { p := validPool(); p.Spec.BlockSize = 32; return p }},
		{"pool next to link-local", func() Resource { p := validPool(); p.Spec.CIDR = "169.255.0.0/16"; return p }},
		{"pool dotted name", func() Resource { p := validPool(); p.Metadata.Name = "pool.a-1"; return p }},
		{"pool name 253 chars", func() Resource {
			p := validPool()
			p.Metadata.Name = strings.Repeat(strings.Repeat("a", 62)+".", 4) + "a"
			return p
		}},
		{"bgpconfig default empty", func() Resource { return validBGPConfig() }},
		{"bgpconfig default full", func() Resource {
			c := validBGPConfig()
			c.Spec = BGPConfigurationSpec{ASNumber: ptr(ASNumber(4294967295)), NodeToNodeMeshEnabled: ptr(false)}
			return c
		}},
		{"bgpconfig node override full", func() Resource {
			c := NewBGPConfiguration(BGPConfigName("node-1"))
			c.Spec = BGPConfigurationSpec{
				ListenPort:             ptr(1179),
				NodeMeshPassword:       strings.Repeat("x", 80),
				NodeMeshMaxRestartTime: dur(time.Minute),
			}
			return c
		}},
		{"peer external", func() Resource { return validPeer() }},
		{"peer external with port and timers", func() Resource {
			p := validPeer()
			p.Spec.PeerIP = "198.18.1.1:1179"
			p.Spec.Node = "node-1"
			p.Spec.Password = "secret"
			p.Spec.HoldTime = dur(9 * time.Second)
			p.Spec.KeepaliveTime = dur(3 * time.Second)
			p.Spec.MaxRestartTime = dur(time.Minute)
			return p
		}},
		{"peer port 65535", func() Resource { p := validPeer(); p.Spec.PeerIP = "198.18.1.1:65535"; return p }},
		{"peer holdTime 0 disables keepalives", func() Resource {
			p := validPeer()
			p.Spec.HoldTime = dur(0)
			p.Spec.KeepaliveTime = dur(30 * time.Second)
			return p
		}},
		{"peer selector (route reflectors)", func() Resource {
			p := NewBGPPeer("to-rrs")
			p.Spec.NodeSelector = "!has(route-reflector)"
			p.Spec.PeerSelector = "has(route-reflector)"
			return p
		}},
		{"node empty spec", func() Resource { return NewNode("bare") }},
		{"node ipv6 only", func() Resource {
			n := NewNode("v6")
			n.Spec.BGP = &NodeBGPSpec{IPv6Address: "2001:db8:1::2/64"}
			return n
		}},
		{"node full", func() Resource {
			n := validNode()
			n.Spec.BGP.ASNumber = ptr(ASNumber(65010))
			n.Spec.BGP.RouteReflectorClusterID = "224.0.0.1"
			n.Spec.BGP.IPv6Address = "fd00:18:1::2/64"
			n.Spec.BGP.IPv4IPIPTunnelAddr = "10.244.0.1"
			n.Spec.IPv4VXLANTunnelAddr = "10.244.0.2"
			n.Spec.VXLANTunnelMACAddr = "66:1f:3a:00:00:01"
			return n
		}},
		{"wep", func() Resource { return validWEP() }},
		{"wep without addresses", func() Resource { w := validWEP(); w.Spec.IPNetworks = nil; w.Spec.MAC = ""; return w }},
		{"ipam default", func() Resource { return NewIPAMConfiguration() }},
		{"ipam no limit", func() Resource {
			c := NewIPAMConfiguration()
			c.Spec.MaxBlocksPerHost = ptr(0)
			c.Spec.StrictAffinity = true
			return c
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := tt.res().Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
		})
	}
}

// asNumber errors are caught while decoding, before Validate, because a plain
// uint32 would only say "cannot unmarshal number".
func TestASNumberDecode(t *testing.T) {
	doc := func(v string) string {
		return "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata:\n  name: p\nspec:\n  peerIP: 198.18.1.1\n  asNumber: " + v + "\n"
	}
	tests := []struct {
		in      string
		want    ASNumber
		wantErr string
	}{
		{"64512", 64512, ""},
		{"4294967295", 4294967295, ""},
		{`"65001"`, 65001, ""},
		{`"1.10"`, 65546, ""},
		{`'1.0'`, 65536, ""},
		{`"65535.65535"`, 4294967295, ""},
		{"4294967296", 0, "asNumber 4294967296 is out of range: use 1 to 4294967295"},
		{"-1", 0, "asNumber -1 is out of range: use 1 to 4294967295"},
		{"99999999999999999999", 0, "is out of range: use 1 to 4294967295"},
		{"private", 0, "asNumber private is out of range"},
		{`"65536.1"`, 0, "asNumber 65536.1: asdot form must be <0-65535>.<0-65535>"},
		{`"1.x"`, 0, "asdot form"},
		{"true", 0, "asNumber true"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			rs, err := Decode([]byte(doc(tt.in)))
			if tt.wantErr != "" {
				if err == nil {
					t.Fatalf("Decode succeeded with asNumber %v, want error %q", *rs[0].(*BGPPeer).Spec.ASNumber, tt.wantErr)
				}
				if !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %q does not contain %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			if got := *rs[0].(*BGPPeer).Spec.ASNumber; got != tt.want {
				t.Fatalf("asNumber = %d, want %d", got, tt.want)
			}
		})
	}
	// 0 decodes; Validate rejects it with the field and the range.
	rs, err := Decode([]byte(doc("0")))
	if err != nil {
		t.Fatalf("Decode asNumber 0: %v", err)
	}
	wantFieldErr(t, rs[0].Validate(), "spec.asNumber", "use 1 to 4294967295")
}

// Unquoted 1.10 is a YAML float (1.1), so the asdot form silently becomes 1.1 = 65537.
func TestASNumberUnquotedAsdot(t *testing.T) {
	rs, err := Decode([]byte("apiVersion: margay.dev/v1\nkind: BGPConfiguration\nmetadata: {name: default}\nspec: {asNumber: 1.10}\n"))
	ok := err != nil || *rs[0].(*BGPConfiguration).Spec.ASNumber == 65546
	var got any = err
	if err == nil {
		got = *rs[0].(*BGPConfiguration).Spec.ASNumber
	}
	expect(t, ok, "types.go ASNumber.UnmarshalJSON: unquoted YAML `asNumber: 1.10` decodes to %v (read as 1.1), want 65546 or an error asking to quote it", got)
}

func TestValidateAgainst(t *testing.T) {
	other := func(name, cidr string) *IPPool {
		p := validPool()
		p.Metadata.Name = name
		p.Spec.CIDR = cidr
		return p
	}
	tests := []struct {
		name   string
		pool   *IPPool
		others []Resource
		frag   string // "" means valid
	}{
		{"no others", validPool(), nil, ""},
		{"disjoint", validPool(), []Resource{other("b", "10.245.0.0/16"), other("c", "192.168.0.0/24")}, ""},
		{"itself in the list (update)", validPool(), []Resource{validPool()}, ""},
		{"non-pools ignored", validPool(), []Resource{validNode(), validPeer()}, ""},
		{"other inside", validPool(), []Resource{other("b", "10.244.128.0/17")}, `overlaps IPPool "b" (10.244.128.0/17); pools must not overlap`},
		{"other contains", validPool(), []Resource{other("big", "10.0.0.0/8")}, `overlaps IPPool "big" (10.0.0.0/8)`},
		{"other identical", validPool(), []Resource{other("twin", "10.244.0.0/16")}, `overlaps IPPool "twin"`},
		{"second of several overlaps", validPool(), []Resource{other("b", "10.245.0.0/16"), other("c", "10.244.7.0/24")}, `overlaps IPPool "c"`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := ValidateAgainst(tt.pool, tt.others)
			if tt.frag == "" {
				if err != nil {
					t.Fatalf("ValidateAgainst: %v", err)
				}
				return
			}
			wantFieldErr(t, err, "spec.cidr", tt.frag)
		})
	}
	if err := ValidateAgainst(validNode(), []Resource{validPool()}); err != nil {
		t.Errorf("ValidateAgainst on a Node: %v", err)
	}
}

func TestValidateUpdate(t *testing.T) {
	tests := []struct {
		name   string
		mod    func(*IPPool)
		field  string // "" means allowed
		frag   string
		fields int
	}{
		{"unchanged", func(*IPPool) {}, "", "", 0},
		{"disable", func(p *IPPool) { p.Spec.Disabled = true }, "", "", 0},
		{"change modes, nat, selector, labels", func(p *IPPool) {
			p.Spec.IPIPMode = EncapAlways
			p.Spec.NATOutgoing = true
			p.Spec.NodeSelector = "has(x)"
			p.Metadata.Labels = map[string]string{"a": "b"}
		}, "", "", 0},
		{"cidr", func(p *IPPool) { p.Spec.CIDR = "10.245.0.0/16" }, "spec.cidr", "is immutable (stored: 10.244.0.0/16); create a new pool, disable this one, then delete it", 1},
		{"blockSize", func(p *IPPool) { p.Spec.BlockSize = 24 }, "spec.blockSize", "is immutable (stored: 26); create a new pool instead", 1},
		{"both", func(p *IPPool) { p.Spec.CIDR = "10.0.0.0/8"; p.Spec.BlockSize = 28 }, "spec.blockSize", "immutable", 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			old, upd := validPool(), validPool()
			tt.mod(upd)
			err := ValidateUpdate(old, upd)
			if tt.field == "" {
				if err != nil {
					t.Fatalf("ValidateUpdate: %v", err)
				}
				return
			}
			wantFieldErr(t, err, tt.field, tt.frag)
			var ve *ValidationError
			errors.As(err, &ve)
			if len(ve.Fields) != tt.fields {
				t.Errorf("got %d field errors, want %d: %v", len(ve.Fields), tt.fields, err)
			}
		})
	}
	if err := ValidateUpdate(validNode(), validNode()); err != nil {
		t.Errorf("ValidateUpdate on Nodes: %v", err)
	}
}

func TestDefaults(t *testing.T) {
	p := NewIPPool("p")
	p.SetDefaults()
	if p.Spec.BlockSize != 26 || p.Spec.IPIPMode != EncapNever || p.Spec.VXLANMode != EncapNever || p.Spec.NodeSelector != "all()" {
		t.Errorf("IPPool defaults = %+v, want blockSize 26, Never, Never, all()", p.Spec)
	}
	p = NewIPPool("p")
	p.Spec.CIDR = "fd00:10::/48"
	if p.SetDefaults(); p.Spec.BlockSize != 122 {
		t.Errorf("IPv6 pool default blockSize = %d, want 122", p.Spec.BlockSize)
	}
	// Set fields are kept.
	p = NewIPPool("p")
	p.Spec = IPPoolSpec{BlockSize: 29, IPIPMode: EncapAlways, VXLANMode: EncapCrossSubnet, NodeSelector: "has(a)"}
	want := p.Spec
	p.SetDefaults()
	if p.Spec != want {
		t.Errorf("SetDefaults changed set fields: %+v, want %+v", p.Spec, want)
	}

	c := NewIPAMConfiguration()
	if c.Metadata.Name != "default" || c.Spec.MaxBlocksPerHost == nil || *c.Spec.MaxBlocksPerHost != 20 || c.MaxBlocks() != 20 {
		t.Errorf("NewIPAMConfiguration = %+v, want name default, maxBlocksPerHost 20", c)
	}
	c = &IPAMConfiguration{}
	if c.MaxBlocks() != 20 {
		t.Errorf("MaxBlocks of unset = %d, want 20", c.MaxBlocks())
	}
	c.SetDefaults()
	if c.Spec.MaxBlocksPerHost == nil || *c.Spec.MaxBlocksPerHost != 20 {
		t.Errorf("IPAMConfiguration SetDefaults: maxBlocksPerHost = %v, want 20", c.Spec.MaxBlocksPerHost)
	}
	c.Spec.MaxBlocksPerHost = ptr(0)
	c.SetDefaults()
	if c.MaxBlocks() != 0 {
		t.Errorf("explicit 0 (no limit) overwritten by SetDefaults: %d", c.MaxBlocks())
	}

	w := NewWorkloadEndpoint("w")
	w.SetDefaults()
	if w.Spec.Orchestrator != "k8s" || w.Spec.Endpoint != "eth0" {
		t.Errorf("WorkloadEndpoint defaults = %+v", w.Spec)
	}
	if w := validWEP(); w.Spec.Ports[0].Protocol.String() != "TCP" || w.Spec.Ports[1].Protocol.String() != "UDP" {
		t.Errorf("a port's protocol defaults to TCP: %+v", w.Spec.Ports)
	}

	// Decode applies defaults too.
	rs, err := Decode([]byte(`
apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: p}
spec: {cidr: 10.244.0.0/16}
---
apiVersion: margay.dev/v1
kind: IPAMConfiguration
metadata: {name: default}
spec: {strictAffinity: true}
`))
	if err != nil {
		t.Fatal(err)
	}
	if s := rs[0].(*IPPool).Spec; s.BlockSize != 26 || s.IPIPMode != EncapNever || s.VXLANMode != EncapNever || s.NodeSelector != AllSelector {
		t.Errorf("decoded pool not defaulted: %+v", s)
	}
	if m := rs[1].(*IPAMConfiguration).Spec.MaxBlocksPerHost; m == nil || *m != 20 {
		t.Errorf("decoded IPAMConfiguration maxBlocksPerHost = %v, want 20", m)
	}
}

func TestResolveBGP(t *testing.T) {
	builtin := BGPSettings{ASNumber: 64512, NodeToNodeMeshEnabled: true, ListenPort: 179, NodeMeshMaxRestartTime: 120 * time.Second}
	conf := func(name string, s BGPConfigurationSpec) *BGPConfiguration {
		c := NewBGPConfiguration(name)
		c.Spec = s
		return c
	}
	global := conf("default", BGPConfigurationSpec{
		ASNumber:         ptr(ASNumber(65000)),
		ListenPort:       ptr(1179),
		NodeMeshPassword: "global-secret",
	})
	tests := []struct {
		name         string
		global, node *BGPConfiguration
		want         BGPSettings
	}{
		{"built-in defaults", nil, nil, builtin},
		{"empty configs", conf("default", BGPConfigurationSpec{}), conf("node.a", BGPConfigurationSpec{}), builtin},
		{"global only", global, nil, BGPSettings{ASNumber: 65000, NodeToNodeMeshEnabled: true, ListenPort: 1179, NodeMeshPassword: "global-secret", NodeMeshMaxRestartTime: 120 * time.Second}},
		{"node only", nil, conf("node.a", BGPConfigurationSpec{NodeToNodeMeshEnabled: ptr(false), NodeMeshMaxRestartTime: dur(time.Minute)}),
			BGPSettings{ASNumber: 64512, NodeToNodeMeshEnabled: false, ListenPort: 179, NodeMeshMaxRestartTime: time.Minute}},
		{"node overrides global field by field", global, conf("node.a", BGPConfigurationSpec{ASNumber: ptr(ASNumber(65099)), NodeMeshMaxRestartTime: dur(30 * time.Second)}),
			BGPSettings{ASNumber: 65099, NodeToNodeMeshEnabled: true, ListenPort: 1179, NodeMeshPassword: "global-secret", NodeMeshMaxRestartTime: 30 * time.Second}},
		{"node overrides everything", global, conf("node.a", BGPConfigurationSpec{
			ASNumber: ptr(ASNumber(1)), NodeToNodeMeshEnabled: ptr(false), ListenPort: ptr(2179),
			NodeMeshPassword: "node-secret", NodeMeshMaxRestartTime: dur(time.Second),
		}), BGPSettings{ASNumber: 1, NodeToNodeMeshEnabled: false, ListenPort: 2179, NodeMeshPassword: "node-secret", NodeMeshMaxRestartTime: time.Second}},
		{"explicit true in node beats false in global", conf("default", BGPConfigurationSpec{NodeToNodeMeshEnabled: ptr(false)}), conf("node.a", BGPConfigurationSpec{NodeToNodeMeshEnabled: ptr(true)}),
			builtin},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ResolveBGP(tt.global, tt.node); got != tt.want {
				t.Errorf("ResolveBGP = %+v, want %+v", got, tt.want)
			}
		})
	}
	if got := BGPConfigName("node-1"); got != "node.node-1" {
		t.Errorf("BGPConfigName = %q", got)
	}
}

func TestPeerAddr(t *testing.T) {
	tests := []struct {
		in   string
		addr string
		port int
		err  string
	}{
		{"198.18.1.1", "198.18.1.1", 179, ""},
		{"198.18.1.1:1179", "198.18.1.1", 1179, ""},
		{"198.18.1.1:0", "", 0, "has a bad port"},
		{"198.18.1.1:x", "", 0, "has a bad port"},
		{"", "", 0, "is not an IP address"},
		{"peer", "", 0, "is not an IP address"},
		{"fd00:18:1::1", "fd00:18:1::1", 179, ""},
		{"[fd00:18:1::1]:1179", "fd00:18:1::1", 1179, ""},
		{"::ffff:198.18.1.1", "198.18.1.1", 179, ""},
		{"[fd00:18:1::1]:0", "", 0, "has a bad port"},
		{"fe80::1", "", 0, "must be a global unicast address"},
		{"[fe80::1%eth0]:179", "", 0, "must be a global unicast address"},
	}
	for _, tt := range tests {
		t.Run(tt.in, func(t *testing.T) {
			p := NewBGPPeer("p")
			p.Spec.PeerIP = tt.in
			a, port, err := p.PeerAddr()
			if tt.err != "" {
				if err == nil || !strings.Contains(err.Error(), tt.err) {
					t.Fatalf("PeerAddr(%q) error = %v, want %q", tt.in, err, tt.err)
				}
				return
			}
			if err != nil || a.String() != tt.addr || port != tt.port {
				t.Fatalf("PeerAddr(%q) = %v, %d, %v; want %s, %d", tt.in, a, port, err, tt.addr, tt.port)
			}
		})
	}
}

func TestFieldErrorFormat(t *testing.T) {
	tests := []struct {
		fe   FieldError
		want string
	}{
		{FieldError{Field: "spec.node", Detail: "is required"}, "spec.node: is required"},
		{FieldError{Field: "spec.cidr", Value: "x", Detail: "bad"}, `spec.cidr: "x": bad`},
		{FieldError{Field: "spec.blockSize", Value: 40, Detail: "bad"}, "spec.blockSize: 40: bad"},
	}
	for _, tt := range tests {
		if got := tt.fe.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}
	ve := &ValidationError{Ref: `IPPool "p"`, Fields: []*FieldError{&tests[0].fe, &tests[1].fe}}
	if got, want := ve.Error(), `invalid IPPool "p": spec.node: is required; spec.cidr: "x": bad`; got != want {
		t.Errorf("ValidationError = %q, want %q", got, want)
	}
}

func TestIPPoolSelects(t *testing.T) {
	p := validPool()
	if !p.Selects(nil) {
		t.Error("default pool does not select an unlabelled node")
	}
	p.Spec.NodeSelector = "zone == 'a'"
	if !p.Selects(map[string]string{"zone": "a"}) || p.Selects(map[string]string{"zone": "b"}) {
		t.Error("zone == 'a' selects wrongly")
	}
	p.Spec.NodeSelector = "zone =="
	if p.Selects(map[string]string{"zone": "a"}) {
		t.Error("an invalid selector selects a node")
	}
	if got := p.Prefix().String(); got != "10.244.0.0/16" {
		t.Errorf("Prefix = %s", got)
	}
}

func validPolicy() *NetworkPolicy {
	p := NewNetworkPolicy("web", "allow-front")
	p.Spec.Selector = "app == 'web'"
	p.Spec.Ingress = []Rule{{Action: ActionAllow, Protocol: &Protocol{Name: "TCP"},
		Source:      EntityRule{Selector: "app == 'front'", NamespaceSelector: "all()"},
		Destination: EntityRule{Ports: []Port{{Min: 80, Max: 80}, {Min: 8000, Max: 8080}, {Name: "http"}}}}}
	p.SetDefaults()
	return p
}

func TestValidatePolicy(t *testing.T) {
	if err := validPolicy().Validate(); err != nil {
		t.Fatalf("valid policy: %v", err)
	}
	if got := validPolicy().Spec.Types; len(got) != 1 || got[0] != PolicyIngress {
		t.Errorf("default types %v, want [Ingress]", got)
	}
	cases := []struct {
		name, field, frag string
		edit              func(p *NetworkPolicy)
	}{
		{"no namespace", "metadata.namespace", "required", func(p *NetworkPolicy) { p.Metadata.Namespace = "" }},
		{"bad namespace", "metadata.namespace", "lower-case", func(p *NetworkPolicy) { p.Metadata.Namespace = "a.b" }},
		{"bad selector", "spec.selector", "", func(p *NetworkPolicy) { p.Spec.Selector = "app ==" }},
		{"namespaceSelector on a namespaced policy", "spec.namespaceSelector", "GlobalNetworkPolicy", func(p *NetworkPolicy) { p.Spec.NamespaceSelector = "all()" }},
		{"bad type", "spec.types", "Ingress or Egress", func(p *NetworkPolicy) { p.Spec.Types = []PolicyType{"Both"} }},
		{"rules without their type", "spec.ingress", "lacks Ingress", func(p *NetworkPolicy) { p.Spec.Types = []PolicyType{PolicyEgress} }},
		{"no action", "spec.ingress[0].action", "required", func(p *NetworkPolicy) { p.Spec.Ingress[0].Action = "" }},
		{"bad action", "spec.ingress[0].action", "Allow, Deny", func(p *NetworkPolicy) { p.Spec.Ingress[0].Action = "Accept" }},
		{"ports without protocol", "spec.ingress[0].destination.ports", "needs protocol", func(p *NetworkPolicy) { p.Spec.Ingress[0].Protocol = nil }},
		{"ports with ICMP", "spec.ingress[0].destination.ports", "needs protocol", func(p *NetworkPolicy) { p.Spec.Ingress[0].Protocol = &Protocol{Name: "ICMP"} }},
		{"named source port", "spec.ingress[0].source.ports", "destination port", func(p *NetworkPolicy) { p.Spec.Ingress[0].Source.Ports = []Port{{Name: "http"}} }},
		{"bad net", "spec.ingress[0].source.nets", "CIDR", func(p *NetworkPolicy) { p.Spec.Ingress[0].Source.Nets = []string{"10.0.0.300/8"} }},
		{"host bits", "spec.ingress[0].source.notNets", "write 10.0.0.0/8", func(p *NetworkPolicy) { p.Spec.Ingress[0].Source.NotNets = []string{"10.1.0.0/8"} }},
		{"protocol equals notProtocol", "spec.ingress[0].notProtocol", "never match", func(p *NetworkPolicy) { p.Spec.Ingress[0].NotProtocol = &Protocol{Number: 6} }},
		{"doNotTrack", "spec.doNotTrack", "not supported", func(p *NetworkPolicy) { p.Spec.DoNotTrack = true }},
		{"bad tier", "spec.tier", "Tier", func(p *NetworkPolicy) { p.Spec.Tier = "Not_A_Name" }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			p := validPolicy()
			c.edit(p)
			wantFieldErr(t, p.Validate(), c.field, c.frag)
		})
	}
	g := NewGlobalNetworkPolicy("g")
	g.Spec.NamespaceSelector = "team == 'a'"
	g.Spec.Egress = []Rule{{Action: ActionDeny}}
	g.SetDefaults()
	if err := g.Validate(); err != nil || len(g.Spec.Types) != 1 || g.Spec.Types[0] != PolicyEgress {
		t.Errorf("egress-only global policy: err %v, types %v (want [Egress])", err, g.Spec.Types)
	}
	g.Metadata.Namespace = "x"
	wantFieldErr(t, g.Validate(), "metadata.namespace", "not namespaced")
	tier := NewTier(DefaultTier)
	wantFieldErr(t, tier.Validate(), "metadata.name", "implicit default tier")
	wantFieldErr(t, NewTier("t").Validate(), "spec.order", "required")
}

func TestDecodePortsAndProtocols(t *testing.T) {
	doc := `apiVersion: margay.dev/v1
kind: GlobalNetworkPolicy
metadata: {name: g}
spec:
  ingress:
  - action: Allow
    protocol: 132
    destination: {ports: [80, "90:99", "metrics"], notPorts: ["95"]}
  - action: Deny
    protocol: udplite
`
	r, err := DecodeOne([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	in := r.(*GlobalNetworkPolicy).Spec.Ingress
	d := in[0].Destination
	if in[0].Protocol.Num() != 132 || in[1].Protocol.String() != "UDPLite" || len(d.Ports) != 3 ||
		d.Ports[0] != (Port{Min: 80, Max: 80}) || d.Ports[1] != (Port{Min: 90, Max: 99}) || d.Ports[2].Name != "metrics" || d.NotPorts[0].Min != 95 {
		t.Errorf("decoded %+v", in)
	}
	for _, bad := range []struct{ value, frag string }{
		{`protocol: 256`, "out of range"}, {`protocol: Tcpp`, "use TCP"}, {`protocol: 0`, "out of range"},
		{`destination: {ports: ["99:90"]}`, "must not be above"}, {`destination: {ports: [70000]}`, "0 to 65535"},
		{`destination: {ports: ["Http"]}`, "port name"}, {`destination: {ports: ["a--b"]}`, "port name"},
	} {
		_, err := DecodeOne([]byte("apiVersion: margay.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec:\n  ingress:\n  - action: Allow\n    " + bad.value + "\n"))
		if err == nil || !strings.Contains(err.Error(), bad.frag) {
			t.Errorf("%s: error %v, want one containing %q", bad.value, err, bad.frag)
		}
	}
}
