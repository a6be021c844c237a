package e2e

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
)

// hijackPools: two blocks for three nodes, so that the third borrows, and a
// disabled pool where no node has a block.
const hijackPools = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: small}
spec: {cidr: 10.244.0.0/25, blockSize: 26}
---
apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: spare}
spec: {cidr: 10.246.0.0/16, disabled: true}
`

// A ToR announces, as its own, what belongs to others: a more specific prefix
// inside node1's block, node3's whole block, node2's borrowed /32 and a block
// that no node has. No node follows any of them, every node counts and logs
// them with the ToR as the peer, and the pods keep talking. With FRR, node3's
// BGPPeer also has maxPrefixes: one prefix more closes that session alone, and
// node status says why.
func TestHijackFRR(t *testing.T) {
	if _, err := os.Stat("/usr/lib/frr/bgpd"); err != nil {
		t.Skip("FRR's bgpd (package frr) is not installed")
	}
	peers := hijackPools
	for _, n := range []string{"node1", "node2", "node3"} {
		limit := ""
		if n == "node3" {
			limit = ", maxPrefixes: 4"
		}
		peers += fmt.Sprintf("---\napiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: tor-%s}\nspec: {node: %s, peerIP: 198.18.1.1, asNumber: %d%s}\n", n, n, lab.ToRAS, limit)
	}
	l := up(t, lab.Options{Nodes: 3, Pools: peers, AgentArgs: []string{"--resync-interval", "2s"}})
	vtysh := startFRR(t, l)
	bogus := hijack(t, l, func(ps []netip.Prefix) {
		args := []string{"-c", "configure terminal", "-c", fmt.Sprintf("router bgp %d", lab.ToRAS), "-c", "address-family ipv4 unicast"}
		for _, p := range ps {
			args = append(args, "-c", "network "+p.String())
		}
		if out, err := vtysh(args...); err != nil {
			t.Fatalf("vtysh: %v: %s", err, out)
		}
	})

	// A fifth prefix, outside the pools, is one more than node3 takes.
	if out, err := vtysh("-c", "configure terminal", "-c", fmt.Sprintf("router bgp %d", lab.ToRAS), "-c", "address-family ipv4 unicast", "-c", "network 192.0.2.0/24"); err != nil {
		t.Fatalf("vtysh: %v: %s", err, out)
	}
	n3 := l.Nodes[2]
	err := lab.WaitFor(30*time.Second, func() error {
		out, err := n3.NS.Run(filepath.Join(binDir, "margayctl"), "node", "status")
		if err != nil {
			return fmt.Errorf("node status: %v: %s", err, out)
		}
		if !regexp.MustCompile(`198\.18\.1\.1 .* maximum prefixes exceeded: the peer sent more than maxPrefixes 4`).MatchString(out) {
			return fmt.Errorf("node3's status does not show the ToR's session closed for maxPrefixes:\n%s", out)
		}
		t.Logf("node3:\n%s", out)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// The others keep their ToR sessions, node3 its mesh.
	for _, n := range l.Nodes {
		out, err := n.NS.Run(filepath.Join(binDir, "margayctl"), "node", "status")
		if err != nil {
			t.Fatalf("node status on %s: %v: %s", n.Name, err, out)
		}
		want := 3
		if n == n3 {
			want = 2
		}
		if got := strings.Count(out, "Established"); got != want {
			t.Errorf("%s has %d established sessions, want %d:\n%s", n.Name, got, want, out)
		}
	}
	checkNotFollowed(t, l, bogus)
	allPairsTCP(t, l)
}

// The same with BIRD as the ToR.
func TestHijackBird(t *testing.T) {
	if _, err := exec.LookPath("bird"); err != nil {
		t.Skip("bird (package bird2) is not installed")
	}
	l := up(t, lab.Options{Nodes: 3, Pools: hijackPools, ToR: "bird", AgentArgs: []string{"--resync-interval", "2s"}})
	hijack(t, l, func(ps []netip.Prefix) {
		if err := l.BirdAnnounce(ps); err != nil {
			t.Fatal(err)
		}
	})
}

// A node that announces another node's block, with the highest local
// preference and the origin that the owner's own path has, and the lowest
// router ID, so that its path is the best on the third node, is not followed
// there: the owner's path is.
func TestHijackMeshNode(t *testing.T) {
	l := up(t, lab.Options{Nodes: 3, Pools: neverPool, AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	rogue, observer, owner := l.Nodes[0], l.Nodes[1], l.Nodes[2]
	blocks, err := nodeBlocks(l, rogue)
	if err != nil {
		t.Fatal(err)
	}
	victim := netip.MustParsePrefix(blocks[owner.Name][0])
	gobgp, err := exec.Command("go", "tool", "-n", "gobgp").Output()
	if err != nil {
		t.Fatalf("build gobgp: %v", err)
	}
	cli := strings.TrimSpace(string(gobgp))
	if out, err := rogue.NS.Run(cli, "global", "rib", "add", victim.String(), "origin", "igp", "local-pref", "4294967295"); err != nil {
		t.Fatalf("gobgp global rib add: %v: %s", err, out)
	}
	peer := rogue.IP.Addr().String()
	for _, n := range []*lab.Node{observer, owner} {
		waitIgnored(t, n, peer, 1)
	}
	// The rogue path is BGP's best on the observer, and not followed there.
	out, err := observer.NS.Run(cli, "global", "rib")
	if err != nil || !regexp.MustCompile(`\*>\s+`+regexp.QuoteMeta(victim.String())+`\s+`+regexp.QuoteMeta(peer)).MatchString(out) {
		t.Errorf("the rogue path is not the best on %s: %v:\n%s", observer.Name, err, out)
	}
	want := fmt.Sprintf("%s via %s", victim, owner.IP.Addr())
	if out := observer.NS.MustRun(t, "ip", "-4", "route", "show", "proto", "77"); !strings.Contains(out, want) {
		t.Errorf("%s does not route %s's block to it (%s):\n%s", observer.Name, owner.Name, want, out)
	}
	if out := owner.NS.MustRun(t, "ip", "-4", "route", "show", "proto", "77"); !strings.Contains(out, "blackhole "+victim.String()) {
		t.Errorf("%s lost the blackhole of its own block:\n%s", owner.Name, out)
	}
	checkIgnoredLog(t, observer, peer, victim, rogue.Name, owner.Name)
	allPairsTCP(t, l)
}

// hijack runs the rogue ToR's part of the tests: announce the bogus
// prefixes, then check that every node got and ignored them. It returns them.
func hijack(t *testing.T, l *lab.Lab, announce func([]netip.Prefix)) []netip.Prefix {
	t.Helper()
	addPods(t, l, 1) // node1 and node2 take the two blocks; node3 borrows
	blocks, err := nodeBlocks(l, l.Nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	n1, n2, n3 := l.Nodes[0], l.Nodes[1], l.Nodes[2]
	if len(blocks[n1.Name]) != 1 || len(blocks[n2.Name]) != 1 || len(blocks[n3.Name]) != 0 {
		t.Fatalf("want one block each on node1 and node2 and none on node3: %v", blocks)
	}
	inner := netip.PrefixFrom(netip.MustParsePrefix(blocks[n1.Name][0]).Addr(), 28)
	borrowed := netip.PrefixFrom(n3.Pods[0].IP, 32)
	bogus := []netip.Prefix{inner, netip.MustParsePrefix(blocks[n2.Name][0]), borrowed, netip.MustParsePrefix("10.246.7.0/26")}
	announce(bogus)
	for _, n := range l.Nodes {
		waitIgnored(t, n, "198.18.1.1", len(bogus))
	}
	checkNotFollowed(t, l, bogus)
	checkIgnoredLog(t, n1, "198.18.1.1", borrowed, "", "node3")
	allPairsTCP(t, l)
	return bogus
}

// checkNotFollowed: no node has a route through the ToR, nor a route for a
// bogus prefix other than its owner's.
func checkNotFollowed(t *testing.T, l *lab.Lab, bogus []netip.Prefix) {
	t.Helper()
	for _, n := range l.Nodes {
		out := n.NS.MustRun(t, "ip", "-4", "route", "show", "proto", "77")
		if strings.Contains(out, "via 198.18.1.1") {
			t.Errorf("%s routes pods through the ToR:\n%s", n.Name, out)
		}
		if strings.Contains(out, bogus[0].String()) || strings.Contains(out, bogus[3].String()) {
			t.Errorf("%s routes %s or %s, which are no node's:\n%s", n.Name, bogus[0], bogus[3], out)
		}
	}
}

// waitIgnored waits until node n's agent counts want paths from peer as
// ignored, now and in total.
func waitIgnored(t *testing.T, n *lab.Node, peer string, want int) {
	t.Helper()
	err := lab.WaitFor(45*time.Second, func() error {
		body, err := n.HTTPGet("127.0.0.1:9091", "/metrics")
		if err != nil {
			return err
		}
		for _, m := range []string{"margay_bgp_ignored_paths_total", "margay_bgp_ignored_paths"} {
			got := metric(body, fmt.Sprintf(`%s{peer=%q}`, m, peer))
			if got != want {
				return fmt.Errorf("%s: %s{peer=%q} = %d, want %d", n.Name, m, peer, got, want)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// noIgnored watches every node for window (longer than the agents' 5 s
// grace) and fails if one reports an ignored path.
func noIgnored(t *testing.T, l *lab.Lab, window time.Duration) {
	t.Helper()
	for start := time.Now(); time.Since(start) < window; time.Sleep(500 * time.Millisecond) {
		for _, n := range l.Nodes {
			body, err := n.HTTPGet("127.0.0.1:9091", "/metrics")
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(body, "\nmargay_bgp_ignored_paths_total{") {
				t.Fatalf("%s reports ignored paths after %v:\n%s", n.Name, time.Since(start).Round(time.Millisecond), body)
			}
		}
	}
}

func metric(body, name string) int {
	for _, line := range strings.Split(body, "\n") {
		if v, ok := strings.CutPrefix(line, name+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return int(f)
		}
	}
	return 0
}

// checkIgnoredLog: node n's log names the peer, the prefix, the node the path
// claims owns it ("" for none) and its real owner.
func checkIgnoredLog(t *testing.T, n *lab.Node, peer string, prefix netip.Prefix, claimant, owner string) {
	t.Helper()
	b, err := os.ReadFile(n.LogPath())
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.Contains(line, "ignoring a BGP path") && strings.Contains(line, `"prefix":"`+prefix.String()+`"`) &&
			strings.Contains(line, `"peer":"`+peer+`"`) && strings.Contains(line, `"claimant":"`+claimant+`"`) && strings.Contains(line, `"owner":"`+owner+`"`) {
			t.Logf("%s: %s", n.Name, line)
			return
		}
	}
	t.Errorf("%s's log has no line ignoring %s from %s, claimed by %q, with owner %s", n.Name, prefix, peer, claimant, owner)
}
