package felix

import (
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/nstest"
)

func newIPTables(t *testing.T, log *slog.Logger) *IPTables {
	t.Helper()
	return newIPTablesOf(t, log, false)
}

func newIPTablesOf(t *testing.T, log *slog.Logger, v6 bool) *IPTables {
	t.Helper()
	ipt, err := NewIPTables(log, v6)
	if err != nil {
		t.Fatal(err)
	}
	return ipt
}

// applyRules applies out as the agent's timer pass does: after Resync, so
// that Apply reads the kernel and repairs what the test changed.
func applyRules(t *testing.T, ns *nstest.NS, ipt *IPTables, out calc.Output) bool {
	t.Helper()
	ipt.Resync()
	var changed bool
	if err := ns.Do(func() (err error) { changed, err = ipt.Apply(out.Chains, out.Jumps); return err }); err != nil {
		t.Fatal(err)
	}
	return changed
}

// mgyChains lists the margay chains in iptables-save output as "table/chain".
func mgyChains(save string) []string {
	var chains []string
	table := ""
	for _, l := range strings.Split(save, "\n") {
		switch {
		case strings.HasPrefix(l, "*"):
			table = l[1:]
		case strings.HasPrefix(l, ":"+ChainPrefix):
			chains = append(chains, table+"/"+strings.Fields(l[1:])[0])
		}
	}
	slices.Sort(chains)
	return chains
}

