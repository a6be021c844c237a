package api

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"
)

const multiDocYAML = `# margay resources for the lab
---
# the pod pool
apiVersion: margay.dev/v1
kind: IPPool
metadata:
  name: default-pool   # trailing comment
  labels:
    margay.dev/role: pods
spec:
  cidr: 10.244.0.0/16
  ipipMode: CrossSubnet
  natOutgoing: true
--- # a separator with a comment
apiVersion: margay.dev/v1
kind: BGPConfiguration
metadata:
  name: default
spec:
  asNumber: 65000
  nodeToNodeMeshEnabled: false
  nodeMeshMaxRestartTime: 90s
---
# only a comment in this document
---
apiVersion: margay.dev/v1
kind: BGPPeer
metadata: {name: tor}
spec:
  peerIP: "198.18.1.1:1179"
  asNumber: "1.10"
  keepaliveTime: 20s
  holdTime: 1m
---
`

func TestDecodeMultiDocYAML(t *testing.T) {
	rs, err := Decode([]byte(multiDocYAML))
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if len(rs) != 3 {
		t.Fatalf("got %d resources, want 3", len(rs))
	}
	pool, ok := rs[0].(*IPPool)
	if !ok {
		t.Fatalf("resource 0 is %T, want *IPPool", rs[0])
	}
	wantPool := &IPPool{
		TypeMeta: TypeMeta{APIVersion: APIVersion, Kind: KindIPPool},
		Metadata: ObjectMeta{Name: "default-pool", Labels: map[string]string{"margay.dev/role": "pods"}},
		Spec: IPPoolSpec{CIDR: "10.244.0.0/16", BlockSize: 26, IPIPMode: EncapCrossSubnet, VXLANMode: EncapNever,
			NATOutgoing: true, NodeSelector: "all()"},
	}
	if !reflect.DeepEqual(pool, wantPool) {
		t.Errorf("pool = %+v\nwant %+v", pool, wantPool)
	}
	conf := rs[1].(*BGPConfiguration)
	if *conf.Spec.ASNumber != 65000 || *conf.Spec.NodeToNodeMeshEnabled || conf.Spec.NodeMeshMaxRestartTime.Duration != 90*time.Second || conf.Spec.ListenPort != nil {
		t.Errorf("BGPConfiguration spec = %+v", conf.Spec)
	}
	peer := rs[2].(*BGPPeer)
	if peer.Spec.PeerIP != "198.18.1.1:1179" || *peer.Spec.ASNumber != 65546 ||
		peer.Spec.KeepaliveTime.Duration != 20*time.Second || peer.Spec.HoldTime.Duration != time.Minute {
		t.Errorf("BGPPeer spec = %+v", peer.Spec)
	}
	for _, r := range rs {
		if err := r.Validate(); err != nil {
			t.Errorf("decoded resource invalid: %v", err)
		}
	}
}

func TestDecodeJSON(t *testing.T) {
	in := `{
  "apiVersion": "margay.dev/v1",
  "kind": "Node",
  "metadata": {"name": "node-1", "labels": {"zone": "a"}, "resourceVersion": "42"},
  "spec": {
    "bgp": {"ipv4Address": "198.18.1.2/24", "asNumber": 65001, "routeReflectorClusterID": "224.0.0.1"},
    "ipv4VXLANTunnelAddr": "10.244.3.0"
  }
}`
	for _, decode := range []struct {
		name string
		fn   func([]byte) (Resource, error)
	}{
		{"Decode", func(b []byte) (Resource, error) {
			rs, err := Decode(b)
			if err != nil {
				return nil, err
			}
			if len(rs) != 1 {
				t.Fatalf("got %d resources, want 1", len(rs))
			}
			return rs[0], nil
		}},
		{"DecodeOne", DecodeOne},
	} {
		t.Run(decode.name, func(t *testing.T) {
			r, err := decode.fn([]byte(in))
			if err != nil {
				t.Fatalf("decode: %v", err)
			}
			want := &Node{
				TypeMeta: TypeMeta{APIVersion: APIVersion, Kind: KindNode},
				Metadata: ObjectMeta{Name: "node-1", Labels: map[string]string{"zone": "a"}, ResourceVersion: "42"},
				Spec: NodeSpec{
					BGP:                 &NodeBGPSpec{IPv4Address: "198.18.1.2/24", ASNumber: ptr(ASNumber(65001)), RouteReflectorClusterID: "224.0.0.1"},
					IPv4VXLANTunnelAddr: "10.244.3.0",
				},
			}
			if !reflect.DeepEqual(r, want) {
				t.Errorf("got %+v\nwant %+v", r, want)
			}
		})
	}
}

