// Command policybench measures margay's network policy. It needs root and
// iperf3.
//
//	go run ./test/bench/policybench [-cases latency,add,scale] [-trials 10] [-big 21] [-policies 1000] [-endpoints 5000]
//
// It prints:
//   - latency: from the start of `margayctl apply` of a GlobalNetworkPolicy
//     (run in a lab node: the lab's etcd is reachable only there) until the last node
//     enforces it (a pod behind it on every node answers a prober), p50 and
//     p99, in a 3-node lab and a big one;
//   - add: from the start of a pod's CNI ADD until its address is in the
//     selector ipset of every node, in the same labs;
//   - scale: on one node, with policies and endpoints by the thousand, the
//     time to program them from nothing and to apply one change, and
//     pod-to-pod TCP throughput through that rule set as a ratio to the same
//     pods with no policy, measured in the same run.
package main

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/felix"
	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/lab"
)

const pools = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true}
`

func main() {
	cases := flag.String("cases", "latency,add,scale", "what to measure, comma-separated")
	trials := flag.Int("trials", 10, "trials per lab size (latency, add)")
	big := flag.Int("big", 21, "nodes in the big lab")
	policies := flag.Int("policies", 1000, "policies in the scale case")
	endpoints := flag.Int("endpoints", 5000, "endpoints in the scale case")
	runs := flag.Int("runs", 3, "iperf3 runs per configuration (scale); the median is reported")
	seconds := flag.Int("seconds", 5, "seconds per iperf3 run")
	flag.Parse()
	if os.Geteuid() != 0 {
		log.Fatal("policybench needs root: it makes network namespaces")
	}
	bin, err := os.MkdirTemp("", "margay-policybench-")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(bin)
	cmd := exec.Command("go", "build", "-o", bin+"/", "./cmd/margay-node", "./cmd/margay", "./cmd/margay-ipam", "./cmd/margayctl")
	if out, err := cmd.CombinedOutput(); err != nil {
		log.Fatalf("go build: %v\n%s", err, out)
	}
	fmt.Printf("margay policy benchmarks, %s\n\n", time.Now().UTC().Format("2006-01-02"))
	for _, c := range strings.Split(*cases, ",") {
		var err error
		switch c {
		case "latency", "add":
			for _, n := range []int{3, *big} {
				if err = inLab(bin, n, c, *trials); err != nil {
					break
				}
			}
		case "scale":
			if _, lerr := exec.LookPath("iperf3"); lerr != nil {
				log.Fatal("the scale case needs iperf3 (apt-get install iperf3)")
			}
			err = scale(bin, *policies, *endpoints, *runs, *seconds)
		default:
			err = fmt.Errorf("unknown case %q in -cases", c)
		}
		if err != nil {
			log.Fatal(err)
		}
	}
}

// benchLab is a lab with a target pod in namespace "bench" on every node,
// each answering UDP echo on port 7, and a prober pod on the first node.
type benchLab struct {
	l       *lab.Lab
	prober  *lab.Pod
	targets []*lab.Pod
	stop    []func()
}

func (b *benchLab) down() {
	for _, f := range b.stop {
		f()
	}
	b.l.Down()
}

func newBenchLab(bin string, nodes int) (*benchLab, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	start := time.Now()
	l, err := lab.Up(ctx, lab.Options{Nodes: nodes, Subnets: 1, Bin: bin, Pools: pools})
	if err != nil {
		return nil, err
	}
	b := &benchLab{l: l}
	err = lab.WaitFor(3*time.Minute, func() error {
		for _, n := range l.Nodes {
			if err := n.Ready(); err != nil {
				return err
			}
		}
		return nil
	})
	if err == nil {
		b.prober, err = l.AddPodIn(ctx, l.Nodes[0], "probe", "prober")
	}
	for i, n := range l.Nodes {
		if err != nil {
			break
		}
		var p *lab.Pod
		if p, err = l.AddPodIn(ctx, n, "bench", fmt.Sprintf("target%d", i)); err == nil {
			b.targets = append(b.targets, p)
			err = b.echo(p)
		}
	}
	if err == nil {
		err = lab.WaitFor(time.Minute, func() error { return b.allAnswer(true) })
	}
	if err != nil {
		b.down()
		return nil, err
	}
	fmt.Printf("%d nodes: lab up, every agent ready and every target answering in %s\n", nodes, time.Since(start).Round(100*time.Millisecond))
	return b, nil
}

// echo answers UDP on port 7 in the pod until the lab goes down.
func (b *benchLab) echo(p *lab.Pod) error {
	var pc net.PacketConn
	if err := p.NS.Do(func() (err error) { pc, err = net.ListenPacket("udp4", ":7"); return err }); err != nil {
		return err
	}
	b.stop = append(b.stop, func() { pc.Close() })
	go func() {
		buf := make([]byte, 16)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
		}
	}()
	return nil
}

// probe sends one datagram from the prober to the target on a new socket,
// so a new flow that policy judges afresh, and says if the echo came back.
func (b *benchLab) probe(to netip.Addr, timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	c, err := b.prober.NS.DialContext(ctx, "udp4", netip.AddrPortFrom(to, 7).String())
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("x")); err != nil {
		return false
	}
	buf := make([]byte, 1)
	n, err := c.Read(buf)
	return err == nil && n == 1
}

// allAnswer checks that every target answers (or that none does).
func (b *benchLab) allAnswer(want bool) error {
	var wg sync.WaitGroup
	got := make([]bool, len(b.targets))
	for i, p := range b.targets {
		wg.Add(1)
		go func() { defer wg.Done(); got[i] = b.probe(p.IP, 300*time.Millisecond) }()
	}
	wg.Wait()
	for i, ok := range got {
		if ok != want {
			return fmt.Errorf("target %s answers: %v, want %v", b.targets[i].Name, ok, want)
		}
	}
	return nil
}

// apply writes resources with margayctl, run in the first node: the lab's
// etcd is reachable only from inside the lab, never from this namespace.
func (b *benchLab) apply(doc string) error {
	f, err := os.CreateTemp(b.l.Dir(), "bench-*.yaml")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(doc); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if out, err := b.l.Ctl(b.l.Nodes[0], "apply", "-f", f.Name()); err != nil {
		return fmt.Errorf("margayctl apply: %v: %s", err, out)
	}
	return nil
}

func (b *benchLab) delete(kind, name string) error {
	if out, err := b.l.Ctl(b.l.Nodes[0], "delete", kind, name); err != nil {
		return fmt.Errorf("margayctl delete %s %s: %v: %s", kind, name, err, out)
	}
	return nil
}

const (
	isolate = `apiVersion: margay.dev/v1