// The iptables reconciler in a node namespace: it programs margay's chains as
// iptables-save prints them, puts each jump first in its base chain, changes
// nothing on a second pass, repairs drift, rewrites only the chains an input
// change touches, and leaves other rules alone, through Cleanup too.
func TestIPTablesApply(t *testing.T) {
	ns := nstest.New(t, "node")
	var l logs
	ipt := newIPTables(t, l.logger())
	sets := NewIPSets(slog.New(slog.DiscardHandler))
	in := labInput()
	in.RandomFully = ipt.RandomFully()
	// Someone else's rules, which margay must leave where they are.
	ns.MustRun(t, "iptables", "-A", "FORWARD", "-s", "192.0.2.1/32", "-j", "ACCEPT")
	ns.MustRun(t, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "uplink0", "-j", "RETURN")
	out := calc.Compute(in)
	applySets(t, ns, sets, out.IPSets) // the rules match on them

	masq := "-A MGY-POSTROUTING -m set --match-set mgy-masq-pools src -m set ! --match-set mgy-all-pools dst -j MASQUERADE"
	if in.RandomFully {
		masq += " --random-fully"
	}
	want := map[string]string{ // table/chain: `iptables -S` of it
		"filter/MGY-FROM-WL": `-N MGY-FROM-WL
-A MGY-FROM-WL -p ipencap -m comment --comment "margay: IPIP from a pod" -j DROP
-A MGY-FROM-WL -p udp -m udp --dport 4789 -m comment --comment "margay: VXLAN from a pod" -j DROP
-A MGY-FROM-WL -s 10.244.0.5/32 -i mgyaaaaaaaaaaa -j RETURN
-A MGY-FROM-WL -s 10.250.0.7/32 -i mgybbbbbbbbbbb -j RETURN
-A MGY-FROM-WL -m comment --comment "margay: spoofed or unknown pod" -j DROP`,
		"filter/MGY-TO-WL": `-N MGY-TO-WL
-A MGY-TO-WL -o mgyaaaaaaaaaaa -j RETURN
-A MGY-TO-WL -o mgybbbbbbbbbbb -j RETURN
-A MGY-TO-WL -m comment --comment "margay: unknown pod" -j DROP`,
		"filter/MGY-FORWARD": `-N MGY-FORWARD
-A MGY-FORWARD -i mgy+ -j MGY-FROM-WL
-A MGY-FORWARD -o mgy+ -j MGY-TO-WL
-A MGY-FORWARD -i mgy+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A MGY-FORWARD -o mgy+ -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A MGY-FORWARD -i mgy+ -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -m comment --comment "margay: TCP without a flow and no SYN" -j DROP
-A MGY-FORWARD -o mgy+ -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m conntrack --ctstate NEW -m comment --comment "margay: TCP without a flow and no SYN" -j DROP
-A MGY-FORWARD -i mgy+ -j MARK --set-xmark 0x0/0x30000
-A MGY-FORWARD -i mgy+ -j MGY-FROM-EP
-A MGY-FORWARD -i mgy+ -m mark --mark 0x0/0x10000 -m comment --comment "margay: egress policy did not accept" -j DROP
-A MGY-FORWARD -o mgy+ -j MARK --set-xmark 0x0/0x30000
-A MGY-FORWARD -o mgy+ -j MGY-TO-EP
-A MGY-FORWARD -o mgy+ -m mark --mark 0x0/0x10000 -m comment --comment "margay: ingress policy did not accept" -j DROP
-A MGY-FORWARD -i mgy+ -j ACCEPT
-A MGY-FORWARD -o mgy+ -j ACCEPT`,
		"filter/MGY-FROM-EP": `-N MGY-FROM-EP
-A MGY-FROM-EP -i mgyaaaaaaaaaaa -g MGY-FW-mgyaaaaaaaaaaa
-A MGY-FROM-EP -i mgybbbbbbbbbbb -g MGY-FW-mgybbbbbbbbbbb`,
		"filter/MGY-TO-EP": `-N MGY-TO-EP
-A MGY-TO-EP -o mgyaaaaaaaaaaa -g MGY-TW-mgyaaaaaaaaaaa
-A MGY-TO-EP -o mgybbbbbbbbbbb -g MGY-TW-mgybbbbbbbbbbb`,
		"filter/MGY-INPUT": `-N MGY-INPUT
-A MGY-INPUT -i mgy+ -j MGY-FROM-WL
-A MGY-INPUT -p ipencap -m set --match-set mgy-all-hosts src -j ACCEPT
-A MGY-INPUT -p ipencap -m comment --comment "margay: IPIP from an unknown host" -j DROP
-A MGY-INPUT -p udp -m udp --dport 4789 -m set --match-set mgy-all-hosts src -j ACCEPT
-A MGY-INPUT -p udp -m udp --dport 4789 -m comment --comment "margay: VXLAN from an unknown host" -j DROP`,
		"nat/MGY-POSTROUTING": "-N MGY-POSTROUTING\n" + masq,
		// No policy selects the pods: their chains accept.
		"filter/MGY-FW-mgyaaaaaaaaaaa": noPolicy("MGY-FW-mgyaaaaaaaaaaa"),
		"filter/MGY-FW-mgybbbbbbbbbbb": noPolicy("MGY-FW-mgybbbbbbbbbbb"),
		"filter/MGY-TW-mgyaaaaaaaaaaa": noPolicy("MGY-TW-mgyaaaaaaaaaaa"),
		"filter/MGY-TW-mgybbbbbbbbbbb": noPolicy("MGY-TW-mgybbbbbbbbbbb"),
		"filter/FORWARD": `-P FORWARD ACCEPT
-A FORWARD -j MGY-FORWARD
-A FORWARD -s 192.0.2.1/32 -j ACCEPT`,
		"filter/INPUT": `-P INPUT ACCEPT
-A INPUT -j MGY-INPUT`,
		"nat/POSTROUTING": `-P POSTROUTING ACCEPT
-A POSTROUTING -j MGY-POSTROUTING
-A POSTROUTING -o uplink0 -j RETURN`,
	}
	check := func(what string) {
		t.Helper()
		for key, w := range want {
			table, chain, _ := strings.Cut(key, "/")
			if got, _ := ns.Run("iptables", "-t", table, "-S", chain); got != w {
				t.Errorf("%s: %s is\n%s\nwant\n%s", what, key, got, w)
			}
		}
		var chains []string
		for key := range want {
			if strings.Contains(key, "/"+ChainPrefix) {
				chains = append(chains, key)
			}
		}
		slices.Sort(chains)
		if got := mgyChains(ns.MustRun(t, "iptables-save")); !slices.Equal(got, chains) {
			t.Errorf("%s: margay chains %q, want %q", what, got, chains)
		}
	}
	if !applyRules(t, ns, ipt, out) {
		t.Error("first Apply reported no change")
	}
	check("first Apply")
	for _, line := range l.take() {
		if strings.Contains(line, "level=WARN") {
			t.Errorf("first Apply: %s", line)
		}
	}
	if applyRules(t, ns, ipt, out) {
		t.Errorf("second Apply changed something: %q", l.take())
	}

	for _, d := range []struct {
		name string
		mess [][]string // iptables arguments
	}{
		{"chain flushed", [][]string{{"-F", calc.ChainFromWL}}},
		{"rule deleted", [][]string{{"-D", calc.ChainToWL, "1"}}},
		{"rule added", [][]string{{"-A", calc.ChainForward, "-j", "ACCEPT"}}},
		{"bypass inserted", [][]string{{"-I", calc.ChainFromWL, "1", "-j", "RETURN"}}},
		{"jump deleted", [][]string{{"-D", "FORWARD", "-j", calc.ChainForward}}},
		{"jump not first", [][]string{
			{"-t", "nat", "-D", "POSTROUTING", "-j", calc.ChainPostrouting},
			{"-t", "nat", "-A", "POSTROUTING", "-j", calc.ChainPostrouting},
		}},
		{"jump duplicated", [][]string{
			{"-A", "FORWARD", "-j", calc.ChainForward},
			{"-I", "FORWARD", "2", "-j", calc.ChainForward},
			{"-I", "INPUT", "1", "-j", calc.ChainInput},
		}},
		{"chain and jump deleted", [][]string{
			{"-t", "nat", "-D", "POSTROUTING", "-j", calc.ChainPostrouting},
			{"-t", "nat", "-F", calc.ChainPostrouting},
			{"-t", "nat", "-X", calc.ChainPostrouting},
		}},
		{"stale margay chains", [][]string{
			{"-N", "MGY-OLD"},
			{"-A", "MGY-OLD", "-j", "ACCEPT"},
			{"-I", "FORWARD", "2", "-j", "MGY-OLD"},
			{"-A", calc.ChainForward, "-j", "MGY-OLD"},
			{"-t", "nat", "-N", "MGY-OLD-NAT"},
		}},
	} {
		for _, args := range d.mess {
			ns.MustRun(t, append([]string{"iptables"}, args...)...)
		}
		if !applyRules(t, ns, ipt, out) {
			t.Errorf("%s: Apply reported no change", d.name)
		}
		check(d.name)
		l.take()
		if applyRules(t, ns, ipt, out) {
			t.Errorf("%s: Apply after the repair changed something: %q", d.name, l.take())
		}
	}

	// Pod b goes: only the per-pod chains that list it are rewritten, and its
	// own chains removed.
	in.Endpoints = in.Endpoints[:1]
	if !applyRules(t, ns, ipt, calc.Compute(in)) {
		t.Error("removing an endpoint reported no change")
	}
	got := strings.Join(l.take(), "\n")
	for _, c := range []string{calc.ChainFromEP, calc.ChainToEP, calc.ChainFromWL, calc.ChainToWL} {
		if !strings.Contains(got, "rewriting\" family=iptables table=filter chain="+c+" ") {
			t.Errorf("removing an endpoint: %s was not rewritten: logged\n%s", c, got)
		}
	}
	if n := strings.Count(got, "rewriting"); n != 4 {
		t.Errorf("removing an endpoint: %d chains rewritten, want 4: logged\n%s", n, got)
	}
	for _, c := range []string{"MGY-FW-" + vethB, "MGY-TW-" + vethB} {
		if !strings.Contains(got, "chain removed\" family=iptables chain="+c) {
			t.Errorf("removing an endpoint: %s not removed: logged\n%s", c, got)
		}
		delete(want, "filter/"+c)
	}
	for _, key := range []string{"filter/" + calc.ChainFromWL, "filter/" + calc.ChainToWL, "filter/" + calc.ChainFromEP, "filter/" + calc.ChainToEP} {
		var keep []string
		for _, line := range strings.Split(want[key], "\n") {
			if !strings.Contains(line, vethB) {
				keep = append(keep, line)
			}
		}
		want[key] = strings.Join(keep, "\n")
	}
	check("endpoint removed")

	if err := ns.Do(ipt.Cleanup); err != nil {
		t.Fatal(err)
	}
	if err := ns.Do(sets.Cleanup); err != nil {
		t.Fatal(err)
	}
	save := ns.MustRun(t, "iptables-save")
	if strings.Contains(save, ChainPrefix) {
		t.Errorf("after Cleanup:\n%s", save)
	}
	for _, rule := range []string{"-A FORWARD -s 192.0.2.1/32 -j ACCEPT", "-A POSTROUTING -o uplink0 -j RETURN"} {
		if !strings.Contains(save, rule) {
			t.Errorf("Cleanup removed someone else's rule %q:\n%s", rule, save)
		}
	}
	if got := kernelSets(t, ns); len(got) != 0 {
		t.Errorf("ipsets after Cleanup: %v", got)
	}
}

