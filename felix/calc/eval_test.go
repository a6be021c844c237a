package calc

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/margay-dev/margay/api"
)

// TestEvaluate runs packets through the chains Compute writes and checks
// the verdicts against truth tables written from the policies' meaning.
func TestEvaluate(t *testing.T) {
	// n1 holds a/web and a/db; b/web is on n2. Namespace a is team=blue.
	blue := map[string]string{api.NamespaceLabelPrefix + "team": "blue"}
	eps := []*api.WorkloadEndpoint{
		wep("n1", "a", "web", "10.244.1.1/32", merge(blue, map[string]string{"app": "web"}), "http/TCP/8080"),
		wep("n1", "a", "db", "10.244.1.2/32", merge(blue, map[string]string{"app": "db"})),
		wep("n2", "b", "web", "10.244.2.1/32", map[string]string{"app": "web"}, "http/TCP/80"),
	}
	var local []Endpoint
	for _, w := range eps[:2] {
		local = append(local, Endpoint{Name: w.Metadata.Name, Interface: w.Spec.InterfaceName, IPs: []netip.Prefix{netip.MustParsePrefix(w.Spec.IPNetworks[0])}})
	}
	aweb, adb, bweb, inet := netip.MustParseAddr("10.244.1.1"), netip.MustParseAddr("10.244.1.2"), netip.MustParseAddr("10.244.2.1"), netip.MustParseAddr("203.0.113.10")
	// pkt is a packet between two of the addresses above, on the interfaces
	// FORWARD sees it on.
	iface := map[netip.Addr]string{aweb: "mgyweb", adb: "mgydb"}
	pkt := func(src, dst netip.Addr, proto uint8, dport uint16) Packet {
		return Packet{In: iface[src], Out: iface[dst], Src: src, Dst: dst, Proto: proto, SPort: 40000, DPort: dport}
	}
	const tcp, udp, icmp = 6, 17, 1
	type check struct {
		p    Packet
		want bool
	}
	cases := []struct {
		name   string
		policy string
		checks []check
	}{{
		name: "no policy lets everything through, but not a spoofed source",
		checks: []check{
			{pkt(aweb, adb, tcp, 80), true}, {pkt(bweb, aweb, udp, 53), true}, {pkt(aweb, inet, icmp, 0), true},
			{Packet{In: "mgyweb", Src: adb, Dst: inet, Proto: icmp}, false},
			{Packet{In: "mgyother", Src: inet, Dst: aweb, Proto: tcp, DPort: 80}, false},
		},
	}, {
		name: "ingress allow from a selector on a port range",
		policy: `kind: NetworkPolicy
metadata: {name: db, namespace: a}
spec:
  selector: app == 'db'
  ingress: [{action: Allow, protocol: TCP, source: {selector: app == 'web'}, destination: {ports: ["5000:5432"]}}]`,
		checks: []check{
			{pkt(aweb, adb, tcp, 5432), true}, {pkt(aweb, adb, tcp, 5000), true}, {pkt(aweb, adb, tcp, 5433), false},
			{pkt(aweb, adb, udp, 5432), false},
			{pkt(bweb, adb, tcp, 5432), false}, // b/web is in another namespace
			{pkt(adb, aweb, tcp, 80), true},    // a/web has no policy
			{pkt(adb, bweb, tcp, 80), true},    // Ingress only
		},
	}, {
		name: "Deny before Allow by order, named port, notNets",
		policy: `kind: GlobalNetworkPolicy
metadata: {name: deny}
spec:
  order: 1
  selector: app == 'web'
  ingress: [{action: Deny, source: {nets: [10.244.1.0/24], notNets: [10.244.1.2/32]}}]
---
kind: GlobalNetworkPolicy
metadata: {name: allow}
spec:
  order: 2
  selector: app == 'web'
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [http]}}]`,
		checks: []check{
			{pkt(adb, aweb, tcp, 8080), true}, // a/web's http
			{pkt(adb, aweb, tcp, 80), false},  // b/web's http, not a/web's
			{pkt(bweb, aweb, tcp, 8080), true},
			{pkt(inet, aweb, tcp, 8080), true},
			{Packet{In: "mgyweb2", Out: "mgyweb", Src: netip.MustParseAddr("10.244.1.3"), Dst: aweb, Proto: tcp, DPort: 8080}, false}, // an unknown pod
		},
	}, {
		name: "egress to a CIDR with an exception, and Pass to the next tier",
		policy: `kind: Tier
metadata: {name: security}
spec: {order: 10}
---
kind: GlobalNetworkPolicy
metadata: {name: pass}
spec:
  tier: security
  namespaceSelector: team == 'blue'
  egress: [{action: Pass, protocol: UDP}, {action: Deny}]
---
kind: NetworkPolicy
metadata: {name: out, namespace: a}
spec:
  egress: [{action: Allow, destination: {nets: [203.0.113.0/24], notNets: [203.0.113.10/32]}}]`,
		checks: []check{
			{pkt(aweb, netip.MustParseAddr("203.0.113.11"), udp, 53), true},
			{pkt(aweb, inet, udp, 53), false},                                 // the exception
			{pkt(aweb, netip.MustParseAddr("203.0.113.11"), tcp, 443), false}, // the security tier denies
			{pkt(adb, bweb, udp, 53), false},                                  // not in the CIDR
			{pkt(bweb, aweb, tcp, 80), true},                                  // Egress only
		},
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var pol Policy
			if c.policy != "" {
				var docs []string
				for _, d := range strings.Split(c.policy, "\n---\n") {
					docs = append(docs, "apiVersion: margay.dev/v1\n"+d)
				}
				pol = decodePolicies(t, strings.Join(docs, "\n---\n"))
			}
			pol.Endpoints = eps
			out := Compute(Input{Node: "n1", Endpoints: local, Policy: pol})
			ev := NewEvaluator(out.Chains, out.IPSets)
			for _, ch := range c.checks {
				got, err := ev.Forward(ch.p)
				if err != nil {
					t.Fatalf("%s: %v", ch.p, err)
				}
				if got != ch.want {
					t.Errorf("%s: accepted %v, want %v", ch.p, got, ch.want)
				}
			}
		})
	}
}

