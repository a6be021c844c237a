package api

import (
	"encoding/json"
	"reflect"
	"testing"
)

func FuzzDecode(f *testing.F) {
	seeds := []string{
		multiDocYAML,
		"apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p, labels: {a: b}}\nspec: {cidr: 10.244.0.0/16, blockSize: 24, vxlanMode: CrossSubnet, natOutgoing: true, nodeSelector: \"zone in {'a','b'}\"}\n",
		"apiVersion: margay.dev/v1\nkind: BGPConfiguration\nmetadata: {name: node.n1}\nspec: {asNumber: \"1.10\", nodeToNodeMeshEnabled: false, listenPort: 1179, nodeMeshPassword: pw, nodeMeshMaxRestartTime: 1h30m}\n",
		"apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: rr}\nspec: {peerIP: \"198.18.1.1:1179\", asNumber: 65001, keepaliveTime: 1500ms, holdTime: 9s, maxRestartTime: 2m, maxPrefixes: 500}\n",
		"apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: n1}\nspec:\n  bgp: {ipv4Address: 198.18.1.2/24, asNumber: 65001, routeReflectorClusterID: 224.0.0.1}\n  vxlanTunnelMACAddr: \"66:1f:3a:00:00:01\"\n",
		`{"apiVersion": "margay.dev/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w"}, "spec": {"node": "n", "containerID": "c", "interfaceName": "mgy1", "ipNetworks": ["10.244.0.5/32"], "mac": "ee:ee:ee:ee:ee:ee"}}`,
		`{"apiVersion": "margay.dev/v1", "kind": "List", "items": [{"apiVersion": "margay.dev/v1", "kind": "IPAMConfiguration", "metadata": {"name": "default"}, "spec": {"strictAffinity": true, "maxBlocksPerHost": 0}}]}`,
		"apiVersion: margay.dev/v1\nkind: NetworkPolicy\nmetadata: {name: p, namespace: web}\nspec:\n  order: 10\n  selector: app == 'web'\n  ingress:\n  - action: Allow\n    protocol: TCP\n    source: {selector: app == 'front', namespaceSelector: all(), nets: [10.0.0.0/8], notNets: [10.1.0.0/16]}\n    destination: {ports: [80, \"8000:8080\", http], notPorts: [8001]}\n  egress:\n  - {action: Pass, notProtocol: 17}\n",
		"apiVersion: margay.dev/v1\nkind: GlobalNetworkPolicy\nmetadata: {name: g}\nspec: {tier: security, namespaceSelector: has(team), types: [Egress], egress: [{action: Deny, protocol: 1}]}\n",
		"apiVersion: margay.dev/v1\nkind: Tier\nmetadata: {name: security}\nspec: {order: 100}\n",
		"# comment\n---\n--- # x\n",
		"",
	}
	for _, s := range seeds {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		rs, err := Decode(data)
		if err != nil {
			return
		}
		for i, r := range rs {
			_ = r.Validate()
			_ = ValidateAgainst(r, rs)
			if err := ValidateUpdate(r, r); err != nil {
				t.Fatalf("resource %d: ValidateUpdate(r, r) = %v", i, err)
			}
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatalf("resource %d: json.Marshal(%#v): %v", i, r, err)
			}
			back, err := DecodeOne(b)
			if err != nil {
				t.Fatalf("resource %d: DecodeOne(%s): %v", i, b, err)
			}
			r.SetDefaults()
			back.SetDefaults()
			if !reflect.DeepEqual(r, back) {
				t.Fatalf("resource %d: JSON round trip differs\n got %#v\nwant %#v\njson %s", i, back, r, b)
			}
		}
	})
}

// fuzzLabelSets adds short keys, which the fuzzer produces far more often than
// the realistic ones in selectorLabelSets.
var fuzzLabelSets = append([]struct {
	name   string
	labels map[string]string
}{
	{"short", map[string]string{"a": "b", "k": "v", "b": ""}},
	{"short2", map[string]string{"a": "", "c": "it's", "0": "0"}},
}, selectorLabelSets...)

func FuzzParseSelector(f *testing.F) {
	for _, tt := range selectorMatchCases {
		f.Add(tt.sel)
	}
	for _, s := range []string{"a == 'b", "k = 'v'", "((has(a))", "a in {'x' 'y'}", "!!!(!has(a) || b not in {\"c\"})"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		sel, err := ParseSelector(s)
		if err != nil {
			return
		}
		printed := sel.String()
		again, err := ParseSelector(printed)
		if err != nil {
			t.Fatalf("ParseSelector(%q) ok, but its String() %q does not parse: %v", s, printed, err)
		}
		for _, ls := range fuzzLabelSets {
			if a, b := sel.Matches(ls.labels), again.Matches(ls.labels); a != b {
				t.Fatalf("%q matches %s: %v, but its String() %q: %v", s, ls.name, a, printed, b)
			}
		}
		if again.String() != printed {
			t.Fatalf("String() not stable: %q then %q", printed, again.String())
		}
	})
}