// noPolicy is the chain of an endpoint no policy selects.
func noPolicy(chain string) string {
	return "-N " + chain + `
-A ` + chain + ` -j MARK --set-xmark 0x0/0x30000
-A ` + chain + ` -j MARK --set-xmark 0x10000/0x10000
-A ` + chain + ` -j RETURN`
}

// dropCount is the packet counter of the anti-spoofing DROP rule in
// MGY-FROM-WL, of iptables or ip6tables.
func dropCount(t *testing.T, ns *nstest.NS, cmd string) int {
	t.Helper()
	for _, l := range strings.Split(ns.MustRun(t, cmd, "-L", calc.ChainFromWL, "-v", "-x", "-n"), "\n") {
		if f := strings.Fields(l); len(f) > 2 && f[2] == "DROP" && strings.Contains(l, "spoofed") {
			n, err := strconv.Atoi(f[0])
			if err != nil {
				t.Fatalf("DROP counter in %q: %v", l, err)
			}
			return n
		}
	}
	t.Fatalf("no DROP rule in %s", calc.ChainFromWL)
	return 0
}

// The rules work in the kernel, in both families: a pod reaches its node
// from its own address, and packets it sends from an address that is not
// its own are dropped by the anti-spoofing rule, where without margay's
// rules they got through. An IPv6 pod still finds its gateway, the host
// end's link-local address, by neighbour discovery from its own link-local
// address.
func TestAntiSpoofing(t *testing.T) {
	for _, fam := range []struct {
		name, cmd       string
		v6              bool
		own, spoof      string
		node            string // the node's address the pod pings
		hostSide, inPod [][]string
	}{{
		name: "IPv4", cmd: "iptables", own: "10.244.0.5", spoof: "10.244.0.99", node: "198.18.1.2",
		hostSide: [][]string{
			{"sh", "-c", "echo 1 > /proc/sys/net/ipv4/conf/" + vethA + "/proxy_arp; echo 0 > /proc/sys/net/ipv4/neigh/" + vethA + "/proxy_delay"},
		},
		inPod: [][]string{
			{"ip", "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"},
			{"ip", "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"},
		},
	}, {
		name: "IPv6", cmd: "ip6tables", v6: true, own: "fd00:244::5", spoof: "fd00:244::99", node: "fd00:18:1::2",
		hostSide: [][]string{
			{"ip", "link", "set", vethA, "address", "ee:ee:ee:ee:ee:ee"},
			{"sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/" + vethA + "/accept_dad"},
			{"ip", "addr", "add", "fd00:18:1::2/64", "dev", "uplink0", "nodad"},
		},
		inPod: [][]string{
			{"sh", "-c", "echo 0 > /proc/sys/net/ipv6/conf/eth0/accept_dad; echo 0 > /proc/sys/net/ipv6/neigh/eth0/delay_first_probe_time"},
			{"ip", "route", "add", "default", "via", "fe80::ecee:eeff:feee:eeee", "dev", "eth0"},
		},
	}} {
		t.Run(fam.name, func(t *testing.T) {
			node := nstest.New(t, "node")
			if err := node.MakeHost("198.18.1.2/24"); err != nil {
				t.Fatal(err)
			}
			pod := nstest.New(t, "pod")
			bits := "/32"
			if fam.v6 {
				bits = "/128"
			}
			node.MustRun(t, "ip", "link", "add", vethA, "type", "veth", "peer", "name", "eth0", "netns", pod.Name)
			for _, c := range fam.hostSide {
				node.MustRun(t, c...)
			}
			node.MustRun(t, "ip", "link", "set", vethA, "up")
			// So that replies to the spoofed address would find their way back
			// too: only the rules stand between the spoofer and the node.
			for _, a := range []string{fam.own, fam.spoof} {
				node.MustRun(t, "ip", "route", "add", a+bits, "dev", vethA, "scope", "link")
				add := []string{"ip", "addr", "add", a + bits, "dev", "eth0"}
				if fam.v6 {
					add = append(add, "nodad")
				}
				pod.MustRun(t, add...)
			}
			pod.MustRun(t, "ip", "link", "set", "eth0", "up")
			for _, c := range fam.inPod {
				pod.MustRun(t, c...)
			}
			ping := func(src string) error {
				out, err := pod.Run("ping", "-n", "-c", "1", "-W", "2", "-I", src, fam.node)
				if err != nil {
					t.Logf("ping from %s: %v: %s", src, err, out)
				}
				return err
			}
			if ping(fam.own) != nil || ping(fam.spoof) != nil {
				t.Fatal("without margay's rules both sources must reach the node")
			}

			ipt := newIPTablesOf(t, slog.New(slog.DiscardHandler), fam.v6)
			in := labInput()
			in.RandomFully = ipt.RandomFully()
			in.Endpoints = []calc.Endpoint{{Name: "pod", Interface: vethA, IPs: []netip.Prefix{netip.MustParsePrefix(fam.own + bits)}}}
			out := calc.Compute(in)
			if fam.v6 {
				out.Chains = out.Chains6
			}
			applySets(t, node, NewIPSets(slog.New(slog.DiscardHandler)), out.IPSets)
			applyRules(t, node, ipt, out)
			// The neighbours are found again under the rules.
			pod.MustRun(t, "ip", "neigh", "flush", "dev", "eth0")
			node.MustRun(t, "ip", "neigh", "flush", "dev", vethA)

			if err := ping(fam.own); err != nil {
				t.Errorf("the pod cannot reach its node from its own address")
			}
			if fam.v6 {
				// A stale neighbour is probed with a solicitation from the
				// pod's link-local address, which must be answered.
				pod.MustRun(t, "ip", "neigh", "change", "fe80::ecee:eeff:feee:eeee", "dev", "eth0", "nud", "stale")
				if err := ping(fam.own); err != nil {
					t.Errorf("ping after the gateway went stale: %v", err)
				}
				if err := waitFor(5*time.Second, func() error {
					if got := pod.MustRun(t, "ip", "neigh", "show", "dev", "eth0", "fe80::ecee:eeff:feee:eeee"); !strings.Contains(got, "REACHABLE") {
						return fmt.Errorf("the gateway's neighbour entry: %s", got)
					}
					return nil
				}); err != nil {
					t.Error(err)
				}
			}
			before := dropCount(t, node, fam.cmd)
			if ping(fam.spoof) == nil {
				t.Errorf("a spoofed source reached the node")
			}
			if after := dropCount(t, node, fam.cmd); after <= before {
				t.Errorf("DROP counter went from %d to %d: the spoofed packet was not dropped by margay's rule", before, after)
			}
		})
	}
}

