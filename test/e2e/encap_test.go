package e2e

import (
	"fmt"
	"net/netip"
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

// encapPool is the lab's pool with an encapsulation mode such as "vxlanMode:
// Always"; with none it routes directly (Never).
func encapPool(mode string) string {
	if mode != "" {
		mode = ", " + mode
	}
	return fmt.Sprintf(`apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true%s}
`, mode)
}

// encap is one encapsulation, for the cross-subnet suite both share.
type encap struct {
	mode     string // its IPPool field
	dev      string
	overhead int
	wire     string // tcpdump's filter for its packets
	// via is how a node routes another node's blocks through it.
	via func(to *lab.Node) string
}

var (
	vxlanEncap = encap{"vxlanMode", "vxlan.margay", 50, "udp port 4789", func(*lab.Node) string { return "dev vxlan.margay" }}
	ipipEncap  = encap{"ipipMode", "tunl0", 20, "ip proto 4", func(to *lab.Node) string { return "via " + to.IP.Addr().String() + " dev tunl0" }}
)

// VXLAN CrossSubnet, Always and Never with a ToR, natively: see crossSubnet.
func TestCrossSubnetVXLAN(t *testing.T) { crossSubnet(t, vxlanEncap) }

// The same with IPIP, on a kernel with IPIP: make test-vm runs it in the kernel VM.
func TestCrossSubnetIPIP(t *testing.T) {
	if _, err := os.Stat("/sys/module/ipip"); err != nil {
		t.Skip("this kernel has no IPIP; make test-vm runs this test in a VM")
	}
	crossSubnet(t, ipipEncap)
}

// crossSubnet runs five nodes, three in subnet A and two in B, behind a router
// that knows nothing of pods but runs a BIRD ToR peering with every node.
//   - Pool mode CrossSubnet: same-subnet pairs route directly (the tunnel
//     device carries none of their traffic, and the wire shows plain IP),
//     cross-subnet pairs through the tunnel (the wire shows only
//     encapsulated packets); every pod reaches every pod (ping and TCP) with
//     full-size packets that may not be fragmented, and one byte more fails.
//   - Always: every route moves into the tunnel, same-subnet traffic included.
//   - Never: the ToR has learnt the blocks, so cross-subnet routes go to the
//     gateway, unencapsulated.
//
// The pods stay up throughout, and each switch completes within the resync
// interval.
func crossSubnet(t *testing.T, e encap) {
	if _, err := exec.LookPath("bird"); err != nil {
		t.Fatal("bird (package bird2) is not installed: make deps installs it")
	}
	// Long enough that a switch seldom waits behind a full pass, which in the
	// emulated VM takes seconds (iptables there is slow).
	const resync = 15 * time.Second
	l := up(t, lab.Options{Nodes: 5, Subnets: 2, Pools: encapPool(e.mode + ": CrossSubnet"), ToR: "bird", AgentArgs: []string{"--resync-interval", resync.String()}})
	addPods(t, l, 1)
	podMTU := 1500 - e.overhead
	n1, n2, n3 := l.Nodes[0], l.Nodes[1], l.Nodes[2] // n1 and n3 in subnet A, n2 in B
	a, b, c := n1.Pods[0], n3.Pods[0], n2.Pods[0]
	sameSubnet := func(x, y *lab.Node) bool { return x.IP.Masked() == y.IP.Masked() }
	direct := func(_, to *lab.Node) string { return "via " + to.IP.Addr().String() + " dev eth0" }
	checkEncap(t, l, func(from, to *lab.Node) string {
		if sameSubnet(from, to) {
			return direct(from, to)
		}
		return e.via(to)
	})
	allPairs(t, l, podMTU-28)
	allPairsTCP(t, l)
	before := txPackets(t, n1, e.dev)
	if err := lab.Ping(a.NS, b.IP, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, n1, e.dev); after != before {
		t.Errorf("same-subnet pings went through %s: tx %d -> %d", e.dev, before, after)
	}
	if err := lab.Ping(a.NS, c.IP, 5); err != nil {
		t.Fatal(err)
	}
	if after := txPackets(t, n1, e.dev); after < before+5 {
		t.Errorf("cross-subnet pings did not go through %s: tx %d -> %d", e.dev, before, after)
	}
	if out, err := a.NS.Run("ping", "-c", "1", "-W", "2", "-M", "do", "-s", fmt.Sprint(podMTU-28+1), c.IP.String()); err == nil {
		t.Errorf("a DF packet one byte over the pod MTU got through:\n%s", out)
	}
	// On the wire: same-subnet pod traffic crosses subnet A's segment as plain
	// ICMP between the pods' addresses; cross-subnet traffic leaves the router
	// into subnet B encapsulated between the nodes, and never plain.
	pods := func(x, y *lab.Pod) string { return fmt.Sprintf("icmp and host %s and host %s", x.IP, y.IP) }
	nodes := func(x, y *lab.Node) string {
		return fmt.Sprintf("%s and host %s and host %s", e.wire, x.IP.Addr(), y.IP.Addr())
	}
	if n := capture(t, l.Router, "br0", pods(a, b), func() { lab.Ping(a.NS, b.IP, 3) }); n < 3 {
		t.Errorf("tcpdump on subnet A saw %d plain ICMP packets between the same-subnet pods, want at least 3", n)
	}
	if n := capture(t, l.Router, "br1", nodes(n1, n2), func() { lab.Ping(a.NS, c.IP, 3) }); n < 3 {
		t.Errorf("tcpdump on subnet B saw %d encapsulated packets (%s) between node1 and node2, want at least 3", n, e.wire)
	}
	if n := capture(t, l.Router, "br1", pods(a, c), func() { lab.Ping(a.NS, c.IP, 3) }); n != 0 {
		t.Errorf("tcpdump on subnet B saw %d unencapsulated packets between the cross-subnet pods", n)
	}
	checkPodMTU(t, l, n1, podMTU)

	// Always: every route moves into the tunnel, and the pods keep talking.
	switchMode(t, l, e.mode+": Always", resync, func(_, to *lab.Node) string { return e.via(to) })
	allPairs(t, l, podMTU-28)
	if n := capture(t, l.Router, "br0", nodes(n1, n3), func() { lab.Ping(a.NS, b.IP, 3) }); n < 3 {
		t.Errorf("tcpdump on subnet A saw %d encapsulated packets between node1 and node3 under Always, want at least 3", n)
	}

	// Never: the ToR learnt every block from its node, so a cross-subnet
	// block is routed to the gateway, which knows the way.
	waitBirdRoutes(t, l, allBlocks(t, l))
	switchMode(t, l, "", resync, func(from, to *lab.Node) string {
		if sameSubnet(from, to) {
			return direct(from, to)
		}
		return "via " + from.Gateway().String() + " dev eth0"
	})
	allPairs(t, l, podMTU-28) // the pods keep the MTU they were made with
	allPairsTCP(t, l)
	if n := capture(t, l.Router, "br1", pods(a, c), func() { lab.Ping(a.NS, c.IP, 3) }); n < 3 {
		t.Errorf("tcpdump on subnet B saw %d plain ICMP packets between the cross-subnet pods under Never, want at least 3", n)
	}
	checkPodMTU(t, l, n1, 1500) // new pods need no room for a tunnel
}

// switchMode applies the pool with the given mode (none: Never) and checks
// that within the resync interval every node routes as want says and a pod
// reaches a pod on the other subnet.
func switchMode(t *testing.T, l *lab.Lab, mode string, resync time.Duration, want func(from, to *lab.Node) string) {
	t.Helper()
	blocks, err := nodeBlocks(l, l.Nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	name := mode
	if name == "" {
		name = "Never"
	}
	start := time.Now()
	if out, err := apply(l, encapPool(mode)); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	a, c := l.Nodes[0].Pods[0], l.Nodes[1].Pods[0]
	err = lab.WaitFor(2*resync, func() error {
		if err := routedAs(l, blocks, false, want); err != nil {
			return err
		}
		return lab.Ping(a.NS, c.IP, 1)
	})
	took := time.Since(start)
	if err != nil {
		t.Fatalf("switching to %s: %v", name, err)
	}
	if took > resync {
		t.Errorf("switching to %s took %v, more than the resync interval %v", name, took.Round(time.Millisecond), resync)
	}
	t.Logf("switched to %s: routes moved and cross-subnet pods talk again after %v", name, took.Round(time.Millisecond))
}

// checkPodMTU checks that margayctl node status on n shows the pod MTU.
func checkPodMTU(t *testing.T, l *lab.Lab, n *lab.Node, want int) {
	t.Helper()
	mtu := filepath.Join(l.Dir(), n.Name, "mtu")
	err := lab.WaitFor(10*time.Second, func() error {
		out, err := n.NS.Run(filepath.Join(binDir, "margayctl"), "node", "status", "--mtu-file", mtu)
		if err != nil || !strings.Contains(out, fmt.Sprintf("Pod MTU: %d", want)) {
			return fmt.Errorf("margayctl node status: %v\n%s\nwant the pod MTU %d", err, out, want)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
}

// checkEncap waits until every node routes every other node's IPv4 blocks
// the way want says.
func checkEncap(t *testing.T, l *lab.Lab, want func(from, to *lab.Node) string) {
	t.Helper()
	checkEncapOf(t, l, false, want)
}

// checkEncapOf is checkEncap for the blocks of one family.
func checkEncapOf(t *testing.T, l *lab.Lab, v6 bool, want func(from, to *lab.Node) string) {
	t.Helper()
	blocks, err := nodeBlocks(l, l.Nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(30*time.Second, func() error { return routedAs(l, blocks, v6, want) }); err != nil {
		t.Fatal(err)
	}
}

// routedAs checks every node's route to every other node's blocks of one
// family.
func routedAs(l *lab.Lab, blocks map[string][]string, v6 bool, want func(from, to *lab.Node) string) error {
	family := "-4"
	if v6 {
		family = "-6"
	}
	for _, a := range l.Nodes {
		out, _ := a.NS.Run("ip", family, "route", "show", "proto", "77")
		for _, b := range l.Nodes {
			if a == b {
				continue
			}
			for _, blk := range blocks[b.Name] {
				if strings.Contains(blk, ":") != v6 {
					continue
				}
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
}

// allPairs pings every pod from every other pod with size-byte payloads and the
// don't-fragment bit set, once the pair can reach each other at all: a new pod's
// packets are dropped until its agent has added it to the anti-spoofing chain,
// which on a slow machine (the VM) takes a second or two after its routes exist.
func allPairs(t *testing.T, l *lab.Lab, size int) {
	t.Helper()
	allPairsOf(t, l, size, func(p *lab.Pod) netip.Addr { return p.IP })
}

// allPairsOf is allPairs to the pods' addresses addr gives, of either family.
func allPairsOf(t *testing.T, l *lab.Lab, size int, addr func(*lab.Pod) netip.Addr) {
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
				if err := lab.WaitFor(30*time.Second, func() error { return lab.Ping(a.NS, addr(b), 1) }); err != nil {
					mu.Lock()
					t.Errorf("%s -> %s: %v", a.Name, b.Name, err)
					mu.Unlock()
					continue
				}
				out, err := a.NS.Run("ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", fmt.Sprint(size), "-q", addr(b).String())
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
	// -Z root: tcpdump would drop to its own user, which the kernel VM lacks.
	cmd := exec.Command("ip", "netns", "exec", ns.Name, "timeout", "5", "tcpdump", "-Z", "root", "-i", iface, "-n", "-l", "-q", filter)
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
