package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
)

// Three dual-stack nodes in one subnet: IPv6 blocks travel over the IPv4
// sessions with each node's IPv6 address as next hop, every node's kernel holds
// exactly the IPv6 routes it should beside the IPv4 ones, and every pod reaches
// every other pod over both families (ping, and TCP with its own address as
// source), and the internet host over both, as its node (NAT66 for IPv6).
func TestDualStackOneSubnet(t *testing.T) {
	l := up(t, lab.Options{Nodes: 3, Pools: dualNATPools, DualStack: true, AgentArgs: []string{"--resync-interval", "2s"}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	waitReady(t, l)
	for _, n := range l.Nodes {
		if _, err := l.AddPod(ctx, n, n.Name+"-pod"); err != nil {
			t.Fatal(err)
		}
	}
	for _, p := range l.Pods() {
		if !p.IP.Is4() || !p.IP6.Is6() || !netip.MustParsePrefix("fd00:244::/48").Contains(p.IP6) {
			t.Fatalf("pod %s has %s and %s; want an IPv4 and an IPv6 pod address", p.Name, p.IP, p.IP6)
		}
	}
	start := time.Now()
	err := lab.WaitFor(30*time.Second, func() error {
		for _, n := range l.Nodes {
			if err := checkRoutes(l, n); err != nil {
				return err
			}
			if err := checkRoutes6(l, n); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("IPv6 routes exact on every node %v after the last ADD", time.Since(start).Round(time.Millisecond))
	for _, a := range l.Pods() {
		for _, b := range l.Pods() {
			if a == b {
				continue
			}
			for _, dst := range []netip.Addr{b.IP, b.IP6} {
				if err := lab.Ping(a.NS, dst, 1); err != nil {
					t.Error(err)
				}
			}
		}
	}
	for _, b := range l.Pods() {
		stop := serve(t, b.NS, 8080)
		for _, a := range l.Pods() {
			if a == b {
				continue
			}
			if got, err := dial(a.NS, netip.AddrPortFrom(b.IP6, 8080)); err != nil || got != a.IP6.String() {
				t.Errorf("TCP over IPv6 %s -> %s: server saw %q, %v; want the client's own address %s", a.Name, b.Name, got, err, a.IP6)
			}
		}
		stop()
	}
	stop := serve(t, l.Internet, 80)
	defer stop()
	for _, n := range l.Nodes {
		p := n.Pods[0]
		for _, c := range []struct{ dst, want netip.Addr }{{lab.InternetAddr, n.IP.Addr()}, {lab.InternetAddr6, n.IP6.Addr()}} {
			if got, err := dial(p.NS, netip.AddrPortFrom(c.dst, 80)); err != nil || got != c.want.String() {
				t.Errorf("pod %s to the internet host at %s: seen as %q, %v; want its node's %s", p.Name, c.dst, got, err, c.want)
			}
		}
	}
}

// checkRoutes6 compares node n's margay IPv6 routes with what they should be:
// a blackhole for each of its v6 blocks, the other nodes' v6 blocks via their
// IPv6 addresses, and a /128 to each of its pods.
func checkRoutes6(l *lab.Lab, n *lab.Node) error {
	out, err := n.NS.Run("ip", "-6", "route", "show", "proto", "77")
	if err != nil {
		return err
	}
	var got []string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		// The kernel adds a metric and a preference to every IPv6 route.
		if i := slices.Index(f, "metric"); i >= 0 {
			f = f[:i]
		}
		if len(f) > 0 {
			got = append(got, strings.Join(f, " "))
		}
	}
	blocks, err := nodeBlocks(l, n)
	if err != nil {
		return err
	}
	var want []string
	for _, m := range l.Nodes {
		for _, b := range blocks[m.Name] {
			switch {
			case !strings.Contains(b, ":"):
			case m == n:
				want = append(want, "blackhole "+b+" dev lo")
			default:
				want = append(want, fmt.Sprintf("%s via %s dev eth0", b, m.IP6.Addr()))
			}
		}
	}
	for _, p := range n.Pods {
		want = append(want, p.IP6.String()+" dev "+hostVeth(n, p))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		return fmt.Errorf("%s's IPv6 routes:\n%s\nwant:\n%s", n.Name, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	return nil
}

// vxlanDualPools are IPv4 and IPv6 pools with VXLAN CrossSubnet and
// natOutgoing.
const vxlanDualPools = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true, vxlanMode: CrossSubnet}
---
apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods-v6}
spec: {cidr: "fd00:244::/48", natOutgoing: true, vxlanMode: CrossSubnet}
`

// Dual-stack nodes in two subnets with VXLAN CrossSubnet pools of both
// families: IPv6 blocks in a node's IPv6 subnet are routed directly, those
// beyond it through vxlan-v6.margay over the IPv6 underlay, beside IPv4's
// vxlan.margay. Every pod reaches every other over both families with
// full-size packets that may not be fragmented (the pod MTU leaves IPv6's 70
// bytes); same-subnet IPv6 traffic never enters the tunnel, cross-subnet
// traffic crosses subnet B only as UDP 4789 between the nodes' IPv6
// addresses; and a pod reaches the internet host over IPv6 as its node.
func TestCrossSubnetVXLANDualStack(t *testing.T) {
	l := up(t, lab.Options{Nodes: 3, Subnets: 2, Pools: vxlanDualPools, DualStack: true, AgentArgs: []string{"--resync-interval", "5s"}})
	waitReady(t, l)
	addPods(t, l, 1)
	n1, n2, n3 := l.Nodes[0], l.Nodes[1], l.Nodes[2] // n1 and n3 in subnet A, n2 in B
	a, b, c := n1.Pods[0], n3.Pods[0], n2.Pods[0]
	const podMTU = 1500 - 70
	sameSubnet := func(x, y *lab.Node) bool { return x.IP.Masked() == y.IP.Masked() }
	checkEncapOf(t, l, true, func(from, to *lab.Node) string {
		if sameSubnet(from, to) {
			return "via " + to.IP6.Addr().String() + " dev eth0"
		}
		return "dev vxlan-v6.margay"
	})
	checkEncap(t, l, func(from, to *lab.Node) string {
		if sameSubnet(from, to) {
			return "via " + to.IP.Addr().String() + " dev eth0"
		}
		return "dev vxlan.margay"
	})
	allPairsOf(t, l, podMTU-48, func(p *lab.Pod) netip.Addr { return p.IP6 })
	allPairs(t, l, podMTU-28)
	for _, x := range l.Pods() {
		stop := serve(t, x.NS, 8080)
		for _, y := range l.Pods() {
			if x == y {
				continue
			}
			if got, err := dial(y.NS, netip.AddrPortFrom(x.IP6, 8080)); err != nil || got != y.IP6.String() {
				t.Errorf("TCP over IPv6 %s -> %s: server saw %q, %v; want %s", y.Name, x.Name, got, err, y.IP6)
			}
		}
		stop()
	}
	const dev = "vxlan-v6.margay"
	before := txPackets(t, n1, dev)
	if err := lab.Ping(a.NS, b.IP6, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, n1, dev); after != before {
		t.Errorf("same-subnet IPv6 pings went through %s: tx %d -> %d", dev, before, after)
	}
	if err := lab.Ping(a.NS, c.IP6, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, n1, dev); after < before+5 {
		t.Errorf("cross-subnet IPv6 pings did not go through %s: tx %d -> %d", dev, before, after)
	}
	if out, err := a.NS.Run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", fmt.Sprint(podMTU-48+1), c.IP6.String()); err == nil {
		t.Errorf("an IPv6 packet one byte over the pod MTU got through:\n%s", out)
	}
	encapsulated := fmt.Sprintf("ip6 and udp port 4789 and host %s and host %s", n1.IP6.Addr(), n2.IP6.Addr())
	if got := capture(t, l.Router, "br1", encapsulated, func() { lab.Ping(a.NS, c.IP6, 3) }); got < 3 {
		t.Errorf("tcpdump on subnet B saw %d IPv6 VXLAN packets between node1 and node2, want at least 3", got)
	}
	plain := fmt.Sprintf("icmp6 and host %s and host %s", a.IP6, c.IP6)
	if got := capture(t, l.Router, "br1", plain, func() { lab.Ping(a.NS, c.IP6, 3) }); got != 0 {
		t.Errorf("tcpdump on subnet B saw %d unencapsulated IPv6 packets between the cross-subnet pods", got)
	}
	stop := serve(t, l.Internet, 80)
	defer stop()
	if got, err := dial(c.NS, netip.AddrPortFrom(lab.InternetAddr6, 80)); err != nil || got != n2.IP6.Addr().String() {
		t.Errorf("pod %s to the internet host over IPv6: seen as %q, %v; want its node's %s", c.Name, got, err, n2.IP6.Addr())
	}
	checkPodMTU(t, l, n1, podMTU)
}