// A rule written otherwise than iptables lists it can never compare equal: Apply
// warns, naming it, instead of silently rewriting the chain on every pass.
func TestIPTablesNonCanonicalRule(t *testing.T) {
	ns := nstest.New(t, "node")
	var l logs
	ipt := newIPTables(t, l.logger())
	out := calc.Output{Chains: []calc.Chain{{Table: "filter", Name: "MGY-TEST", Rules: [][]string{
		{"-i", "mgyx", "-s", "10.244.0.5", "-j", "RETURN"}, // iptables lists -s first, with /32
	}}}}
	applyRules(t, ns, ipt, out)
	if !applyRules(t, ns, ipt, out) {
		t.Error("a non-canonical rule compared equal")
	}
	got := strings.Join(l.take(), "\n")
	if !strings.Contains(got, "level=WARN") || !strings.Contains(got, `listed="-s 10.244.0.5/32 -i mgyx -j RETURN"`) {
		t.Errorf("no warning naming the rule; logged:\n%s", got)
	}
	if err := ns.Do(ipt.Cleanup); err != nil {
		t.Fatal(err)
	}
}

// Comments come back quoted and escaped by iptables-save; they still compare
// equal to the rule as written.
func TestIPTablesQuotedComment(t *testing.T) {
	ns := nstest.New(t, "node")
	ipt := newIPTables(t, slog.New(slog.DiscardHandler))
	comment := `margay: say "hi" \ to 'pods'`
	out := calc.Output{Chains: []calc.Chain{{Table: "filter", Name: "MGY-TEST", Rules: [][]string{
		{"-m", "comment", "--comment", comment, "-j", "RETURN"},
		{"-m", "comment", "--comment", "plain", "-j", "RETURN"},
	}}}}
	applyRules(t, ns, ipt, out)
	if got := ns.MustRun(t, "iptables", "-S", "MGY-TEST"); !strings.Contains(got, `--comment "margay: say \"hi\" \\ to \'pods\'"`) {
		t.Errorf("iptables lists:\n%s", got)
	}
	if applyRules(t, ns, ipt, out) {
		t.Error("the quoted comment did not compare equal")
	}
}

