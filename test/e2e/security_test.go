package e2e

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
	"github.com/margay-dev/margay/test/nstest"
)

// Tunnel packets from anyone but a node are dropped: the internet host sending
// IPIP (IP protocol 4) or VXLAN (UDP 4789) to a node, and a pod sending IPIP.
// The counters of MGY-INPUT's DROP rules prove it.
func TestTunnelPacketsOnlyFromNodes(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, Pools: encapPool("vxlanMode: CrossSubnet"), AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	n := l.Nodes[0]
	pod := l.Nodes[1].Pods[0]
	if err := lab.WaitFor(20*time.Second, func() error { return lab.Ping(pod.NS, n.IP.Addr(), 1) }); err != nil {
		t.Fatal(err)
	}
	dropsIn := func(node *lab.Node, chain, what string) int {
		out := node.NS.MustRun(t, "iptables", "-L", chain, "-v", "-x", "-n")
		m := regexp.MustCompile(`(?m)^\s*(\d+)\s+\d+\s+DROP.*margay: ` + what).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("no DROP rule for %s in %s:\n%s", what, chain, out)
		}
		v, _ := strconv.Atoi(m[1])
		return v
	}
	drops := func(what string) int { return dropsIn(n, "MGY-INPUT", what) }
	ipip0, vxlan0 := drops("IPIP from an unknown host"), drops("VXLAN from an unknown host")
	send(t, l.Internet, "ip4:4", n.IP.Addr().String(), 3)
	send(t, l.Internet, "udp4", n.IP.Addr().String()+":4789", 3)
	if got := drops("IPIP from an unknown host"); got < ipip0+3 {
		t.Errorf("IPIP from the internet host: DROP counted %d -> %d, want 3 more", ipip0, got)
	}
	if got := drops("VXLAN from an unknown host"); got < vxlan0+3 {
		t.Errorf("VXLAN from the internet host: DROP counted %d -> %d, want 3 more", vxlan0, got)
	}
	// A pod on node2 sends IPIP and VXLAN to node1: dropped as it leaves the
	// pod, before NAT could give it node2's address.
	ipip1, vxlan1 := dropsIn(l.Nodes[1], "MGY-FROM-WL", "IPIP from a pod"), dropsIn(l.Nodes[1], "MGY-FROM-WL", "VXLAN from a pod")
	send(t, pod.NS, "ip4:4", n.IP.Addr().String(), 3)
	send(t, pod.NS, "udp4", n.IP.Addr().String()+":4789", 3)
	if got := dropsIn(l.Nodes[1], "MGY-FROM-WL", "IPIP from a pod"); got < ipip1+3 {
		t.Errorf("IPIP from a pod: DROP counted %d -> %d, want 3 more", ipip1, got)
	}
	if got := dropsIn(l.Nodes[1], "MGY-FROM-WL", "VXLAN from a pod"); got < vxlan1+3 {
		t.Errorf("VXLAN from a pod: DROP counted %d -> %d, want 3 more", vxlan1, got)
	}
}

// With default flags the health port answers on loopback only, from the node
// itself; metrics answer on the node's address, for Prometheus.
func TestHealthOnLoopback(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2})
	waitReady(t, l) // through 127.0.0.1:9099 in each node
	n1, n2 := l.Nodes[0], l.Nodes[1]
	for _, from := range []*lab.Node{n1, n2} {
		if out, err := from.HTTPGet(netip.AddrPortFrom(n1.IP.Addr(), 9099).String(), "/readyz"); err == nil {
			t.Errorf("%s reached node1's health port on %s:\n%s", from.Name, n1.IP.Addr(), out)
		}
	}
	out, err := n2.HTTPGet(netip.AddrPortFrom(n1.IP.Addr(), 9091).String(), "/metrics")
	if err != nil || !strings.Contains(out, "margay_bgp_peers") {
		t.Errorf("node2 cannot read node1's metrics on %s:9091: %v", n1.IP.Addr(), err)
	}
}

// send sends count small packets from inside ns: raw IP (network "ip4:4") or UDP.
func send(t *testing.T, ns *nstest.NS, network, to string, count int) {
	t.Helper()
	err := ns.Do(func() error {
		c, err := net.Dial(network, to)
		if err != nil {
			return err
		}
		defer c.Close()
		for i := range count {
			if _, err := fmt.Fprintf(c, "margay test packet %d", i); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
}
