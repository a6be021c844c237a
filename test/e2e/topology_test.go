package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
)

// Five nodes, the node-to-node mesh off, node1 a route reflector that every
// other node peers with (one BGPPeer with a peerSelector): every pod pair still
// connects, and a client has exactly one session, to the reflector. Every node
// also peers with a BIRD ToR over eBGP, which learns each block from its own
// node only: the reflector reflects to its iBGP peers, not to the ToR.
func TestRouteReflector(t *testing.T) {
	pools := neverPool + `---
apiVersion: margay.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {nodeToNodeMeshEnabled: false}
---
apiVersion: margay.dev/v1
kind: Node
metadata: {name: node1, labels: {route-reflector: "true"}}
spec: {bgp: {ipv4Address: 198.18.1.2/24, routeReflectorClusterID: 224.0.0.1}}
---
apiVersion: margay.dev/v1
kind: BGPPeer
metadata: {name: peer-with-reflectors}
spec: {nodeSelector: all(), peerSelector: "route-reflector == 'true'"}
`
	l := up(t, lab.Options{Nodes: 5, Pools: pools, ToR: "bird", AgentArgs: []string{"--resync-interval", "2s"}})
	addPods(t, l, 1)
	pods := l.Pods()
	err := lab.WaitFor(30*time.Second, func() error {
		for _, a := range pods {
			for _, b := range pods {
				if a != b {
					if err := lab.Ping(a.NS, b.IP, 1); err != nil {
						return err
					}
				}
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	want := allBlocks(t, l)
	err = lab.WaitFor(30*time.Second, func() error {
		out, err := l.Router.Run("birdc", "-s", l.BirdSocket(), "show", "route")
		if err != nil {
			return fmt.Errorf("birdc: %v: %s", err, out)
		}
		return sameRoutes(birdRoutes(out), want)
	})
	if err != nil {
		t.Error(err)
	}
	out, err := l.Nodes[3].NS.Run(binDir+"/margayctl", "node", "status")
	if err != nil || strings.Count(out, "Established") != 2 || !strings.Contains(out, "198.18.1.2") {
		t.Errorf("node4's sessions: %v\n%s\nwant two, to the reflector 198.18.1.2 and the ToR", err, out)
	}
	out, _ = l.Nodes[0].NS.Run(binDir+"/margayctl", "node", "status")
	if strings.Count(out, "Established") != 5 {
		t.Errorf("the reflector's sessions:\n%s\nwant 5: four clients and the ToR", out)
	}
}

// A node whose pool has no block left for it borrows an address from another
// node's block: it advertises the /32, the others route it to the borrower, and
// traffic to that pod works from every node.
func TestBorrowedAddress(t *testing.T) {
	pools := `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: tiny}
spec: {cidr: 10.244.0.0/26, blockSize: 26, natOutgoing: true}
`
	l := up(t, lab.Options{Nodes: 3, Pools: pools, AgentArgs: []string{"--resync-interval", "2s"}})
	waitReady(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	a, err := l.AddPod(ctx, l.Nodes[0], "owner") // node1 claims the only block
	if err != nil {
		t.Fatal(err)
	}
	b, err := l.AddPod(ctx, l.Nodes[1], "borrower") // node2 must borrow from it
	if err != nil {
		t.Fatal(err)
	}
	c, err := l.AddPod(ctx, l.Nodes[2], "third")
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("%s via %s", b.IP, l.Nodes[1].IP.Addr())
	err = lab.WaitFor(30*time.Second, func() error {
		for _, n := range []*lab.Node{l.Nodes[0], l.Nodes[2]} {
			out, _ := n.NS.Run("ip", "-4", "route", "show", "proto", "77")
			if !strings.Contains(out, want) {
				return fmt.Errorf("%s does not route the borrowed %s to node2:\n%s", n.Name, b.IP, out)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, from := range []*lab.Pod{a, c} {
		if err := lab.Ping(from.NS, b.IP, 2); err != nil {
			t.Error(err)
		}
		if err := lab.Ping(b.NS, from.IP, 2); err != nil {
			t.Error(err)
		}
	}
	// The borrowed /32 is withdrawn when its pod goes.
	if err := l.DelPod(ctx, b); err != nil {
		t.Fatal(err)
	}
	err = lab.WaitFor(10*time.Second, func() error {
		for _, n := range []*lab.Node{l.Nodes[0], l.Nodes[2]} {
			if out, _ := n.NS.Run("ip", "-4", "route", "show", "proto", "77"); strings.Contains(out, want) {
				return fmt.Errorf("%s still routes the released %s:\n%s", n.Name, b.IP, out)
			}
		}
		return nil
	})
	if err != nil {
		t.Error(err)
	}
	// The /32's path outlived its WorkloadEndpoint for a moment, and was not
	// followed then: no node takes that for a hijack.
	noIgnored(t, l, 8*time.Second)
}
