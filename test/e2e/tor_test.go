package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
)

// A global BGPPeer: every node peers with the ToR at 198.18.1.1, AS 65000, eBGP.
const torPeer = neverPool + `---
apiVersion: margay.dev/v1
kind: BGPPeer
metadata: {name: tor}
spec: {peerIP: 198.18.1.1, asNumber: 65000}
`

// A BIRD 2 ToR in the router namespace peers with every node over eBGP and
// learns exactly the pod blocks, each from its own node (next hop self); the
// nodes export nothing else. gobgp and margayctl show the sessions.
func TestToRBird(t *testing.T) {
	if _, err := exec.LookPath("bird"); err != nil {
		t.Skip("bird (package bird2) is not installed")
	}
	l := up(t, lab.Options{Nodes: 3, Pools: neverPool, ToR: "bird", AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	want := allBlocks(t, l)
	waitBirdRoutes(t, l, want)
	checkSessionTools(t, l)
}

// A dual-stack lab in two subnets whose pools never encapsulate, with BIRD
// as the ToR: the nodes send it their IPv6 blocks over the IPv4 sessions
// (MP-BGP, next hop the node's IPv6 address), it learns exactly the blocks of
// both families and installs them in the router's kernel, and pods in
// different subnets reach each other through it over both families.
func TestToRBirdDualStack(t *testing.T) {
	if _, err := exec.LookPath("bird"); err != nil {
		t.Skip("bird (package bird2) is not installed")
	}
	l := up(t, lab.Options{Nodes: 3, Subnets: 2, Pools: dualNATPools, DualStack: true, ToR: "bird", AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	want := allBlocks(t, l)
	if !slices.ContainsFunc(want, func(r string) bool { return strings.HasPrefix(r, "fd00:244:") }) {
		t.Fatalf("no IPv6 block among %q", want)
	}
	waitBirdRoutes(t, l, want)
	allPairs(t, l, 1500-28)
	allPairsOf(t, l, 1500-48, func(p *lab.Pod) netip.Addr { return p.IP6 })
	// Across the subnets through the gateway, unencapsulated.
	n1, n2 := l.Nodes[0], l.Nodes[1]
	if out := n1.NS.MustRun(t, "ip", "-6", "route", "show", "proto", "77"); !strings.Contains(out, "via "+hostGateway6(n1).String()) {
		t.Errorf("node1 routes no IPv6 block through its gateway %s:\n%s", hostGateway6(n1), out)
	}
	plain := fmt.Sprintf("icmp6 and host %s and host %s", n1.Pods[0].IP6, n2.Pods[0].IP6)
	if got := capture(t, l.Router, "br1", plain, func() { lab.Ping(n1.Pods[0].NS, n2.Pods[0].IP6, 3) }); got < 3 {
		t.Errorf("tcpdump on subnet B saw %d plain ICMPv6 packets between the pods, want at least 3", got)
	}
}

// hostGateway6 is the router's IPv6 address on n's subnet.
func hostGateway6(n *lab.Node) netip.Addr { return n.IP6.Masked().Addr().Next() }

// The same with an FRR bgpd as the ToR.
func TestToRFRR(t *testing.T) { torFRR(t, false) }

// And in a dual-stack lab: FRR learns the IPv6 blocks over the IPv4
// sessions, each with its node's IPv6 address as next hop.
func TestToRFRRDualStack(t *testing.T) { torFRR(t, true) }

func torFRR(t *testing.T, dual bool) {
	if _, err := os.Stat("/usr/lib/frr/bgpd"); err != nil {
		t.Skip("FRR's bgpd (package frr) is not installed")
	}
	pools, families := torPeer, []string{"ipv4"}
	if dual {
		pools, families = torPeer+"---\n"+strings.SplitN(dualNATPools, "---\n", 2)[1], []string{"ipv4", "ipv6"}
	}
	l := up(t, lab.Options{Nodes: 3, Pools: pools, DualStack: dual, AgentArgs: []string{"--resync-interval", "2s"}})
	vtysh := startFRR(t, l)
	addPods(t, l, 1)
	want := allBlocks(t, l)
	err := lab.WaitFor(60*time.Second, func() error {
		var got []string
		for _, f := range families {
			out, err := vtysh("-c", "show bgp "+f+" unicast json")
			if err != nil {
				return fmt.Errorf("vtysh: %v: %s", err, out)
			}
			routes, err := frrRoutes(out)
			if err != nil {
				return err
			}
			got = append(got, routes...)
		}
		return sameRoutes(got, want)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// waitBirdRoutes waits until the BIRD ToR has exactly the routes want.
func waitBirdRoutes(t *testing.T, l *lab.Lab, want []string) {
	t.Helper()
	err := lab.WaitFor(60*time.Second, func() error {
		out, err := l.Router.Run("birdc", "-s", l.BirdSocket(), "show", "route")
		if err != nil {
			return fmt.Errorf("birdc: %v: %s", err, out)
		}
		return sameRoutes(birdRoutes(out), want)
	})
	if err != nil {
		t.Fatal(err)
	}
}

// startFRR runs FRR's bgpd in the router as every node's eBGP peer (AS
// lab.ToRAS), and returns a vtysh to it. It sends the nodes only what it
// announces of its own, none of the routes it learns.
func startFRR(t *testing.T, l *lab.Lab) (vtysh func(args ...string) (string, error)) {
	t.Helper()
	// bgpd drops to the frr user, which must reach its files.
	dir, err := os.MkdirTemp("", "margay-frr-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	os.Chmod(dir, 0o777)
	// Only routes of its own (an empty AS path) go out to the nodes.
	conf := "bgp as-path access-list own permit ^$\nroute-map own permit 10\n match as-path own\nexit\n"
	conf += fmt.Sprintf("router bgp %d\n bgp router-id 198.18.1.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n timers bgp 3 9\n", lab.ToRAS)
	for _, n := range l.Nodes {
		conf += fmt.Sprintf(" neighbor %s remote-as 64512\n neighbor %s timers connect 2\n", n.IP.Addr(), n.IP.Addr())
	}
	conf += " address-family ipv4 unicast\n"
	for _, n := range l.Nodes {
		conf += fmt.Sprintf("  neighbor %s route-map own out\n", n.IP.Addr())
	}
	conf += " exit-address-family\n"
	if l.Nodes[0].IP6.IsValid() { // dual-stack: IPv6 unicast over the IPv4 sessions
		conf += " address-family ipv6 unicast\n"
		for _, n := range l.Nodes {
			conf += fmt.Sprintf("  neighbor %s activate\n  neighbor %s route-map own out\n", n.IP.Addr(), n.IP.Addr())
		}
		conf += " exit-address-family\n"
	}
	confPath := filepath.Join(dir, "frr.conf")
	if err := os.WriteFile(confPath, []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	startDaemon(t, l.Router.Name, "/usr/lib/frr/bgpd", "-f", confPath, "-Z",
		"-i", filepath.Join(dir, "bgpd.pid"), "--vty_socket", dir, "-A", "127.0.0.1", "-P", "0")
	return func(args ...string) (string, error) {
		return l.Router.Run(append([]string{"vtysh", "--vty_socket", dir}, args...)...)
	}
}

// startDaemon runs a routing daemon in a namespace until the test ends.
func startDaemon(t *testing.T, ns string, args ...string) {
	t.Helper()
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...)
	var out strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
		if t.Failed() {
			t.Logf("%s output:\n%s", args[0], out.String())
		}
	})
}

func addPods(t *testing.T, l *lab.Lab, perNode int) {
	t.Helper()
	waitReady(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	for _, n := range l.Nodes {
		for i := range perNode {
			if _, err := l.AddPod(ctx, n, fmt.Sprintf("%s-pod%d", n.Name, i)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// allBlocks is every node's blocks as "cidr via node-ip", an IPv6 block via
// the node's IPv6 address.
func allBlocks(t *testing.T, l *lab.Lab) []string {
	t.Helper()
	blocks, err := nodeBlocks(l, l.Nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, n := range l.Nodes {
		for _, b := range blocks[n.Name] {
			via := n.IP.Addr()
			if strings.Contains(b, ":") {
				via = n.IP6.Addr()
			}
			want = append(want, b+" via "+via.String())
		}
	}
	return want
}

func sameRoutes(got, want []string) error {
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		return fmt.Errorf("the ToR has routes\n%s\nwant exactly\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	return nil
}

// birdRoutes reads `birdc show route`: every route, best or not, as "cidr via
// next-hop".
func birdRoutes(out string) []string {
	var got []string
	var prefix string
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || strings.HasPrefix(line, "BIRD") || strings.HasPrefix(line, "Table") {
			continue
		}
		if strings.Contains(f[0], "/") {
			prefix = f[0]
			continue
		}
		if f[0] == "via" && len(f) > 1 && prefix != "" {
			got = append(got, prefix+" via "+f[1])
		}
	}
	return got
}

// frrRoutes reads `show bgp ipv4|ipv6 unicast json`: every path as "cidr
// via next-hop", the global one of an IPv6 path.
func frrRoutes(js string) ([]string, error) {
	var v struct {
		Routes map[string][]struct {
			Nexthops []struct {
				IP    string `json:"ip"`
				Scope string `json:"scope"`
			} `json:"nexthops"`
		} `json:"routes"`
	}
	if err := json.Unmarshal([]byte(js), &v); err != nil {
		return nil, fmt.Errorf("FRR JSON: %v: %s", err, js)
	}
	var got []string
	for prefix, paths := range v.Routes {
		for _, p := range paths {
			for _, nh := range p.Nexthops {
				if nh.Scope != "link-local" {
					got = append(got, prefix+" via "+nh.IP)
				}
			}
		}
	}
	return got, nil
}

// checkSessionTools: the stock gobgp CLI and margayctl node status, run in a
// node, show its sessions to the other nodes and the ToR.
func checkSessionTools(t *testing.T, l *lab.Lab) {
	t.Helper()
	gobgp, err := exec.Command("go", "tool", "-n", "gobgp").Output()
	if err != nil {
		t.Fatalf("build gobgp: %v", err)
	}
	n := l.Nodes[0]
	out, err := n.NS.Run(strings.TrimSpace(string(gobgp)), "neighbor")
	if err != nil {
		t.Fatalf("gobgp neighbor: %v: %s", err, out)
	}
	for _, peer := range []string{"198.18.1.1", l.Nodes[1].IP.Addr().String(), l.Nodes[2].IP.Addr().String()} {
		if !strings.Contains(out, peer) {
			t.Errorf("gobgp neighbor on %s does not show %s:\n%s", n.Name, peer, out)
		}
	}
	if strings.Count(out, "Establ") != 3 {
		t.Errorf("gobgp neighbor: want 3 established sessions:\n%s", out)
	}
	out, err = n.NS.Run(filepath.Join(binDir, "margayctl"), "node", "status")
	if err != nil {
		t.Fatalf("margayctl node status: %v: %s", err, out)
	}
	for _, want := range []string{"198.18.1.1", "node specific (tor-node1)", "node-to-node mesh (node2)", "Established"} {
		if !strings.Contains(out, want) {
			t.Errorf("margayctl node status does not show %q:\n%s", want, out)
		}
	}
	t.Logf("margayctl node status:\n%s", out)
}
