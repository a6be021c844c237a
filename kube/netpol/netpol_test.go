package netpol

import (
	"cmp"
	"encoding/json"
	"strings"
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"

	"github.com/margay-dev/margay/api"
)

// k8s decodes a Kubernetes NetworkPolicy prod/p with the given spec, strictly.
func k8s(t testing.TB, spec string) *networkingv1.NetworkPolicy {
	t.Helper()
	var np networkingv1.NetworkPolicy
	doc := "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: prod}\nspec:\n" + indent(spec)
	if err := yaml.UnmarshalStrict([]byte(doc), &np); err != nil {
		t.Fatalf("test input: %v\n%s", err, doc)
	}
	return &np
}

func indent(s string) string {
	s = strings.TrimPrefix(s, "\n")
	var b strings.Builder
	for _, l := range strings.SplitAfter(s, "\n") {
		if l != "" {
			b.WriteString("  " + l)
		}
	}
	return b.String()
}

// margay decodes the margay NetworkPolicy prod/knp.default.p with the given
// spec (order 1000 implied).
func margay(t testing.TB, spec string) *api.NetworkPolicy {
	t.Helper()
	doc := "apiVersion: margay.dev/v1\nkind: NetworkPolicy\nmetadata: {name: knp.default.p, namespace: prod}\nspec:\n  order: 1000\n" + indent(spec)
	r, err := api.DecodeOne([]byte(doc))
	if err != nil {
		t.Fatalf("test want: %v\n%s", err, doc)
	}
	return r.(*api.NetworkPolicy)
}

