package calc

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/margay-dev/margay/api"
)

// wep is an endpoint on node in namespace ns with labels and, after the
// address, named ports as "name/PROTO/port".
func wep(node, ns, name, ip string, labels map[string]string, ports ...string) *api.WorkloadEndpoint {
	w := api.NewWorkloadEndpoint(node + "-" + ns + "-" + name)
	w.Metadata.Labels = map[string]string{api.LabelNamespace: ns}
	for k, v := range labels {
		w.Metadata.Labels[k] = v
	}
	w.Spec = api.WorkloadEndpointSpec{Node: node, Namespace: ns, Pod: name, ContainerID: "c", InterfaceName: "mgy" + name, IPNetworks: []string{ip}}
	for _, p := range ports {
		f := strings.Split(p, "/")
		var port uint16
		fmt.Sscan(f[2], &port)
		proto, _ := api.ProtocolFromName(f[1])
		w.Spec.Ports = append(w.Spec.Ports, api.EndpointPort{Name: f[0], Protocol: proto, Port: port})
	}
	return w
}

// decodePolicies reads margay policy and tier documents.
func decodePolicies(t *testing.T, docs string) Policy {
	t.Helper()
	rs, err := api.Decode([]byte(docs))
	if err != nil {
		t.Fatal(err)
	}
	var pol Policy
	for _, r := range rs {
		if err := r.Validate(); err != nil {
			t.Fatal(err)
		}
		switch r := r.(type) {
		case *api.NetworkPolicy:
			pol.Policies = append(pol.Policies, r)
		case *api.GlobalNetworkPolicy:
			pol.Globals = append(pol.Globals, r)
		case *api.Tier:
			pol.Tiers = append(pol.Tiers, r)
		}
	}
	return pol
}

// rendered is a policy plan with hashed names made readable: a policy chain
// is <in NAME> or <out NAME>, and a set is {its members}.
type rendered struct {
	chains   map[string][]string
	problems []string
	applied  map[string][]PolicyRef
}

func render(plan policyPlan, pol Policy) rendered {
	names := map[string]string{}
	for _, p := range pol.Policies {
		for _, d := range []api.PolicyType{api.PolicyIngress, api.PolicyEgress} {
			names[policyChainName(PolicyRef{Kind: api.KindNetworkPolicy, Namespace: p.Metadata.Namespace, Name: p.Metadata.Name}, d)] =
				fmt.Sprintf("<%s %s/%s>", map[api.PolicyType]string{api.PolicyIngress: "in", api.PolicyEgress: "out"}[d], p.Metadata.Namespace, p.Metadata.Name)
		}
	}
	for _, p := range pol.Globals {
		for _, d := range []api.PolicyType{api.PolicyIngress, api.PolicyEgress} {
			names[policyChainName(PolicyRef{Kind: api.KindGlobalNetworkPolicy, Name: p.Metadata.Name}, d)] =
				fmt.Sprintf("<%s %s>", map[api.PolicyType]string{api.PolicyIngress: "in", api.PolicyEgress: "out"}[d], p.Metadata.Name)
		}
	}
	for _, s := range plan.sets {
		var ms []string
		for _, m := range s.Members {
			ms = append(ms, m.String())
		}
		for _, p := range s.Ports {
			ms = append(ms, p.String())
		}
		names[s.Name] = "{" + strings.Join(ms, " ") + "}"
	}
	out := rendered{chains: map[string][]string{}, problems: plan.problems, applied: plan.applied}
	for _, c := range plan.chains {
		name := c.Name
		if n, ok := names[name]; ok {
			name = n
		}
		var lines []string
		for _, r := range c.Rules {
			var args []string
			for _, a := range r {
				if n, ok := names[a]; ok {
					a = n
				}
				args = append(args, a)
			}
			lines = append(lines, strings.Join(args, " "))
		}
		out.chains[name] = lines
	}
	return out
}