// Windows line endings: the separator line ends in \r.
func TestDecodeCRLF(t *testing.T) {
	in := "apiVersion: margay.dev/v1\r\nkind: Node\r\nmetadata: {name: a}\r\n---\r\napiVersion: margay.dev/v1\r\nkind: Node\r\nmetadata: {name: b}\r\n"
	if rs, err := Decode([]byte(in)); err != nil || len(rs) != 2 || rs[1].GetMetadata().Name != "b" {
		t.Errorf("CRLF multi-document: %v, %d resources", err, len(rs))
	}
}

// YAML in flow style starts with a brace, like JSON, and is YAML all the same.
func TestDecodeFlowYAML(t *testing.T) {
	rs, err := Decode([]byte("{apiVersion: margay.dev/v1, kind: Node, metadata: {name: n1}, spec: {bgp: {ipv4Address: 10.0.0.1/24}}}\n---\n" +
		"{kind: IPPool, apiVersion: margay.dev/v1, metadata: {name: p}, spec: {cidr: 10.1.0.0/16}}\n"))
	if err != nil || len(rs) != 2 || rs[0].GetMetadata().Name != "n1" || rs[1].(*IPPool).Spec.CIDR != "10.1.0.0/16" {
		t.Fatalf("flow-style YAML: %v, %+v", err, rs)
	}
	if _, err := Decode([]byte("{kind: IPPool, apiVersion: margay.dev/v1, metadata: {name: p}, spec: {cidrr: 10.1.0.0/16}}")); err == nil || !strings.Contains(err.Error(), "spec.cidrr: unknown field") {
		t.Errorf("flow-style YAML with a typo: %v", err)
	}
	for _, in := range []string{"{apiVersion: margay.dev/v1, kind: Node, metadata: {name: a}} {kind: Node}", "{apiVersion: margay.dev/v1, kind: Node, metadata: {name: a}}\nb: 2"} {
		if rs, err := Decode([]byte(in)); err == nil {
			t.Errorf("Decode(%q) = %d resources and no error; want an error for what follows the first", in, len(rs))
		}
	}
}

func TestDecodeList(t *testing.T) {
	tests := []struct {
		name  string
		in    string
		kinds []string
	}{
		{"yaml list", `
apiVersion: margay.dev/v1
kind: List
items:
- apiVersion: margay.dev/v1
  kind: IPPool
  metadata: {name: a}
  spec: {cidr: 10.244.0.0/16}
- apiVersion: margay.dev/v1
  kind: IPPool
  metadata: {name: b}
  spec: {cidr: 10.245.0.0/16, vxlanMode: Always}
`, []string{"IPPool/a", "IPPool/b"}},
		{"json list", `{"apiVersion": "margay.dev/v1", "kind": "List", "items": [
  {"apiVersion": "margay.dev/v1", "kind": "WorkloadEndpoint", "metadata": {"name": "w"},
   "spec": {"node": "n", "containerID": "c", "interfaceName": "mgy1", "ipNetworks": ["10.244.0.5/32"]}},
  {"apiVersion": "margay.dev/v1", "kind": "IPAMConfiguration", "metadata": {"name": "default"}, "spec": {"strictAffinity": true}}
]}`, []string{"WorkloadEndpoint/w", "IPAMConfiguration/default"}},
		{"list between documents", `
apiVersion: margay.dev/v1
kind: Node
metadata: {name: n1}
---
apiVersion: margay.dev/v1
kind: List
items:
- {apiVersion: margay.dev/v1, kind: Node, metadata: {name: n2}}
- {apiVersion: margay.dev/v1, kind: Node, metadata: {name: n3}}
---
apiVersion: margay.dev/v1
kind: Node
metadata: {name: n4}
`, []string{"Node/n1", "Node/n2", "Node/n3", "Node/n4"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := Decode([]byte(tt.in))
			if err != nil {
				t.Fatalf("Decode: %v", err)
			}
			var got []string
			for _, r := range rs {
				got = append(got, r.GetTypeMeta().Kind+"/"+r.GetMetadata().Name)
				if err := r.Validate(); err != nil {
					t.Errorf("Validate: %v", err)
				}
			}
			if !reflect.DeepEqual(got, tt.kinds) {
				t.Errorf("got %v, want %v", got, tt.kinds)
			}
		})
	}
	// Items are defaulted like top-level documents.
	rs, _ := Decode([]byte(tests[0].in))
	if rs[1].(*IPPool).Spec.BlockSize != 26 || rs[1].(*IPPool).Spec.VXLANMode != EncapAlways {
		t.Errorf("list item not defaulted: %+v", rs[1].(*IPPool).Spec)
	}
}

