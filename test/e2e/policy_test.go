package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/test/lab"
	"github.com/margay-dev/margay/test/nstest"
)

// service is a port a policy test's servers listen on.
type service struct {
	proto string // "tcp" or "udp"
	port  int
}

func (s service) String() string { return fmt.Sprintf("%s/%d", s.proto, s.port) }

var (
	tcp80    = service{"tcp", 80}
	tcp81    = service{"tcp", 81}
	udp80    = service{"udp", 80}
	services = []service{tcp80, tcp81, udp80}
)

// peer is one end of a probe: a pod, or the internet host.
type peer struct {
	name      string // namespace/pod, or "internet"
	namespace string // "" for the internet host
	labels    map[string]string
	ports     []api.EndpointPort // its named ports
	ns        *nstest.NS
	addr      netip.Addr // of the family its flows are of
}

func (p *peer) is(name string) bool { return p.name == name }

// flow is one probe: a new connection (TCP) or datagram exchange (UDP).
type flow struct {
	from, to *peer
	svc      service
}

func (f flow) String() string {
	if f.v6() {
		return fmt.Sprintf("%s -> %s %s over IPv6", f.from.name, f.to.name, f.svc)
	}
	return fmt.Sprintf("%s -> %s %s", f.from.name, f.to.name, f.svc)
}

// v6 tells whether the flow is over IPv6.
func (f flow) v6() bool { return f.to.addr.Is6() }

// serveAll answers every service in ns until the test ends: TCP with "ok", UDP
// by echoing.
func serveAll(t *testing.T, ns *nstest.NS) {
	t.Helper()
	for _, s := range services {
		if s.proto == "tcp" {
			serveTCP(t, ns, s.port, func(c net.Conn) {
				c.Write([]byte("ok"))
				c.Close()
			})
			continue
		}
		err := ns.Do(func() error {
			pc, err := net.ListenPacket("udp", fmt.Sprintf(":%d", s.port))
			if err != nil {
				return err
			}
			t.Cleanup(func() { pc.Close() })
			go func() {
				buf := make([]byte, 64)
				for {
					n, from, err := pc.ReadFrom(buf)
					if err != nil {
						return
					}
					pc.WriteTo(buf[:n], from)
				}
			}()
			return nil
		})
		if err != nil {
			t.Fatalf("serve %s in %s: %v", s, ns.Name, err)
		}
	}
}