func toYAML(t testing.TB, v any) string {
	t.Helper()
	b, err := yaml.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// checkTranslation checks what every translation must be: valid, with
// selectors in the canonical form the parser prints, and the same after a
// round trip through JSON (as etcd stores it), so that the controller does
// not see a stored translation as different from a new one.
func checkTranslation(t testing.TB, p *api.NetworkPolicy) {
	t.Helper()
	// As margayctl stores one from a file without a namespace.
	v := *p
	v.Metadata.Namespace = cmp.Or(v.Metadata.Namespace, api.DefaultNamespace)
	if err := v.Validate(); err != nil {
		t.Fatalf("translation does not validate: %v\n%s", err, toYAML(t, p))
	}
	sels := []string{p.Spec.Selector}
	for _, rs := range [][]api.Rule{p.Spec.Ingress, p.Spec.Egress} {
		for _, r := range rs {
			sels = append(sels, r.Source.Selector, r.Source.NamespaceSelector, r.Destination.Selector, r.Destination.NamespaceSelector)
		}
	}
	for _, s := range sels {
		if s == "" {
			continue
		}
		sel, err := api.ParseSelector(s)
		if err != nil {
			t.Fatalf("selector %q does not parse: %v", s, err)
		}
		if sel.String() != s {
			t.Errorf("selector %q is not canonical: the parser prints %q", s, sel.String())
		}
	}
	js, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	back, err := api.DecodeOne(js)
	if err != nil {
		t.Fatalf("translation does not decode back: %v\n%s", err, js)
	}
	js2, _ := json.Marshal(back)
	if string(js) != string(js2) {
		t.Errorf("translation changes through JSON:\n%s\n%s", js, js2)
	}
}

func TestTranslate(t *testing.T) {
	cases := []struct{ name, in, want string }{{
		name: "default deny ingress",
		in:   "podSelector: {}\n",
		want: "selector: all()\ntypes: [Ingress]\n",
	}, {
		name: "default deny egress",
		in:   "podSelector: {}\npolicyTypes: [Egress]\n",
		want: "selector: all()\ntypes: [Egress]\n",
	}, {
		name: "default deny both",
		in:   "podSelector: {}\npolicyTypes: [Ingress, Egress]\n",
		want: "selector: all()\ntypes: [Ingress, Egress]\n",
	}, {
		name: "allow all ingress",
		in:   "podSelector: {}\ningress: [{}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow}]\n",
	}, {
		name: "allow all egress",
		in:   "podSelector: {}\negress: [{}]\npolicyTypes: [Egress]\n",
		want: "selector: all()\ntypes: [Egress]\negress: [{action: Allow}]\n",
	}, {
		name: "egress rules without policyTypes add Egress to Ingress (upstream default)",
		in:   "podSelector: {matchLabels: {app: web}}\negress: [{}]\n",
		want: "selector: app == 'web'\ntypes: [Ingress, Egress]\negress: [{action: Allow}]\n",
	}, {
		name: "rules of a direction not in policyTypes never apply, and are left out",
		in:   "podSelector: {}\npolicyTypes: [Egress]\ningress: [{}]\n",
		want: "selector: all()\ntypes: [Egress]\n",
	}, {
		name: "a type listed twice is listed once",
		in:   "podSelector: {}\npolicyTypes: [Egress, Egress]\n",
		want: "selector: all()\ntypes: [Egress]\n",
	}, {
		name: "from pods of the policy's namespace",
		in:   "podSelector: {matchLabels: {app: db}}\ningress: [{from: [{podSelector: {matchLabels: {app: web}}}]}]\n",
		want: "selector: app == 'db'\ntypes: [Ingress]\ningress: [{action: Allow, source: {selector: app == 'web'}}]\n",
	}, {
		name: "from every pod of the policy's namespace",
		in:   "podSelector: {}\ningress: [{from: [{podSelector: {}}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, source: {selector: all()}}]\n",
	}, {
		name: "from namespace",
		in:   "podSelector: {}\ningress: [{from: [{namespaceSelector: {matchLabels: {team: blue}}}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, source: {namespaceSelector: team == 'blue'}}]\n",
	}, {
		name: "from every namespace",
		in:   "podSelector: {}\ningress: [{from: [{namespaceSelector: {}}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, source: {namespaceSelector: all()}}]\n",
	}, {
		name: "from pod in namespace (both selectors in one peer)",
		in:   "podSelector: {}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {team: blue}}\n    podSelector: {matchLabels: {app: web}}\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, source: {selector: app == 'web', namespaceSelector: team == 'blue'}}]\n",
	}, {
		name: "ipBlock with except",
		in:   "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 172.17.0.0/16, except: [172.17.1.0/24, 172.17.2.0/24]}}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, source: {nets: [172.17.0.0/16], notNets: [172.17.1.0/24, 172.17.2.0/24]}}]\n",
	}, {
		name: "ipBlock with host bits, which Kubernetes ignores; and IPv6",
		in:   "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.1.2.3/16}}, {ipBlock: {cidr: 'fd00::/64', except: ['fd00::/80']}}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress:\n- {action: Allow, source: {nets: [10.1.0.0/16]}}\n- {action: Allow, source: {nets: ['fd00::/64'], notNets: ['fd00::/80']}}\n",
	}, {
		name: "a port: TCP by default, on the destination (the selected pod)",
		in:   "podSelector: {}\ningress: [{ports: [{port: 80}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, protocol: TCP, destination: {ports: [80]}}]\n",
	}, {
		name: "named port",
		in:   "podSelector: {}\ningress: [{ports: [{port: http}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, protocol: TCP, destination: {ports: [http]}}]\n",
	}, {
		name: "port range (endPort)",
		in:   "podSelector: {}\ningress: [{ports: [{protocol: TCP, port: 32000, endPort: 32768}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, protocol: TCP, destination: {ports: ['32000:32768']}}]\n",
	}, {
		name: "a protocol without a port allows all its ports",
		in:   "podSelector: {}\ningress: [{ports: [{protocol: UDP, port: 53}, {protocol: UDP}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, protocol: UDP}]\n",
	}, {
		name: "SCTP",
		in:   "podSelector: {}\ningress: [{ports: [{protocol: SCTP, port: 9999}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, protocol: SCTP, destination: {ports: [9999]}}]\n",
	}, {
		name: "egress to CIDR",
		in:   "podSelector: {matchLabels: {role: db}}\npolicyTypes: [Egress]\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/24}}], ports: [{protocol: TCP, port: 5978}]}]\n",
		want: "selector: role == 'db'\ntypes: [Egress]\negress: [{action: Allow, protocol: TCP, destination: {nets: [10.0.0.0/24], ports: [5978]}}]\n",
	}, {
		name: "egress to a pod's named port",
		in:   "podSelector: {}\npolicyTypes: [Egress]\negress: [{to: [{podSelector: {matchLabels: {app: dns}}, namespaceSelector: {}}], ports: [{protocol: UDP, port: dns}]}]\n",
		want: "selector: all()\ntypes: [Egress]\negress: [{action: Allow, protocol: UDP, destination: {selector: app == 'dns', namespaceSelector: all(), ports: [dns]}}]\n",
	}, {
		name: "multiple peers × multiple ports: one rule per peer and protocol",
		in: `podSelector: {}
ingress:
- from: [{podSelector: {matchLabels: {app: a}}}, {ipBlock: {cidr: 192.0.2.0/24}}]
  ports: [{port: 80}, {protocol: UDP, port: 53}, {port: 443}, {port: 8000, endPort: 8080}, {port: metrics}]
`,
		want: `selector: all()
types: [Ingress]
ingress:
- {action: Allow, protocol: TCP, source: {selector: app == 'a'}, destination: {ports: [80, 443, '8000:8080', metrics]}}
- {action: Allow, protocol: UDP, source: {selector: app == 'a'}, destination: {ports: [53]}}
- {action: Allow, protocol: TCP, source: {nets: [192.0.2.0/24]}, destination: {ports: [80, 443, '8000:8080', metrics]}}
- {action: Allow, protocol: UDP, source: {nets: [192.0.2.0/24]}, destination: {ports: [53]}}
`,
	}, {
		name: "several rules stay in order",
		in:   "podSelector: {}\ningress: [{from: [{podSelector: {}}]}, {ports: [{port: 22}]}]\n",
		want: "selector: all()\ntypes: [Ingress]\ningress: [{action: Allow, source: {selector: all()}}, {action: Allow, protocol: TCP, destination: {ports: [22]}}]\n",
	}, {
		name: "matchExpressions of all four operators, with matchLabels first, by key",
		in: `podSelector:
  matchLabels: {tier: front, app: web}
  matchExpressions:
  - {key: env, operator: In, values: [prod, dev, prod]}
  - {key: example.com/zone, operator: NotIn, values: [b, a]}
  - {key: canary, operator: Exists}
  - {key: legacy, operator: DoesNotExist}
`,
		want: "selector: \"app == 'web' && tier == 'front' && env in {'dev', 'prod'} && example.com/zone not in {'a', 'b'} && has(canary) && !has(legacy)\"\ntypes: [Ingress]\n",
	}, {
		name: "label keys that are words of the selector language, and an empty value",
		in:   "podSelector:\n  matchLabels: {has: x, all: '', in: 'y'}\n  matchExpressions: [{key: not, operator: NotIn, values: [a]}, {key: has, operator: Exists}]\n",
		want: "selector: \"all == '' && has == 'x' && in == 'y' && not not in {'a'} && has(has)\"\ntypes: [Ingress]\n",
	}, {
		// The example of the Kubernetes documentation's NetworkPolicy page.
		name: "the upstream example",
		in: `podSelector:
  matchLabels:
    role: db
policyTypes:
- Ingress
- Egress
ingress:
- from:
  - ipBlock:
      cidr: 172.17.0.0/16
      except:
      - 172.17.1.0/24
  - namespaceSelector:
      matchLabels:
        project: myproject
  - podSelector:
      matchLabels:
        role: frontend
  ports:
  - protocol: TCP
    port: 6379
egress:
- to:
  - ipBlock:
      cidr: 10.0.0.0/24
  ports:
  - protocol: TCP
    port: 5978
`,
		want: `selector: role == 'db'
types: [Ingress, Egress]
ingress:
- {action: Allow, protocol: TCP, source: {nets: [172.17.0.0/16], notNets: [172.17.1.0/24]}, destination: {ports: [6379]}}
- {action: Allow, protocol: TCP, source: {namespaceSelector: project == 'myproject'}, destination: {ports: [6379]}}
- {action: Allow, protocol: TCP, source: {selector: role == 'frontend'}, destination: {ports: [6379]}}
egress:
- {action: Allow, protocol: TCP, destination: {nets: [10.0.0.0/24], ports: [5978]}}
`,
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Translate(k8s(t, c.in))
			if err != nil {
				t.Fatal(err)
			}
			checkTranslation(t, got)
			if g, w := toYAML(t, got), toYAML(t, margay(t, c.want)); g != w {
				t.Errorf("got\n%s\nwant\n%s", g, w)
			}
		})
	}
}

