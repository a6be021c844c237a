package e2e

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/margay-dev/margay/test/lab"
	"github.com/margay-dev/margay/test/nstest"
)

// allowFromA is a policy on x/b that lets in x/a only, with extra rules
// that match nothing of the lab (their sources are outside it): which and
// where depends on i, so that each i is a different chain.
func allowFromA(name string, i int) string {
	allow := "{action: Allow, source: {selector: app == 'a'}}"
	extra := fmt.Sprintf("{action: Allow, protocol: TCP, source: {nets: [198.51.100.0/24]}, destination: {ports: [%d]}}", 1000+i)
	rules := []string{allow, extra}
	if i%2 == 1 {
		rules = []string{extra, "{action: Deny, source: {nets: [198.51.100.7/32]}}", allow}
	}
	return fmt.Sprintf("apiVersion: margay.dev/v1\nkind: NetworkPolicy\nmetadata: {name: %s, namespace: \"x\"}\nspec:\n  selector: app == 'b'\n  ingress: [%s]\n",
		name, strings.Join(rules, ", "))
}

// pingStats runs count pings 10 ms apart in ns and reports how many were
// sent and answered.
func pingStats(ns *nstest.NS, to netip.Addr, count int) (sent, got int, err error) {
	out, _ := ns.Run("ping", "-n", "-q", "-c", strconv.Itoa(count), "-i", "0.01", "-W", "1", to.String())
	m := regexp.MustCompile(`(\d+) packets transmitted, (\d+) received`).FindStringSubmatch(out)
	if m == nil {
		return 0, 0, fmt.Errorf("ping %s: %s", to, out)
	}
	sent, _ = strconv.Atoi(m[1])
	got, _ = strconv.Atoi(m[2])
	return sent, got, nil
}

// traffic runs, until stop is closed or limit passes, a ping every 10 ms
// and a new flow every 10 ms (alternately TCP and UDP, so that each is
// judged by policy afresh rather than by conntrack) on each of flows.
type traffic struct {
	mu                  sync.Mutex
	pingsSent, pingsGot map[string]int
	flowsTried, flowsOK map[string]int
	errs                []error
	wait                func() // until the traffic has stopped
}

func runTraffic(flows []flow, stop <-chan struct{}, limit time.Duration) *traffic {
	tr := &traffic{pingsSent: map[string]int{}, pingsGot: map[string]int{}, flowsTried: map[string]int{}, flowsOK: map[string]int{}}
	deadline := time.Now().Add(limit)
	done := func() bool {
		select {
		case <-stop:
			return true
		default:
			return time.Now().After(deadline)
		}
	}
	var wg sync.WaitGroup
	for _, f := range flows {
		key := f.from.name + " -> " + f.to.name
		wg.Add(2)
		go func() { // pings, in runs of 100
			defer wg.Done()
			for !done() {
				sent, got, err := pingStats(f.from.ns, f.to.addr, 100)
				tr.mu.Lock()
				tr.pingsSent[key] += sent
				tr.pingsGot[key] += got
				if err != nil {
					tr.errs = append(tr.errs, err)
				}
				tr.mu.Unlock()
			}
		}()
		go func() { // new flows
			defer wg.Done()
			var probes sync.WaitGroup
			tick := time.NewTicker(10 * time.Millisecond)
			defer tick.Stop()
			for n := 0; !done(); n++ {
				<-tick.C
				g := f
				g.svc = tcp80
				if n%2 == 1 {
					g.svc = udp80
				}
				probes.Add(1)
				go func() {
					defer probes.Done()
					ok := probe(g)
					tr.mu.Lock()
					tr.flowsTried[key]++
					if ok {
						tr.flowsOK[key]++
					}
					tr.mu.Unlock()
				}()
			}
			probes.Wait()
		}()
	}
	tr.wait = wg.Wait
	return tr
}