func TestPolicyRules(t *testing.T) {
	// Two namespaces, a and b, with a web and a db pod each; node n1 holds
	// a's; b's are on n2. Namespace a is labelled team=blue.
	blue := map[string]string{api.NamespaceLabelPrefix + "team": "blue"}
	withNS := func(l map[string]string) map[string]string {
		out := map[string]string{}
		for k, v := range l {
			out[k] = v
		}
		for k, v := range blue {
			out[k] = v
		}
		return out
	}
	eps := []*api.WorkloadEndpoint{
		wep("n1", "a", "web", "10.244.1.1/32", withNS(map[string]string{"app": "web"}), "http/TCP/8080"),
		wep("n1", "a", "db", "10.244.1.2/32", withNS(map[string]string{"app": "db"})),
		wep("n2", "b", "web", "10.244.2.1/32", map[string]string{"app": "web"}, "http/TCP/80", "http/UDP/53"),
		wep("n2", "b", "db", "10.244.2.2/32", map[string]string{"app": "db"}),
	}
	local := []Endpoint{{Name: eps[0].Metadata.Name, Interface: "mgyweb"}, {Name: eps[1].Metadata.Name, Interface: "mgydb"}}
	const (
		clear    = "-j MARK --set-xmark 0x0/0x30000"
		accept   = "-j MARK --set-xmark 0x10000/0x10000"
		ret      = "-j RETURN"
		ifAcc    = "-m mark --mark 0x10000/0x10000 -j RETURN"
		unpass   = "-j MARK --set-xmark 0x0/0x20000"
		notPass  = "-m mark --mark 0x0/0x20000"
		ifPassed = "-m mark --mark 0x20000/0x20000 -j RETURN"
	)
	drop := func(dir, tier string) string {
		return fmt.Sprintf(`%s -m comment --comment margay: no %s policy of tier %s allowed it -j DROP`, notPass, dir, tier)
	}
	jump := func(chain string) string { return notPass + " -j " + chain }
	open := []string{clear, accept, ret}

	cases := []struct {
		name     string
		policy   string
		chains   map[string][]string // only those named are checked
		absent   []string            // chains that must not exist
		applied  []string            // policies applied to a/web
		problems []string            // substrings, one per problem
	}{{
		name:   "no policy allows everything",
		chains: map[string][]string{"MGY-TW-mgyweb": open, "MGY-FW-mgyweb": open, "MGY-TW-mgydb": open, "MGY-FROM-EP": {"-i mgyweb -g MGY-FW-mgyweb", "-i mgydb -g MGY-FW-mgydb"}, "MGY-TO-EP": {"-o mgyweb -g MGY-TW-mgyweb", "-o mgydb -g MGY-TW-mgydb"}},
	}, {
		name: "a namespaced policy selects in its namespace only; its selector rule too",
		policy: `kind: NetworkPolicy
metadata: {name: web, namespace: a}
spec:
  selector: app == 'web'
  ingress: [{action: Allow, source: {selector: app == 'db'}}]`,
		chains: map[string][]string{
			"MGY-TW-mgyweb": {clear, jump("<in a/web>"), ifAcc, drop("ingress", "default"), unpass, accept, ret},
			"MGY-FW-mgyweb": open, // Ingress only
			"MGY-TW-mgydb":  open,
			// a's db only, not b's
			"<in a/web>": {"-m set --match-set {10.244.1.2/32} src -m comment --comment NetworkPolicy a/web ingress[0] " + accept, ifAcc},
		},
		absent:  []string{"<out a/web>"},
		applied: []string{"NetworkPolicy a/web"},
	}, {
		name: "a policy of another namespace does not apply",
		policy: `kind: NetworkPolicy
metadata: {name: deny, namespace: b}
spec: {selector: all(), types: [Ingress, Egress]}`,
		chains: map[string][]string{"MGY-TW-mgyweb": open, "MGY-FW-mgyweb": open},
		absent: []string{"<in b/deny>"},
	}, {
		name: "a namespaceSelector reaches other namespaces; a global policy's selector spans them",
		policy: `kind: NetworkPolicy
metadata: {name: from-web, namespace: a}
spec:
  selector: app == 'db'
  ingress: [{action: Allow, source: {selector: app == 'web', namespaceSelector: all()}}]
---
kind: GlobalNetworkPolicy
metadata: {name: blue-egress}
spec:
  selector: all()
  namespaceSelector: team == 'blue'
  egress: [{action: Allow, destination: {selector: app == 'db'}}]`,
		chains: map[string][]string{
			"<in a/from-web>":   {"-m set --match-set {10.244.1.1/32 10.244.2.1/32} src -m comment --comment NetworkPolicy a/from-web ingress[0] " + accept, ifAcc},
			"<out blue-egress>": {"-m set --match-set {10.244.1.2/32 10.244.2.2/32} dst -m comment --comment GlobalNetworkPolicy blue-egress egress[0] " + accept, ifAcc},
			"MGY-FW-mgyweb":     {clear, jump("<out blue-egress>"), ifAcc, drop("egress", "default"), unpass, accept, ret},
		},
		applied: []string{"GlobalNetworkPolicy blue-egress"},
	}, {
		name: "tiers in order, Pass skips the rest of its tier, Deny drops at once",
		policy: `kind: Tier
metadata: {name: security}
spec: {order: 10}
---
kind: Tier
metadata: {name: platform}
spec: {order: 20}
---
kind: GlobalNetworkPolicy
metadata: {name: z-platform}
spec:
  tier: platform
  selector: all()
  ingress: [{action: Allow, protocol: TCP, destination: {ports: [443]}}]
---
kind: GlobalNetworkPolicy
metadata: {name: sec}
spec:
  tier: security
  order: 5
  selector: all()
  ingress:
  - {action: Deny, source: {nets: [192.0.2.0/24], notNets: [192.0.2.8/29]}}
  - {action: Pass}
---
kind: NetworkPolicy
metadata: {name: late, namespace: a}
spec: {tier: security, order: 50, selector: all(), ingress: [{action: Allow}]}`,
		chains: map[string][]string{
			"MGY-TW-mgyweb": {clear,
				jump("<in sec>"), ifAcc, jump("<in a/late>"), ifAcc, drop("ingress", "security"), unpass,
				jump("<in z-platform>"), ifAcc, drop("ingress", "platform"), unpass,
				accept, ret},
			"<in sec>": {
				"-m set --match-set {192.0.2.0/24} src -m set ! --match-set {192.0.2.8/29} src -m comment --comment GlobalNetworkPolicy sec ingress[0] -j DROP",
				"-m comment --comment GlobalNetworkPolicy sec ingress[1] -j MARK --set-xmark 0x20000/0x20000", ifPassed},
			"<in z-platform>": {"-p tcp -m multiport --dports 443 -m comment --comment GlobalNetworkPolicy z-platform ingress[0] " + accept, ifAcc},
		},
		applied: []string{"GlobalNetworkPolicy sec", "NetworkPolicy a/late", "GlobalNetworkPolicy z-platform"},
	}, {
		name: "order within a tier, an unset order last, then by name",
		policy: `kind: NetworkPolicy
metadata: {name: b-unset, namespace: a}
spec: {selector: app == 'web', ingress: [{action: Allow}]}
---
kind: NetworkPolicy
metadata: {name: a-unset, namespace: a}
spec: {selector: app == 'web', ingress: [{action: Allow}]}
---
kind: NetworkPolicy
metadata: {name: ten, namespace: a}
spec: {order: 10, selector: app == 'web', ingress: [{action: Allow}]}
---
kind: GlobalNetworkPolicy
metadata: {name: two}
spec: {order: 2, selector: app == 'web', ingress: [{action: Allow}]}`,
		applied: []string{"GlobalNetworkPolicy two", "NetworkPolicy a/ten", "NetworkPolicy a/a-unset", "NetworkPolicy a/b-unset"},
	}, {
		name: "more ports than a multiport match takes; named ports by protocol and selector",
		policy: `kind: NetworkPolicy
metadata: {name: ports, namespace: a}
spec:
  selector: app == 'db'
  types: [Egress]
  egress:
  - action: Allow
    protocol: TCP
    destination:
      namespaceSelector: all()
      selector: app == 'web'
      ports: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, "20:30", http]
      notPorts: [9999]`,
		chains: map[string][]string{
			"<out a/ports>": {
				// 14 ports and a range (which counts twice) are 16 entries.
				"-p tcp -m set --match-set {10.244.1.1/32 10.244.2.1/32} dst -m multiport ! --dports 9999 -m multiport --dports 1,2,3,4,5,6,7,8,9,10,11,12,13,14 -m comment --comment NetworkPolicy a/ports egress[0] " + accept, ifAcc,
				"-p tcp -m set --match-set {10.244.1.1/32 10.244.2.1/32} dst -m multiport ! --dports 9999 -m multiport --dports 20:30 -m comment --comment NetworkPolicy a/ports egress[0] " + accept, ifAcc,
				// b/web's UDP "http" is not a TCP port.
				"-p tcp -m set --match-set {10.244.1.1/32 10.244.2.1/32} dst -m multiport ! --dports 9999 -m set --match-set {10.244.1.1,6:8080 10.244.2.1,6:80} dst,dst -m comment --comment NetworkPolicy a/ports egress[0] " + accept, ifAcc},
		},
	}, {
		name: "IPv6 nets match no IPv4 packet: the rule is left out, not widened",
		policy: `kind: NetworkPolicy
metadata: {name: v6, namespace: a}
spec:
  selector: app == 'web'
  ingress: [{action: Allow, source: {nets: ["2001:db8::/32"]}}, {action: Allow, protocol: UDP}]`,
		chains: map[string][]string{"<in a/v6>": {"-p udp -m comment --comment NetworkPolicy a/v6 ingress[1] " + accept, ifAcc}},
	}, {
		name: "a missing tier is enforced after the default tier, and reported",
		policy: `kind: GlobalNetworkPolicy
metadata: {name: lost}
spec: {tier: nowhere, selector: app == 'web', ingress: [{action: Deny}]}
---
kind: GlobalNetworkPolicy
metadata: {name: allow}
spec: {selector: app == 'web', ingress: [{action: Allow, protocol: TCP}]}`,
		chains: map[string][]string{
			"MGY-TW-mgyweb": {clear, jump("<in allow>"), ifAcc, drop("ingress", "default"), unpass, jump("<in lost>"), ifAcc, drop("ingress", "nowhere"), unpass, accept, ret},
		},
		applied:  []string{"GlobalNetworkPolicy allow", "GlobalNetworkPolicy lost"},
		problems: []string{`GlobalNetworkPolicy lost names tier "nowhere", which does not exist`},
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var docs []string
			for _, d := range strings.Split(c.policy, "---\n") {
				if strings.TrimSpace(d) != "" {
					docs = append(docs, "apiVersion: margay.dev/v1\n"+d)
				}
			}
			pol := Policy{}
			if len(docs) > 0 {
				pol = decodePolicies(t, strings.Join(docs, "\n---\n"))
			}
			pol.Endpoints = eps
			got := render(policyRules(local, pol), pol)
			for name, want := range c.chains {
				if have, ok := got.chains[name]; !ok {
					t.Errorf("no chain %s; have %v", name, slices.Sorted(maps.Keys(got.chains)))
				} else if !slices.Equal(have, want) {
					t.Errorf("chain %s:\n  %s\nwant\n  %s", name, strings.Join(have, "\n  "), strings.Join(want, "\n  "))
				}
			}
			for _, name := range c.absent {
				if _, ok := got.chains[name]; ok {
					t.Errorf("chain %s exists", name)
				}
			}
			var applied []string
			for _, r := range got.applied[eps[0].Metadata.Name] {
				applied = append(applied, r.String())
			}
			if c.applied != nil && !slices.Equal(applied, c.applied) {
				t.Errorf("applied to a/web: %q, want %q", applied, c.applied)
			}
			if refs := AppliedTo(pol, eps[0]); len(refs) != len(applied) {
				t.Errorf("AppliedTo: %v, Compute: %v", refs, applied)
			}
			if len(got.problems) != len(c.problems) {
				t.Errorf("problems %q, want %q", got.problems, c.problems)
			}
			for i := range min(len(got.problems), len(c.problems)) {
				if !strings.Contains(got.problems[i], c.problems[i]) {
					t.Errorf("problem %q does not say %q", got.problems[i], c.problems[i])
				}
			}
		})
	}
}

