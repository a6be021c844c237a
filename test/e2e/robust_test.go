package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/margay-dev/margay/test/lab"
)

// Someone flushes margay's chains, deletes a route it programmed and empties
// one of its ipsets, in both families of a dual-stack node: all is back
// within the resync interval (2 s here).
func TestDriftRepair(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, Pools: dualNATPools, DualStack: true, AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	n := l.Nodes[0]
	remoteVia := func(family string, via netip.Addr) string {
		t.Helper()
		remote := ""
		err := lab.WaitFor(30*time.Second, func() error {
			out, _ := n.NS.Run("ip", family, "route", "show", "proto", "77")
			for _, line := range strings.Split(out, "\n") {
				if strings.Contains(line, "via "+via.String()+" ") {
					remote = strings.Fields(line)[0]
					return nil
				}
			}
			return fmt.Errorf("no route via node2 yet:\n%s", out)
		})
		if err != nil {
			t.Fatal(err)
		}
		return remote
	}
	remote, remote6 := remoteVia("-4", l.Nodes[1].IP.Addr()), remoteVia("-6", l.Nodes[1].IP6.Addr())
	// The pod's own rules come in a later pass than its route: the state to
	// restore is the one with them.
	err := lab.WaitFor(30*time.Second, func() error {
		for _, save := range []string{"iptables-save", "ip6tables-save"} {
			if rules, _ := n.NS.Run(save); !strings.Contains(rules, "-A MGY-TO-WL -o mgy") {
				return fmt.Errorf("no rules for the pod yet in %s:\n%s", save, rules)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	state := func() string {
		var keep []string
		for _, save := range []string{"iptables-save", "ip6tables-save"} {
			rules, _ := n.NS.Run(save)
			for _, line := range strings.Split(rules, "\n") {
				if strings.Contains(line, "MGY") {
					keep = append(keep, save+": "+line)
				}
			}
		}
		routes, _ := n.NS.Run("ip", "-4", "route", "show", "proto", "77")
		routes6, _ := n.NS.Run("ip", "-6", "route", "show", "proto", "77")
		routes += "\n" + routes6
		var sets []string
		n.NS.Do(func() error {
			for _, name := range []string{"mgy-all-pools", "mgy-masq-pools", "mgy-all-hosts", "mgy-all-pools-v6", "mgy-masq-pools-v6", "mgy-all-hosts-v6"} {
				r, err := netlink.IpsetList(name)
				if err != nil {
					sets = append(sets, name+": "+err.Error())
					continue
				}
				sets = append(sets, fmt.Sprintf("%s: %d members", name, len(r.Entries)))
			}
			return nil
		})
		return strings.Join(keep, "\n") + "\n" + routes + "\n" + strings.Join(sets, "\n")
	}
	before := state()
	for _, c := range [][]string{
		{"iptables", "-F", "MGY-FORWARD"},
		{"iptables", "-t", "nat", "-F", "MGY-POSTROUTING"},
		{"iptables", "-D", "INPUT", "-j", "MGY-INPUT"},
		{"ip", "route", "del", remote},
		{"ip6tables", "-F", "MGY-FORWARD"},
		{"ip6tables", "-t", "nat", "-F", "MGY-POSTROUTING"},
		{"ip6tables", "-D", "INPUT", "-j", "MGY-INPUT"},
		{"ip", "-6", "route", "del", remote6},
	} {
		n.NS.MustRun(t, c...)
	}
	if err := n.NS.Do(func() error {
		return errors.Join(netlink.IpsetFlush("mgy-all-pools"), netlink.IpsetFlush("mgy-all-pools-v6"))
	}); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	err = lab.WaitFor(5*time.Second, func() error {
		if got := state(); got != before {
			return fmt.Errorf("not repaired:\n%s\nwant:\n%s", got, before)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("repaired in %s", time.Since(start).Round(10*time.Millisecond))
	// margay-node cleanup takes it all away once the agent is stopped.
	n.Stop(syscall.SIGTERM)
	if out, err := n.NS.Run(filepath.Join(binDir, "margay-node"), "cleanup"); err != nil {
		t.Fatalf("cleanup: %v: %s", err, out)
	}
	if got := state(); strings.Contains(got, "MGY") || strings.Contains(got, "via") || strings.Contains(got, "members") {
		t.Errorf("after margay-node cleanup:\n%s", got)
	}
}

// etcd goes away for 30 s: pods on different nodes keep talking, the agents say
// they are not ready and why, and they recover by themselves.
func TestEtcdDown(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, Pools: neverPool, AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	a, b := l.Nodes[0].Pods[0], l.Nodes[1].Pods[0]
	if err := lab.WaitFor(30*time.Second, func() error { return lab.Ping(a.NS, b.IP, 1) }); err != nil {
		t.Fatal(err)
	}
	l.Etcd.Stop()
	down := time.Now()
	err := lab.WaitFor(20*time.Second, func() error {
		err := l.Nodes[0].Ready()
		if err == nil || !strings.Contains(err.Error(), "datastore") {
			return fmt.Errorf("node1 still ready, or not for the datastore: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
	for time.Since(down) < 30*time.Second {
		if err := lab.Ping(a.NS, b.IP, 2); err != nil {
			t.Fatalf("%s into the outage: %v", time.Since(down).Round(time.Second), err)
		}
		time.Sleep(time.Second)
	}
	if err := l.Etcd.Restart(); err != nil {
		t.Fatal(err)
	}
	waitReady(t, l)
	for _, n := range l.Nodes {
		if !n.Running() {
			t.Errorf("%s's agent exited during the outage", n.Name)
		}
	}
	// And it works again: a new pod is routed.
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := l.AddPod(ctx, l.Nodes[1], "after")
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(20*time.Second, func() error { return lab.Ping(a.NS, c.IP, 1) }); err != nil {
		t.Error(err)
	}
}

// Mistakes get clear errors and no crash loop: a second agent with a node's
// address or name refuses to start and says why; a BGPPeer with a bad AS is
// refused; a peer that never answers shows in node status and readiness but
// does not keep the node unready past the grace period.
func TestMisconfiguration(t *testing.T) {
	l := up(t, lab.Options{Nodes: 2, Pools: neverPool, AgentArgs: []string{"--resync-interval", "2s"}})
	waitReady(t, l)
	agent := func(n *lab.Node, name string) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		out, err := exec.CommandContext(ctx, "ip", "netns", "exec", n.NS.Name, filepath.Join(binDir, "margay-node"),
			"--nodename", name, "--etcd-endpoints", l.Endpoint(), "--health-listen", "", "--metrics-listen", "",
			"--bgp-api-listen", "", "--mtu-file", "").CombinedOutput()
		return string(out), err
	}
	if out, err := agent(l.Nodes[1], "node9"); err == nil || !strings.Contains(out, `node IP 198.18.1.3 is already used by node "node2"`) {
		t.Errorf("a second agent with node2's address: %v\n%s", err, out)
	}
	if out, err := agent(l.Nodes[1], "node1"); err == nil || !strings.Contains(out, `node name "node1" is in use by a running margay-node at 198.18.1.2`) {
		t.Errorf("a second agent named node1: %v\n%s", err, out)
	}
	// A second agent on the same host, as the same node: refused before it
	// touches the node, by the health port the first holds.
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	dup, err := exec.CommandContext(ctx, "ip", "netns", "exec", l.Nodes[0].NS.Name, filepath.Join(binDir, "margay-node"),
		"--nodename", "node1", "--etcd-endpoints", l.Endpoint(), "--mtu-file", "").CombinedOutput()
	cancel()
	if err == nil || !strings.Contains(string(dup), "is another margay-node running on this host?") {
		t.Errorf("a second agent on node1's host: %v\n%s", err, dup)
	}
	if err := l.Nodes[0].Ready(); err != nil || !l.Nodes[0].Running() {
		t.Errorf("node1's agent after the second one was refused: %v", err)
	}
	if out, err := apply(l, "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: bad}\nspec: {peerIP: 198.18.1.1, asNumber: 4294967296}\n"); err == nil || !strings.Contains(out, "asNumber 4294967296 is out of range") {
		t.Errorf("a BGPPeer with AS 4294967296: %v: %s", err, out)
	}
	out, err := apply(l, "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: silent}\nspec: {peerIP: 198.18.1.99, asNumber: 65099}\n---\n"+
		"apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: secret}\nspec: {peerIP: 198.18.1.98, asNumber: 65098, password: not-the-right-one}\n")
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	n := l.Nodes[0]
	err = lab.WaitFor(10*time.Second, func() error {
		out, _ := n.NS.Run(filepath.Join(binDir, "margayctl"), "node", "status")
		if !strings.Contains(out, "198.18.1.99") || !strings.Contains(out, "global (silent)") || strings.Contains(strings.Split(out[strings.Index(out, "198.18.1.99"):], "\n")[0], "Established") {
			return fmt.Errorf("node status:\n%s", out)
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
	out, _ = n.NS.Run(filepath.Join(binDir, "margayctl"), "node", "status")
	t.Logf("with a silent peer:\n%s", out)
	if !strings.Contains(out, "TCP MD5 password set: check it matches the peer's") {
		t.Errorf("node status does not point at the password of the passworded peer:\n%s", out)
	}
	// Readiness names the silent peer while the agent gives peers their grace
	// period, then stops waiting for it.
	if err := n.Ready(); err != nil && !strings.Contains(err.Error(), "198.18.1.99") {
		t.Errorf("node1 not ready for another reason than the silent peer: %v", err)
	}
	if err := lab.WaitFor(40*time.Second, n.Ready); err != nil {
		t.Errorf("the silent peer keeps node1 unready: %v", err)
	}
	if !n.Running() {
		t.Error("node1's agent exited")
	}
}