// The name and namespace: knp.default.<name>, in the same namespace, or in
// none for an object without one (from a file), which margayctl -n fills as
// for a margay policy.
func TestTranslateMeta(t *testing.T) {
	np := k8s(t, "podSelector: {}\n")
	np.Name, np.Namespace, np.Labels = "allow-web", "shop", map[string]string{"a": "b"}
	got, err := Translate(np)
	if err != nil {
		t.Fatal(err)
	}
	m := got.Metadata
	if m.Name != "knp.default.allow-web" || m.Namespace != "shop" || m.Labels != nil || got.Spec.Tier != "" || *got.Spec.Order != 1000 {
		t.Errorf("got %+v, tier %q, order %v", m, got.Spec.Tier, *got.Spec.Order)
	}
	np.Namespace = ""
	if got, err = Translate(np); err != nil || got.Metadata.Namespace != "" {
		t.Errorf("without a namespace: %v, %v", got, err)
	}
	np.Name = strings.Repeat("a", 242)
	if _, err := Translate(np); err == nil || !strings.Contains(err.Error(), "shorten the name") {
		t.Errorf("a name too long for the prefix: %v", err)
	}
}

func TestTranslateRefuses(t *testing.T) {
	cases := []struct{ name, in, want string }{
		{"a peer with nothing", "podSelector: {}\ningress: [{from: [{}]}]\n", "spec.ingress[0].from[0]: a peer needs"},
		{"ipBlock with a selector", "podSelector: {}\negress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}]}]\n", "spec.egress[0].to[0]: ipBlock cannot be combined"},
		{"not a CIDR", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.1}}]}]\n", "ipBlock.cidr: \"10.0.0.1\" is not a CIDR"},
		{"except outside cidr", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.1.0.0/24]}}]}]\n", "except[0]: 10.1.0.0/24 must be inside"},
		{"except equal to cidr", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 10.0.0.0/16, except: [10.0.0.0/16]}}]}]\n", "must be inside"},
		{"except of the other family", "podSelector: {}\ningress: [{from: [{ipBlock: {cidr: 0.0.0.0/0, except: ['::/1']}}]}]\n", "must be inside"},
		{"ICMP", "podSelector: {}\ningress: [{ports: [{protocol: ICMP}]}]\n", `ports[0].protocol: "ICMP" must be TCP, UDP or SCTP`},
		{"lower-case protocol", "podSelector: {}\ningress: [{ports: [{protocol: tcp, port: 80}]}]\n", `"tcp" must be TCP`},
		{"endPort of a named port", "podSelector: {}\ningress: [{ports: [{port: http, endPort: 90}]}]\n", "endPort: needs a numeric port"},
		{"endPort without a port", "podSelector: {}\ningress: [{ports: [{endPort: 90}]}]\n", "endPort: needs a numeric port"},
		{"endPort below port", "podSelector: {}\ningress: [{ports: [{port: 100, endPort: 90}]}]\n", "endPort: 90 must be from port (100)"},
		{"port 0", "podSelector: {}\ningress: [{ports: [{port: 0}]}]\n", "port: 0 must be from 1 to 65535"},
		{"port too big", "podSelector: {}\ningress: [{ports: [{port: 70000}]}]\n", "port: 70000"},
		{"bad port name", "podSelector: {}\ningress: [{ports: [{port: HTTP}]}]\n", `"HTTP" is neither a port number nor a port name`},
		{"a number as a string", "podSelector: {}\ningress: [{ports: [{port: '80'}]}]\n", `"80" is neither`},
		{"bad operator", "podSelector: {matchExpressions: [{key: a, operator: Gt, values: ['1']}]}\n", `spec.podSelector.matchExpressions[0].operator: "Gt" must be In`},
		{"In without values", "podSelector: {matchExpressions: [{key: a, operator: In}]}\n", "In needs at least one value"},
		{"Exists with values", "podSelector: {matchExpressions: [{key: a, operator: Exists, values: [x]}]}\n", "Exists takes no values"},
		{"bad label key", "podSelector: {matchLabels: {'a b': c}}\n", `matchLabels: "a b" is not a valid label key`},
		{"bad label value", "podSelector: {matchLabels: {a: \"it's\"}}\n", `matchLabels.a: "it's" is not a valid label value`},
		{"bad expression value", "ingress: [{from: [{namespaceSelector: {matchExpressions: [{key: a, operator: In, values: ['x}']}]}}]}]\n", `from[0].namespaceSelector.matchExpressions[0].values: "x}"`},
		{"bad policy type", "podSelector: {}\npolicyTypes: [Both]\n", `spec.policyTypes[0]: "Both" must be Ingress or Egress`},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got, err := Translate(k8s(t, c.in))
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("error %v, want one containing %q; translation:\n%s", err, c.want, toYAML(t, got))
			}
		})
	}
	np := k8s(t, "podSelector: {}\n")
	np.Namespace = "Prod"
	if _, err := Translate(np); err == nil || !strings.Contains(err.Error(), "metadata.namespace") {
		t.Errorf("bad namespace: %v", err)
	}
	np.Namespace, np.Name = "prod", "a_b"
	if _, err := Translate(np); err == nil || !strings.Contains(err.Error(), "metadata.name") {
		t.Errorf("bad name: %v", err)
	}
}