// serveTCP accepts connections on port in ns until the test ends, and hands
// each to handle on a goroutine of its own.
func serveTCP(t *testing.T, ns *nstest.NS, port int, handle func(net.Conn)) {
	t.Helper()
	var ln net.Listener
	if err := ns.Do(func() (err error) { ln, err = net.Listen("tcp", fmt.Sprintf(":%d", port)); return err }); err != nil {
		t.Fatalf("serve tcp/%d in %s: %v", port, ns.Name, err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
}

// probeTimeout bounds one probe: a denied one takes all of it.
const probeTimeout = time.Second

// probe tells whether one flow gets through, both ways.
func probe(f flow) bool {
	ctx, cancel := context.WithTimeout(context.Background(), probeTimeout)
	defer cancel()
	network := f.svc.proto + "4"
	if f.v6() {
		network = f.svc.proto + "6"
	}
	c, err := f.from.ns.DialContext(ctx, network, netip.AddrPortFrom(f.to.addr, uint16(f.svc.port)).String())
	if err != nil {
		return false
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(probeTimeout))
	if f.svc.proto == "udp" {
		if _, err := c.Write([]byte("hi")); err != nil {
			return false
		}
	}
	buf := make([]byte, 2)
	n, _ := c.Read(buf)
	return n == 2
}

// matrix probes every flow at once.
func matrix(flows []flow) map[flow]bool {
	var mu sync.Mutex
	var wg sync.WaitGroup
	got := map[flow]bool{}
	sem := make(chan struct{}, 24)
	for _, f := range flows {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			ok := probe(f)
			<-sem
			mu.Lock()
			got[f] = ok
			mu.Unlock()
		}()
	}
	wg.Wait()
	return got
}

// policyLab is two nodes in two subnets (VXLAN between them), two namespaces
// with a pod "a" and a pod "b" each, spread over the nodes, and the
// internet host; every one serves tcp/80, tcp/81 and udp/80. A dual-stack
// policyLab has its nodes in one subnet (IPv6 has no VXLAN yet) and probes
// every flow over both families; its pools have natOutgoing.
type policyLab struct {
	l     *lab.Lab
	pods  []*peer // by their IPv4 addresses
	pods6 []*peer // the same by their IPv6 ones, in a dual-stack lab
	inet  *peer
	flows []flow // of both families in a dual-stack lab
}

const dualNATPools = neverPool + `---
apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods-v6}
spec: {cidr: "fd00:244::/48", natOutgoing: true}
`

var nsLabels = map[string]map[string]string{
	"x": {"name": "x", "team": "blue"},
	"y": {"name": "y"},
}

// namedPorts are the pods' named ports: "serve" is a different port on a and
// on b.
var namedPorts = map[string][]api.EndpointPort{
	"a": {{Name: "serve", Protocol: api.Protocol{Name: "TCP"}, Port: 81}},
	"b": {{Name: "serve", Protocol: api.Protocol{Name: "TCP"}, Port: 80}, {Name: "serve", Protocol: api.Protocol{Name: "UDP"}, Port: 80}},
}

func newPolicyLab(t *testing.T, dual bool) *policyLab {
	opts := lab.Options{Nodes: 2, Subnets: 2, Pools: encapPool("vxlanMode: CrossSubnet"), AgentArgs: []string{"--resync-interval", "5s"}}
	if dual {
		opts.Subnets, opts.Pools, opts.DualStack = 1, dualNATPools, true
	}
	l := up(t, opts)
	waitReady(t, l)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	pl := &policyLab{l: l}
	for i, spec := range []struct{ namespace, app string }{{"x", "a"}, {"x", "b"}, {"y", "a"}, {"y", "b"}} {
		n := l.Nodes[i%2]
		if spec.namespace == "y" {
			n = l.Nodes[(i+1)%2] // y's pods sit the other way round
		}
		p, err := l.AddPodIn(ctx, n, spec.namespace, spec.namespace+"-"+spec.app)
		if err != nil {
			t.Fatal(err)
		}
		pl.pods = append(pl.pods, &peer{name: spec.namespace + "/" + spec.app, namespace: spec.namespace,
			labels: map[string]string{"app": spec.app}, ports: namedPorts[spec.app], ns: p.NS, addr: p.IP})
		if dual {
			pl.pods6 = append(pl.pods6, &peer{name: spec.namespace + "/" + spec.app, namespace: spec.namespace,
				labels: map[string]string{"app": spec.app}, ports: namedPorts[spec.app], ns: p.NS, addr: p.IP6})
		}
		serveAll(t, p.NS)
	}
	pl.inet = &peer{name: "internet", ns: l.Internet, addr: lab.InternetAddr}
	serveAll(t, l.Internet)
	pl.label(t)
	pl.flows = flowsOf(pl.pods, pl.inet)
	if dual {
		pl.flows = append(pl.flows, flowsOf(pl.pods6, &peer{name: "internet", ns: l.Internet, addr: lab.InternetAddr6})...)
	}
	return pl
}

// flowsOf are the flows from every pod to every other and to the internet host.
func flowsOf(pods []*peer, inet *peer) []flow {
	var flows []flow
	for _, from := range pods {
		for _, to := range append(slices.Clone(pods), inet) {
			if from == to {
				continue
			}
			for _, s := range services {
				flows = append(flows, flow{from, to, s})
			}
		}
	}
	return flows
}

// label gives the pods' WorkloadEndpoints their labels as
// margay-kube-controllers would: the pod's, its namespace, and its
// namespace's labels; and their named ports.
func (pl *policyLab) label(t *testing.T) {
	out, err := pl.l.Ctl(pl.l.Nodes[0], "get", "workloadendpoints", "-o", "json")
	if err != nil {
		t.Fatalf("get workloadendpoints: %v: %s", err, out)
	}
	var list struct{ Items []*api.WorkloadEndpoint }
	if err := json.Unmarshal([]byte(out), &list); err != nil {
		t.Fatal(err)
	}
	var docs []string
	for _, w := range list.Items {
		i := slices.IndexFunc(pl.pods, func(p *peer) bool {
			return p.name == w.Spec.Namespace+"/"+strings.TrimPrefix(w.Spec.Pod, w.Spec.Namespace+"-")
		})
		if i < 0 {
			t.Fatalf("endpoint %s is of no pod of the test", w.Metadata.Name)
		}
		p := pl.pods[i]
		w.Metadata.Labels = maps.Clone(p.labels)
		w.Metadata.Labels[api.LabelNamespace] = p.namespace
		for k, v := range nsLabels[p.namespace] {
			w.Metadata.Labels[api.NamespaceLabelPrefix+k] = v
		}
		w.Spec.Ports = p.ports
		b, _ := json.Marshal(w)
		docs = append(docs, string(b))
	}
	if out, err := apply(pl.l, strings.Join(docs, "\n---\n")); err != nil {
		t.Fatalf("labelling the endpoints: %v: %s", err, out)
	}
}

// expect is a policy case's truth table, written from the policy's meaning
// and not from margay's code.
type expect func(f flow) bool

// enforce applies the policies, waits until every flow does what want says,
// and reports how long that took; it then deletes the policies.
func (pl *policyLab) enforce(t *testing.T, yaml string, want expect) time.Duration {
	t.Helper()
	start := time.Now()
	if yaml != "" {
		if out, err := apply(pl.l, yaml); err != nil {
			t.Fatalf("apply: %v: %s", err, out)
		}
	}
	var last []string
	err := lab.WaitFor(30*time.Second, func() error {
		got := matrix(pl.flows)
		last = last[:0]
		for _, f := range pl.flows {
			if got[f] != want(f) {
				last = append(last, fmt.Sprintf("%s: got %v, want %v", f, got[f], want(f)))
			}
		}
		if len(last) > 0 {
			return errors.New(strings.Join(last, "\n"))
		}
		return nil
	})
	took := time.Since(start)
	if err != nil {
		for _, n := range pl.l.Nodes {
			for _, cmd := range []string{"iptables-save", "ip6tables-save"} {
				out, _ := n.NS.Run(cmd, "-t", "filter")
				t.Logf("%s's filter table (%s):\n%s", n.Name, cmd, out)
			}
		}
		t.Fatalf("after %s, %d of %d flows are wrong:\n%s", took.Round(time.Millisecond), len(last), len(pl.flows), strings.Join(last, "\n"))
	}
	if yaml == "" {
		return took
	}
	f, err := os.CreateTemp(pl.l.Dir(), "delete-*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	f.WriteString(yaml)
	f.Close()
	if out, err := pl.l.Ctl(pl.l.Nodes[0], "delete", "-f", f.Name()); err != nil {
		t.Fatalf("delete: %v: %s", err, out)
	}
	return took
}

// allOpen is the truth table with no policy: everything gets through.
func allOpen(flow) bool { return true }

// The Kubernetes NetworkPolicy cases of the upstream e2e suite, applied as
// networking.k8s.io/v1 files with margayctl, translated and enforced by
// margay across two nodes and two namespaces, on TCP and UDP. Each case's
// truth table is written from the Kubernetes semantics.
func TestKubernetesNetworkPolicy(t *testing.T) { kubernetesNetworkPolicy(t, false) }

// The same cases in a dual-stack lab, each flow probed over both families:
// selectors match a pod's IPv6 address as its IPv4 one, and an ipBlock only
// addresses of its own family.
func TestKubernetesNetworkPolicyDualStack(t *testing.T) { kubernetesNetworkPolicy(t, true) }

func kubernetesNetworkPolicy(t *testing.T, dual bool) {
	pl := newPolicyLab(t, dual)
	pl.enforce(t, "", allOpen)
	xb := pl.pods[1].addr
	type policyCase struct {
		name string
		yaml string
		want expect
	}
	cases := []policyCase{
		{"default deny ingress", knp("x", "deny", `podSelector: {}
  policyTypes: [Ingress]`),
			func(f flow) bool { return f.to.namespace != "x" }},
		{"default deny egress", knp("x", "deny", `podSelector: {}
  policyTypes: [Egress]`),
			func(f flow) bool { return f.from.namespace != "x" }},
		{"allow all ingress despite a deny", knp("x", "deny", `podSelector: {}
  policyTypes: [Ingress]`) + "---\n" + knp("x", "allow-all", `podSelector: {}
  ingress: [{}]`),
			allOpen},
		{"allow from namespace", knp("x", "from-y", `podSelector: {matchLabels: {app: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {name: "y"}}`),
			func(f flow) bool { return !f.to.is("x/a") || f.from.namespace == "y" }},
		{"allow from pod in namespace", knp("x", "from-y-b", `podSelector: {matchLabels: {app: a}}
  ingress:
  - from:
    - namespaceSelector: {matchLabels: {name: "y"}}
      podSelector: {matchLabels: {app: b}}`),
			func(f flow) bool { return !f.to.is("x/a") || f.from.is("y/b") }},
		{"allow from namespace or pod", knp("x", "from-y-or-b", `podSelector: {matchLabels: {app: a}}
  ingress:
  - from:
    - namespaceSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}
    - podSelector: {matchExpressions: [{key: app, operator: In, values: [b]}]}`),
			func(f flow) bool { return !f.to.is("x/a") || f.from.namespace == "y" || f.from.is("x/b") }},
		{"ipBlock with except", knp("x", "block", `podSelector: {matchLabels: {app: a}}
  ingress:
  - from:
    - ipBlock: {cidr: 10.244.0.0/16, except: [`+xb.String()+`/32]}`),
			func(f flow) bool { return !f.to.is("x/a") || !f.v6() && !f.from.is("x/b") }},
		{"ports by protocol", knp("x", "ports", `podSelector: {matchLabels: {app: a}}
  ingress:
  - ports: [{protocol: UDP, port: 80}, {port: 81}]`),
			func(f flow) bool { return !f.to.is("x/a") || f.svc == udp80 || f.svc == tcp81 }},
		{"port range", knp("x", "range", `podSelector: {matchLabels: {app: a}}
  ingress:
  - ports: [{protocol: TCP, port: 79, endPort: 81}]`),
			func(f flow) bool { return !f.to.is("x/a") || f.svc.proto == "tcp" }},
		{"named port, resolved on each pod", knp("x", "named", `podSelector: {}
  ingress:
  - ports: [{port: serve}]`),
			func(f flow) bool {
				return f.to.namespace != "x" || f.to.is("x/a") && f.svc == tcp81 || f.to.is("x/b") && f.svc == tcp80
			}},
		{"named port on egress, with a protocol", knp("y", "named-egress", `podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to: [{namespaceSelector: {}}]
    ports: [{protocol: UDP, port: serve}]`),
			func(f flow) bool { return !f.from.is("y/a") || f.to.labels["app"] == "b" && f.svc == udp80 }},
		{"egress to a CIDR", knp("x", "egress", `podSelector: {matchLabels: {app: a}}
  policyTypes: [Egress]
  egress:
  - to:
    - ipBlock: {cidr: 203.0.113.0/24}`),
			func(f flow) bool { return !f.from.is("x/a") || !f.v6() && f.to.is("internet") }},
		{"policy on both sides", knp("x", "deny", `podSelector: {}
  policyTypes: [Ingress]`) + "---\n" + knp("x", "from-y", `podSelector: {}
  ingress: [{from: [{namespaceSelector: {matchLabels: {name: "y"}}}]}]`) + "---\n" + knp("y", "deny", `podSelector: {}
  policyTypes: [Egress]`) + "---\n" + knp("y", "to-x", `podSelector: {}
  policyTypes: [Egress] # without, Kubernetes makes it Ingress too, isolating y
  egress: [{to: [{namespaceSelector: {matchLabels: {name: "x"}}}]}]`),
			func(f flow) bool {
				return (f.to.namespace != "x" || f.from.namespace == "y") && (f.from.namespace != "y" || f.to.namespace == "x")
			}},
	}
	if dual {
		yb6 := pl.pods6[3].addr
		cases = append(cases, policyCase{"IPv6 ipBlock with except", knp("x", "block6", `podSelector: {matchLabels: {app: a}}
  ingress:
  - from:
    - ipBlock: {cidr: "fd00:244::/48", except: ["`+yb6.String()+`/128"]}`),
			func(f flow) bool { return !f.to.is("x/a") || f.v6() && !f.from.is("y/b") }})
	}
	var took []time.Duration
	for _, c := range cases {
		took = append(took, pl.enforce(t, c.yaml, c.want))
		t.Logf("%s: enforced everywhere in %s", c.name, took[len(took)-1].Round(time.Millisecond))
	}
	pl.enforce(t, "", allOpen)
}

// knp is a Kubernetes NetworkPolicy.
func knp(namespace, name, spec string) string {
	return fmt.Sprintf(`apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: %s, namespace: "%s"}
spec:
  %s
`, name, namespace, spec)
}

// Calico's own resources: order within a tier, Deny before Allow, tiers and
// Pass, notNets, a GlobalNetworkPolicy over the namespaces a
// namespaceSelector picks, and egress Deny with notProtocol.
func TestCalicoPolicy(t *testing.T) {
	pl := newPolicyLab(t, false)
	xb := pl.pods[1].addr
	mgy := func(kind, namespace, name, spec string) string {
		ns := ""
		if namespace != "" {
			ns = ", namespace: \"" + namespace + "\""
		}
		return fmt.Sprintf("apiVersion: margay.dev/v1\nkind: %s\nmetadata: {name: %s%s}\nspec:\n  %s\n---\n", kind, name, ns, spec)
	}
	cases := []struct {
		name string
		yaml string
		want expect
	}{
		{"Deny first by order", mgy("NetworkPolicy", "x", "first", `order: 10
  ingress: [{action: Deny, protocol: TCP, destination: {ports: [81]}}]`) + mgy("NetworkPolicy", "x", "second", `order: 20
  ingress: [{action: Allow}]`),
			func(f flow) bool { return f.to.namespace != "x" || f.svc != tcp81 }},
		{"Allow first by order", mgy("NetworkPolicy", "x", "first", `order: 30
  ingress: [{action: Deny, protocol: TCP, destination: {ports: [81]}}]`) + mgy("NetworkPolicy", "x", "second", `order: 20
  ingress: [{action: Allow}]`),
			allOpen},
		{"tiers and Pass", mgy("Tier", "", "security", "order: 100") + mgy("GlobalNetworkPolicy", "", "sec", `tier: security
  order: 1
  ingress:
  - {action: Deny, protocol: TCP, source: {namespaceSelector: "name == 'y'"}, destination: {ports: [81]}}
  - {action: Pass}`) + mgy("NetworkPolicy", "y", "deny-y", "types: [Ingress]"),
			func(f flow) bool {
				return f.to.is("internet") || f.to.namespace == "x" && !(f.from.namespace == "y" && f.svc == tcp81)
			}},
		{"notNets", mgy("GlobalNetworkPolicy", "", "not-nets", `selector: app == 'a'
  ingress: [{action: Allow, source: {notNets: [`+xb.String()+`/32]}}]`),
			func(f flow) bool { return f.to.labels["app"] != "a" || !f.from.is("x/b") }},
		{"global policy by namespace", mgy("GlobalNetworkPolicy", "", "blue", `namespaceSelector: team == 'blue'
  ingress: [{action: Allow, source: {namespaceSelector: team == 'blue'}}]`),
			func(f flow) bool { return f.to.namespace != "x" || f.from.namespace == "x" }},
		{"egress Deny and notProtocol", mgy("GlobalNetworkPolicy", "", "b-out", `selector: app == 'b'
  egress:
  - {action: Deny, destination: {selector: app == 'a'}}
  - {action: Allow, notProtocol: UDP}`),
			func(f flow) bool {
				return f.from.labels["app"] != "b" || f.to.labels["app"] != "a" && f.svc.proto != "udp"
			}},
	}
	for _, c := range cases {
		took := pl.enforce(t, c.yaml, c.want)
		t.Logf("%s: enforced everywhere in %s", c.name, took.Round(time.Millisecond))
	}
	pl.enforce(t, "", allOpen)
}
