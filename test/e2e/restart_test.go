package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
)

// An agent restarting (SIGTERM, then SIGKILL) under a steady ping stream across
// nodes loses no packet: routes stay in the kernel, and graceful restart keeps the
// peers' routes to the restarting node. A node removed for good has its routes
// withdrawn on the others.
func TestAgentRestartLosesNothing(t *testing.T) {
	l := up(t, lab.Options{Nodes: 3, Pools: neverPool, AgentArgs: []string{"--resync-interval", "1s"}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	waitReady(t, l)
	a, err := l.AddPod(ctx, l.Nodes[0], "a")
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddPod(ctx, l.Nodes[1], "b")
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.AddPod(ctx, l.Nodes[2], "c")
	if err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(30*time.Second, func() error { return lab.Ping(a.NS, b.IP, 1) }); err != nil {
		t.Fatal(err)
	}
	restartUnderPing(t, l, a, []netip.Addr{b.IP}, l.Nodes[1], time.Second)
	// node3 leaves for good: its agent dies and its Node is deleted; the others
	// drop its block.
	blocks, err := nodeBlocks(l, l.Nodes[0])
	if err != nil {
		t.Fatal(err)
	}
	// Killed, the agent cannot give up its claim on the name: the delete is
	// refused until the claim expires, then releases node3's pod and block.
	l.Nodes[2].Stop(syscall.SIGKILL)
	if out, err := l.Ctl(l.Nodes[0], "delete", "node", "node3"); err == nil || !strings.Contains(out, "running margay-node") {
		t.Errorf("delete of node3 right after its agent was killed: %v: %s; want a refusal while its claim lasts", err, out)
	}
	var deleted string
	if err := lab.WaitFor(30*time.Second, func() error {
		out, err := l.Ctl(l.Nodes[0], "delete", "node", "node3")
		deleted = out
		return err
	}); err != nil {
		t.Fatalf("delete node3: %v", err)
	}
	if !strings.Contains(deleted, "released its 1 address and 1 block") {
		t.Errorf("delete node3: %s; want its pod's address and its block released", deleted)
	}
	start := time.Now()
	err = lab.WaitFor(90*time.Second, func() error {
		for _, n := range l.Nodes[:2] {
			out, _ := n.NS.Run("ip", "-4", "route", "show", "proto", "77")
			for _, blk := range blocks["node3"] {
				if strings.Contains(out, blk) {
					return fmt.Errorf("%s still routes node3's %s:\n%s", n.Name, blk, out)
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("node3's routes withdrawn on the others %s after its Node was deleted", time.Since(start).Round(10*time.Millisecond))
	if err := lab.Ping(a.NS, c.IP, 1); err == nil {
		t.Errorf("pod c on the removed node3 still answers")
	}
}

// The same across subnets through VXLAN: the restarted agent keeps the
// device's neighbour and forwarding entries until BGP has converged.
func TestAgentRestartVXLAN(t *testing.T) {
	l := up(t, lab.Options{Nodes: 4, Subnets: 2, Pools: encapPool("vxlanMode: CrossSubnet")})
	addPods(t, l, 1)
	a, b := l.Nodes[0].Pods[0], l.Nodes[1].Pods[0]
	if err := lab.WaitFor(30*time.Second, func() error { return lab.Ping(a.NS, b.IP, 1) }); err != nil {
		t.Fatal(err)
	}
	restartUnderPing(t, l, a, []netip.Addr{b.IP}, l.Nodes[1], 3*time.Second)
}

// The same in a dual-stack lab with VXLAN for both families: graceful
// restart keeps the peers' IPv6 routes too, and the restarted agent keeps
// vxlan-v6.margay's entries beside vxlan.margay's. Pod a pings pod b across
// the subnets over both families at once.
func TestAgentRestartDualStack(t *testing.T) {
	l := up(t, lab.Options{Nodes: 4, Subnets: 2, Pools: vxlanDualPools, DualStack: true})
	addPods(t, l, 1)
	a, b := l.Nodes[0].Pods[0], l.Nodes[1].Pods[0]
	for _, dst := range []netip.Addr{b.IP, b.IP6} {
		if err := lab.WaitFor(30*time.Second, func() error { return lab.Ping(a.NS, dst, 1) }); err != nil {
			t.Fatal(err)
		}
	}
	restartUnderPing(t, l, a, []netip.Addr{b.IP, b.IP6}, l.Nodes[1], 3*time.Second)
}

// restartUnderPing restarts n's agent, by SIGTERM and then by SIGKILL, while
// pod a pings each of dsts every 10 ms, and checks that no ping is lost. The
// agent is down for the given time.
func restartUnderPing(t *testing.T, l *lab.Lab, a *lab.Pod, dsts []netip.Addr, n *lab.Node, down time.Duration) {
	t.Helper()
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGKILL} {
		// 1200 pings 10 ms apart: 12 s, bounded by ping's own deadline.
		type result struct {
			dst netip.Addr
			out string
			err error
		}
		done := make(chan result, len(dsts))
		for _, dst := range dsts {
			go func() {
				out, err := a.NS.Run("ping", "-q", "-i", "0.01", "-c", "1200", "-w", "30", dst.String())
				done <- result{dst, out, err}
			}()
		}
		time.Sleep(2 * time.Second)
		n.Stop(sig)
		time.Sleep(down)
		if err := n.Start(); err != nil {
			t.Fatal(err)
		}
		for range dsts {
			r := <-done
			loss := regexp.MustCompile(`(\d+) received`).FindStringSubmatch(r.out)
			if r.err != nil || len(loss) < 2 || loss[1] != "1200" {
				t.Errorf("pings to %s across the %v restart of %s's agent: %v\n%s", r.dst, sig, n.Name, r.err, r.out)
			} else {
				t.Logf("%v restart, pings to %s: %s", sig, r.dst, strings.TrimSpace(r.out[strings.LastIndex(r.out, "---"):]))
			}
		}
		waitReady(t, l)
	}
}
