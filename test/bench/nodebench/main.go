// Command nodebench measures margay-node in the namespace lab. It needs root and
// iperf3.
//
//	go run ./test/bench/nodebench [-runs 3] [-seconds 5] [-big 21] [-cases direct,direct-v6,vxlan,vxlan-v6,ipip,convergence]
//
// It prints:
//   - cross-node pod-to-pod TCP throughput (iperf3, 1 and 4 streams) as a ratio to
//     node-to-node throughput measured in the same run over the same underlay:
//     direct routing in one subnet and VXLAN across two, each for IPv4 and for
//     IPv6 in a dual-stack lab, and IPIP across two (in the kernel VM of
//     test/vm when this kernel lacks it);
//   - convergence: from the start of the CNI ADD that claims a new block on one
//     node until the block's route is in the kernel of every other node (netlink
//     events), in a 3-node lab and a big one;
//   - each agent's resident memory in the big lab, where every node has big-1 peers.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/lab"
	"github.com/margay-dev/margay/test/vm"
)

const pools = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true}
`

const dualPools = pools + `---
apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods-v6}
spec: {cidr: "fd00:244::/48"}
`

func main() {
	runs := flag.Int("runs", 3, "iperf3 runs per path and stream count; the median is reported")
	seconds := flag.Int("seconds", 5, "seconds per iperf3 run")
	big := flag.Int("big", 21, "nodes in the big lab (convergence and memory)")
	cases := flag.String("cases", "direct,direct-v6,vxlan,vxlan-v6,ipip,convergence", "what to measure, comma-separated")
	binFlag := flag.String("bin", "", "directory of prebuilt margay binaries (default: build them)")
	flag.Parse()
	if os.Geteuid() != 0 {
		log.Fatal("nodebench needs root: it makes network namespaces")
	}
	if _, err := exec.LookPath("iperf3"); err != nil {
		log.Fatal("nodebench needs iperf3 (apt-get install iperf3)")
	}
	bin := *binFlag
	if bin == "" {
		var err error
		if bin, err = os.MkdirTemp("", "margay-nodebench-"); err != nil {
			log.Fatal(err)
		}
		defer os.RemoveAll(bin)
		if err := build(bin, "./cmd/margay-node", "./cmd/margay", "./cmd/margay-ipam", "./cmd/margayctl"); err != nil {
			log.Fatal(err)
		}
	}
	fmt.Printf("margay-node benchmarks, %s\n\n", time.Now().UTC().Format("2006-01-02"))
	for _, c := range strings.Split(*cases, ",") {
		var err error
		switch c {
		case "direct":
			err = throughput(bin, "direct routing, one subnet", 1, pools, false, 0.9, *runs, *seconds)
		case "direct-v6":
			err = throughput(bin, "IPv6, direct routing, one subnet", 1, dualPools, true, 0.9, *runs, *seconds)
		case "vxlan":
			err = throughput(bin, "VXLAN, across two subnets", 2, vxlanPool, false, 0.7, *runs, *seconds)
		case "vxlan-v6":
			err = throughput(bin, "IPv6 VXLAN, across two subnets", 2, vxlanDualPools, true, 0.7, *runs, *seconds)
		case "ipip":
			if _, statErr := os.Stat("/sys/module/ipip"); statErr != nil {
				err = inVM(*runs, *seconds) // this kernel has no IPIP
				break
			}
			err = throughput(bin, "IPIP, across two subnets", 2, ipipPool, false, 0.7, *runs, *seconds)
		case "convergence":
			for _, n := range []int{3, *big} {
				if err = convergence(bin, n); err != nil {
					break
				}
			}
		default:
			err = fmt.Errorf("unknown case %q in -cases", c)
		}
		if err != nil {
			log.Fatal(err)
		}
	}
}

// build builds static binaries of the packages into dir: static, so that they
// run in the kernel VM too.
func build(dir string, pkgs ...string) error {
	cmd := exec.Command("go", append([]string{"build", "-o", dir + "/"}, pkgs...)...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("go build: %v\n%s", err, out)
	}
	return nil
}

// inVM runs the IPIP case in the kernel VM (test/vm), whose kernel has IPIP:
// this program, the binaries and etcd go in, iperf3 from the host, and both
// sides of the ratio are measured inside the same VM.
func inVM(runs, seconds int) error {
	dir, err := os.MkdirTemp("", "margay-nodebench-vm-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := build(dir, "./cmd/margay-node", "./cmd/margay", "./cmd/margay-ipam", "./cmd/margayctl",
		"./test/etcdtest/etcdserver", "./test/bench/nodebench"); err != nil {
		return err
	}
	files := map[string]string{"/etc/protocols": "/etc/protocols"}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		files["/margay/bin/"+e.Name()] = filepath.Join(dir, e.Name())
	}
	iperf, _ := exec.LookPath("iperf3")
	fmt.Println("IPIP: this kernel has none, so the case runs in the kernel VM (qemu TCG: absolute figures are the emulator's, the ratio is the finding)")
	return vm.Run(context.Background(), vm.Options{
		Files: files,
		Tools: []string{iperf},
		Command: []string{"/margay/bin/nodebench", "-bin", "/margay/bin", "-cases", "ipip",
			"-runs", strconv.Itoa(runs), "-seconds", strconv.Itoa(seconds)},
		Env:     []string{etcdtest.ServerEnv + "=/margay/bin/etcdserver"},
		Timeout: 10 * time.Minute,
	})
}

// vxlanPool and ipipPool encapsulate between subnets.
const (
	vxlanPool = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true, vxlanMode: CrossSubnet}
`
	ipipPool = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true, ipipMode: CrossSubnet}