func TestDecodeErrors(t *testing.T) {
	const pool = "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.244.0.0/16}\n"
	tests := []struct {
		name  string
		in    string
		frags []string
	}{
		{"unknown spec field", "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec:\n  cidrr: 10.244.0.0/16\n",
			[]string{"document 1", "IPPool", `spec.cidrr: unknown field; did you mean "cidr"?`}},
		{"unknown metadata field", "apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: node-1, uid: x}\n",
			[]string{`metadata.uid: unknown field`}},
		{"unknown top-level field", "apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: node-1}\nstatus: {}\n",
			[]string{`status: unknown field`}},
		{"unknown field in json", `{"apiVersion": "margay.dev/v1", "kind": "BGPPeer", "metadata": {"name": "p"}, "spec": {"peerIp": "1.2.3.4", "peerAS": 1}}`,
			[]string{`spec.peerAS: unknown field`}},
		{"unknown field in list item", "apiVersion: margay.dev/v1\nkind: List\nitems:\n- apiVersion: margay.dev/v1\n  kind: IPPool\n  metadata: {name: p}\n  spec: {cidr: 10.244.0.0/16}\n" +
			"- apiVersion: margay.dev/v1\n  kind: IPPool\n  metadata: {name: q}\n  spec: {blokSize: 24}\n",
			[]string{"item 2", `spec.blokSize: unknown field; did you mean "blockSize"?`}},
		{"unknown field on list", "apiVersion: margay.dev/v1\nkind: List\nitem: []\n", []string{`item: unknown field; did you mean "items"?`}},
		{"error in second document", pool + "---\napiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: q}\nspec: {natOutgoin: true}\n",
			[]string{"document 2", `spec.natOutgoin: unknown field; did you mean "natOutgoing"?`}},
		{"field names are case-sensitive", "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.244.0.0/16, blocksize: 24}\n",
			[]string{`spec.blocksize: unknown field; did you mean "blockSize"?`}},
		{"unknown field inside a list value", "apiVersion: margay.dev/v1\nkind: WorkloadEndpoint\nmetadata: {name: w}\nspec: {node: n, containerID: c, interfaceName: i, ipNetworks: [], extra: 1}\n",
			[]string{`spec.extra: unknown field`}},
		{"unknown kind", "apiVersion: margay.dev/v1\nkind: IPPoool\nmetadata: {name: p}\n", []string{`kind: "IPPoool" is not a margay kind`}},
		{"kind in lower case", "apiVersion: margay.dev/v1\nkind: ippool\nmetadata: {name: p}\n", []string{`"ippool" is not a margay kind`}},
		{"kind is a plural", "apiVersion: margay.dev/v1\nkind: ippools\nmetadata: {name: p}\n", []string{"is not a margay kind"}},
		{"kind missing", "apiVersion: margay.dev/v1\nmetadata: {name: p}\n", []string{"kind: is required"}},
		{"calico apiVersion", "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: p}\n",
			[]string{`apiVersion: "projectcalico.org/v3" is not supported; use "margay.dev/v1"`}},
		{"apiVersion missing", "kind: IPPool\nmetadata: {name: p}\n", []string{`apiVersion: "" is not supported`}},
		{"list item wrong apiVersion", "apiVersion: margay.dev/v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Node, metadata: {name: n}}\n",
			[]string{"item 1", `apiVersion: "v1" is not supported`}},
		{"wrong type", "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.244.0.0/16, blockSize: big}\n",
			[]string{"spec.blockSize: expected int, got string"}},
		{"bad duration", "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: p}\nspec: {holdTime: 90}\n",
			[]string{`duration 90 must be a string such as "90s"`}},
		{"bad duration string", "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: p}\nspec: {holdTime: ninety}\n",
			[]string{`duration "ninety"`, `"90s" or "2m"`}},
		{"yaml 1.1 boolean as a name", "apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: no}\n", []string{"metadata.name: expected string, got bool"}},
		{"not yaml", "apiVersion: margay.dev/v1\nkind: [IPPool\n", []string{"not valid YAML or JSON"}},
		{"broken json", `{"apiVersion": "margay.dev/v1", "kind": "Node",, "metadata": {"name": "n"}}`, []string{"not valid JSON", "invalid character ','"}},
		{"broken flow yaml", `{apiVersion: margay.dev/v1, kind: [Node, metadata: {name: n}}`, []string{"not valid YAML"}},
		{"scalar document", "just words\n", []string{"expected an object with apiVersion and kind"}},
		{"array document", "- a\n- b\n", []string{"expected an object with apiVersion and kind"}},
		{"empty input", "", []string{"no resources found in input"}},
		{"whitespace only", " \n\t\n", []string{"no resources found in input"}},
		{"comments and separators only", "# nothing\n---\n  # still nothing\n---\n", []string{"no resources found in input"}},
		{"empty list", "apiVersion: margay.dev/v1\nkind: List\nitems: []\n", []string{"no resources found in input"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rs, err := Decode([]byte(tt.in))
			if err == nil {
				t.Fatalf("Decode succeeded with %d resources, want an error", len(rs))
			}
			if rs != nil {
				t.Errorf("Decode returned resources alongside error %v", err)
			}
			for _, f := range tt.frags {
				if !strings.Contains(err.Error(), f) {
					t.Errorf("error %q does not contain %q", err, f)
				}
			}
		})
	}
}