// The data plane has no window: while the policy that allows x/a into x/b
// is rewritten 100 times (its rules reordered, unrelated ones added and
// removed), a ping every 10 ms and a new connection every 10 ms from x/a
// all get through, and from y/a none does. Each rewrite is waited for on
// x/b's node, so all 100 are programmed, none coalesced.
func TestPolicyNoWindow(t *testing.T) {
	pl := newPolicyLab(t, false)
	xa, xb, ya := pl.pods[0], pl.pods[1], pl.pods[2]
	allowed, denied := flow{xa, xb, tcp80}, flow{ya, xb, tcp80}
	pl.applyAndWait(t, allowFromA("no-window", 0), allowed, denied)
	node := pl.nodeOf(t, xb)

	stop := make(chan struct{})
	tr := runTraffic([]flow{allowed, denied}, stop, 5*time.Minute)
	start := time.Now()
	var programmed []time.Duration
	for i := 1; i <= 100; i++ {
		t0 := time.Now()
		if out, err := apply(pl.l, allowFromA("no-window", i)); err != nil {
			close(stop)
			t.Fatalf("update %d: %v: %s", i, err, out)
		}
		marker := fmt.Sprintf("--dports %d ", 1000+i)
		if err := lab.WaitFor(10*time.Second, func() error {
			out, err := node.NS.Run("iptables-save", "-t", "filter")
			if err != nil || !strings.Contains(out, marker) {
				return fmt.Errorf("update %d is not programmed on %s", i, node.Name)
			}
			return nil
		}); err != nil {
			close(stop)
			t.Fatal(err)
		}
		programmed = append(programmed, time.Since(t0))
	}
	took := time.Since(start)
	time.Sleep(500 * time.Millisecond) // the probes of the last update
	close(stop)
	tr.wait()
	for _, err := range tr.errs {
		t.Error(err)
	}
	a, d := allowed.from.name+" -> "+allowed.to.name, denied.from.name+" -> "+denied.to.name
	t.Logf("100 updates in %s (median %s each, apply to programmed on %s)", took.Round(time.Millisecond), median(programmed).Round(time.Millisecond), node.Name)
	t.Logf("allowed %s: %d/%d pings answered, %d/%d new flows through", a, tr.pingsGot[a], tr.pingsSent[a], tr.flowsOK[a], tr.flowsTried[a])
	t.Logf("denied %s: %d/%d pings answered, %d/%d new flows through", d, tr.pingsGot[d], tr.pingsSent[d], tr.flowsOK[d], tr.flowsTried[d])
	// One every 10 ms would be took/10ms; a loaded machine gets fewer, but
	// not so few that the updates ran without traffic.
	if min := int(took / (20 * time.Millisecond)); tr.pingsSent[a] < min || tr.flowsTried[a] < min || tr.flowsTried[d] < min {
		t.Errorf("too little traffic for the %s of updates (want %d of each at least): %d pings and %d flows allowed, %d flows denied",
			took.Round(time.Millisecond), min, tr.pingsSent[a], tr.flowsTried[a], tr.flowsTried[d])
	}
	if tr.pingsGot[a] != tr.pingsSent[a] || tr.flowsOK[a] != tr.flowsTried[a] {
		t.Errorf("the allowed flow lost traffic while its policy changed")
	}
	if tr.pingsGot[d] != 0 || tr.flowsOK[d] != 0 {
		t.Errorf("the denied flow got traffic through while the policy changed")
	}
	// Each new flow's first packet met the Allow rule on x/b's node, across
	// the 100 rewrites that zeroed the rule's iptables counters. A rewrite
	// loses what its rule counts between the agent reading the counters and
	// iptables-restore replacing the chain (some milliseconds: at 100 new
	// flows a second, a few percent of them over 100 rewrites in a row).
	metrics, err := node.HTTPGet("127.0.0.1:9091", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	series := `margay_policy_packets_total{action="allow",direction="ingress",kind="NetworkPolicy",name="no-window",namespace="x",tier="default"}`
	m := regexp.MustCompile(regexp.QuoteMeta(series) + ` (\d+)`).FindStringSubmatch(metrics)
	if m == nil {
		t.Fatalf("%s's metrics lack %s", node.Name, series)
	}
	counted, _ := strconv.Atoi(m[1])
	t.Logf("%s %d", series, counted)
	if counted < tr.flowsOK[a]*9/10 || counted > tr.flowsOK[a]+tr.pingsSent[a]/100+10 {
		t.Errorf("the policy counted %d allowed packets; %d new flows got through", counted, tr.flowsOK[a])
	}
}

// applyAndWait applies policy and waits until allowed gets through and
// denied does not.
func (pl *policyLab) applyAndWait(t *testing.T, policy string, allowed, denied flow) {
	t.Helper()
	if out, err := apply(pl.l, policy); err != nil {
		t.Fatalf("apply: %v: %s", err, out)
	}
	if err := lab.WaitFor(30*time.Second, func() error {
		if probe(denied) || !probe(allowed) {
			return fmt.Errorf("%s or %s not enforced yet", allowed, denied)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// nodeOf is the lab node a pod runs on.
func (pl *policyLab) nodeOf(t *testing.T, p *peer) *lab.Node {
	t.Helper()
	for _, n := range pl.l.Nodes {
		out, err := n.NS.Run("ip", "route", "show", p.addr.String())
		if err == nil && strings.Contains(out, "dev mgy") {
			return n
		}
	}
	t.Fatalf("no node has a route to %s through a pod interface", p.name)
	return nil
}

func median(ds []time.Duration) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(ds))
	return s[len(s)/2]
}

// Established flows that a new policy denies are cut, and allowed ones are
// not: long-lived UDP and TCP flows from x/a and y/a into x/b carry on
// until a policy lets in x/a only; then y/a's stop and x/a's lose nothing.
func TestPolicyCutsDeniedFlows(t *testing.T) {
	pl := newPolicyLab(t, false)
	xa, xb, ya := pl.pods[0], pl.pods[1], pl.pods[2]
	const echoPort = 82
	var mu sync.Mutex
	var accepted []net.Conn
	t.Cleanup(func() {
		mu.Lock()
		defer mu.Unlock()
		for _, c := range accepted {
			c.Close()
		}
	})
	serveTCP(t, xb.ns, echoPort, func(c net.Conn) { // echo
		mu.Lock()
		accepted = append(accepted, c)
		mu.Unlock()
		buf := make([]byte, 64)
		for {
			n, err := c.Read(buf)
			if err != nil {
				return
			}
			c.Write(buf[:n])
		}
	})
	// One connection each, kept for the whole test.
	type conn struct {
		name string
		c    net.Conn
	}
	var conns []conn
	for _, from := range []*peer{xa, ya} {
		for _, svc := range []service{{"tcp", echoPort}, udp80} {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			c, err := from.ns.DialContext(ctx, svc.proto+"4", netip.AddrPortFrom(xb.addr, uint16(svc.port)).String())
			cancel()
			if err != nil {
				t.Fatalf("%s -> x/b %s: %v", from.name, svc, err)
			}
			t.Cleanup(func() { c.Close() })
			conns = append(conns, conn{fmt.Sprintf("%s -> x/b %s", from.name, svc), c})
		}
	}
	exchange := func(c net.Conn) bool {
		c.SetDeadline(time.Now().Add(300 * time.Millisecond))
		if _, err := c.Write([]byte("hi")); err != nil {
			return false
		}
		buf := make([]byte, 2)
		n, err := c.Read(buf)
		return err == nil && n == 2
	}
	for _, c := range conns {
		if !exchange(c.c) {
			t.Fatalf("%s: no echo before any policy", c.name)
		}
	}
	if out, err := apply(pl.l, allowFromA("cut", 0)); err != nil {
		t.Fatalf("apply: %v: %s", err, out)
	}
	start := time.Now()
	cutAt := map[string]time.Duration{}
	lost := map[string]int{}
	// Exchange on every connection every 50 ms until y/a's are both cut, and
	// then for 2 s more to see that x/a's carry on and y/a's stay cut.
	var done atomic.Bool
	var settled time.Time
	for i := 0; i < 400 && !done.Load(); i++ {
		for _, c := range conns {
			ok := exchange(c.c)
			fromX := strings.HasPrefix(c.name, "x/a")
			switch {
			case fromX && !ok:
				lost[c.name]++
			case !fromX && !ok:
				if _, seen := cutAt[c.name]; !seen {
					cutAt[c.name] = time.Since(start)
				}
			case !fromX && ok && cutAt[c.name] != 0:
				t.Errorf("%s: an echo came back after the flow was cut", c.name)
			}
		}
		if len(cutAt) == 2 && settled.IsZero() {
			settled = time.Now()
		}
		if !settled.IsZero() && time.Since(settled) > 2*time.Second {
			done.Store(true)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(cutAt) != 2 {
		t.Fatalf("after %s, y/a's established flows were not cut: cut %v", time.Since(start).Round(time.Millisecond), cutAt)
	}
	for name, n := range lost {
		t.Errorf("%s: %d exchanges lost on a flow the policy allows", name, n)
	}
	for name, d := range cutAt {
		t.Logf("%s: cut %s after the policy was applied", name, d.Round(time.Millisecond))
	}
	// The allowed side of the cut TCP flow sends first: conntrack would take the
	// packet up as a new flow from x/b, which policy allows, and so open the
	// connection to y/a again. It must stay cut.
	var server net.Conn
	mu.Lock()
	for _, c := range accepted {
		if ap, err := netip.ParseAddrPort(c.RemoteAddr().String()); err == nil && ap.Addr().Unmap() == ya.addr {
			server = c
		}
	}
	mu.Unlock()
	if server == nil {
		t.Fatal("x/b accepted no connection from y/a")
	}
	if _, err := server.Write([]byte("xb")); err != nil {
		t.Fatalf("x/b writes to y/a: %v", err)
	}
	for _, c := range conns {
		if c.name != "y/a -> x/b tcp/82" {
			continue
		}
		c.c.SetReadDeadline(time.Now().Add(time.Second))
		if n, err := c.c.Read(make([]byte, 8)); err == nil {
			t.Errorf("y/a received %d bytes x/b sent after the cut: the flow was opened again from the allowed side", n)
		}
		if exchange(c.c) {
			t.Errorf("y/a's exchange succeeded after x/b sent first")
		}
	}
	metrics, err := pl.nodeOf(t, xb).HTTPGet("127.0.0.1:9091", "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^margay_policy_flows_cut_total (\d+)$`).FindStringSubmatch(metrics)
	if m == nil {
		t.Fatal("x/b's node has no margay_policy_flows_cut_total")
	}
	if n, _ := strconv.Atoi(m[1]); n < 2 {
		t.Errorf("x/b's node counts %d flows cut, want 2 at least", n)
	}
}

// Drift is repaired on the resync timer, and until then the workload fails
// closed: a flushed policy chain or an emptied selector set lets nothing
// through that the policy would not, and stops what it would.
func TestPolicyDrift(t *testing.T) {
	pl := newPolicyLab(t, false)
	xa, xb, ya := pl.pods[0], pl.pods[1], pl.pods[2]
	allowed, denied := flow{xa, xb, tcp80}, flow{ya, xb, tcp80}
	pl.applyAndWait(t, allowFromA("drift", 0), allowed, denied)
	node := pl.nodeOf(t, xb)
	save, err := node.NS.Run("iptables-save", "-t", "filter")
	if err != nil {
		t.Fatal(err)
	}
	// The policy's chain and the set its selector rule matches on.
	m := regexp.MustCompile(`-A (MGY-PI-\S+) -m set --match-set (mgy-s-\S+) src -m comment --comment "NetworkPolicy x/drift ingress\[0\]"`).FindStringSubmatch(save)
	if m == nil {
		t.Fatalf("no rule of x/drift on %s:\n%s", node.Name, save)
	}
	chain, set := m[1], m[2]
	const resync = 5 * time.Second // newPolicyLab's
	for _, d := range []struct {
		what    string
		drift   func() error
		drifted func() bool
	}{
		{"flushed chain " + chain, func() error { _, err := node.NS.Run("iptables", "-F", chain); return err }, func() bool {
			out, _ := node.NS.Run("iptables", "-S", chain)
			return !strings.Contains(out, "-A "+chain)
		}},
		{"emptied set " + set, func() error { return node.NS.Do(func() error { return netlink.IpsetFlush(set) }) }, func() bool {
			var r *netlink.IPSetResult
			node.NS.Do(func() (err error) { r, err = netlink.IpsetList(set); return err })
			return r != nil && len(r.Entries) == 0
		}},
	} {
		if err := d.drift(); err != nil {
			t.Fatalf("%s: %v", d.what, err)
		}
		start := time.Now()
		closed := 0
		var repaired time.Duration
		for time.Since(start) < resync+5*time.Second {
			var wg sync.WaitGroup
			var okAllowed, okDenied bool
			wg.Add(2)
			go func() { defer wg.Done(); okAllowed = probe(allowed) }()
			go func() { defer wg.Done(); okDenied = probe(denied) }()
			wg.Wait()
			// Read after the probes: drifted then means drifted throughout.
			still := d.drifted()
			if okDenied {
				t.Errorf("%s: the denied flow got through after %s", d.what, time.Since(start).Round(time.Millisecond))
			}
			if okAllowed && still {
				t.Errorf("%s: the allowed flow got through while drifted: fails open", d.what)
			}
			if !okAllowed && still {
				closed++
			}
			if okAllowed && !still {
				repaired = time.Since(start)
				break
			}
		}
		if repaired == 0 {
			t.Fatalf("%s: not repaired within %s", d.what, resync+5*time.Second)
		}
		if closed == 0 {
			t.Errorf("%s: repaired before a probe saw the drift; nothing was shown", d.what)
		}
		t.Logf("%s: failed closed for %d probes, repaired and allowed again %s after the drift (resync interval %s)", d.what, closed, repaired.Round(time.Millisecond), resync)
		if repaired > resync+2*time.Second {
			t.Errorf("%s: repaired after %s, more than the resync interval %s and 2 s", d.what, repaired.Round(time.Millisecond), resync)
		}
	}
}
