package felix

import (
	"bytes"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/nstest"
)

// Interfaces of the two pods in labInput.
const (
	vethA = "mgyaaaaaaaaaaa"
	vethB = "mgybbbbbbbbbbb"
)

// labInput is a node with two pods, a natOutgoing pool and a plain one, and a
// second node.
func labInput() calc.Input {
	nat := api.NewIPPool("nat")
	nat.Spec.CIDR, nat.Spec.NATOutgoing = "10.244.0.0/16", true
	nat.SetDefaults()
	plain := api.NewIPPool("plain")
	plain.Spec.CIDR = "10.250.0.0/16"
	plain.SetDefaults()
	var nodes []*api.Node
	for _, na := range [][2]string{{"n1", "198.18.1.2/24"}, {"n2", "198.18.1.3/24"}} {
		n := api.NewNode(na[0])
		n.Spec.BGP = &api.NodeBGPSpec{IPv4Address: na[1]}
		nodes = append(nodes, n)
	}
	p := netip.MustParsePrefix
	return calc.Input{
		Node:   "n1",
		NodeIP: p("198.18.1.2/24"),
		Pools:  []*api.IPPool{nat, plain},
		Nodes:  nodes,
		Blocks: []netip.Prefix{p("10.244.0.0/26")},
		Endpoints: []calc.Endpoint{
			{Name: "a", Interface: vethA, IPs: []netip.Prefix{p("10.244.0.5/32")}},
			{Name: "b", Interface: vethB, IPs: []netip.Prefix{p("10.250.0.7/32")}},
		},
	}
}

// dualStack gives labInput an IPv6 pool with natOutgoing, IPv6 addresses
// for both nodes and pod a.
func dualStack(in *calc.Input) {
	v6 := api.NewIPPool("v6")
	v6.Spec.CIDR, v6.Spec.NATOutgoing = "fd00:244::/48", true
	v6.SetDefaults()
	in.Pools = append(in.Pools, v6)
	in.NodeIP6 = netip.MustParsePrefix("fd00:18:1::2/64")
	in.Nodes[0].Spec.BGP.IPv6Address = "fd00:18:1::2/64"
	in.Nodes[1].Spec.BGP.IPv6Address = "fd00:18:1::3/64"
	in.Endpoints[0].IPs = append(in.Endpoints[0].IPs, netip.MustParsePrefix("fd00:244::5/128"))
}

// logs records a reconciler's log lines, without timestamps, so a test can tell
// what it changed.
type logs struct{ buf bytes.Buffer }

func (l *logs) logger() *slog.Logger {
	return slog.New(slog.NewTextHandler(&l.buf, &slog.HandlerOptions{
		Level: slog.LevelDebug,
		ReplaceAttr: func(groups []string, a slog.Attr) slog.Attr {
			if a.Key == slog.TimeKey && len(groups) == 0 {
				return slog.Attr{}
			}
			return a
		},
	}))
}

