package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
	"github.com/margay-dev/margay/test/nstest"
)

const neverPool = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true}
`

// Three nodes in one subnet, two pods each: every pod reaches every other pod
// (ping and TCP, with the pod's own address as source), each node's kernel holds
// exactly the routes it should, and a pod reaches the internet host as its node.
func TestThreeNodesOneSubnet(t *testing.T) {
	l := up(t, lab.Options{Nodes: 3, Pools: neverPool, AgentArgs: []string{"--resync-interval", "2s"}})
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	waitReady(t, l)
	for _, n := range l.Nodes {
		for i := range 2 {
			if _, err := l.AddPod(ctx, n, fmt.Sprintf("%s-pod%d", n.Name, i)); err != nil {
				t.Fatal(err)
			}
		}
	}
	// Every node routes every other node's block via that node, directly.
	err := lab.WaitFor(30*time.Second, func() error {
		for _, n := range l.Nodes {
			if err := checkRoutes(l, n); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	pods := l.Pods()
	var wg sync.WaitGroup
	errs := make(chan error, len(pods)*len(pods))
	for _, a := range pods {
		wg.Go(func() {
			for _, b := range pods {
				if a != b {
					if err := lab.Ping(a.NS, b.IP, 1); err != nil {
						errs <- err
					}
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// TCP, and no NAT between pods: each server sees the client pod's address.
	allPairsTCP(t, l)
	// Prometheus metrics on 9091.
	metrics, err := l.Nodes[0].HTTPGet("127.0.0.1:9091", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`margay_bgp_peers{state="Established"} 2`, "margay_routes_programmed 5", "margay_ipam_blocks_owned 1", `margay_reconcile_duration_seconds_count{reconciler="routes"}`} {
		if !strings.Contains(metrics, want) {
			t.Errorf("node1's metrics lack %q", want)
		}
	}
	// NAT to the outside: the internet host sees the node's address.
	stop := serve(t, l.Internet, 80)
	defer stop()
	for _, n := range l.Nodes {
		p := n.Pods[0]
		got, err := dial(p.NS, netip.AddrPortFrom(lab.InternetAddr, 80))
		if err != nil || got != n.IP.Addr().String() {
			t.Errorf("pod %s to the internet host: seen as %q, %v; want its node's %s", p.Name, got, err, n.IP.Addr())
		}
	}
}

func waitReady(t *testing.T, l *lab.Lab) {
	t.Helper()
	err := lab.WaitFor(60*time.Second, func() error {
		for _, n := range l.Nodes {
			if err := n.Ready(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// checkRoutes compares node n's margay routes with what they should be: a
// blackhole per own block, a /32 per own pod, and every other node's blocks via
// that node.
func checkRoutes(l *lab.Lab, n *lab.Node) error {
	out, err := n.NS.Run("ip", "-4", "route", "show", "proto", "77")
	if err != nil {
		return err
	}
	var got []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 0 {
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
			case strings.Contains(b, ":"): // IPv6: checkRoutes6
			case m == n:
				want = append(want, "blackhole "+b)
			default:
				want = append(want, fmt.Sprintf("%s via %s dev eth0", b, m.IP.Addr()))
			}
		}
	}
	for _, p := range n.Pods {
		want = append(want, p.IP.String()+" dev "+hostVeth(n, p)+" scope link")
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		return fmt.Errorf("%s's routes:\n%s\nwant:\n%s", n.Name, strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	return nil
}

// hostVeth finds the host end of pod p's veth by its /32 route's device.
func hostVeth(n *lab.Node, p *lab.Pod) string {
	out, _ := n.NS.Run("ip", "-4", "-o", "route", "get", p.IP.String())
	f := strings.Fields(out)
	for i, w := range f {
		if w == "dev" && i+1 < len(f) {
			return f[i+1]
		}
	}
	return "?"
}

// nodeBlocks reads the blocks each node holds from margayctl ipam show.
func nodeBlocks(l *lab.Lab, n *lab.Node) (map[string][]string, error) {
	out, err := l.Ctl(n, "ipam", "show", "--show-blocks", "-o", "json")
	if err != nil {
		return nil, fmt.Errorf("ipam show: %v: %s", err, out)
	}
	return parseBlocks(out)
}

// allPairsTCP connects every pod to every other pod's TCP server; the server
// must see the client's own address.
func allPairsTCP(t *testing.T, l *lab.Lab) {
	t.Helper()
	pods := l.Pods()
	for _, b := range pods {
		stop := serve(t, b.NS, 8080)
		for _, a := range pods {
			if a == b {
				continue
			}
			if got, err := dial(a.NS, netip.AddrPortFrom(b.IP, 8080)); err != nil || got != a.IP.String() {
				t.Errorf("TCP %s -> %s: server saw %q, %v; want the client's own address %s", a.Name, b.Name, got, err, a.IP)
			}
		}
		stop()
	}
}

// serve answers every TCP connection on port with the client's address, from
// inside ns, until stop is called.
func serve(t *testing.T, ns *nstest.NS, port int) (stop func()) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) { ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port)); return err }); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			io.WriteString(c, host)
			c.Close()
		}
	}()
	return func() { ln.Close() }
}

// dial connects from inside ns, over to's family, and returns what the server said.
func dial(ns *nstest.NS, to netip.AddrPort) (string, error) {
	var got []byte
	err := ns.Do(func() error {
		c, err := net.DialTimeout("tcp", to.String(), 3*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(3 * time.Second))
		got, err = io.ReadAll(c)
		return err
	})
	return string(got), err
}

// parseBlocks reads `margayctl ipam show --show-blocks -o json` into node ->
// block CIDRs.
func parseBlocks(js string) (map[string][]string, error) {
	var blocks []struct {
		CIDR     string `json:"cidr"`
		Affinity string `json:"affinity"`
	}
	if err := json.Unmarshal([]byte(js), &blocks); err != nil {
		return nil, fmt.Errorf("ipam show: %v: %s", err, js)
	}
	out := map[string][]string{}
	for _, b := range blocks {
		if b.Affinity != "" {
			out[b.Affinity] = append(out[b.Affinity], b.CIDR)
		}
	}
	return out, nil
}