// Rewriting or removing a chain zeroes its counters: Apply reports what they
// held first, and Counts lists them as iptables-save -c does.
func TestIPTablesCounters(t *testing.T) {
	ns := nstest.New(t, "node")
	ipt := newIPTables(t, slog.New(slog.DiscardHandler))
	var reset []RuleCount
	ipt.OnReset = func(rc RuleCount) { reset = append(reset, rc) }
	// A chain with counters, as a kernel that has seen traffic holds it.
	restore := "*filter\n:MGY-A - [0:0]\n:MGY-B - [0:0]\n" +
		"[5:500] -A MGY-A -s 10.0.0.1/32 -j ACCEPT\n[0:0] -A MGY-A -j DROP\n[7:700] -A MGY-B -j ACCEPT\nCOMMIT\n"
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "iptables-restore", "-c", "--noflush")
	cmd.Stdin = strings.NewReader(restore)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	var counts []RuleCount
	if err := ns.Do(func() (err error) { counts, err = ipt.Counts("filter"); return err }); err != nil {
		t.Fatal(err)
	}
	want := []RuleCount{
		{Table: "filter", Chain: "MGY-A", Rule: []string{"-s", "10.0.0.1/32", "-j", "ACCEPT"}, Packets: 5, Bytes: 500},
		{Table: "filter", Chain: "MGY-A", Rule: []string{"-j", "DROP"}},
		{Table: "filter", Chain: "MGY-B", Rule: []string{"-j", "ACCEPT"}, Packets: 7, Bytes: 700},
	}
	if !slices.EqualFunc(counts, want, equalCount) {
		t.Errorf("Counts = %v, want %v", counts, want)
	}
	// MGY-A rewritten, MGY-B removed: both report their non-zero counts.
	chains := []calc.Chain{{Table: "filter", Name: "MGY-A", Rules: [][]string{{"-j", "DROP"}}}}
	if err := ns.Do(func() error { _, err := ipt.Apply(chains, nil); return err }); err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(reset, []RuleCount{want[0], want[2]}, equalCount) {
		t.Errorf("reported on reset %v, want %v", reset, []RuleCount{want[0], want[2]})
	}
}