func TestDecodeOneErrors(t *testing.T) {
	tests := []struct{ in, frag string }{
		{`{"apiVersion": "margay.dev/v1", "kind": "List", "items": []}`, `"List" is not a margay kind`},
		{`null`, "kind: is required"},
		{`{"apiVersion": "margay.dev/v1", "kind": "IPPool", "spec": {"cidr": 10}}`, "spec.cidr: expected string, got number"},
	}
	for _, tt := range tests {
		_, err := DecodeOne([]byte(tt.in))
		if err == nil || !strings.Contains(err.Error(), tt.frag) {
			t.Errorf("DecodeOne(%s) error = %v, want %q", tt.in, err, tt.frag)
		}
	}
}

// Every kind, fully populated, survives Decode → json.Marshal → DecodeOne.
func TestJSONRoundTrip(t *testing.T) {
	in := `
apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: p, labels: {a: b}, resourceVersion: "7"}
spec: {cidr: 10.244.0.0/16, blockSize: 24, vxlanMode: CrossSubnet, natOutgoing: true, disabled: true, nodeSelector: "zone in {'a','b'}"}
---
apiVersion: margay.dev/v1
kind: BGPConfiguration
metadata: {name: default}
spec: {asNumber: "65535.65535", nodeToNodeMeshEnabled: false, listenPort: 1179, nodeMeshPassword: pw, nodeMeshMaxRestartTime: 1h30m}
---
apiVersion: margay.dev/v1
kind: BGPPeer
metadata: {name: rr}
spec: {nodeSelector: "!has(rr)", peerSelector: "has(rr)", password: x, keepaliveTime: 1500ms, holdTime: 9s, maxRestartTime: 2m}
---
apiVersion: margay.dev/v1
kind: Node
metadata: {name: n1}
spec:
  bgp: {ipv4Address: 198.18.1.2/24, asNumber: 65001, routeReflectorClusterID: 224.0.0.1, ipv4IPIPTunnelAddr: 10.244.0.1}
  ipv4VXLANTunnelAddr: 10.244.0.2
  vxlanTunnelMACAddr: "66:1f:3a:00:00:01"
---
apiVersion: margay.dev/v1
kind: WorkloadEndpoint
metadata: {name: w}
spec: {node: n1, orchestrator: k8s, namespace: ns, pod: pod, containerID: c, endpoint: eth0, interfaceName: mgy1, ipNetworks: [10.244.0.5/32], mac: "ee:ee:ee:ee:ee:ee"}
---
apiVersion: margay.dev/v1
kind: IPAMConfiguration
metadata: {name: default}
spec: {strictAffinity: true, maxBlocksPerHost: 0}
---
apiVersion: margay.dev/v1
kind: Node
metadata: {name: bare}
`
	rs, err := Decode([]byte(in))
	if err != nil {
		t.Fatalf("Decode: %v", err)
	}
	if len(rs) != 7 {
		t.Fatalf("got %d resources, want 7", len(rs))
	}
	for _, r := range rs {
		t.Run(Ref(r), func(t *testing.T) {
			if err := r.Validate(); err != nil {
				t.Fatalf("Validate: %v", err)
			}
			b, err := json.Marshal(r)
			if err != nil {
				t.Fatalf("Marshal: %v", err)
			}
			back, err := DecodeOne(b)
			if err != nil {
				t.Fatalf("DecodeOne(%s): %v", b, err)
			}
			if !reflect.DeepEqual(r, back) {
				t.Errorf("round trip differs:\n got %#v\nwant %#v\njson %s", back, r, b)
			}
			// And through the multi-document path.
			again, err := Decode(b)
			if err != nil || len(again) != 1 || !reflect.DeepEqual(again[0], r) {
				t.Errorf("Decode(%s) = %v, %v", b, again, err)
			}
		})
	}
	// Values that must survive literally.
	b, _ := json.Marshal(rs[1])
	if !strings.Contains(string(b), `"asNumber":4294967295`) || !strings.Contains(string(b), `"nodeMeshMaxRestartTime":"1h30m0s"`) {
		t.Errorf("BGPConfiguration JSON = %s", b)
	}
	if m := rs[5].(*IPAMConfiguration).MaxBlocks(); m != 0 {
		t.Errorf("explicit maxBlocksPerHost 0 decoded as %d", m)
	}
}

