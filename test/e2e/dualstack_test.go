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