func equalCount(a, b RuleCount) bool {
	return a.Table == b.Table && a.Chain == b.Chain && slices.Equal(a.Rule, b.Rule) && a.Packets == b.Packets && a.Bytes == b.Bytes
}

// Between Resyncs, Apply trusts what it left: a table whose desired chains
// are unchanged is not read again, so drift waits for the timer pass.
func TestIPTablesTrustsItsLastApply(t *testing.T) {
	ns := nstest.New(t, "node")
	ipt := newIPTables(t, slog.New(slog.DiscardHandler))
	out := calc.Output{Chains: []calc.Chain{{Table: "filter", Name: "MGY-TEST", Rules: [][]string{{"-j", "RETURN"}}}}}
	apply := func() bool {
		var changed bool
		if err := ns.Do(func() (err error) { changed, err = ipt.Apply(out.Chains, out.Jumps); return err }); err != nil {
			t.Fatal(err)
		}
		return changed
	}
	apply()
	ns.MustRun(t, "iptables", "-F", "MGY-TEST")
	if apply() {
		t.Error("Apply with the same input read the table again")
	}
	ipt.Resync()
	if !apply() {
		t.Error("Apply after Resync did not repair the flushed chain")
	}
	if got := ns.MustRun(t, "iptables", "-S", "MGY-TEST"); !strings.Contains(got, "-A MGY-TEST -j RETURN") {
		t.Errorf("after the repair: %s", got)
	}
}