// `labels: {}` decodes to an empty map, marshals (omitempty) to nothing, and comes
// back as nil: semantically the same, but not DeepEqual.
func TestJSONRoundTripEmptyLabels(t *testing.T) {
	rs, err := Decode([]byte("apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: node-1, labels: {}}\n"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(rs[0])
	back, err := DecodeOne(b)
	if err != nil {
		t.Fatal(err)
	}
	expect(t, reflect.DeepEqual(rs[0], back),
		"meta.go ObjectMeta.Labels: `labels: {}` decodes to an empty non-nil map but round-trips to nil (json omitempty); normalise empty labels to nil on decode")
}

func TestKinds(t *testing.T) {
	for _, k := range Kinds() {
		r := k.New()
		if r.GetTypeMeta().Kind != k.Kind || r.GetTypeMeta().APIVersion != APIVersion {
			t.Errorf("%s: New() has type %+v", k.Kind, *r.GetTypeMeta())
		}
		if got := KindOf(r); got.Kind != k.Kind {
			t.Errorf("KindOf(%T) = %s, want %s", r, got.Kind, k.Kind)
		}
		for _, name := range append([]string{k.Kind, strings.ToUpper(k.Kind), k.Plural}, k.Aliases...) {
			got, err := LookupKind(name)
			if err != nil || got.Kind != k.Kind {
				t.Errorf("LookupKind(%q) = %s, %v; want %s", name, got.Kind, err, k.Kind)
			}
		}
	}
	if got := KindOf((*IPPool)(nil)); got.Kind != KindIPPool {
		t.Errorf("KindOf(nil *IPPool) = %s", got.Kind)
	}
	_, err := LookupKind("pods")
	if err == nil || !strings.Contains(err.Error(), `unknown resource kind "pods"`) || !strings.Contains(err.Error(), "ippools") {
		t.Errorf("LookupKind(pods) error = %v", err)
	}
	if got := Ref(validPool()); got != `IPPool "pool-a"` {
		t.Errorf("Ref = %s", got)
	}
}

// Two JSON objects one after the other (jq -c output, a log of resources) must
// give both resources or an error, never silently just the first.
func TestDecodeTrailingData(t *testing.T) {
	const a = `{"apiVersion": "margay.dev/v1", "kind": "Node", "metadata": {"name": "a"}}`
	const b = `{"apiVersion": "margay.dev/v1", "kind": "Node", "metadata": {"name": "b"}}`
	for _, in := range []string{a + "\n" + b + "\n", a + " " + b, a + " trailing garbage"} {
		t.Run(in[len(a):], func(t *testing.T) {
			rs, err := Decode([]byte(in))
			expect(t, err != nil || len(rs) == 2,
				"decode.go decodeDoc/DecodeOne: yaml.YAMLToJSON keeps only the first YAML node, so Decode(%q) returns %d resource(s) and no error; the rest is silently dropped", in, len(rs))
		})
	}
}