// A pod joining a selector changes the members of its set, not the name of
// the set or any chain: the data plane updates one ipset in place.
func TestPolicySetsFollowEndpoints(t *testing.T) {
	pol := decodePolicies(t, `apiVersion: margay.dev/v1
kind: NetworkPolicy
metadata: {name: p, namespace: a}
spec:
  selector: app == 'db'
  ingress: [{action: Allow, source: {selector: app == 'web'}}]`)
	db := wep("n1", "a", "db", "10.244.1.2/32", map[string]string{"app": "db"})
	local := []Endpoint{{Name: db.Metadata.Name, Interface: "mgydb"}}
	pol.Endpoints = []*api.WorkloadEndpoint{db, wep("n1", "a", "web", "10.244.1.1/32", map[string]string{"app": "web"})}
	before := policyRules(local, pol)
	pol.Endpoints = append(pol.Endpoints, wep("n2", "a", "web2", "10.244.2.9/32", map[string]string{"app": "web"}))
	after := policyRules(local, pol)
	if !slices.EqualFunc(before.chains, after.chains, func(a, b Chain) bool {
		return a.Name == b.Name && slices.EqualFunc(a.Rules, b.Rules, slices.Equal)
	}) {
		t.Error("a new member changed the chains")
	}
	// One set per family, the IPv6 one empty.
	if len(before.sets) != 2 || len(after.sets) != 2 || before.sets[0].Name != after.sets[0].Name ||
		after.sets[1].Name != after.sets[0].Name+"-v6" || len(after.sets[1].Members) != 0 {
		t.Fatalf("sets before %v, after %v", before.sets, after.sets)
	}
	if got := fmt.Sprint(after.sets[0].Members); got != "[10.244.1.1/32 10.244.2.9/32]" {
		t.Errorf("members after the pod joined: %s", got)
	}
}
