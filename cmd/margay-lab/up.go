package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"

	"github.com/margay-dev/margay/bgp"
	"github.com/margay-dev/margay/test/lab"
)

var podName = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$`)

type upOptions struct {
	nodes, subnets, podsPerNode int
	encap, tor, ipFamily        string
}

func (a *app) upCmd() *cobra.Command {
	var o upOptions
	cmd := &cobra.Command{
		Use:   "up",
		Short: "Build the lab and start margay on it; print its BGP sessions and an all-pairs connectivity matrix",
		Args:  nArgs(0),
		RunE: func(*cobra.Command, []string) error {
			switch {
			case o.nodes < 1 || o.nodes > 200:
				return usagef("--nodes %d: give 1 to 200", o.nodes)
			case o.subnets < 1 || o.subnets > o.nodes:
				return usagef("--subnets %d: give 1 to the number of nodes (%d)", o.subnets, o.nodes)
			case o.podsPerNode < 0 || o.podsPerNode > 26:
				return usagef("--pods-per-node %d: give 0 to 26", o.podsPerNode)
			case o.encap != "auto" && o.encap != "ipip" && o.encap != "vxlan" && o.encap != "none":
				return usagef("--encap %q: give auto, ipip, vxlan or none", o.encap)
			case o.tor != "bird" && o.tor != "none":
				return usagef("--tor %q: give bird or none", o.tor)
			case o.ipFamily == "ipv6":
				return usagef("--ip-family ipv6: an IPv6-only lab needs BGP sessions over IPv6, which margay does not have yet; use dual")
			case o.ipFamily != "ipv4" && o.ipFamily != "dual":
				return usagef("--ip-family %q: give ipv4 or dual", o.ipFamily)
			}
			return a.up(o)
		},
	}
	f := cmd.Flags()
	f.IntVar(&o.nodes, "nodes", 4, "nodes")
	f.IntVar(&o.subnets, "subnets", 2, "subnets the nodes are spread over, joined by a router")
	f.IntVar(&o.podsPerNode, "pods-per-node", 2, "pods to add on every node")
	f.StringVar(&o.encap, "encap", "auto", "encapsulation across subnets: auto (IPIP if this kernel has it, else VXLAN), ipip, vxlan or none")
	f.StringVar(&o.tor, "tor", "none", "a BGP ToR in the router that learns the pod blocks: bird or none")
	f.StringVar(&o.ipFamily, "ip-family", "ipv4", "the pods' and nodes' families: ipv4, or dual for an IPv6 address beside each IPv4 one")
	return cmd
}

// progress prefixes each line with the time since the command started.
type progress struct {
	w     io.Writer
	start time.Time
}

func (p *progress) Write(b []byte) (int, error) {
	for _, line := range strings.Split(strings.TrimRight(string(b), "\n"), "\n") {
		fmt.Fprintf(p.w, "[%5.1fs] %s\n", time.Since(p.start).Seconds(), line)
	}
	return len(b), nil
}

func (a *app) up(o upOptions) (err error) {
	p := &progress{w: a.out, start: time.Now()}
	if err := a.lock(); err != nil {
		return err
	}
	st, err := a.load()
	if _, doneErr := os.Stat(a.donePath()); err == nil && st != nil && doneErr == nil && lab.Load(*st).EtcdRunning() {
		return errors.New("a lab is already up: margay-lab status shows it, margay-lab down removes it")
	}
	// What a crashed or killed up left behind.
	if names, _ := lab.Sweep(a.prefix); len(names) > 0 || st != nil || err != nil {
		fmt.Fprintf(p, "removed an earlier lab that did not finish (%d namespaces)", len(names))
	}
	os.RemoveAll(a.stateDir)
	bin, err := binDir()
	if err != nil {
		return err
	}
	mode, why := encapsulation(o.encap)
	fmt.Fprintf(p, "encapsulation: %s", why)
	if mode == "" && o.tor == "none" && o.subnets > 1 {
		fmt.Fprintf(p, "warning: with --encap none and no ToR the router does not know the pods: pods in different subnets will not reach each other")
	}
	pool := labPools(mode, o.ipFamily == "dual")
	if err := os.MkdirAll(a.stateDir, 0o755); err != nil {
		return err
	}
	ctx, cancel := signalContext()
	defer cancel()
	keep := false // a lab that is up but not all reachable stays for a look
	defer func() {
		if err == nil || keep {
			return
		}
		if ctx.Err() != nil {
			err = errors.New("interrupted")
		}
		fmt.Fprintf(p, "%v: removing everything", err)
		if rmErr := a.remove(nil); rmErr != nil {
			err = errors.Join(err, rmErr)
		}
	}()
	tor := o.tor
	if tor == "none" {
		tor = ""
	}
	l, err := lab.Up(ctx, lab.Options{Nodes: o.nodes, Subnets: o.subnets, Bin: bin, Dir: filepath.Join(a.stateDir, "lab"),
		Pools: pool, ToR: tor, DualStack: o.ipFamily == "dual", Detach: true, Log: p})
	if err != nil {
		return err
	}
	defer func() {
		if err != nil && !keep {
			l.Down()
		}
	}()
	if err := a.save(l); err != nil {
		return err
	}
	if err := waitReady(ctx, l); err != nil {
		return err
	}
	fmt.Fprintf(p, "every margay-node is ready")
	for _, n := range l.Nodes {
		for i := range o.podsPerNode {
			if err := ctx.Err(); err != nil {
				return err
			}
			pctx, cancel := context.WithTimeout(ctx, time.Minute)
			_, err := l.AddPod(pctx, n, fmt.Sprintf("%s-%c", n.Name, 'a'+i))
			cancel()
			if err != nil {
				return err
			}
		}
	}
	if err := a.save(l); err != nil {
		return err
	}
	fmt.Fprintln(a.out)
	sessions(ctx, a.out, l)
	fmt.Fprintln(a.out)
	failed := matrix(ctx, a.out, l, 15*time.Second)
	if err := ctx.Err(); err != nil {
		return err
	}
	// From here on the lab is one that up finished, not one a crash left.
	if err := os.WriteFile(a.donePath(), nil, 0o600); err != nil {
		return err
	}
	fmt.Fprintln(a.out)
	fmt.Fprintf(p, "the lab is up (%d nodes, %d pods); try:", len(l.Nodes), len(l.Pods()))
	// The hints name this program as it was called, so they run as shown.
	for _, hint := range []string{"exec node1 -- margayctl node status", "exec node1 -- gobgp global rib", "pod add node1 web", "status", "down"} {
		fmt.Fprintf(a.out, "  %s %s\n", os.Args[0], hint)
	}
	if failed > 0 {
		keep = true
		return fmt.Errorf("%d of the connectivity checks failed; the lab stays up for a look (margay-lab down removes it)", failed)
	}
	return nil
}

// labPools are the lab's pools: 10.244.0.0/16 with the encapsulation field
// mode across subnets (none for Never), and for a dual-stack lab
// fd00:244::/48 too, with VXLAN where the IPv4 pool has IPIP (IPIP carries
// IPv4 only).
func labPools(mode string, dual bool) string {
	pool := func(name, cidr, mode string) string {
		p := fmt.Sprintf("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: %s}\nspec: {cidr: %q, natOutgoing: true", name, cidr)
		if mode != "" {
			p += ", " + mode + ": CrossSubnet"
		}
		return p + "}\n"
	}
	pools := pool("default-ipv4-ippool", "10.244.0.0/16", mode)
	if dual {
		if mode == "ipipMode" {
			mode = "vxlanMode"
		}
		pools += "---\n" + pool("default-ipv6-ippool", "fd00:244::/48", mode)
	}
	return pools
}

// encapsulation is the pool field for --encap and what to say about it.
func encapsulation(choice string) (mode, why string) {
	switch choice {
	case "ipip":
		return "ipipMode", "IPIP across subnets (ipipMode: CrossSubnet)"
	case "vxlan":
		return "vxlanMode", "VXLAN across subnets (vxlanMode: CrossSubnet)"
	case "none":
		return "", "none (every pool mode Never)"
	}
	if kernelHasIPIP() {
		return "ipipMode", "auto: this kernel has IPIP, so IPIP across subnets (ipipMode: CrossSubnet)"
	}
	return "vxlanMode", "auto: this kernel has no IPIP module, so VXLAN across subnets (vxlanMode: CrossSubnet)"
}

// kernelHasIPIP reports whether the running kernel has IPIP loaded, built in
// or as a module it can load.
func kernelHasIPIP() bool {
	if _, err := os.Stat("/sys/module/ipip"); err == nil {
		return true
	}
	var u unix.Utsname
	if unix.Uname(&u) != nil {
		return false
	}
	dir := filepath.Join("/lib/modules", unix.ByteSliceToString(u.Release[:]))
	if m, _ := filepath.Glob(filepath.Join(dir, "kernel/net/ipv4/ipip.ko*")); len(m) > 0 {
		return true
	}
	b, _ := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	return strings.Contains(string(b), "kernel/net/ipv4/ipip.ko")
}

func waitReady(ctx context.Context, l *lab.Lab) error {
	deadline := time.Now().Add(time.Minute)
	for _, n := range l.Nodes {
		for {
			err := n.Ready()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				return fmt.Errorf("margay-node on %s: %w (its log: %s)", n.Name, err, n.LogPath())
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// sessions prints every node's BGP sessions, read from its agent's GoBGP API.
func sessions(ctx context.Context, w io.Writer, l *lab.Lab) {
	fmt.Fprintln(w, "BGP sessions:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tPEER ADDRESS\tPEER TYPE\tSTATE\tSINCE\tINFO")
	now := time.Now()
	for _, n := range l.Nodes {
		cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		peers, err := bgp.ListPeers(cctx, "127.0.0.1:50051", grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			var c net.Conn
			err := n.NS.Do(func() (err error) {
				// The socket is made on this thread, so it lives in the node's namespace.
				var d net.Dialer
				c, err = d.DialContext(ctx, "tcp", addr)
				return err
			})
			return c, err
		}))
		cancel()
		if err != nil {
			fmt.Fprintf(tw, "%s\t-\t-\t-\t-\tmargay-node's BGP API: %v\n", n.Name, err)
			continue
		}
		for _, p := range peers {
			r := bgp.DescribePeer(p, now)
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", n.Name, r.Address, r.Type, r.State, r.Since, r.Info)
		}
	}
	tw.Flush()
}

// matrix pings every pod and the internet host from every pod, one packet at a
// time, retrying a failed pair for up to wait (new pods take a moment to be
// routed everywhere), and prints the results. In a dual-stack lab every
// target is pinged at its IPv6 address too. It returns how many failed.
func matrix(ctx context.Context, w io.Writer, l *lab.Lab, wait time.Duration) int {
	pods := l.Pods()
	type target struct {
		name string
		addr netip.Addr
	}
	var targets, targets6 []target
	for _, p := range pods {
		targets = append(targets, target{p.Name, p.IP})
		if p.IP6.IsValid() {
			targets6 = append(targets6, target{p.Name + " v6", p.IP6})
		}
	}
	targets = append(targets, target{"internet", lab.InternetAddr})
	if len(targets6) > 0 {
		targets = append(append(targets, targets6...), target{"internet v6", lab.InternetAddr6})
	}
	cells := make([][]string, len(pods))
	failed := 0
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i, src := range pods {
		cells[i] = make([]string, len(targets))
		wg.Go(func() {
			for j, t := range targets {
				if t.addr == src.IP || t.addr == src.IP6 {
					cells[i][j] = "·"
					continue
				}
				rtt, ok := ping(ctx, src, t.addr, wait)
				cells[i][j] = "✓ " + rtt
				if !ok {
					cells[i][j] = "✗"
					mu.Lock()
					failed++
					mu.Unlock()
				}
			}
		})
	}
	wg.Wait()
	fmt.Fprintln(w, "Connectivity (ping from each row's pod to each column; · is the pod itself):")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	header := "FROM \\ TO"
	for _, t := range targets {
		header += "\t" + t.name
	}
	fmt.Fprintln(tw, header)
	for i, src := range pods {
		fmt.Fprintln(tw, src.Name+"\t"+strings.Join(cells[i], "\t"))
	}
	tw.Flush()
	self := len(pods) * (1 + min(len(targets6), 1)) // a pod's own addresses
	total := len(pods) * len(targets)
	fmt.Fprintf(w, "%d of %d reachable\n", total-self-failed, total-self)
	return failed
}

// ping sends one echo request at a time from the pod until one is answered
// (within 1 s) or wait has passed; it returns the round-trip time.
func ping(ctx context.Context, p *lab.Pod, addr netip.Addr, wait time.Duration) (string, bool) {
	deadline := time.Now().Add(wait)
	for {
		out, err := p.NS.Run("ping", "-c", "1", "-W", "1", "-n", addr.String())
		if err == nil {
			if i := strings.Index(out, "time="); i >= 0 {
				return strings.Fields(out[i+len("time="):])[0] + "ms", true
			}
			return "", true
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return "", false
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (a *app) statusCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Print the lab's BGP sessions and connectivity matrix again",
		Args:  nArgs(0),
		RunE: func(*cobra.Command, []string) error {
			l, err := a.mustLoad()
			if err != nil {
				return err
			}
			ctx, cancel := signalContext()
			defer cancel()
			for _, n := range l.Nodes {
				if !n.Running() {
					fmt.Fprintf(a.out, "margay-node on %s is not running (its log: %s)\n", n.Name, n.LogPath())
				}
			}
			sessions(ctx, a.out, l)
			fmt.Fprintln(a.out)
			// A pod added a moment ago is let out once its agent has seen it.
			if failed := matrix(ctx, a.out, l, 3*time.Second); failed > 0 {
				return fmt.Errorf("%d of the connectivity checks failed", failed)
			}
			return nil
		},
	}
}