`
	vxlanDualPools = vxlanPool + `---
apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods-v6}
spec: {cidr: "fd00:244::/48", natOutgoing: true, vxlanMode: CrossSubnet}
`
)

func up(bin string, nodes, subnets int, pool string, dual bool) (*lab.Lab, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, lab.Options{Nodes: nodes, Subnets: subnets, Bin: bin, Pools: pool, DualStack: dual})
	if err != nil {
		return nil, err
	}
	err = lab.WaitFor(2*time.Minute, func() error {
		for _, n := range l.Nodes {
			if err := n.Ready(); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		l.Down()
		return nil, err
	}
	return l, nil
}

// throughput compares pod-to-pod with node-to-node TCP across two nodes, the
// nodes in one subnet or in two (then node-to-node crosses the router too),
// over IPv6 in a dual-stack lab with v6.
func throughput(bin, name string, subnets int, pool string, v6 bool, target float64, runs, seconds int) error {
	l, err := up(bin, 2, subnets, pool, v6)
	if err != nil {
		return err
	}
	defer l.Down()
	ctx := context.Background()
	a, err := l.AddPod(ctx, l.Nodes[0], "client")
	if err != nil {
		return err
	}
	b, err := l.AddPod(ctx, l.Nodes[1], "server")
	if err != nil {
		return err
	}
	nodeDst, podDst := l.Nodes[1].IP.Addr(), b.IP
	if v6 {
		nodeDst, podDst = l.Nodes[1].IP6.Addr(), b.IP6
	}
	if err := lab.WaitFor(30*time.Second, func() error { return lab.Ping(a.NS, podDst, 1) }); err != nil {
		return err
	}
	type path struct {
		name        string
		client, srv interface {
			Run(...string) (string, error)
		}
		srvName, dst string
	}
	paths := []path{
		{"node to node (baseline)", l.Nodes[0].NS, l.Nodes[1].NS, l.Nodes[1].NS.Name, nodeDst.String()},
		{"pod to pod, across nodes", a.NS, b.NS, b.NS.Name, podDst.String()},
	}
	fmt.Printf("TCP throughput, %s, iperf3 -t %d, median of %d runs (Gbit/s):\n\n| path | 1 stream | 4 streams |\n|---|---:|---:|\n", name, seconds, runs)
	res := map[string][2]float64{}
	for _, p := range paths {
		var got [2]float64
		for i, streams := range []int{1, 4} {
			var xs []float64
			for range runs {
				srv := exec.Command("ip", "netns", "exec", p.srvName, "iperf3", "-s", "-1")
				if err := srv.Start(); err != nil {
					return err
				}
				time.Sleep(300 * time.Millisecond)
				out, err := p.client.Run("iperf3", "-c", p.dst, "-t", strconv.Itoa(seconds), "-P", strconv.Itoa(streams), "-J")
				srv.Process.Kill()
				srv.Wait()
				if err != nil {
					return fmt.Errorf("iperf3 %s: %v: %s", p.name, err, out)
				}
				var r struct {
					End struct {
						SumReceived struct {
							BitsPerSecond float64 `json:"bits_per_second"`
						} `json:"sum_received"`
					} `json:"end"`
				}
				if err := json.Unmarshal([]byte(out), &r); err != nil {
					return fmt.Errorf("iperf3 JSON: %v", err)
				}
				xs = append(xs, r.End.SumReceived.BitsPerSecond/1e9)
			}
			got[i] = median(xs)
		}
		res[p.name] = got
		fmt.Printf("| %s | %.2f | %.2f |\n", p.name, got[0], got[1])
	}
	base, pod := res[paths[0].name], res[paths[1].name]
	fmt.Printf("\npod/node ratio: 1 stream %.2f, 4 streams %.2f (target ≥ %.1f)\n\n", pod[0]/base[0], pod[1]/base[1], target)
	return nil
}

// convergence times new blocks' routes reaching every other node, then reads
// the agents' memory.
func convergence(bin string, nodes int) error {
	start := time.Now()
	l, err := up(bin, nodes, 1, pools, false)
	if err != nil {
		return err
	}
	defer l.Down()
	fmt.Printf("%d nodes: lab up and every agent ready in %s\n", nodes, time.Since(start).Round(100*time.Millisecond))
	var lat []time.Duration
	for i := range min(5, nodes) {
		n := l.Nodes[i*nodes/min(5, nodes)]
		d, err := timeNewBlock(l, n, fmt.Sprintf("conv%d", i))
		if err != nil {
			return err
		}
		lat = append(lat, d)
	}
	slices.Sort(lat)
	fmt.Printf("%d nodes: new block to a route on all %d others: median %s, max %s (%d blocks)\n", nodes, nodes-1,
		lat[len(lat)/2].Round(time.Millisecond), lat[len(lat)-1].Round(time.Millisecond), len(lat))
	var rss []float64
	for _, n := range l.Nodes {
		if kb, err := vmRSS(n.PID()); err == nil {
			rss = append(rss, float64(kb)/1024)
		}
	}
	fmt.Printf("%d nodes: agent RSS with %d peers each: median %.1f MiB, max %.1f MiB\n\n", nodes, nodes-1, median(rss), slices.Max(rss))
	return nil
}

// timeNewBlock adds a pod on n (its first, so it claims a block) and waits
// until the block's route is in every other node's kernel.
func timeNewBlock(l *lab.Lab, n *lab.Node, pod string) (time.Duration, error) {
	others := []*lab.Node{}
	for _, m := range l.Nodes {
		if m != n {
			others = append(others, m)
		}
	}
	type seen struct {
		node string
		dst  netip.Prefix
		at   time.Time
	}
	ch := make(chan seen, 1024)
	done := make(chan struct{})
	defer close(done)
	for _, m := range others {
		h, err := netns.GetFromPath(m.NS.Path)
		if err != nil {
			return 0, err
		}
		updates := make(chan netlink.RouteUpdate, 256)
		err = netlink.RouteSubscribeWithOptions(updates, done, netlink.RouteSubscribeOptions{Namespace: &h})
		h.Close()
		if err != nil {
			return 0, err
		}
		go func() {
			for u := range updates {
				if u.Type == unix.RTM_NEWROUTE && u.Dst != nil {
					if a, ok := netip.AddrFromSlice(u.Dst.IP); ok {
						bits, _ := u.Dst.Mask.Size()
						ch <- seen{m.Name, netip.PrefixFrom(a.Unmap(), bits), time.Now()}
					}
				}
			}
		}()
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	start := time.Now()
	p, err := l.AddPod(ctx, n, pod)
	if err != nil {
		return 0, err
	}
	got := map[string]time.Time{}
	var mu sync.Mutex
	deadline := time.After(time.Minute)
	for len(got) < len(others) {
		select {
		case s := <-ch:
			if s.dst.Bits() < 32 && s.dst.Contains(p.IP) {
				mu.Lock()
				if _, ok := got[s.node]; !ok {
					got[s.node] = s.at
				}
				mu.Unlock()
			}
		case <-deadline:
			return 0, fmt.Errorf("%s's new block reached %d of %d nodes in a minute", n.Name, len(got), len(others))
		}
	}
	var last time.Time
	for _, t := range got {
		if t.After(last) {
			last = t
		}
	}
	return last.Sub(start), nil
}

func vmRSS(pid int) (int, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			return strconv.Atoi(f[1])
		}
	}
	return 0, fmt.Errorf("no VmRSS for pid %d", pid)
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[len(s)/2]
}
