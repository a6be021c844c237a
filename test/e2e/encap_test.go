package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
	"github.com/margay-dev/margay/test/nstest"
)

func encapPool(mode string) string {
	return fmt.Sprintf(`apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true, %s}
`, mode)
}

// Five nodes, three in subnet A and two in B, behind a router that knows
// nothing of pods, VXLAN CrossSubnet: same-subnet pairs route directly (the
// VXLAN device carries none of their traffic), cross-subnet pairs through
// vxlan.margay; every pod reaches every pod (ping and TCP) with full-size
// packets that may not be fragmented, and one byte more fails; switching the
// pool to Always moves every route into the tunnel without touching the pods.
func TestCrossSubnetVXLAN(t *testing.T) {
	l := up(t, lab.Options{Nodes: 5, Subnets: 2, Pools: encapPool("vxlanMode: CrossSubnet"), AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	checkEncap(t, l, func(a, b *lab.Node) string {
		if a.IP.Masked() == b.IP.Masked() {
			return "via " + b.IP.Addr().String() + " dev eth0"
		}
		return "dev vxlan.margay"
	})
	allPairs(t, l, 1450-28)
	allPairsTCP(t, l)
	// Same subnet (node1 and node3, both in A): nothing crosses vxlan.margay.
	a, b := l.Nodes[0].Pods[0], l.Nodes[2].Pods[0]
	before := txPackets(t, l.Nodes[0], "vxlan.margay")
	if err := lab.Ping(a.NS, b.IP, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, l.Nodes[0], "vxlan.margay"); after != before {
		t.Errorf("same-subnet pings went through vxlan.margay: tx %d -> %d", before, after)
	}
	// Cross subnet (node1 in A, node2 in B): through it.
	c := l.Nodes[1].Pods[0]
	if err := lab.Ping(a.NS, c.IP, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, l.Nodes[0], "vxlan.margay"); after < before+5 {
		t.Errorf("cross-subnet pings did not go through vxlan.margay: tx %d -> %d", before, after)
	}
	if out, err := a.NS.Run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", fmt.Sprint(1450-28+1), c.IP.String()); err == nil {
		t.Errorf("a DF packet one byte over the pod MTU got through:\n%s", out)
	}
	// On the wire: same-subnet pod traffic crosses subnet A's segment as plain
	// ICMP between the pods' addresses; cross-subnet traffic leaves the router
	// into subnet B as VXLAN (UDP 4789) between the nodes.
	plain := capture(t, l.Router, "br0", fmt.Sprintf("icmp and host %s and host %s", a.IP, b.IP), func() { lab.Ping(a.NS, b.IP, 3) })
	if plain < 3 {
		t.Errorf("tcpdump on subnet A saw %d plain ICMP packets between the same-subnet pods, want at least 3", plain)
	}
	encap := capture(t, l.Router, "br1", fmt.Sprintf("udp port 4789 and host %s and host %s", l.Nodes[0].IP.Addr(), l.Nodes[1].IP.Addr()), func() { lab.Ping(a.NS, c.IP, 3) })
	if encap < 3 {
		t.Errorf("tcpdump on subnet B saw %d VXLAN packets between node1 and node2, want at least 3", encap)
	}
	if n := capture(t, l.Router, "br1", fmt.Sprintf("icmp and host %s", a.IP), func() { lab.Ping(a.NS, c.IP, 3) }); n != 0 {
		t.Errorf("tcpdump on subnet B saw %d unencapsulated packets from pod %s", n, a.IP)
	}
	mtu := filepath.Join(l.Dir(), "node1", "mtu")
	if out, err := l.Nodes[0].NS.Run(filepath.Join(binDir, "margayctl"), "node", "status", "--mtu-file", mtu); err != nil || !strings.Contains(out, "Pod MTU: 1450") {
		t.Errorf("margayctl node status: %v\n%s\nwant the pod MTU 1450", err, out)
	}
	if out, err := apply(l, encapPool("vxlanMode: Always")); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	checkEncap(t, l, func(a, b *lab.Node) string { return "dev vxlan.margay" })
	allPairs(t, l, 1450-28)
}

// checkEncap waits until every node routes every other node's blocks the way
// want says.
func checkEncap(t *testing.T, l *lab.Lab, want func(from, to *lab.Node) string) {
	t.Helper()
	blocks, err := nodeBlocks(l, l.Nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(30*time.Second, func() error {
		for _, a := range l.Nodes {
			out, _ := a.NS.Run("ip", "-4", "route", "show", "proto", "77")
			for _, b := range l.Nodes {
				if a == b {
					continue
				}
				for _, blk := range blocks[b.Name] {
					line := ""
					for _, r := range strings.Split(out, "\n") {
						if strings.HasPrefix(r, blk+" ") {
							line = r
						}
					}
					if !strings.Contains(line, want(a, b)) {
						return fmt.Errorf("%s routes %s's %s as %q, want %q:\n%s", a.Name, b.Name, blk, line, want(a, b), out)
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// allPairs pings every pod from every other pod with size-byte payloads and the
// don't-fragment bit set, once the pair can reach each other at all: a new pod's
// packets are dropped until its agent has added it to the anti-spoofing chain,
// which on a slow machine (the VM) takes a second or two after its routes exist.
func allPairs(t *testing.T, l *lab.Lab, size int) {
	t.Helper()
	pods := l.Pods()
	var wg sync.WaitGroup
	var mu sync.Mutex
	for _, a := range pods {
		wg.Go(func() {
			for _, b := range pods {
				if a == b {
					continue
				}
				if err := lab.WaitFor(30*time.Second, func() error { return lab.Ping(a.NS, b.IP, 1) }); err != nil {
					mu.Lock()
					t.Errorf("%s -> %s: %v", a.Name, b.Name, err)
					mu.Unlock()
					continue
				}
				out, err := a.NS.Run("ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", fmt.Sprint(size), "-q", b.IP.String())
				if err != nil {
					mu.Lock()
					t.Errorf("%s -> %s with %d bytes, DF: %v\n%s", a.Name, b.Name, size, err, out)
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
}

// A pool that needs IPIP on a kernel without it: the agent stays not ready and
// says exactly why. (On a kernel with IPIP, tunl0 is made instead.)
func TestIPIPWithoutKernelSupport(t *testing.T) {
	if _, err := os.Stat("/sys/module/ipip"); err == nil {
		t.Skip("this kernel has IPIP")
	}
	l := up(t, lab.Options{Nodes: 2, Pools: encapPool("ipipMode: Always"), AgentArgs: []string{"--resync-interval", "2s"}})
	err := lab.WaitFor(30*time.Second, func() error {
		err := l.Nodes[0].Ready()
		if err == nil || !strings.Contains(err.Error(), "modprobe ipip") || !strings.Contains(err.Error(), "vxlanMode") {
			return fmt.Errorf("readiness: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// The same across subnets with IPIP CrossSubnet, on a kernel with IPIP (the
// kernel VM runner, test/vm, runs it): same-subnet pairs direct, cross-subnet
// pairs through tunl0, full-size DF packets on every path.
func TestCrossSubnetIPIP(t *testing.T) {
	if _, err := os.Stat("/sys/module/ipip"); err != nil {
		t.Skip("this kernel has no IPIP; make test-vm runs this test in a VM")
	}
	l := up(t, lab.Options{Nodes: 5, Subnets: 2, Pools: encapPool("ipipMode: CrossSubnet"), AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	checkEncap(t, l, func(a, b *lab.Node) string {
		if a.IP.Masked() == b.IP.Masked() {
			return "via " + b.IP.Addr().String() + " dev eth0"
		}
		return "via " + b.IP.Addr().String() + " dev tunl0"
	})
	allPairs(t, l, 1480-28)
	allPairsTCP(t, l)
	a, b, c := l.Nodes[0].Pods[0], l.Nodes[2].Pods[0], l.Nodes[1].Pods[0]
	before := txPackets(t, l.Nodes[0], "tunl0")
	if err := lab.Ping(a.NS, b.IP, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, l.Nodes[0], "tunl0"); after != before {
		t.Errorf("same-subnet pings went through tunl0: tx %d -> %d", before, after)
	}
	if err := lab.Ping(a.NS, c.IP, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, l.Nodes[0], "tunl0"); after < before+5 {
		t.Errorf("cross-subnet pings did not go through tunl0: tx %d -> %d", before, after)
	}
	if out, err := a.NS.Run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", fmt.Sprint(1480-28+1), c.IP.String()); err == nil {
		t.Errorf("a DF packet one byte over the pod MTU got through:\n%s", out)
	}
	// Always: every route moves into tunl0, and the pods keep talking.
	if out, err := apply(l, encapPool("ipipMode: Always")); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	checkEncap(t, l, func(a, b *lab.Node) string { return "via " + b.IP.Addr().String() + " dev tunl0" })
	allPairs(t, l, 1480-28)
}

// txPackets reads a device's transmitted-packet counter in node n.
func txPackets(t *testing.T, n *lab.Node, dev string) int {
	t.Helper()
	out := n.NS.MustRun(t, "cat", "/sys/class/net/"+dev+"/statistics/tx_packets")
	var v int
	fmt.Sscan(out, &v)
	return v
}

// capture counts the packets tcpdump sees on iface in ns matching filter while
// action runs (bounded: tcpdump stops after 5 s).
func capture(t *testing.T, ns *nstest.NS, iface, filter string, action func()) int {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "timeout", "5", "tcpdump", "-i", iface, "-n", "-l", "-q", filter)
	var out strings.Builder
	cmd.Stdout = &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(time.Second) // let tcpdump attach
	action()
	cmd.Wait()
	n := 0
	for _, line := range strings.Split(out.String(), "\n") {
		if strings.TrimSpace(line) != "" {
			n++
		}
	}
	return n
}