func merge(ms ...map[string]string) map[string]string {
	out := map[string]string{}
	for _, m := range ms {
		for k, v := range m {
			out[k] = v
		}
	}
	return out
}

// A rule Evaluator does not know is an error when a packet reaches it, not
// a guess; one the packet never reaches is no error.
func TestEvaluateUnknown(t *testing.T) {
	chains := []Chain{{Table: "filter", Name: ChainForward, Rules: [][]string{
		{"-i", "mgya", "-j", "ACCEPT"},
		{"-m", "owner", "--uid-owner", "0", "-j", "ACCEPT"},
	}}}
	ev := NewEvaluator(chains, nil)
	if ok, err := ev.Forward(Packet{In: "mgya"}); err != nil || !ok {
		t.Errorf("first rule: %v, %v", ok, err)
	}
	if _, err := ev.Forward(Packet{In: "mgyb"}); err == nil || !strings.Contains(err.Error(), `unknown match "owner"`) {
		t.Errorf("second rule: err %v, want unknown match", err)
	}
}

// A flow's first packet is a SYN: the mid-stream drop in MGY-FORWARD never
// takes it, and --tcp-flags matches it as the kernel would.
func TestEvaluateTCPFlags(t *testing.T) {
	for _, tc := range []struct {
		rule  []string
		proto uint8
		want  bool // accepted
	}{
		{concat([]string{"-i", "mgy+"}, midStream, []string{"-j", "DROP"}), 6, true},
		{concat([]string{"-i", "mgy+"}, midStream, []string{"-j", "DROP"}), 17, true},
		{[]string{"-p", "tcp", "-m", "tcp", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN", "-j", "DROP"}, 6, false},
		{[]string{"-p", "tcp", "-m", "tcp", "--tcp-flags", "ALL", "SYN", "-j", "DROP"}, 6, false},
		{[]string{"-p", "tcp", "-m", "tcp", "--tcp-flags", "FIN,RST", "NONE", "-j", "DROP"}, 6, false},
		{[]string{"-p", "tcp", "-m", "tcp", "--tcp-flags", "SYN,ACK", "SYN,ACK", "-j", "DROP"}, 6, true},
	} {
		ev := NewEvaluator([]Chain{{Table: "filter", Name: ChainForward, Rules: [][]string{tc.rule, {"-j", "ACCEPT"}}}}, nil)
		got, err := ev.Forward(Packet{In: "mgya", Proto: tc.proto, Src: netip.MustParseAddr("10.0.0.1"), Dst: netip.MustParseAddr("10.0.0.2"), DPort: 80})
		if err != nil || got != tc.want {
			t.Errorf("%q, proto %d: accepted %v, %v; want %v", tc.rule, tc.proto, got, err, tc.want)
		}
	}
}

// IPv6 traffic meets the same policy through ip6tables' chains: selectors
// match the endpoints' IPv6 addresses, nets and ICMP rules apply to the
// family they are of, and anti-spoofing holds for IPv6 sources.
func TestEvaluateIPv6(t *testing.T) {
	dual := func(w *api.WorkloadEndpoint, ip6 string) *api.WorkloadEndpoint {
		w.Spec.IPNetworks = append(w.Spec.IPNetworks, ip6)
		return w
	}
	eps := []*api.WorkloadEndpoint{
		dual(wep("n1", "a", "web", "10.244.1.1/32", map[string]string{"app": "web"}), "fd00:244::1/128"),
		dual(wep("n1", "a", "db", "10.244.1.2/32", map[string]string{"app": "db"}), "fd00:244::2/128"),
		dual(wep("n2", "a", "api", "10.244.2.1/32", map[string]string{"app": "api"}), "fd00:244:0:1::1/128"),
	}
	var local []Endpoint
	for _, w := range eps[:2] {
		ep := Endpoint{Name: w.Metadata.Name, Interface: w.Spec.InterfaceName}
		for _, n := range w.Spec.IPNetworks {
			ep.IPs = append(ep.IPs, netip.MustParsePrefix(n))
		}
		local = append(local, ep)
	}
	a := netip.MustParseAddr
	web, db, api6, inet := a("fd00:244::1"), a("fd00:244::2"), a("fd00:244:0:1::1"), a("2001:db8::10")
	iface := map[netip.Addr]string{web: "mgyweb", db: "mgydb", a("10.244.1.1"): "mgyweb", a("10.244.1.2"): "mgydb"}
	pkt := func(src, dst netip.Addr, proto uint8, dport uint16) Packet {
		return Packet{In: iface[src], Out: iface[dst], Src: src, Dst: dst, Proto: proto, SPort: 40000, DPort: dport}
	}
	pol := decodePolicies(t, `apiVersion: margay.dev/v1
kind: NetworkPolicy
metadata: {name: db, namespace: a}
spec:
  selector: app == 'db'
  ingress:
  - {action: Allow, protocol: TCP, source: {selector: app == 'api'}, destination: {ports: [5432]}}
  - {action: Allow, protocol: TCP, source: {nets: [10.244.1.1/32, "fd00:244::1/128"]}, destination: {ports: [80]}}
  - {action: Allow, protocol: TCP, source: {nets: [10.244.1.0/24]}, destination: {ports: [81]}}
  - {action: Allow, protocol: ICMP}
  egress:
  - {action: Allow, destination: {notNets: [10.0.0.0/8]}}`)
	pol.Endpoints = eps
	out := Compute(Input{Node: "n1", Endpoints: local, Policy: pol})
	ev4, ev6 := NewEvaluator(out.Chains, out.IPSets), NewEvaluator(out.Chains6, out.IPSets)
	const tcp, icmp, icmp6 = 6, 1, 58
	for _, c := range []struct {
		ev   *Evaluator
		p    Packet
		want bool
	}{
		{ev6, pkt(api6, db, tcp, 5432), true}, // the selector's IPv6 member
		{ev6, pkt(inet, db, tcp, 5432), false},
		{ev6, pkt(web, db, tcp, 80), true},  // the IPv6 net of a mixed list
		{ev6, pkt(web, db, tcp, 81), false}, // an IPv4-only list matches no IPv6 packet
		{ev4, pkt(a("10.244.1.1"), a("10.244.1.2"), tcp, 81), true},
		{ev6, pkt(web, db, icmp6, 0), false}, // ICMP is IPv4's
		{ev4, pkt(a("10.244.1.1"), a("10.244.1.2"), icmp, 0), true},
		{ev6, pkt(db, inet, tcp, 443), true}, // notNets of IPv4 exclude no IPv6 address
		{ev4, pkt(a("10.244.1.2"), a("10.244.2.1"), tcp, 443), false},
		{ev6, pkt(web, inet, tcp, 443), true},                                                    // web has no policy
		{ev6, Packet{In: "mgyweb", Src: db, Dst: inet, Proto: tcp, DPort: 443}, false},           // spoofed
		{ev6, Packet{In: "mgyweb", Src: a("fe80::1"), Dst: inet, Proto: tcp, DPort: 443}, false}, // link-local
	} {
		got, err := c.ev.Forward(c.p)
		if err != nil {
			t.Fatalf("%s: %v", c.p, err)
		}
		if got != c.want {
			t.Errorf("%s: accepted %v, want %v", c.p, got, c.want)
		}
	}
}
