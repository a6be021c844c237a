package felix

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/nstest"
)

// CutDenied in a node namespace: of the conntrack entries there, it deletes
// those of flows through a local pod that the rules now drop, and keeps
// the allowed ones, those of the node itself and those of no local pod, in
// both families.
func TestCutDenied(t *testing.T) {
	ns := nstest.New(t, "node")
	ns.MustRun(t, "ip", "link", "add", "uplink", "type", "veth", "peer", "name", "uplink-peer")
	ns.MustRun(t, "ip", "addr", "add", "192.0.2.1/24", "dev", "uplink")
	ns.MustRun(t, "ip", "addr", "add", "2001:db8::1/64", "dev", "uplink", "nodad")
	// The pod a (10.244.1.1 and fd00:244::1 on mgya) may not be reached on TCP 5432.
	chains := []calc.Chain{{Table: "filter", Name: calc.ChainForward, Rules: [][]string{
		{"-o", "mgya", "-p", "tcp", "-m", "multiport", "--dports", "5432", "-j", "DROP"},
		{"-j", "ACCEPT"},
	}}}
	eps := []calc.Endpoint{{Name: "a", Interface: "mgya", IPs: []netip.Prefix{netip.MustParsePrefix("10.244.1.1/32"), netip.MustParsePrefix("fd00:244::1/128")}}}
	type tuple struct {
		src, dst string
		dport    uint16
	}
	entries := map[tuple]bool{ // kept?
		{"10.244.2.5", "10.244.1.1", 5432}:       false, // denied now
		{"10.244.2.5", "10.244.1.1", 80}:         true,
		{"192.0.2.1", "10.244.1.1", 5432}:        true, // the node's own: no FORWARD
		{"10.244.2.5", "10.244.3.3", 5432}:       true, // no local pod
		{"fd00:244:0:1::5", "fd00:244::1", 5432}: false,
		{"fd00:244:0:1::5", "fd00:244::1", 80}:   true,
		{"2001:db8::1", "fd00:244::1", 5432}:     true,
	}
	family := func(ip net.IP) netlink.InetFamily {
		if ip.To4() != nil {
			return unix.AF_INET
		}
		return unix.AF_INET6
	}
	for e := range entries {
		src, dst := net.ParseIP(e.src), net.ParseIP(e.dst)
		if src.To4() != nil {
			src, dst = src.To4(), dst.To4()
		}
		flow := &netlink.ConntrackFlow{FamilyType: uint8(family(src)),
			Forward:   netlink.IPTuple{SrcIP: src, DstIP: dst, Protocol: unix.IPPROTO_TCP, SrcPort: 40000, DstPort: e.dport},
			Reverse:   netlink.IPTuple{SrcIP: dst, DstIP: src, Protocol: unix.IPPROTO_TCP, SrcPort: e.dport, DstPort: 40000},
			TimeOut:   300,
			ProtoInfo: &netlink.ProtoInfoTCP{State: 3}, // ESTABLISHED
		}
		if err := ns.Do(func() error { return netlink.ConntrackCreate(netlink.ConntrackTable, family(src), flow) }); err != nil {
			t.Fatalf("creating %v: %v", e, err)
		}
	}
	var cut uint
	out := calc.Output{Chains: chains, Chains6: chains}
	if err := ns.Do(func() (err error) { cut, err = CutDenied(out, eps); return err }); err != nil {
		t.Fatal(err)
	}
	if cut != 2 {
		t.Errorf("cut %d flows, want 2", cut)
	}
	var flows []*netlink.ConntrackFlow
	if err := ns.Do(func() error {
		for _, af := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
			fs, err := netlink.ConntrackTableList(netlink.ConntrackTable, af)
			if err != nil {
				return err
			}
			flows = append(flows, fs...)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	for e, kept := range entries {
		has := slices.ContainsFunc(flows, func(f *netlink.ConntrackFlow) bool {
			return f.Forward.SrcIP.String() == e.src && f.Forward.DstIP.String() == e.dst && f.Forward.DstPort == e.dport
		})
		if has != kept {
			t.Errorf("%v: in the table %v, want %v", e, has, kept)
		}
	}
}
