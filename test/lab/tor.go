package lab

import (
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
)

// ToRAS is the AS of the lab's ToR; the nodes keep margay's default, 64512.
const ToRAS = 65000

// Gateway is the router's address on n's subnet.
func (n *Node) Gateway() netip.Addr { return n.IP.Masked().Addr().Next() }

// torPeers is a BGPPeer for each node to the router on its subnet.
func (l *Lab) torPeers() string {
	var b strings.Builder
	for _, n := range l.Nodes {
		fmt.Fprintf(&b, "---\napiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: tor-%s}\nspec: {node: %s, peerIP: %s, asNumber: %d}\n",
			n.Name, n.Name, n.Gateway(), ToRAS)
	}
	return b.String()
}

// BirdSocket is birdc's control socket for the BIRD ToR.
func (l *Lab) BirdSocket() string { return filepath.Join(l.opts.Dir, "bird.ctl") }

func (l *Lab) birdConfPath() string { return filepath.Join(l.opts.Dir, "bird.conf") }

// writeBirdConf writes the BIRD ToR's configuration: an eBGP session with
// every node, from the router's address on the node's subnet. It imports the
// nodes' routes into the router's kernel, so that the router forwards pod
// traffic when no pool encapsulates, and exports to the nodes only the
// prefixes it announces of its own (none but in a test of a rogue ToR). In a
// dual-stack lab each session carries IPv6 unicast too (MP-BGP over the IPv4
// session, as the nodes send it).
func (l *Lab) writeBirdConf(announce []netip.Prefix) error {
	families := []string{"ipv4"}
	if l.opts.DualStack {
		families = append(families, "ipv6")
	}
	conf := "router id 198.18.1.1;\nprotocol device {}\n"
	for _, f := range families {
		conf += fmt.Sprintf("protocol kernel { %s { export where source != RTS_STATIC; }; }\n", f)
		var routes []string
		for _, p := range announce {
			if p.Addr().Is6() == (f == "ipv6") {
				routes = append(routes, fmt.Sprintf("  route %s blackhole;\n", p))
			}
		}
		if len(routes) > 0 {
			conf += fmt.Sprintf("protocol static announced_%s {\n  %s;\n%s}\n", f, f, strings.Join(routes, ""))
		}
	}
	for _, n := range l.Nodes {
		conf += fmt.Sprintf("protocol bgp %s {\n  local %s as %d;\n  neighbor %s as 64512;\n  connect retry time 2;\n", n.Name, n.Gateway(), ToRAS, n.IP.Addr())
		for _, f := range families {
			conf += fmt.Sprintf("  %s { import all; export where source = RTS_STATIC; };\n", f)
		}
		conf += "}\n"
	}
	return os.WriteFile(l.birdConfPath(), []byte(conf), 0o644)
}

// BirdAnnounce makes the BIRD ToR announce exactly prefixes to every node, as
// its own routes.
func (l *Lab) BirdAnnounce(prefixes []netip.Prefix) error {
	if err := l.writeBirdConf(prefixes); err != nil {
		return err
	}
	if out, err := l.Router.Run("birdc", "-s", l.BirdSocket(), "configure"); err != nil || !strings.Contains(out, "Reconfigured") {
		return fmt.Errorf("birdc configure: %v: %s", err, out)
	}
	return nil
}

// startBird runs BIRD as the ToR in the router namespace (writeBirdConf).
func (l *Lab) startBird() error {
	bird, err := exec.LookPath("bird")
	if err != nil {
		return fmt.Errorf("the BIRD ToR needs bird (apt-get install bird2)")
	}
	if err := l.writeBirdConf(nil); err != nil {
		return err
	}
	l.bird, err = startProc([]string{"ip", "netns", "exec", l.Router.Name, bird, "-f", "-c", l.birdConfPath(), "-s", l.BirdSocket(),
		"-P", filepath.Join(l.opts.Dir, "bird.pid")}, filepath.Join(l.opts.Dir, "bird.log"), l.opts.Detach)
	if err != nil {
		return fmt.Errorf("start bird: %w", err)
	}
	l.logf("started BIRD as the ToR (AS %d) in the router", ToRAS)
	return nil
}