// take returns the lines logged since the last take.
func (l *logs) take() []string {
	s := strings.TrimSpace(l.buf.String())
	l.buf.Reset()
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// kernelSets lists every ipset in the namespace as "type member member...",
// read straight from netlink.
func kernelSets(t *testing.T, ns *nstest.NS) map[string]string {
	t.Helper()
	got := map[string]string{}
	err := ns.Do(func() error {
		h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
		if err != nil {
			return err
		}
		defer h.Close()
		all, err := h.IpsetListAll()
		if err != nil {
			return err
		}
		for _, r := range all {
			var members []string
			for _, e := range r.Entries {
				cidr := e.CIDR
				if cidr == 0 && e.IP.To4() != nil {
					cidr = 32
				} else if cidr == 0 {
					cidr = 128
				}
				m := fmt.Sprintf("%s/%d", e.IP, cidr)
				if e.Port != nil {
					m = fmt.Sprintf("%s,%d:%d", e.IP, *e.Protocol, *e.Port)
				}
				members = append(members, m)
			}
			slices.Sort(members)
			typ := r.TypeName
			if r.Family == unix.AF_INET6 {
				typ += " inet6"
			}
			got[r.SetName] = strings.Join(append([]string{typ}, members...), " ")
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

// inNS runs netlink ipset calls inside the namespace, as someone other than
// margay would.
func inNS(t *testing.T, ns *nstest.NS, f func(h *netlink.Handle) error) {
	t.Helper()
	err := ns.Do(func() error {
		h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
		if err != nil {
			return err
		}
		defer h.Close()
		return f(h)
	})
	if err != nil {
		t.Fatal(err)
	}
}

func ipEntry(s string) *netlink.IPSetEntry {
	p := netip.MustParsePrefix(s)
	return &netlink.IPSetEntry{IP: net.IP(p.Addr().AsSlice()), CIDR: uint8(p.Bits())}
}

func applySets(t *testing.T, ns *nstest.NS, s *IPSets, sets []calc.IPSet) bool {
	t.Helper()
	var changed bool
	if err := ns.Do(func() (err error) { changed, err = s.Apply(sets); return err }); err != nil {
		t.Fatal(err)
	}
	return changed
}

// The ipset reconciler creates margay's sets with the right members, changes
// nothing on a second pass, repairs every kind of drift, follows an input
// change member by member, and never touches a set it does not own.
func TestIPSetsApply(t *testing.T) {
	ns := nstest.New(t, "node")
	var l logs
	s := NewIPSets(l.logger())
	in := labInput()
	dualStack(&in)
	inNS(t, ns, func(h *netlink.Handle) error {
		if err := h.IpsetCreate("other-set", "hash:ip", netlink.IpsetCreateOptions{}); err != nil {
			return err
		}
		return h.IpsetAdd("other-set", &netlink.IPSetEntry{IP: net.ParseIP("192.0.2.1")})
	})
	want := map[string]string{
		"other-set":      "hash:ip 192.0.2.1/32",
		"mgy-masq-pools": "hash:net 10.244.0.0/16",
		"mgy-all-pools":  "hash:net 10.244.0.0/16 10.250.0.0/16",
		"mgy-all-hosts":  "hash:ip 198.18.1.2/32 198.18.1.3/32",
		// Each family has its sets.
		"mgy-masq-pools-v6": "hash:net inet6 fd00:244::/48",
		"mgy-all-pools-v6":  "hash:net inet6 fd00:244::/48",
		"mgy-all-hosts-v6":  "hash:ip inet6 fd00:18:1::2/128 fd00:18:1::3/128",
	}
	check := func(what string) {
		t.Helper()
		if got := kernelSets(t, ns); !maps.Equal(got, want) {
			t.Errorf("%s: ipsets\n%v\nwant\n%v", what, got, want)
		}
	}
	sets := calc.Compute(in).IPSets
	if !applySets(t, ns, s, sets) {
		t.Error("first Apply reported no change")
	}
	check("first Apply")
	l.take()
	if applySets(t, ns, s, sets) {
		t.Errorf("second Apply changed something: %q", l.take())
	}

	drift := []struct {
		name string
		mess func(h *netlink.Handle) error
	}{
		{"set destroyed", func(h *netlink.Handle) error { return h.IpsetDestroy("mgy-all-hosts") }},
		{"set flushed", func(h *netlink.Handle) error { return h.IpsetFlush("mgy-all-pools") }},
		{"member removed", func(h *netlink.Handle) error { return h.IpsetDel("mgy-all-pools", ipEntry("10.250.0.0/16")) }},
		{"stray member", func(h *netlink.Handle) error { return h.IpsetAdd("mgy-masq-pools", ipEntry("10.99.0.0/16")) }},
		{"wrong type", func(h *netlink.Handle) error {
			if err := h.IpsetDestroy("mgy-all-hosts"); err != nil {
				return err
			}
			if err := h.IpsetCreate("mgy-all-hosts", "hash:net", netlink.IpsetCreateOptions{}); err != nil {
				return err
			}
			return h.IpsetAdd("mgy-all-hosts", ipEntry("198.18.0.0/16"))
		}},
		{"wrong family", func(h *netlink.Handle) error {
			if err := h.IpsetDestroy("mgy-all-hosts-v6"); err != nil {
				return err
			}
			return h.IpsetCreate("mgy-all-hosts-v6", "hash:ip", netlink.IpsetCreateOptions{})
		}},
		{"IPv6 member removed", func(h *netlink.Handle) error {
			return h.IpsetDel("mgy-all-hosts-v6", &netlink.IPSetEntry{IP: net.ParseIP("fd00:18:1::3")})
		}},
		{"stale margay set", func(h *netlink.Handle) error {
			return h.IpsetCreate("mgy-old", "hash:ip", netlink.IpsetCreateOptions{})
		}},
	}
	for _, d := range drift {
		inNS(t, ns, d.mess)
		// Apply trusts what it left, until Resync has it look again.
		if applySets(t, ns, s, sets) {
			t.Errorf("%s: Apply before Resync changed something: %q", d.name, l.take())
		}
		s.Resync()
		if !applySets(t, ns, s, sets) {
			t.Errorf("%s: Apply reported no change", d.name)
		}
		check(d.name)
		l.take()
		if applySets(t, ns, s, sets) {
			t.Errorf("%s: Apply after the repair changed something: %q", d.name, l.take())
		}
	}

	// One pool fewer: only that member goes.
	in.Pools = slices.Delete(in.Pools, 1, 2) // "plain"
	if !applySets(t, ns, s, calc.Compute(in).IPSets) {
		t.Error("removing a pool reported no change")
	}
	if got := l.take(); len(got) != 1 || !strings.Contains(got[0], `msg="ipset member removed" set=mgy-all-pools member=10.250.0.0/16`) {
		t.Errorf("removing a pool: logged %q, want only the one member removed", got)
	}
	want["mgy-all-pools"] = "hash:net 10.244.0.0/16"
	check("one pool fewer")

	if err := ns.Do(s.Cleanup); err != nil {
		t.Fatal(err)
	}
	want = map[string]string{"other-set": "hash:ip 192.0.2.1/32"}
	check("Cleanup")
}

// A set of the wrong type that a rule uses cannot be remade (nor swapped: the
// kernel swaps only sets of the same features): Apply says so, and repairs it
// once the rule is gone.
func TestIPSetsWrongTypeInUse(t *testing.T) {
	ns := nstest.New(t, "node")
	s := NewIPSets(slog.New(slog.DiscardHandler))
	inNS(t, ns, func(h *netlink.Handle) error {
		if err := h.IpsetCreate(calc.SetAllHosts, "hash:net", netlink.IpsetCreateOptions{}); err != nil {
			return err
		}
		return h.IpsetAdd(calc.SetAllHosts, ipEntry("198.18.0.0/16"))
	})
	ns.MustRun(t, "iptables", "-A", "INPUT", "-m", "set", "--match-set", calc.SetAllHosts, "src", "-j", "ACCEPT")
	sets := calc.Compute(labInput()).IPSets
	err := ns.Do(func() error { _, err := s.Apply(sets); return err })
	if err == nil || !strings.Contains(err.Error(), calc.SetAllHosts) || !strings.Contains(err.Error(), "rule still uses it") {
		t.Errorf("Apply with a wrong-type set in use: err = %v", err)
	}
	if got := kernelSets(t, ns)[calc.SetAllPools]; got != "hash:net 10.244.0.0/16 10.250.0.0/16" {
		t.Errorf("the other sets must still be applied: %s = %q", calc.SetAllPools, got)
	}
	// Cleanup cannot destroy it either, and says so.
	if err := ns.Do(s.Cleanup); err == nil || !strings.Contains(err.Error(), calc.SetAllHosts) {
		t.Errorf("Cleanup with a set in use: err = %v", err)
	}
	ns.MustRun(t, "iptables", "-F", "INPUT")
	if !applySets(t, ns, s, sets) {
		t.Error("Apply once the rule is gone reported no change")
	}
	if got := kernelSets(t, ns)[calc.SetAllHosts]; got != "hash:ip 198.18.1.2/32 198.18.1.3/32" {
		t.Errorf("%s = %q once the rule is gone", calc.SetAllHosts, got)
	}
	if err := ns.Do(s.Cleanup); err != nil {
		t.Fatal(err)
	}
	if got := kernelSets(t, ns); len(got) != 0 {
		t.Errorf("after Cleanup: %v", got)
	}
}

// A named port's set holds address,protocol:port members: created, repaired
// member by member, and changed in place.
func TestIPSetsNamedPorts(t *testing.T) {
	ns := nstest.New(t, "node")
	var l logs
	s := NewIPSets(l.logger())
	a := netip.MustParseAddr
	set := calc.IPSet{Name: "mgy-p-test", Type: "hash:ip,port", Ports: []calc.IPPort{
		{Addr: a("10.244.0.5"), Proto: 6, Port: 8080}, {Addr: a("10.244.0.5"), Proto: 17, Port: 8080}, {Addr: a("10.244.1.9"), Proto: 6, Port: 80}}}
	want := "hash:ip,port 10.244.0.5,17:8080 10.244.0.5,6:8080 10.244.1.9,6:80"
	if !applySets(t, ns, s, []calc.IPSet{set}) {
		t.Error("first Apply reported no change")
	}
	if got := kernelSets(t, ns)["mgy-p-test"]; got != want {
		t.Errorf("after Apply: %q, want %q", got, want)
	}
	l.take()
	if applySets(t, ns, s, []calc.IPSet{set}) {
		t.Errorf("second Apply changed something: %q", l.take())
	}
	// Drift: a member removed and a stray one added, with the same address.
	inNS(t, ns, func(h *netlink.Handle) error {
		tcp, p80, p81 := uint8(6), uint16(80), uint16(81)
		if err := h.IpsetDel("mgy-p-test", &netlink.IPSetEntry{IP: net.ParseIP("10.244.1.9"), Protocol: &tcp, Port: &p80}); err != nil {
			return err
		}
		return h.IpsetAdd("mgy-p-test", &netlink.IPSetEntry{IP: net.ParseIP("10.244.1.9"), Protocol: &tcp, Port: &p81})
	})
	s.Resync()
	if !applySets(t, ns, s, []calc.IPSet{set}) {
		t.Error("repair reported no change")
	}
	if got := l.take(); len(got) != 2 {
		t.Errorf("repair logged %q, want one member added and one removed", got)
	}
	if got := kernelSets(t, ns)["mgy-p-test"]; got != want {
		t.Errorf("after the repair: %q, want %q", got, want)
	}
	// An IPv6 set of the kind, beside the IPv4 one.
	set6 := calc.IPSet{Name: "mgy-p-test-v6", Type: "hash:ip,port", IPv6: true, Ports: []calc.IPPort{{Addr: a("fd00:244::5"), Proto: 6, Port: 8080}}}
	applySets(t, ns, s, []calc.IPSet{set, set6})
	if got := kernelSets(t, ns)["mgy-p-test-v6"]; got != "hash:ip,port inet6 fd00:244::5,6:8080" {
		t.Errorf("the IPv6 set: %q", got)
	}
	if applySets(t, ns, s, []calc.IPSet{set, set6}) {
		t.Errorf("second Apply of the IPv6 set changed something: %q", l.take())
	}
	bad := set
	bad.Members = []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	if err := ns.Do(func() error { _, err := s.Apply([]calc.IPSet{bad}); return err }); err == nil || !strings.Contains(err.Error(), "address,port members only") {
		t.Errorf("a hash:ip,port set with prefix members: %v", err)
	}
	mixed := set6
	mixed.Ports = append(mixed.Ports, set.Ports[0])
	if err := ns.Do(func() error { _, err := s.Apply([]calc.IPSet{mixed}); return err }); err == nil || !strings.Contains(err.Error(), "is not an IPv6 address") {
		t.Errorf("an IPv6 set with an IPv4 member: %v", err)
	}
	if err := ns.Do(s.Cleanup); err != nil {
		t.Fatal(err)
	}
}
