package netpol

import (
	"testing"

	networkingv1 "k8s.io/api/networking/v1"
	"sigs.k8s.io/yaml"
)

// FuzzTranslate: whatever decodes strictly as a Kubernetes NetworkPolicy
// either fails to translate, or translates into a valid margay policy that
// survives the trip through etcd's JSON unchanged.
func FuzzTranslate(f *testing.F) {
	for _, s := range []string{
		k8sPolicy,
		"metadata: {name: p, namespace: prod}\nspec: {podSelector: {}}\n",
		"metadata: {name: p}\nspec: {podSelector: {}, policyTypes: [Egress], egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}], ports: [{protocol: UDP, port: 53}, {protocol: SCTP}]}]}\n",
		"metadata: {name: p, namespace: a}\nspec:\n  podSelector: {matchExpressions: [{key: a, operator: In, values: [x, y]}, {key: b, operator: DoesNotExist}]}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchExpressions: [{key: c, operator: Exists}]}}]\n    ports: [{port: http}, {port: 8000, endPort: 8080}]\n",
		`{"metadata": {"name": "j", "namespace": "n"}, "spec": {"podSelector": {"matchLabels": {"k": ""}}, "ingress": [{"from": [{"ipBlock": {"cidr": "fd00::1/64"}}]}]}}`,
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, doc string) {
		var np networkingv1.NetworkPolicy
		if yaml.UnmarshalStrict([]byte(doc), &np) != nil {
			return
		}
		p, err := Translate(&np)
		if err != nil {
			return
		}
		checkTranslation(t, p)
	})
}