kind: GlobalNetworkPolicy
metadata: {name: bench-isolate}
spec: {selector: "margay.dev/namespace == 'bench'", types: [Ingress]}
`
	allow = `apiVersion: margay.dev/v1
kind: GlobalNetworkPolicy
metadata: {name: bench-allow}
spec:
  selector: "margay.dev/namespace == 'bench'"
  ingress: [{action: Allow, protocol: UDP, destination: {ports: [7]}}]
`
	fromClients = `apiVersion: margay.dev/v1
kind: GlobalNetworkPolicy
metadata: {name: bench-clients}
spec:
  selector: "margay.dev/namespace == 'bench'"
  ingress: [{action: Allow, source: {selector: "margay.dev/namespace == 'clients'"}}]
`
)

func inLab(bin string, nodes int, what string, trials int) error {
	b, err := newBenchLab(bin, nodes)
	if err != nil {
		return err
	}
	defer b.down()
	if what == "latency" {
		return latency(b, nodes, trials)
	}
	return addToSet(b, nodes, trials)
}

// latency isolates the targets, then, trials times, writes a policy that
// lets the prober in and probes every target every 10 ms until each
// answers; then deletes it and waits until none does.
func latency(b *benchLab, nodes, trials int) error {
	if err := b.apply(isolate); err != nil {
		return err
	}
	if err := lab.WaitFor(30*time.Second, func() error { return b.allAnswer(false) }); err != nil {
		return fmt.Errorf("isolating the targets: %w", err)
	}
	var each, last []time.Duration
	for range trials {
		start := time.Now()
		if err := b.apply(allow); err != nil {
			return err
		}
		got, err := b.untilAnswered(start, nil)
		if err != nil {
			return err
		}
		each = append(each, got...)
		last = append(last, slices.Max(got))
		if err := b.delete("globalnetworkpolicy", "bench-allow"); err != nil {
			return err
		}
		if err := lab.WaitFor(30*time.Second, func() error { return b.allAnswer(false) }); err != nil {
			return fmt.Errorf("after deleting the policy: %w", err)
		}
	}
	fmt.Printf("%d nodes: margayctl apply start -> enforced (a new flow through it answered), %d trials:\n", nodes, trials)
	fmt.Printf("  last node: p50 %s, p99 %s, max %s\n", pct(last, 50), pct(last, 99), pct(last, 100))
	fmt.Printf("  each node: p50 %s, p99 %s (%d samples)\n\n", pct(each, 50), pct(each, 99), len(each))
	return nil
}

// untilAnswered probes every target every 10 ms from start until each
// answers, and returns how long each took. It gives up after 30 s.
func (b *benchLab) untilAnswered(start time.Time, targets []*lab.Pod) ([]time.Duration, error) {
	if targets == nil {
		targets = b.targets
	}
	got := make([]time.Duration, len(targets))
	var mu sync.Mutex
	var wg sync.WaitGroup
	deadline := start.Add(30 * time.Second)
	for i, p := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			var probes sync.WaitGroup
			done := make(chan struct{})
			var once sync.Once
			for time.Now().Before(deadline) {
				select {
				case <-done:
					probes.Wait()
					return
				case <-tick.C:
				}
				probes.Add(1)
				go func() {
					defer probes.Done()
					if b.probe(p.IP, time.Second) {
						at := time.Since(start)
						once.Do(func() {
							mu.Lock()
							got[i] = at
							mu.Unlock()
							close(done)
						})
					}
				}()
			}
			probes.Wait()
		}()
	}
	wg.Wait()
	for i, d := range got {
		if d == 0 {
			return nil, fmt.Errorf("target %s did not answer within 30 s", targets[i].Name)
		}
	}
	return got, nil
}

// addToSet times new pods, in namespace "clients" on each node in turn,
// from the start of their ADD until every node has their address in the
// selector ipset of the policy that lets clients in.
func addToSet(b *benchLab, nodes, trials int) error {
	if err := b.apply(fromClients); err != nil {
		return err
	}
	// The policy's selector set exists on every node before the first pod.
	if err := lab.WaitFor(30*time.Second, func() error { _, err := b.inSets(netip.Addr{}); return err }); err != nil {
		return err
	}
	var adds, lasts []time.Duration
	for i := range trials {
		n := b.l.Nodes[i%len(b.l.Nodes)]
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		start := time.Now()
		p, err := b.l.AddPodIn(ctx, n, "clients", fmt.Sprintf("client%d", i))
		cancel()
		if err != nil {
			return err
		}
		adds = append(adds, time.Since(start))
		for {
			missing, err := b.inSets(p.IP)
			if err != nil {
				return err
			}
			if missing == 0 {
				break
			}
			if time.Since(start) > 30*time.Second {
				return fmt.Errorf("client%d: not in the selector set of %d nodes after 30 s", i, missing)
			}
			time.Sleep(5 * time.Millisecond)
		}
		lasts = append(lasts, time.Since(start))
	}
	fmt.Printf("%d nodes: pod ADD start -> its address in the selector ipset of every node, %d pods:\n", nodes, trials)
	fmt.Printf("  ADD itself: p50 %s; ADD start -> last node's set: p50 %s, p99 %s, max %s\n\n", pct(adds, 50), pct(lasts, 50), pct(lasts, 99), pct(lasts, 100))
	return nil
}

// inSets counts the nodes whose selector set (mgy-s-*, the only one the
// lab's policy makes) lacks addr; an invalid addr asks only that the set
// exists.
func (b *benchLab) inSets(addr netip.Addr) (int, error) {
	missing := 0
	for _, n := range b.l.Nodes {
		var sets []netlink.IPSetResult
		if err := n.NS.Do(func() (err error) { sets, err = netlink.IpsetListAll(); return err }); err != nil {
			return 0, fmt.Errorf("%s: ipsets: %w", n.Name, err)
		}
		found, exists := false, false
		for _, s := range sets {
			if !strings.HasPrefix(s.SetName, "mgy-s-") {
				continue
			}
			exists = true
			for _, e := range s.Entries {
				if a, ok := netip.AddrFromSlice(e.IP); ok && a.Unmap() == addr {
					found = true
				}
			}
		}
		if !exists {
			return 0, fmt.Errorf("%s has no selector set yet", n.Name)
		}
		if addr.IsValid() && !found {
			missing++
		}
	}
	return missing, nil
}

// pct is the p-th percentile (nearest rank) of ds.
func pct(ds []time.Duration, p int) time.Duration {
	s := slices.Sorted(slices.Values(ds))
	i := (p*len(s)+99)/100 - 1
	return s[max(0, min(i, len(s)-1))].Round(time.Millisecond)
}

// scale programs, in a one-node lab whose agent is stopped, a rule set for
// endpoints and policies by the thousand, through the same calc and felix
// code the agent runs, and measures iperf3 between two real pods of that
// node through it.
func scale(bin string, policies, endpoints, runs, seconds int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, lab.Options{Nodes: 1, Bin: bin, Pools: pools})
	if err != nil {
		return err
	}
	defer l.Down()
	node := l.Nodes[0]
	if err := lab.WaitFor(2*time.Minute, node.Ready); err != nil {
		return err
	}
	client, err := l.AddPodIn(ctx, node, "ns-0", "client")
	if err != nil {
		return err
	}
	server, err := l.AddPodIn(ctx, node, "ns-0", "server")
	if err != nil {
		return err
	}
	real, err := realEndpoints(l)
	if err != nil {
		return err
	}
	// From here the bench programs the node; the agent would undo it.
	node.Stop(syscall.SIGTERM)
	in := scaleInput(real, server, policies, endpoints)
	logger := slog.New(slog.DiscardHandler)
	ipt, err := felix.NewIPTables(logger, false)
	if err != nil {
		return err
	}
	sets := felix.NewIPSets(logger)
	// apply is what the agent does with a new input: compute, then apply
	// the ipsets and the chains if they differ from the last applied.
	var last calc.Output
	apply := func(in calc.Input) (timing, calc.Output, error) {
		var tm timing
		t0 := time.Now()
		out := calc.Compute(in)
		tm.compute = time.Since(t0)
		err := node.NS.Do(func() error {
			if !reflect.DeepEqual(out.IPSets, last.IPSets) {
				t1 := time.Now()
				if _, err := sets.Apply(out.IPSets); err != nil {
					return err
				}
				tm.ipsets = time.Since(t1)
			}
			if !reflect.DeepEqual(out.Chains, last.Chains) || !reflect.DeepEqual(out.Jumps, last.Jumps) {
				t2 := time.Now()
				if _, err := ipt.Apply(out.Chains, out.Jumps); err != nil {
					return err
				}
				tm.iptables = time.Since(t2)
			}
			return nil
		})
		last = out
		return tm, out, err
	}
	noPolicy := in
	noPolicy.Policy = calc.Policy{Endpoints: in.Policy.Endpoints}
	if _, _, err := apply(noPolicy); err != nil {
		return err
	}
	baseline, err := iperf(client, server, runs, seconds)
	if err != nil {
		return err
	}
	// From no policy to all of it: every policy chain and set is new.
	full, out, err := apply(in)
	if err != nil {
		return err
	}
	rules := 0
	for _, ch := range out.Chains {
		rules += len(ch.Rules)
	}
	members := 0
	for _, st := range out.IPSets {
		members += len(st.Members) + len(st.Ports)
	}
	fmt.Printf("scale: %d policies, %d endpoints (%d on this node): %d chains, %d rules, %d ipsets with %d members\n",
		policies, endpoints, len(in.Endpoints), len(out.Chains), rules, len(out.IPSets), members)
	fmt.Printf("  full programming: %s\n", full)
	// Incremental: one policy's rules change, then a remote endpoint joins
	// the selector of the client's rule (app-20 in ns-0). Policy 100
	// changes, not 0, so that nine others still let the client in.
	var joiners []*api.WorkloadEndpoint
	for _, w := range in.Policy.Endpoints {
		if w.Spec.Node != in.Node && w.Spec.Namespace == "ns-0" && w.Metadata.Labels["app"] != "app-20" {
			joiners = append(joiners, w)
		}
	}
	var policyTimes, labelTimes []timing
	for i := range 5 {
		pol := in.Policy.Policies[min(100, len(in.Policy.Policies)-1)]
		pol.Spec.Ingress[0].Destination.Ports = append(pol.Spec.Ingress[0].Destination.Ports, api.Port{Min: uint16(9000 + i), Max: uint16(9000 + i)})
		tm, _, err := apply(in)
		if err != nil {
			return err
		}
		policyTimes = append(policyTimes, tm)
		joiners[i].Metadata.Labels["app"] = "app-20"
		if tm, _, err = apply(in); err != nil {
			return err
		}
		labelTimes = append(labelTimes, tm)
	}
	fmt.Printf("  one policy's rules changed (median of 5): %s\n", medianTiming(policyTimes))
	fmt.Printf("  a remote endpoint relabelled into a selector (median of 5): %s\n", medianTiming(labelTimes))
	withPolicy, err := iperf(client, server, runs, seconds)
	if err != nil {
		save, _ := node.NS.Run("iptables-save", "-c", "-t", "filter")
		return fmt.Errorf("%w\nthe node's filter table:\n%s", err, save)
	}
	fmt.Printf("  pod to pod on this node, 1 TCP stream, iperf3 -t %d, median of %d: no policy %.2f Gbit/s, %d policies %.2f Gbit/s, ratio %.2f (target ≥ 0.95)\n\n",
		seconds, runs, baseline, policies, withPolicy, withPolicy/baseline)
	return node.NS.Do(func() error { return errors.Join(ipt.Cleanup(), sets.Cleanup()) })
}

// timing is one pass of the agent's work; a part it skipped is zero.
type timing struct{ compute, ipsets, iptables time.Duration }

func (t timing) String() string {
	return fmt.Sprintf("total %s (compute %s, ipsets %s, iptables %s)", (t.compute + t.ipsets + t.iptables).Round(time.Millisecond),
		t.compute.Round(time.Millisecond), t.ipsets.Round(time.Millisecond), t.iptables.Round(time.Millisecond))
}

// medianTiming is the pass of median total, with its parts.
func medianTiming(ts []timing) timing {
	s := slices.Clone(ts)
	slices.SortFunc(s, func(a, b timing) int {
		return cmp.Compare(a.compute+a.ipsets+a.iptables, b.compute+b.ipsets+b.iptables)
	})
	return s[len(s)/2]
}

// realEndpoints reads the lab's WorkloadEndpoints.
func realEndpoints(l *lab.Lab) ([]*api.WorkloadEndpoint, error) {
	out, err := l.Ctl(l.Nodes[0], "get", "workloadendpoints", "-o", "json")
	if err != nil {
		return nil, fmt.Errorf("get workloadendpoints: %v: %s", err, out)
	}
	var list struct{ Items []*api.WorkloadEndpoint }
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		return nil, err
	}
	return list.Items, nil
}

// scaleInput is the node's input. Endpoint i is app-(i%100) in
// ns-(i%20); the first 100 are on this node, the rest on 100 others.
// Policy j selects app-(j%100) in ns-(j%20), which is local endpoint
// j%100, and lets in app-((j+20)%100) of its namespace (50 endpoints) on
// TCP ports 5201 and 8000+j%50; it lets out to a /24, and to
// app-((j+80)%100) on the same ports. The real pods are endpoints 0 (the
// server) and 20 (its client): ten policies select the server and let the
// client in, and ten select the client and let it out to the server.
func scaleInput(real []*api.WorkloadEndpoint, server *lab.Pod, policies, endpoints int) calc.Input {
	in := calc.Input{Node: real[0].Spec.Node}
	labels := func(i int) map[string]string {
		return map[string]string{api.LabelNamespace: fmt.Sprintf("ns-%d", i%20), "app": fmt.Sprintf("app-%d", i%100)}
	}
	all := make([]*api.WorkloadEndpoint, endpoints)
	for _, w := range real {
		i := 20
		if w.Spec.Pod == server.Name {
			i = 0
		}
		w.Metadata.Labels = labels(i)
		w.Spec.Namespace = "ns-0"
		all[i] = w
	}
	for i := range all {
		if all[i] != nil {
			continue
		}
		node := in.Node
		if i >= 100 {
			node = fmt.Sprintf("other%d", i%100)
		}
		w := api.NewWorkloadEndpoint(fmt.Sprintf("fake-%d", i))
		w.Metadata.Labels = labels(i)
		w.Spec = api.WorkloadEndpointSpec{Node: node, Namespace: w.Metadata.Labels[api.LabelNamespace], Pod: w.Metadata.Name,
			InterfaceName: fmt.Sprintf("mgyf%d", i),
			IPNetworks:    []string{netip.AddrFrom4([4]byte{10, 250, byte(i / 250), byte(i%250 + 1)}).String() + "/32"}}
		all[i] = w
	}
	for _, w := range all {
		if w.Spec.Node != in.Node {
			continue
		}
		ep := calc.Endpoint{Name: w.Metadata.Name, Interface: w.Spec.InterfaceName}
		for _, n := range w.Spec.IPNetworks {
			ep.IPs = append(ep.IPs, netip.MustParsePrefix(n))
		}
		in.Endpoints = append(in.Endpoints, ep)
	}
	in.Policy.Endpoints = all
	tcp, _ := api.ProtocolFromName("TCP")
	for j := range policies {
		p := api.NewNetworkPolicy(fmt.Sprintf("ns-%d", j%20), fmt.Sprintf("pol-%d", j))
		order := float64(j)
		p.Spec = api.PolicySpec{Order: &order, Selector: fmt.Sprintf("app == 'app-%d'", j%100),
			Ingress: []api.Rule{{Action: api.ActionAllow, Protocol: &tcp,
				Source:      api.EntityRule{Selector: fmt.Sprintf("app == 'app-%d'", (j+20)%100)},
				Destination: api.EntityRule{Ports: []api.Port{{Min: 5201, Max: 5201}, {Min: uint16(8000 + j%50), Max: uint16(8000 + j%50)}}}}},
			Egress: []api.Rule{
				{Action: api.ActionAllow, Destination: api.EntityRule{Nets: []string{fmt.Sprintf("192.0.%d.0/24", j%250)}}},
				{Action: api.ActionAllow, Protocol: &tcp, Destination: api.EntityRule{Selector: fmt.Sprintf("app == 'app-%d'", (j+80)%100),
					Ports: []api.Port{{Min: 5201, Max: 5201}, {Min: uint16(8000 + j%50), Max: uint16(8000 + j%50)}}}},
			}}
		p.SetDefaults()
		in.Policy.Policies = append(in.Policy.Policies, p)
	}
	return in
}

// iperf is the median single-stream TCP throughput from client to server in
// Gbit/s.
func iperf(client, server *lab.Pod, runs, seconds int) (float64, error) {
	var xs []float64
	for range runs {
		srv := exec.Command("ip", "netns", "exec", server.NS.Name, "iperf3", "-s", "-1")
		if err := srv.Start(); err != nil {
			return 0, err
		}
		time.Sleep(300 * time.Millisecond)
		out, err := client.NS.Run("iperf3", "-c", server.IP.String(), "-t", strconv.Itoa(seconds), "-J")
		srv.Process.Kill()
		srv.Wait()
		if err != nil {
			return 0, fmt.Errorf("iperf3: %v: %s", err, out)
		}
		var r struct {
			End struct {
				SumReceived struct {
					BitsPerSecond float64 `json:"bits_per_second"`
				} `json:"sum_received"`
			} `json:"end"`
		}
		if err := json.Unmarshal([]byte(out), &r); err != nil || r.End.SumReceived.BitsPerSecond == 0 {
			return 0, fmt.Errorf("iperf3 %s -> %s: nothing received (%v):\n%s", client.Name, server.Name, err, out)
		}
		xs = append(xs, r.End.SumReceived.BitsPerSecond/1e9)
	}
	slices.Sort(xs)
	return xs[len(xs)/2], nil
}