// waitFor polls cond until it holds or timeout passes, returning its last error.
func waitFor(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil || time.Now().After(deadline) {
			return err
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ip6tables holds IPv6's chains as iptables holds IPv4's: a dual-stack
// node's chains are written as ip6tables-save lists them (a second Apply
// changes nothing and warns of nothing), hold only IPv6 addresses, and
// Cleanup removes them.
func TestIP6TablesApply(t *testing.T) {
	ns := nstest.New(t, "node")
	var l logs
	ipt4, ipt6 := newIPTables(t, slog.New(slog.DiscardHandler)), newIPTablesOf(t, l.logger(), true)
	sets := NewIPSets(slog.New(slog.DiscardHandler))
	in := labInput()
	in.RandomFully = ipt6.RandomFully()
	dualStack(&in)
	out := calc.Compute(in)
	applySets(t, ns, sets, out.IPSets)
	apply := func() bool {
		t.Helper()
		ipt4.Resync()
		ipt6.Resync()
		var c4, c6 bool
		if err := ns.Do(func() (err error) {
			if c4, err = ipt4.Apply(out.Chains, out.Jumps); err != nil {
				return err
			}
			c6, err = ipt6.Apply(out.Chains6, out.Jumps)
			return err
		}); err != nil {
			t.Fatal(err)
		}
		return c4 || c6
	}
	if !apply() {
		t.Error("first Apply reported no change")
	}
	for _, line := range l.take() {
		if strings.Contains(line, "level=WARN") {
			t.Errorf("first Apply: %s", line)
		}
	}
	if apply() {
		t.Errorf("second Apply changed something: %q", l.take())
	}
	masq := "-A MGY-POSTROUTING -m set --match-set mgy-masq-pools-v6 src -m set ! --match-set mgy-all-pools-v6 dst -j MASQUERADE"
	if in.RandomFully {
		masq += " --random-fully"
	}
	for key, want := range map[string]string{
		"filter/MGY-FROM-WL": `-N MGY-FROM-WL
-A MGY-FROM-WL -p ipencap -m comment --comment "margay: IPIP from a pod" -j DROP
-A MGY-FROM-WL -p udp -m udp --dport 4789 -m comment --comment "margay: VXLAN from a pod" -j DROP
-A MGY-FROM-WL -s fd00:244::5/128 -i mgyaaaaaaaaaaa -j RETURN
-A MGY-FROM-WL -m comment --comment "margay: spoofed or unknown pod" -j DROP`,
		"filter/MGY-INPUT": `-N MGY-INPUT
-A MGY-INPUT -i mgy+ -p ipv6-icmp -m icmp6 --icmpv6-type 135 -m comment --comment "margay: IPv6 neighbour discovery from a pod" -j ACCEPT
-A MGY-INPUT -i mgy+ -p ipv6-icmp -m icmp6 --icmpv6-type 136 -m comment --comment "margay: IPv6 neighbour discovery from a pod" -j ACCEPT
-A MGY-INPUT -i mgy+ -j MGY-FROM-WL
-A MGY-INPUT -p udp -m udp --dport 4789 -m set --match-set mgy-all-hosts-v6 src -j ACCEPT
-A MGY-INPUT -p udp -m udp --dport 4789 -m comment --comment "margay: VXLAN from an unknown host" -j DROP`,
		"nat/MGY-POSTROUTING": "-N MGY-POSTROUTING\n" + masq,
		"filter/FORWARD":      "-P FORWARD ACCEPT\n-A FORWARD -j MGY-FORWARD",
	} {
		table, chain, _ := strings.Cut(key, "/")
		if got, _ := ns.Run("ip6tables", "-t", table, "-S", chain); got != want {
			t.Errorf("ip6tables %s is\n%s\nwant\n%s", key, got, want)
		}
	}
	if got := kernelSets(t, ns); got["mgy-all-hosts-v6"] == "" || !strings.Contains(got["mgy-all-hosts-v6"], "fd00:18:1::3") {
		t.Errorf("ipsets: %v", got)
	}
	if save := ns.MustRun(t, "iptables-save"); strings.Contains(save, "fd00:") {
		t.Errorf("IPv6 addresses in iptables:\n%s", save)
	}
	if err := ns.Do(func() error { return errors.Join(ipt4.Cleanup(), ipt6.Cleanup(), sets.Cleanup()) }); err != nil {
		t.Fatal(err)
	}
	if save := ns.MustRun(t, "ip6tables-save"); strings.Contains(save, ChainPrefix) {
		t.Errorf("after Cleanup:\n%s", save)
	}
}
