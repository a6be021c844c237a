package netpol

import (
	"strings"
	"testing"

	"github.com/margay-dev/margay/api"
)

const k8sPolicy = `apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: allow-web
  namespace: shop
spec:
  podSelector: {matchLabels: {app: web}}
  ingress: [{ports: [{port: 80}]}]
`

func refs(rs []api.Resource) []string {
	var out []string
	for _, r := range rs {
		out = append(out, api.Ref(r))
	}
	return out
}

func TestDecode(t *testing.T) {
	cases := []struct {
		name, in string
		want     []string
	}{{
		name: "margay and Kubernetes documents in one file",
		in:   "apiVersion: margay.dev/v1\nkind: Tier\nmetadata: {name: security}\nspec: {order: 10}\n---\n" + k8sPolicy,
		want: []string{`Tier "security"`, `NetworkPolicy "shop/knp.default.allow-web"`},
	}, {
		// As kubectl get networkpolicies -A -o yaml prints them.
		name: "a kubectl List",
		in: `apiVersion: v1
kind: List
metadata:
  resourceVersion: ""
items:
- apiVersion: networking.k8s.io/v1
  kind: NetworkPolicy
  metadata:
    name: deny
    namespace: a
    uid: 0b0f5b0a-8d0e-4f0e-9d55-1f9b4c3a2e10
    resourceVersion: "812"
    creationTimestamp: "2026-12-03T12:00:00Z"
    annotations: {kubectl.kubernetes.io/last-applied-configuration: "{}"}
  spec: {podSelector: {}, policyTypes: [Ingress]}
- apiVersion: margay.dev/v1
  kind: GlobalNetworkPolicy
  metadata: {name: g}
  spec: {selector: all()}
`,
		want: []string{`NetworkPolicy "a/knp.default.deny"`, `GlobalNetworkPolicy "g"`},
	}, {
		name: "a JSON stream",
		in: `{"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "x"}, "spec": {"podSelector": {}}}
{"apiVersion": "margay.dev/v1", "kind": "Tier", "metadata": {"name": "t"}, "spec": {"order": 1}}`,
		want: []string{`NetworkPolicy "default/knp.default.x"`, `Tier "t"`},
	}}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			rs, err := Decode([]byte(c.in))
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range rs {
				if m := r.GetMetadata(); api.KindOf(r).Namespaced && m.Namespace == "" {
					m.Namespace = api.DefaultNamespace // as margayctl -n does
				}
			}
			if got := refs(rs); strings.Join(got, ",") != strings.Join(c.want, ",") {
				t.Errorf("got %q, want %q", got, c.want)
			}
			for _, r := range rs {
				if err := r.Validate(); err != nil {
					t.Error(err)
				}
			}
		})
	}
	rs, err := Decode([]byte(k8sPolicy))
	if err != nil {
		t.Fatal(err)
	}
	want, err := Translate(k8s(t, "podSelector: {matchLabels: {app: web}}\ningress: [{ports: [{port: 80}]}]\n"))
	if err != nil {
		t.Fatal(err)
	}
	want.Metadata.Namespace, want.Metadata.Name = "shop", "knp.default.allow-web"
	if g, w := toYAML(t, rs[0]), toYAML(t, want); g != w {
		t.Errorf("Decode's translation\n%s\nis not Translate's\n%s", g, w)
	}
}

func TestDecodeErrors(t *testing.T) {
	margayPool := "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.0.0.0/16}\n---\n"
	cases := []struct {
		name, in string
		want     []string
	}{
		{"unknown field in a Kubernetes policy", margayPool + strings.Replace(k8sPolicy, "podSelector", "podSelectr", 1),
			[]string{"document 2", "networking.k8s.io/v1 NetworkPolicy", `unknown field "podSelectr"`}},
		{"untranslatable Kubernetes policy", margayPool + strings.Replace(k8sPolicy, "port: 80", "port: 0", 1),
			[]string{"document 2", `NetworkPolicy "shop/allow-web"`, "spec.ingress[0].ports[0].port: 0 must be from 1 to 65535"}},
		{"another Kubernetes kind", margayPool + "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: i}\n",
			[]string{"document 2", `networking.k8s.io/v1 "Ingress" is not supported`, "NetworkPolicy only"}},
		{"in a List", "apiVersion: v1\nkind: List\nitems:\n- " + strings.ReplaceAll(strings.Replace(k8sPolicy, "port: 80", "protocol: ICMP", 1), "\n", "\n  "),
			[]string{"document 1", "item 1", `"ICMP" must be TCP, UDP or SCTP`}},
		{"margay errors as api.Decode's", margayPool + "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: q}\nspec: {cidrr: x}\n",
			[]string{"document 2", `spec.cidrr: unknown field; did you mean "cidr"?`}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Decode([]byte(c.in))
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not mention %q", err, w)
				}
			}
		})
	}
}
