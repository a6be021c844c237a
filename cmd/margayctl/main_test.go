package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"sigs.k8s.io/yaml"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/etcdtest"
)

// usageHint ends the error line of a usage error.
const usageHint = "(margayctl --help shows usage)"

// unreachable is an etcd endpoint nothing listens on.
const unreachable = "http://127.0.0.1:1"

// result is what one margayctl invocation did.
type result struct {
	code           int
	stdout, stderr string
}

func (r result) String() string {
	return "exit " + strconv.Itoa(r.code) + "\n--- stdout:\n" + r.stdout + "--- stderr:\n" + r.stderr
}

// invoke runs margayctl in-process with stdin and the given arguments.
func invoke(stdin string, args ...string) result {
	var out, errOut bytes.Buffer
	code := run(args, strings.NewReader(stdin), &out, &errOut)
	return result{code, out.String(), errOut.String()}
}

// cluster is margayctl pointed at one real etcd.
type cluster struct{ endpoint string }

func newCluster(t *testing.T) cluster {
	t.Helper()
	return cluster{etcdtest.StartT(t).Endpoints()[0]}
}

func (c cluster) run(args ...string) result { return c.runIn("", args...) }

func (c cluster) runIn(stdin string, args ...string) result {
	return invoke(stdin, append([]string{"--etcd-endpoints", c.endpoint}, args...)...)
}

// ok runs a command that must succeed silently on stderr and returns its stdout.
func (c cluster) ok(t *testing.T, args ...string) string {
	t.Helper()
	return c.okIn(t, "", args...)
}

func (c cluster) okIn(t *testing.T, stdin string, args ...string) string {
	t.Helper()
	r := c.runIn(stdin, args...)
	if r.code != exitOK || r.stderr != "" {
		t.Fatalf("margayctl %s: want exit 0 and empty stderr, got %v", strings.Join(args, " "), r)
	}
	return r.stdout
}

// store opens the cluster's datastore directly, for the ipam package.
func (c cluster) store(t *testing.T) *datastore.Store {
	t.Helper()
	s, err := datastore.New(datastore.Config{Endpoints: []string{c.endpoint}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// wantFail checks a failed invocation: the exit code, nothing on stdout, and one
// "margayctl: ..." line on stderr (ending in the usage hint for usage errors)
// that contains every want.
func wantFail(t *testing.T, r result, code int, want ...string) {
	t.Helper()
	if r.code != code {
		t.Errorf("exit code %d, want %d\n%v", r.code, code, r)
	}
	if r.stdout != "" {
		t.Errorf("stdout not empty on error:\n%v", r)
	}
	checkStderr(t, r.stderr, code)
	line, _, _ := strings.Cut(r.stderr, "\n")
	t.Logf("exit %d: %s", r.code, line)
	for _, w := range want {
		if !strings.Contains(line, w) {
			t.Errorf("error %q does not mention %q", line, w)
		}
	}
}

func checkStderr(t *testing.T, stderr string, code int) {
	t.Helper()
	if !strings.HasSuffix(stderr, "\n") {
		t.Errorf("stderr %q does not end in a newline", stderr)
		return
	}
	lines := strings.Split(strings.TrimSuffix(stderr, "\n"), "\n")
	if len(lines) != 1 {
		t.Errorf("stderr is not one error line (exit %d):\n%s", code, stderr)
	}
	if hinted := strings.HasSuffix(lines[0], usageHint); hinted != (code == exitUsage) {
		t.Errorf("exit %d, and the usage hint is there: %v: %s", code, hinted, lines[0])
	}
	if !strings.HasPrefix(lines[0], "margayctl: ") || len(lines[0]) <= len("margayctl: ") {
		t.Errorf("stderr %q does not start with \"margayctl: \" and a message", lines[0])
	}
}

func writeFile(t *testing.T, name, content string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// table splits table output into rows of whitespace-separated cells.
func table(out string) [][]string {
	var rows [][]string
	for _, l := range strings.Split(strings.TrimRight(out, "\n"), "\n") {
		rows = append(rows, strings.Fields(l))
	}
	return rows
}

func lines(out string) []string { return strings.Split(strings.TrimRight(out, "\n"), "\n") }

const manifest = `# a cluster's network
apiVersion: margay.dev/v1
kind: IPPool
metadata:
  name: pool-a
spec:
  cidr: 10.10.0.0/16
  blockSize: 26
---
apiVersion: margay.dev/v1
kind: IPPool
metadata:
  name: pool-b
  labels:
    tier: edge
spec:
  cidr: 10.20.0.0/16
  blockSize: 28
  ipipMode: CrossSubnet
  natOutgoing: true
---
apiVersion: margay.dev/v1
kind: BGPPeer
metadata:
  name: tor-1
spec:
  peerIP: 192.0.2.1
  asNumber: 64513
---
apiVersion: margay.dev/v1
kind: BGPConfiguration
metadata:
  name: default
spec:
  asNumber: 64512
  nodeToNodeMeshEnabled: false
---
apiVersion: margay.dev/v1
kind: Node
metadata:
  name: node1
spec:
  bgp:
    ipv4Address: 198.18.1.2/24
`

var manifestRefs = []string{`IPPool "pool-a"`, `IPPool "pool-b"`, `BGPPeer "tor-1"`, `BGPConfiguration "default"`, `Node "node1"`}

func wantEach(t *testing.T, out, verb string, refs []string) {
	t.Helper()
	var want []string
	for _, r := range refs {
		want = append(want, r+" "+verb)
	}
	if got := lines(out); !slices.Equal(got, want) {
		t.Errorf("got\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// TestApplyAndGet applies a multi-document file, re-applies it, applies from stdin,
// and reads everything back in every output format.
func TestApplyAndGet(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	file := writeFile(t, "cluster.yaml", manifest)

	wantEach(t, c.ok(t, "apply", "-f", file), "created", manifestRefs)
	wantEach(t, c.ok(t, "apply", "-f", file), "unchanged", manifestRefs)
	wantEach(t, c.okIn(t, manifest, "apply", "-f", "-"), "unchanged", manifestRefs)
	// -f repeated reads every file, not only the last.
	poolC := "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: pool-c}\nspec: {cidr: 10.30.0.0/24}\n"
	want := []string{`IPPool "pool-c" created`}
	for _, r := range manifestRefs {
		want = append(want, r+" unchanged")
	}
	if got := lines(c.okIn(t, poolC, "apply", "-f", "-", "-f", file)); !slices.Equal(got, want) {
		t.Errorf("apply -f - -f FILE:\n%s\nwant\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// JSON documents are accepted too.
	poolD := `{"apiVersion":"margay.dev/v1","kind":"IPPool","metadata":{"name":"pool-d"},"spec":{"cidr":"10.40.0.0/24","disabled":true}}`
	wantEach(t, c.okIn(t, poolD, "create", "-f", "-"), "created", []string{`IPPool "pool-d"`})

	pools := []struct{ name, cidr, block, ipip, nat, disabled string }{
		{"pool-a", "10.10.0.0/16", "26", "Never", "false", "false"},
		{"pool-b", "10.20.0.0/16", "28", "CrossSubnet", "true", "false"},
		{"pool-c", "10.30.0.0/24", "26", "Never", "false", "false"},
		{"pool-d", "10.40.0.0/24", "26", "Never", "false", "true"},
	}

	t.Run("table", func(t *testing.T) {
		out := c.ok(t, "get", "ippools")
		rows := table(out)
		if want := []string{"NAME", "CIDR", "SELECTOR"}; !slices.Equal(rows[0], want) {
			t.Fatalf("header %q, want %q", rows[0], want)
		}
		if len(rows) != 1+len(pools) {
			t.Fatalf("%d rows, want one per pool (%d):\n%s", len(rows)-1, len(pools), out)
		}
		for i, p := range pools {
			if want := []string{p.name, p.cidr, "all()"}; !slices.Equal(rows[i+1], want) {
				t.Errorf("row %d: %q, want %q", i+1, rows[i+1], want)
			}
		}
	})

	t.Run("wide", func(t *testing.T) {
		rows := table(c.ok(t, "get", "ippools", "-o", "wide"))
		if want := []string{"NAME", "CIDR", "SELECTOR", "BLOCKSIZE", "IPIPMODE", "VXLANMODE", "NAT", "DISABLED"}; !slices.Equal(rows[0], want) {
			t.Fatalf("header %q, want %q", rows[0], want)
		}
		if len(rows) != 1+len(pools) {
			t.Fatalf("%d rows, want %d", len(rows)-1, len(pools))
		}
		for i, p := range pools {
			want := []string{p.name, p.cidr, "all()", p.block, p.ipip, "Never", p.nat, p.disabled}
			if !slices.Equal(rows[i+1], want) {
				t.Errorf("row %d: %q, want %q", i+1, rows[i+1], want)
			}
		}
	})

	t.Run("yaml list", func(t *testing.T) {
		out := c.ok(t, "get", "ippools", "-o", "yaml")
		var l struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Items      []struct {
				Kind     string `json:"kind"`
				Metadata struct {
					Name            string            `json:"name"`
					Labels          map[string]string `json:"labels"`
					ResourceVersion string            `json:"resourceVersion"`
				} `json:"metadata"`
				Spec struct {
					CIDR        string `json:"cidr"`
					BlockSize   int    `json:"blockSize"`
					IPIPMode    string `json:"ipipMode"`
					NATOutgoing bool   `json:"natOutgoing"`
				} `json:"spec"`
			} `json:"items"`
		}
		if err := yaml.Unmarshal([]byte(out), &l); err != nil {
			t.Fatalf("yaml output does not parse: %v\n%s", err, out)
		}
		if l.Kind != "List" || l.APIVersion != api.APIVersion || len(l.Items) != len(pools) {
			t.Fatalf("got kind %q apiVersion %q with %d items, want List %s with %d:\n%s", l.Kind, l.APIVersion, len(l.Items), api.APIVersion, len(pools), out)
		}
		for i, it := range l.Items {
			if it.Kind != "IPPool" || it.Metadata.Name != pools[i].name || it.Spec.CIDR != pools[i].cidr || it.Metadata.ResourceVersion == "" {
				t.Errorf("item %d: %+v", i, it)
			}
		}
		b := l.Items[1]
		if b.Spec.BlockSize != 28 || b.Spec.IPIPMode != "CrossSubnet" || !b.Spec.NATOutgoing || b.Metadata.Labels["tier"] != "edge" {
			t.Errorf("pool-b read back as %+v", b)
		}
		// The whole list is valid apply input, and nothing changed.
		wantEach(t, c.okIn(t, out, "apply", "-f", "-"), "unchanged",
			[]string{`IPPool "pool-a"`, `IPPool "pool-b"`, `IPPool "pool-c"`, `IPPool "pool-d"`})
	})

	t.Run("json list", func(t *testing.T) {
		out := c.ok(t, "get", "ippools", "-o", "json")
		var l struct {
			Kind  string           `json:"kind"`
			Items []map[string]any `json:"items"`
		}
		if err := json.Unmarshal([]byte(out), &l); err != nil {
			t.Fatalf("json output does not parse: %v\n%s", err, out)
		}
		if l.Kind != "List" || len(l.Items) != len(pools) {
			t.Fatalf("kind %q, %d items:\n%s", l.Kind, len(l.Items), out)
		}
		for i, it := range l.Items {
			spec := it["spec"].(map[string]any)
			if spec["cidr"] != pools[i].cidr {
				t.Errorf("item %d: cidr %v, want %s", i, spec["cidr"], pools[i].cidr)
			}
		}
		if spec := l.Items[3]["spec"].(map[string]any); spec["disabled"] != true {
			t.Errorf("pool-d not disabled: %v", spec)
		}
		wantEach(t, c.okIn(t, out, "apply", "-f", "-"), "unchanged",
			[]string{`IPPool "pool-a"`, `IPPool "pool-b"`, `IPPool "pool-c"`, `IPPool "pool-d"`})
	})

	t.Run("single yaml round trip", func(t *testing.T) {
		out := c.ok(t, "get", "ippool", "pool-b", "-o", "yaml")
		var p api.IPPool
		if err := yaml.Unmarshal([]byte(out), &p); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if p.Kind != "IPPool" || p.Metadata.Name != "pool-b" || p.Metadata.ResourceVersion == "" || p.Spec.IPIPMode != api.EncapCrossSubnet || !p.Spec.NATOutgoing {
			t.Errorf("read back %+v", p)
		}
		if got := c.okIn(t, out, "apply", "-f", "-"); got != "IPPool \"pool-b\" unchanged\n" {
			t.Errorf("round trip: %q", got)
		}
		// And the same through a file with replace.
		f := writeFile(t, "b.yaml", out)
		if got := c.ok(t, "replace", "-f", f); got != "IPPool \"pool-b\" unchanged\n" {
			t.Errorf("replace of the unchanged copy: %q", got)
		}
	})

	t.Run("single json", func(t *testing.T) {
		out := c.ok(t, "get", "bgpconfig", "default", "-o", "json")
		var bc api.BGPConfiguration
		if err := json.Unmarshal([]byte(out), &bc); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if bc.Spec.ASNumber == nil || *bc.Spec.ASNumber != 64512 || bc.Spec.NodeToNodeMeshEnabled == nil || *bc.Spec.NodeToNodeMeshEnabled {
			t.Errorf("read back %s", out)
		}
		out = c.ok(t, "get", "bgppeer", "tor-1", "-o", "json")
		var peer api.BGPPeer
		if err := json.Unmarshal([]byte(out), &peer); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if peer.Spec.PeerIP != "192.0.2.1" || peer.Spec.ASNumber == nil || *peer.Spec.ASNumber != 64513 {
			t.Errorf("read back %s", out)
		}
	})

	t.Run("aliases", func(t *testing.T) {
		want := c.ok(t, "get", "ippools")
		for _, k := range []string{"pools", "pool", "ippool", "IPPool", "IPPOOLS"} {
			if got := c.ok(t, "get", k); got != want {
				t.Errorf("get %s:\n%s\nwant\n%s", k, got, want)
			}
		}
	})

	t.Run("other kinds", func(t *testing.T) {
		tests := []struct {
			args []string
			want [][]string
		}{
			{[]string{"get", "bgppeers"}, [][]string{{"NAME", "PEERIP", "NODE", "ASN"}, {"tor-1", "192.0.2.1", "(global)", "64513"}}},
			{[]string{"get", "bgppeers", "-o", "wide"}, [][]string{{"NAME", "PEERIP", "NODE", "ASN", "PEERSELECTOR", "KEEPALIVE", "HOLD", "MAXPREFIXES"}, {"tor-1", "192.0.2.1", "(global)", "64513", "-", "-", "-", "-"}}},
			{[]string{"get", "bgpconfigurations"}, [][]string{{"NAME", "ASN", "MESH"}, {"default", "64512", "false"}}},
			{[]string{"get", "nodes"}, [][]string{{"NAME", "ASN", "IPV4", "IPV6"}, {"node1", "-", "198.18.1.2/24", "-"}}},
			{[]string{"get", "node", "node1", "-o", "wide"}, [][]string{{"NAME", "ASN", "IPV4", "IPV6", "IPIPADDR", "VXLANADDR", "VXLANV6ADDR", "RRCLUSTERID"}, {"node1", "-", "198.18.1.2/24", "-", "-", "-", "-", "-"}}},
			{[]string{"get", "workloadendpoints"}, [][]string{{"NAME", "NODE", "NETWORKS", "INTERFACE"}}},
		}
		for _, tt := range tests {
			got := table(c.ok(t, tt.args...))
			if !slices.EqualFunc(got, tt.want, slices.Equal) {
				t.Errorf("%s: got %q, want %q", strings.Join(tt.args, " "), got, tt.want)
			}
		}
	})

	t.Run("get missing", func(t *testing.T) {
		wantFail(t, c.run("get", "ippool", "nope"), exitError, `IPPool "nope"`, "not found")
	})
}

// TestUpdateConflicts proves that a stale copy cannot overwrite a newer one, and
// that create and replace insist on absence and presence.
func TestUpdateConflicts(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	pool := "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata:\n  name: pool-a\nspec:\n  cidr: 10.10.0.0/16\n"
	c.okIn(t, pool, "apply", "-f", "-")

	stale := c.ok(t, "get", "ippool", "pool-a", "-o", "yaml")
	if !strings.Contains(stale, "resourceVersion:") {
		t.Fatalf("get -o yaml carries no resourceVersion:\n%s", stale)
	}
	staleFile := writeFile(t, "stale.yaml", stale)

	// Someone else changes the pool.
	if got := c.okIn(t, pool+"  natOutgoing: true\n", "apply", "-f", "-"); got != "IPPool \"pool-a\" configured\n" {
		t.Fatalf("apply change: %q", got)
	}

	wantFail(t, c.run("replace", "-f", staleFile), exitError, `IPPool "pool-a"`, "stale")
	wantFail(t, c.run("apply", "-f", staleFile), exitError, "stale")
	// The newer version survived.
	if out := c.ok(t, "get", "ippool", "pool-a", "-o", "json"); !strings.Contains(out, `"natOutgoing": true`) {
		t.Errorf("stale write went through:\n%s", out)
	}

	// A fresh copy replaces fine.
	fresh := c.ok(t, "get", "ippool", "pool-a", "-o", "yaml")
	fresh = strings.Replace(fresh, "natOutgoing: true", "natOutgoing: false", 1)
	if got := c.okIn(t, fresh, "replace", "-f", "-"); got != "IPPool \"pool-a\" replaced\n" {
		t.Errorf("replace: %q", got)
	}

	wantFail(t, c.runIn(pool, "create", "-f", "-"), exitError, `IPPool "pool-a"`, "already exists")
	missing := "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: ghost}\nspec: {peerIP: 192.0.2.9, asNumber: 65000}\n"
	wantFail(t, c.runIn(missing, "replace", "-f", "-"), exitError, `BGPPeer "ghost"`, "not found")

	// Immutable fields are refused on update.
	wantFail(t, c.runIn(strings.Replace(pool, "10.10.0.0/16", "10.11.0.0/16", 1), "apply", "-f", "-"), exitError, "spec.cidr", "immutable")
}

// TestDelete deletes by name and by file.
func TestDelete(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	file := writeFile(t, "cluster.yaml", manifest)
	c.ok(t, "apply", "-f", file)

	if got := c.ok(t, "delete", "ippool", "pool-a"); got != "IPPool \"pool-a\" deleted\n" {
		t.Errorf("delete: %q", got)
	}
	wantFail(t, c.run("get", "ippool", "pool-a"), exitError, "not found")
	wantFail(t, c.run("delete", "ippool", "pool-a"), exitError, `IPPool "pool-a"`, "not found")

	c.ok(t, "apply", "-f", file)
	wantEach(t, c.ok(t, "delete", "-f", file), "deleted", manifestRefs)
	for _, k := range []string{"ippools", "bgppeers", "bgpconfigurations", "nodes"} {
		if rows := table(c.ok(t, "get", k)); len(rows) != 1 {
			t.Errorf("get %s after delete -f: %q", k, rows)
		}
	}
	wantFail(t, c.run("delete", "bgppeer", "tor-1"), exitError, "not found")

	// A copy read with get carries its resourceVersion, so deleting by a stale
	// copy fails and leaves the newer version alone.
	peer := "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata: {name: tor-2}\nspec: {peerIP: 192.0.2.2, asNumber: 64513}\n"
	c.okIn(t, peer, "apply", "-f", "-")
	stale := c.ok(t, "get", "bgppeer", "tor-2", "-o", "yaml")
	c.okIn(t, strings.Replace(peer, "64513", "64514", 1), "apply", "-f", "-")
	wantFail(t, c.runIn(stale, "delete", "-f", "-"), exitError, `BGPPeer "tor-2"`, "stale")
	fresh := c.ok(t, "get", "bgppeer", "tor-2", "-o", "yaml")
	if got := c.okIn(t, fresh, "delete", "-f", "-"); got != "BGPPeer \"tor-2\" deleted\n" {
		t.Errorf("delete of a fresh copy: %q", got)
	}

	// Several names: each is reported, and one missing fails the command.
	c.ok(t, "apply", "-f", file)
	if got := c.ok(t, "delete", "pools", "pool-a", "pool-b"); got != "IPPool \"pool-a\" deleted\nIPPool \"pool-b\" deleted\n" {
		t.Errorf("delete two: %q", got)
	}
	r := c.run("delete", "node", "node1", "node9")
	if r.code != exitError || r.stdout != "Node \"node1\" deleted\n" {
		t.Errorf("delete with one missing:\n%v", r)
	}
	if l := lines(r.stderr); len(l) != 2 || !strings.Contains(l[0], `Node "node9" not found`) || !strings.Contains(l[1], "1 of 2") {
		t.Errorf("delete with one missing, stderr:\n%s", r.stderr)
	}
}

// TestBadInput checks that bad resources fail with exit 1 and one line naming the
// problem, and that nothing is written.
func TestBadInput(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.okIn(t, "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: existing}\nspec: {cidr: 10.10.0.0/16}\n", "apply", "-f", "-")

	pool := func(spec string) string {
		return "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata:\n  name: bad\nspec:\n" + spec
	}
	peer := func(spec string) string {
		return "apiVersion: margay.dev/v1\nkind: BGPPeer\nmetadata:\n  name: bad\nspec:\n" + spec
	}
	tests := []struct {
		name, doc string
		want      []string
	}{
		{"invalid yaml", "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: [bad\n", []string{"not valid YAML"}},
		{"unknown field", pool("  cidr: 10.50.0.0/16\n  blockSzie: 26\n"), []string{"IPPool", `spec.blockSzie: unknown field; did you mean "blockSize"?`}},
		{"unknown kind", "apiVersion: margay.dev/v1\nkind: IPPol\nmetadata: {name: x}\n", []string{`"IPPol" is not a margay kind`}},
		{"wrong apiVersion", "apiVersion: v1\nkind: IPPool\nmetadata: {name: x}\n", []string{"apiVersion", "margay.dev/v1"}},
		{"empty", "# nothing\n---\n", []string{"no resources"}},
		{"blockSize 19", pool("  cidr: 10.50.0.0/16\n  blockSize: 19\n"), []string{`IPPool "bad"`, "spec.blockSize", "19", "20 to 32"}},
		{"block larger than pool", pool("  cidr: 10.50.0.0/24\n  blockSize: 22\n"), []string{"spec.blockSize", "at least 24"}},
		{"unmasked cidr", pool("  cidr: 10.50.1.7/16\n"), []string{"spec.cidr", "10.50.1.7/16", "did you mean 10.50.0.0/16"}},
		{"not a cidr", pool("  cidr: 10.50.0.0\n"), []string{"spec.cidr", "not a CIDR"}},
		{"overlapping pool", pool("  cidr: 10.10.128.0/17\n"), []string{"spec.cidr", `overlaps IPPool "existing"`, "10.10.0.0/16"}},
		{"ipip and vxlan", pool("  cidr: 10.50.0.0/16\n  ipipMode: Always\n  vxlanMode: CrossSubnet\n"), []string{"spec.vxlanMode", "ipipMode", "at most one"}},
		{"bad encap mode", pool("  cidr: 10.50.0.0/16\n  ipipMode: Sometimes\n"), []string{"spec.ipipMode", "Sometimes"}},
		{"bad name", "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: Bad_Name}\nspec: {cidr: 10.50.0.0/16}\n", []string{"metadata.name", "Bad_Name"}},
		{"AS number too big", peer("  peerIP: 192.0.2.1\n  asNumber: 4294967296\n"), []string{"asNumber", "4294967296", "out of range"}},
		{"AS number negative", peer("  peerIP: 192.0.2.1\n  asNumber: -1\n"), []string{"asNumber", "out of range"}},
		{"AS number zero", peer("  peerIP: 192.0.2.1\n  asNumber: 0\n"), []string{"spec.asNumber", "out of range"}},
		{"bad peerIP", peer("  peerIP: 192.0.2.300\n  asNumber: 64513\n"), []string{`BGPPeer "bad"`, "spec.peerIP", "192.0.2.300"}},
		{"bad peer port", peer("  peerIP: 192.0.2.1:70000\n  asNumber: 64513\n"), []string{"spec.peerIP", "port"}},
		{"peer without AS", peer("  peerIP: 192.0.2.1\n"), []string{"spec.asNumber", "required"}},
		{"bad node address", "apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: node-x}\nspec: {bgp: {ipv4Address: 198.18.1.2}}\n", []string{"spec.bgp.ipv4Address"}},
		{"bgp config name", "apiVersion: margay.dev/v1\nkind: BGPConfiguration\nmetadata: {name: mine}\nspec: {}\n", []string{"metadata.name", "default"}},
		{"type mismatch", pool("  cidr: 10.50.0.0/16\n  blockSize: big\n"), []string{"blockSize"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := writeFile(t, "bad.yaml", tt.doc)
			wantFail(t, c.run("apply", "-f", f), exitError, tt.want...)
		})
	}
	// Same through create and stdin.
	wantFail(t, c.runIn(pool("  cidr: 10.50.0.0/16\n  blockSize: 19\n"), "create", "-f", "-"), exitError, "spec.blockSize")
	wantFail(t, c.run("apply", "-f", filepath.Join(t.TempDir(), "missing.yaml")), exitError, "missing.yaml")

	// Nothing bad was stored.
	for k, n := range map[string]int{"ippools": 1, "bgppeers": 0, "nodes": 0, "bgpconfigs": 0} {
		if rows := table(c.ok(t, "get", k)); len(rows) != 1+n {
			t.Errorf("get %s: %q, want %d resources", k, rows, n)
		}
	}
}

// TestUsageErrors checks exit code 2 for mistakes in the command line. It points
// margayctl at an endpoint nothing listens on: usage errors never reach etcd, so
// each must fail at once.
func TestUsageErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		args []string
		want []string
	}{
		{"no command", nil, []string{"subcommand"}},
		{"unknown command", []string{"frobnicate"}, []string{"unknown command", "frobnicate"}},
		{"unknown flag", []string{"get", "ippools", "--colour"}, []string{"unknown flag", "--colour"}},
		{"unknown shorthand", []string{"get", "ippools", "-z"}, []string{"unknown shorthand"}},
		{"flag without value", []string{"get", "ippools", "-o"}, []string{"flag needs an argument"}},
		{"get without kind", []string{"get"}, []string{"get"}},
		{"get too many", []string{"get", "ippool", "a", "b"}, []string{"get", "3 arguments"}},
		{"unknown kind", []string{"get", "widgets"}, []string{`unknown resource kind "widgets"`, "ippools"}},
		{"output xml", []string{"get", "ippools", "-o", "xml"}, []string{`-o "xml"`, "yaml"}},
		{"delete unknown kind", []string{"delete", "widget", "x"}, []string{"widget"}},
		{"delete nothing", []string{"delete"}, []string{"delete", "-f"}},
		{"delete kind only", []string{"delete", "ippool"}, []string{"delete"}},
		{"delete both", []string{"delete", "-f", "x.yaml", "ippool", "a"}, []string{"not both"}},
		{"apply without -f", []string{"apply"}, []string{"-f"}},
		{"create without -f", []string{"create"}, []string{"-f"}},
		{"replace without -f", []string{"replace"}, []string{"-f"}},
		{"apply with args", []string{"apply", "pool.yaml"}, []string{"no arguments"}},
		{"ipam bare", []string{"ipam"}, []string{"subcommand"}},
		{"ipam unknown", []string{"ipam", "frob"}, []string{"unknown command", "frob"}},
		{"release neither", []string{"ipam", "release"}, []string{"--ip", "--handle"}},
		{"release both", []string{"ipam", "release", "--ip", "10.0.0.1", "--handle", "h"}, []string{"exactly one"}},
		{"release bad ip", []string{"ipam", "release", "--ip", "ten"}, []string{`"ten"`, "not an IP"}},
		{"show bad ip", []string{"ipam", "show", "--ip", "ten"}, []string{"not an IP"}},
		{"show two modes", []string{"ipam", "show", "--show-blocks", "--show-borrowed"}, []string{"at most one"}},
		{"show yaml", []string{"ipam", "show", "-o", "yaml"}, []string{"table or json"}},
		{"check yaml", []string{"ipam", "check", "-o", "yaml"}, []string{"table or json"}},
		{"check bad grace", []string{"ipam", "check", "--grace", "soon"}, []string{"grace"}},
		{"configure nothing", []string{"ipam", "configure"}, []string{"--strict-affinity"}},
		{"configure bad bool", []string{"ipam", "configure", "--strict-affinity=maybe"}, []string{"strict-affinity"}},
		{"configure negative", []string{"ipam", "configure", "--max-blocks-per-host", "-1"}, []string{"max-blocks-per-host"}},
		{"bad timeout", []string{"--timeout", "soon", "get", "ippools"}, []string{"--timeout"}},
		{"empty endpoints", []string{"--etcd-endpoints", " , ", "get", "ippools"}, []string{"--etcd-endpoints"}},
		{"version with args", []string{"version", "now"}, []string{"no arguments"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := append([]string{"--etcd-endpoints", unreachable, "--timeout", "5s"}, tt.args...)
			if tt.name == "empty endpoints" {
				args = tt.args
			}
			start := time.Now()
			r := invoke("", args...)
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("took %v: a usage error should not wait for etcd", d)
			}
			wantFail(t, r, exitUsage, tt.want...)
		})
	}
}

// TestIPAM drives the ipam commands over allocations made with the ipam package.
func TestIPAM(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	// One /26 pool of /26 blocks: node1's first allocation claims the only block,
	// so node2 (strictAffinity off) must borrow from it.
	c.okIn(t, `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.99.0.0/26, blockSize: 26}
---
{apiVersion: margay.dev/v1, kind: Node, metadata: {name: node1}, spec: {bgp: {ipv4Address: 10.0.0.1/24}}}
---
{apiVersion: margay.dev/v1, kind: Node, metadata: {name: node2}, spec: {bgp: {ipv4Address: 10.0.0.2/24}}}
`, "apply", "-f", "-")
	ctx := context.Background()
	al := ipam.New(c.store(t), ipam.Options{Logger: slog.New(slog.DiscardHandler)})
	assign := func(handle, node string) netip.Addr {
		t.Helper()
		got, err := al.AutoAssign(ctx, ipam.AssignArgs{Handle: handle, Node: node, Attrs: map[string]string{"pod": handle}})
		if err != nil || len(got) != 1 {
			t.Fatalf("AutoAssign(%s, %s) = %v, %v", handle, node, got, err)
		}
		return got[0].IP
	}
	ipA := assign("k8s-pod-network.abc", "node1")
	ipB := assign("k8s-pod-network.def", "node2") // borrowed
	ipC := assign("k8s-pod-network.ghi", "node1")
	ipW := assign("k8s-pod-network.withwep", "node1")
	// ipW's pod has its WorkloadEndpoint, so it is never leaked.
	c.okIn(t, `apiVersion: margay.dev/v1
kind: WorkloadEndpoint
metadata: {name: node1-k8s-web-eth0}
spec: {node: node1, containerID: withwep, interfaceName: cali1, ipNetworks: [`+ipW.String()+`/32]}
`, "apply", "-f", "-")

	block := netip.MustParsePrefix("10.99.0.0/26")
	free := netip.Addr{}
	for ip := block.Addr(); block.Contains(ip); ip = ip.Next() {
		if !slices.Contains([]netip.Addr{ipA, ipB, ipC, ipW}, ip) {
			free = ip
		}
	}

	poolUsage := func(t *testing.T) ipam.PoolUsage {
		t.Helper()
		var pu []ipam.PoolUsage
		out := c.ok(t, "ipam", "show", "-o", "json")
		if err := json.Unmarshal([]byte(out), &pu); err != nil || len(pu) != 1 {
			t.Fatalf("ipam show -o json: %v\n%s", err, out)
		}
		return pu[0]
	}

	t.Run("show", func(t *testing.T) {
		out := c.ok(t, "ipam", "show")
		l := lines(out)
		if len(l) != 2 || strings.Join(strings.Fields(l[0]), " ") != "POOL CIDR IN USE FREE BLOCKS" {
			t.Fatalf("ipam show:\n%s", out)
		}
		if got, want := strings.Fields(l[1]), []string{"pods", "10.99.0.0/26", "4", "(6%)", "60", "1"}; !slices.Equal(got, want) {
			t.Errorf("pool row %q, want %q", got, want)
		}
		pu := poolUsage(t)
		if size := pu.Size; size == nil || size.Int64() != 64 {
			t.Errorf("ipam show -o json: size %v, want 64", size)
		}
		if pu.Size = nil; pu != (ipam.PoolUsage{Name: "pods", CIDR: "10.99.0.0/26", InUse: 4, Blocks: 1}) {
			t.Errorf("ipam show -o json: %+v", pu)
		}
	})

	t.Run("show blocks", func(t *testing.T) {
		rows := table(c.ok(t, "ipam", "show", "--show-blocks"))
		want := [][]string{{"BLOCK", "POOL", "AFFINITY", "IN", "USE", "FREE", "BORROWED"}, {"10.99.0.0/26", "pods", "node1", "4", "60", "1"}}
		if !slices.EqualFunc(rows, want, slices.Equal) {
			t.Errorf("got %q, want %q", rows, want)
		}
		var bu []ipam.BlockUsage
		if err := json.Unmarshal([]byte(c.ok(t, "ipam", "show", "--show-blocks", "-o", "json")), &bu); err != nil {
			t.Fatal(err)
		}
		if len(bu) != 1 || bu[0] != (ipam.BlockUsage{CIDR: block, Pool: "pods", Affinity: "node1", Size: 64, InUse: 4, Borrowed: 1}) {
			t.Errorf("blocks json: %+v", bu)
		}
	})

	t.Run("show borrowed", func(t *testing.T) {
		rows := table(c.ok(t, "ipam", "show", "--show-borrowed"))
		want := [][]string{{"IP", "BLOCK", "BLOCK", "OWNER", "BORROWED", "BY", "HANDLE"}, {ipB.String(), "10.99.0.0/26", "node1", "node2", "k8s-pod-network.def"}}
		if !slices.EqualFunc(rows, want, slices.Equal) {
			t.Errorf("got %q, want %q", rows, want)
		}
		var in []ipam.IPInfo
		if err := json.Unmarshal([]byte(c.ok(t, "ipam", "show", "--show-borrowed", "-o", "json")), &in); err != nil {
			t.Fatal(err)
		}
		if len(in) != 1 || in[0].IP != ipB || in[0].Node != "node2" || in[0].BlockOwner != "node1" || !in[0].Allocated {
			t.Errorf("borrowed json: %+v", in)
		}
	})

	t.Run("show ip", func(t *testing.T) {
		out := c.ok(t, "ipam", "show", "--ip", ipA.String())
		for _, w := range []string{"k8s-pod-network.abc", "node1", "pods", "10.99.0.0/26"} {
			if !strings.Contains(out, w) {
				t.Errorf("show --ip %s does not mention %q:\n%s", ipA, w, out)
			}
		}
		var in ipam.IPInfo
		if err := json.Unmarshal([]byte(c.ok(t, "ipam", "show", "--ip", ipB.String(), "-o", "json")), &in); err != nil {
			t.Fatal(err)
		}
		if !in.Allocated || in.Handle != "k8s-pod-network.def" || in.Node != "node2" || in.BlockOwner != "node1" || in.Attrs["pod"] != "k8s-pod-network.def" {
			t.Errorf("show --ip %s -o json: %+v", ipB, in)
		}
		if got, want := c.ok(t, "ipam", "show", "--ip", free.String()), free.String()+" is free (pool pods)\n"; got != want {
			t.Errorf("free ip: %q, want %q", got, want)
		}
		if got := c.ok(t, "ipam", "show", "--ip", "192.168.7.7"); got != "192.168.7.7 is not in any IP pool\n" {
			t.Errorf("ip outside pools: %q", got)
		}
	})

	t.Run("check clean", func(t *testing.T) {
		out := c.ok(t, "ipam", "check")
		if !strings.Contains(out, "Checked 1 blocks, 4 allocations and 4 handles") || !strings.HasSuffix(out, "No problems found.\n") {
			t.Errorf("ipam check:\n%s", out)
		}
	})

	t.Run("check leaked", func(t *testing.T) {
		// Problems found and left: the report, and exit code 3.
		r := c.run("ipam", "check", "--grace", "0s")
		out := r.stdout
		if r.code != exitProblems || !strings.Contains(out, "Leaked addresses (3):") || r.stderr != "margayctl: found 3 problems; --release-leaked fixes them\n" {
			t.Errorf("ipam check --grace 0s: want exit 3 with the report:\n%v", r)
		}
		for _, ip := range []netip.Addr{ipA, ipB, ipC} {
			if !strings.Contains(out, ip.String()+" ") {
				t.Errorf("leaked %s not reported:\n%s", ip, out)
			}
		}
		if strings.Contains(out, ipW.String()+" ") {
			t.Errorf("%s has a WorkloadEndpoint but is reported:\n%s", ipW, out)
		}
		var rep struct {
			Leaked []ipam.Finding `json:"leaked"`
			Fixed  int            `json:"fixed"`
		}
		r = c.run("ipam", "check", "--grace", "0s", "-o", "json")
		if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || r.code != exitProblems {
			t.Fatalf("check -o json: %v:\n%v", err, r)
		}
		if len(rep.Leaked) != 3 || rep.Fixed != 0 {
			t.Errorf("check -o json: %+v", rep)
		}
	})

	t.Run("release", func(t *testing.T) {
		if got, want := c.ok(t, "ipam", "release", "--ip", ipC.String()), "released "+ipC.String()+" (handle k8s-pod-network.ghi)\n"; got != want {
			t.Errorf("release --ip: %q, want %q", got, want)
		}
		wantFail(t, c.run("ipam", "release", "--ip", ipC.String()), exitError, ipC.String(), "not allocated")
		if got, want := c.ok(t, "ipam", "release", "--handle", "k8s-pod-network.def"), "released "+ipB.String()+" (handle k8s-pod-network.def)\n"; got != want {
			t.Errorf("release --handle: %q, want %q", got, want)
		}
		wantFail(t, c.run("ipam", "release", "--handle", "k8s-pod-network.def"), exitError, "k8s-pod-network.def", "no addresses")
		if pu := poolUsage(t); pu.InUse != 2 {
			t.Errorf("in use after releases: %d, want 2", pu.InUse)
		}
		if out := c.ok(t, "ipam", "show", "--ip", ipB.String()); !strings.Contains(out, "is free") {
			t.Errorf("released %s: %s", ipB, out)
		}
	})

	t.Run("release leaked", func(t *testing.T) {
		out := c.ok(t, "ipam", "check", "--grace", "0s", "--release-leaked")
		if !strings.Contains(out, "Leaked addresses (1):") || !strings.Contains(out, ipA.String()) || !strings.Contains(out, "Fixed 1 problem.") {
			t.Errorf("release-leaked:\n%s", out)
		}
		if pu := poolUsage(t); pu.InUse != 1 {
			t.Errorf("in use after release-leaked: %d, want 1 (the pod with an endpoint)", pu.InUse)
		}
		// Once the endpoint goes, its address leaks too.
		c.ok(t, "delete", "wep", "node1-k8s-web-eth0")
		c.ok(t, "ipam", "check", "--grace", "0s", "--release-leaked")
		if pu := poolUsage(t); pu.InUse != 0 {
			t.Errorf("in use after the last release: %d, want 0", pu.InUse)
		}
		if out := c.ok(t, "ipam", "check", "--grace", "0s"); !strings.Contains(out, "No problems found.") {
			t.Errorf("check after repair:\n%s", out)
		}
	})

	t.Run("delete node", func(t *testing.T) {
		store := c.store(t)
		held := datastore.AgentsPrefix + "node1"
		if _, err := store.Txn(ctx, nil, []clientv3.Op{clientv3.OpPut(held, "10.0.0.1")}, nil); err != nil {
			t.Fatal(err)
		}
		wantFail(t, c.run("delete", "node", "node1"), exitError, `node "node1" has a running margay-node (at 10.0.0.1)`)
		if _, err := store.Txn(ctx, nil, []clientv3.Op{clientv3.OpDelete(held)}, nil); err != nil {
			t.Fatal(err)
		}
		ip := assign("k8s-pod-network.onnode1", "node1")
		c.okIn(t, "{apiVersion: margay.dev/v1, kind: WorkloadEndpoint, metadata: {name: node1-k8s-db-eth0}, spec: {node: node1, containerID: onnode1, interfaceName: mgy2, ipNetworks: ["+ip.String()+"/32]}}\n", "apply", "-f", "-")
		if got, want := c.ok(t, "delete", "node", "node1"), "Node \"node1\" deleted, and released its 1 address and 1 block\n"; got != want {
			t.Errorf("delete node: %q, want %q", got, want)
		}
		if out := c.ok(t, "ipam", "check", "--grace", "0s"); !strings.Contains(out, "No problems found.") {
			t.Errorf("check after deleting node1:\n%s", out)
		}
		if rows := table(c.ok(t, "get", "workloadendpoints")); len(rows) != 1 {
			t.Errorf("node1's endpoint outlived it: %q", rows)
		}
		// node2 takes over the block node1 left.
		if got := assign("k8s-pod-network.onnode2", "node2"); !netip.MustParsePrefix("10.99.0.0/26").Contains(got) {
			t.Errorf("node2 got %s", got)
		}
		if rows := table(c.ok(t, "ipam", "show", "--show-blocks")); len(rows) < 2 || !slices.Contains(rows[1], "node2") {
			t.Errorf("the block is not node2's: %q", rows)
		}
	})

	t.Run("configure", func(t *testing.T) {
		if got := c.ok(t, "ipam", "configure", "--strict-affinity=true"); got != "IPAM configuration: strictAffinity=true maxBlocksPerHost=20\n" {
			t.Errorf("configure: %q", got)
		}
		var cfg api.IPAMConfiguration
		if err := json.Unmarshal([]byte(c.ok(t, "get", "ipamconfigurations", "default", "-o", "json")), &cfg); err != nil {
			t.Fatal(err)
		}
		if !cfg.Spec.StrictAffinity {
			t.Errorf("strictAffinity not stored: %+v", cfg.Spec)
		}
		if got := c.ok(t, "ipam", "configure", "--max-blocks-per-host", "5"); got != "IPAM configuration: strictAffinity=true maxBlocksPerHost=5\n" {
			t.Errorf("configure max blocks: %q", got)
		}
		if rows := table(c.ok(t, "get", "ipamconfig")); !slices.Equal(rows[1], []string{"default", "true", "5"}) {
			t.Errorf("get ipamconfig: %q", rows)
		}
		wantFail(t, c.run("ipam", "configure"), exitUsage, "--strict-affinity")
	})
}

// TestDatastoreFlags checks how margayctl finds etcd.
func TestDatastoreFlags(t *testing.T) {
	// Not parallel: it sets the environment.
	c := newCluster(t)
	c.okIn(t, "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.10.0.0/16}\n", "apply", "-f", "-")

	t.Run("env", func(t *testing.T) {
		t.Setenv("MARGAY_ETCD_ENDPOINTS", c.endpoint)
		r := invoke("", "get", "ippools")
		if r.code != exitOK || !strings.Contains(r.stdout, "10.10.0.0/16") {
			t.Errorf("MARGAY_ETCD_ENDPOINTS not honoured:\n%v", r)
		}
	})

	t.Run("flag beats env", func(t *testing.T) {
		t.Setenv("MARGAY_ETCD_ENDPOINTS", unreachable)
		if out := c.ok(t, "get", "ippools"); !strings.Contains(out, "10.10.0.0/16") {
			t.Errorf("get: %s", out)
		}
	})

	t.Run("several endpoints", func(t *testing.T) {
		r := invoke("", "--etcd-endpoints", c.endpoint+", "+c.endpoint, "get", "ippools", "-o", "json")
		if r.code != exitOK {
			t.Errorf("comma-separated endpoints:\n%v", r)
		}
	})

	t.Run("unreachable", func(t *testing.T) {
		start := time.Now()
		r := invoke("", "--etcd-endpoints", unreachable, "--timeout", "1s", "get", "ippools")
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %v with --timeout 1s", d)
		}
		wantFail(t, r, exitError, "127.0.0.1:1", "unavailable")
	})

	t.Run("unreachable from env", func(t *testing.T) {
		t.Setenv("MARGAY_ETCD_ENDPOINTS", unreachable)
		t.Setenv("MARGAY_ETCD_TIMEOUT", "1s")
		start := time.Now()
		r := invoke("", "ipam", "show")
		if d := time.Since(start); d > 3*time.Second {
			t.Errorf("took %v with MARGAY_ETCD_TIMEOUT=1s", d)
		}
		wantFail(t, r, exitError, "127.0.0.1:1")
	})

	t.Run("tls", func(t *testing.T) {
		pki := etcdtest.NewPKI(t, t.TempDir(), "ctl")
		srv, err := etcdtest.Start(etcdtest.Options{TLS: &transport.TLSInfo{CertFile: pki.ServerCert, KeyFile: pki.ServerKey, TrustedCAFile: pki.CA, ClientCertAuth: true}})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(srv.Close)
		ep := srv.Endpoints()[0]
		flags := []string{"--etcd-endpoints", ep, "--etcd-ca-cert-file", pki.CA, "--etcd-cert-file", pki.ClientCert, "--etcd-key-file", pki.ClientKey}
		if r := invoke("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: tls}\nspec: {cidr: 10.20.0.0/16}\n", append(flags, "apply", "-f", "-")...); r.code != exitOK {
			t.Fatalf("apply over TLS with flags:\n%v", r)
		}
		t.Setenv("MARGAY_ETCD_ENDPOINTS", ep)
		t.Setenv("MARGAY_ETCD_CA_CERT_FILE", pki.CA)
		t.Setenv("MARGAY_ETCD_CERT_FILE", pki.ClientCert)
		t.Setenv("MARGAY_ETCD_KEY_FILE", pki.ClientKey)
		if r := invoke("", "get", "ippools"); r.code != exitOK || !strings.Contains(r.stdout, "10.20.0.0/16") {
			t.Errorf("get over TLS from the environment:\n%v", r)
		}
		// etcd wants a client certificate: without one the call fails, in time.
		t.Setenv("MARGAY_ETCD_CERT_FILE", "")
		t.Setenv("MARGAY_ETCD_KEY_FILE", "")
		wantFail(t, invoke("", "--timeout", "1s", "get", "ippools"), exitError, ep)
		t.Setenv("MARGAY_ETCD_CERT_FILE", pki.ClientCert)
		wantFail(t, invoke("", "get", "ippools"), exitError, "MARGAY_ETCD_KEY_FILE")
	})

	t.Run("version needs no etcd", func(t *testing.T) {
		start := time.Now()
		r := invoke("", "--etcd-endpoints", unreachable, "version")
		if r.code != exitOK || r.stderr != "" || !strings.HasPrefix(r.stdout, "margayctl ") || !strings.Contains(r.stdout, api.APIVersion) {
			t.Errorf("version:\n%v", r)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("version took %v: it should not wait for etcd", d)
		}
	})
}

// TestBinary runs the real margayctl process.
func TestBinary(t *testing.T) {
	t.Parallel()
	if testing.Short() {
		t.Skip("builds the binary")
	}
	c := newCluster(t)
	bin := filepath.Join(t.TempDir(), "margayctl")
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	exe := func(stdin string, args ...string) result {
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = append(os.Environ(), "MARGAY_ETCD_ENDPOINTS="+c.endpoint)
		cmd.Stdin = strings.NewReader(stdin)
		var out, errOut bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errOut
		err := cmd.Run()
		var ee *exec.ExitError
		code := 0
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatalf("run %s: %v", bin, err)
		}
		return result{code, out.String(), errOut.String()}
	}
	pool := "apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: p}\nspec: {cidr: 10.10.0.0/16}\n"

	if r := exe("", "version"); r.code != 0 || !strings.HasPrefix(r.stdout, "margayctl ") || r.stderr != "" {
		t.Errorf("version:\n%v", r)
	}
	if r := exe(pool, "apply", "-f", "-"); r.code != 0 || r.stdout != "IPPool \"p\" created\n" || r.stderr != "" {
		t.Errorf("apply:\n%v", r)
	}
	wantFail(t, exe(pool, "create", "-f", "-"), exitError, "already exists")
	wantFail(t, exe("", "get", "ippool", "q"), exitError, "not found")
	wantFail(t, exe("", "frobnicate"), exitUsage, "unknown command")
	wantFail(t, exe("", "get", "--bogus"), exitUsage, "unknown flag")
	wantFail(t, exe("", "--etcd-endpoints", unreachable, "--timeout", "1s", "get", "ippools"), exitError, "127.0.0.1:1")
	if r := exe("", "get", "ippools"); r.code != 0 || !strings.Contains(r.stdout, "10.10.0.0/16") {
		t.Errorf("get:\n%v", r)
	}
	if r := exe("", "--help"); r.code != 0 || !strings.Contains(r.stdout, "Usage:") || r.stderr != "" {
		t.Errorf("--help:\n%v", r)
	}

	// A successful ipam command writes nothing to stderr, even when the ipam
	// package logs: here freeing the last address of one of node n1's two blocks
	// releases that block's affinity.
	if r := exe("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: tiny}\nspec: {cidr: 10.77.0.0/30, blockSize: 31}\n---\n"+
		"{apiVersion: margay.dev/v1, kind: Node, metadata: {name: n1}, spec: {bgp: {ipv4Address: 10.0.0.1/24}}}\n", "apply", "-f", "-"); r.code != 0 {
		t.Fatalf("apply tiny:\n%v", r)
	}
	al := ipam.New(c.store(t), ipam.Options{Logger: slog.New(slog.DiscardHandler)})
	var last netip.Addr
	for _, h := range []string{"x1", "x2", "x3"} {
		got, err := al.AutoAssign(ctx, ipam.AssignArgs{Handle: ipam.PodHandle(h), Node: "n1", Pools: []string{"tiny"}})
		if err != nil {
			t.Fatal(err)
		}
		last = got[0].IP
	}
	r := exe("", "ipam", "release", "--ip", last.String())
	if r.code != 0 || r.stderr != "" || r.stdout != "released "+last.String()+" (handle k8s-pod-network.x3)\n" {
		t.Errorf("ipam release:\n%v", r)
	}
	// The logging path did run: the emptied block lost its owner.
	var bu []ipam.BlockUsage
	if err := json.Unmarshal([]byte(exe("", "ipam", "show", "--show-blocks", "-o", "json").stdout), &bu); err != nil {
		t.Fatal(err)
	}
	owners := map[string]string{}
	for _, b := range bu {
		owners[b.CIDR.String()] = b.Affinity
	}
	if want := map[string]string{"10.77.0.0/31": "n1", "10.77.0.2/31": ""}; !maps.Equal(owners, want) {
		t.Errorf("block owners after the release: %v, want %v", owners, want)
	}
}

const policies = `apiVersion: margay.dev/v1
kind: Tier
metadata: {name: security}
spec: {order: 100}
---
apiVersion: margay.dev/v1
kind: GlobalNetworkPolicy
metadata: {name: deny-blocked}
spec:
  tier: security
  order: 10
  selector: all()
  namespaceSelector: "team == 'a'"
  types: [Ingress]
  ingress:
  - action: Deny
    source: {nets: [192.0.2.0/24]}
  - action: Pass
---
apiVersion: margay.dev/v1
kind: NetworkPolicy
metadata: {name: web, namespace: "team-a"}
spec:
  order: 5
  selector: app == 'web'
  ingress:
  - action: Allow
    protocol: TCP
    destination: {ports: [80, "8000:8080"]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all}
spec:
  podSelector: {}
  policyTypes: [Ingress, Egress]
---
apiVersion: margay.dev/v1
kind: WorkloadEndpoint
metadata:
  name: node1-k8s-web-eth0
  labels: {app: web, "margay.dev/namespace": "team-a", "margay.ns.team": a}
spec: {node: node1, namespace: "team-a", pod: web, containerID: c0ffee, interfaceName: mgyaaaa, ipNetworks: [10.65.0.5/32]}
`

// TestPolicies applies margay and Kubernetes policies, lists them by
// namespace, and shows which apply to an endpoint.
func TestPolicies(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	file := writeFile(t, "policies.yaml", policies)
	// The Kubernetes policy names no namespace: -n gives it one. The margay
	// one names its own, which -n must not contradict.
	wantFail(t, c.run("apply", "-f", file, "-n", "team-b"), exitError, `"team-a"`, "-n")
	refs := []string{`Tier "security"`, `GlobalNetworkPolicy "deny-blocked"`, `NetworkPolicy "team-a/web"`, `NetworkPolicy "team-a/knp.default.deny-all"`, `WorkloadEndpoint "node1-k8s-web-eth0"`}
	wantEach(t, c.ok(t, "apply", "-f", file, "-n", "team-a"), "created", refs)
	wantEach(t, c.ok(t, "apply", "-f", file, "-n", "team-a"), "unchanged", refs)

	tests := []struct {
		args []string
		want [][]string
	}{
		// The default namespace has none.
		{[]string{"get", "networkpolicies"}, [][]string{{"NAMESPACE", "NAME", "TIER", "ORDER", "SELECTOR", "TYPES"}}},
		{[]string{"get", "netpol", "-n", "team-a"}, [][]string{{"NAMESPACE", "NAME", "TIER", "ORDER", "SELECTOR", "TYPES"},
			{"team-a", "knp.default.deny-all", "default", "1000", "all()", "Ingress,Egress"},
			{"team-a", "web", "default", "5", "app", "==", "'web'", "Ingress"}}},
		{[]string{"get", "netpol", "-A", "-o", "wide"}, [][]string{{"NAMESPACE", "NAME", "TIER", "ORDER", "SELECTOR", "TYPES", "INGRESS", "EGRESS"},
			{"team-a", "knp.default.deny-all", "default", "1000", "all()", "Ingress,Egress", "0", "0"},
			{"team-a", "web", "default", "5", "app", "==", "'web'", "Ingress", "1", "0"}}},
		{[]string{"get", "gnp"}, [][]string{{"NAME", "TIER", "ORDER", "SELECTOR", "TYPES"}, {"deny-blocked", "security", "10", "all()", "Ingress"}}},
		{[]string{"get", "tiers"}, [][]string{{"NAME", "ORDER"}, {"security", "100"}}},
		// Evaluated tier by tier, then by order.
		{[]string{"get", "wep", "-o", "wide"}, [][]string{{"NAME", "NODE", "NETWORKS", "INTERFACE", "NAMESPACE", "POD", "CONTAINER", "MAC", "POLICIES"},
			{"node1-k8s-web-eth0", "node1", "10.65.0.5/32", "mgyaaaa", "team-a", "web", "c0ffee", "-", "gnp:deny-blocked,team-a/web,team-a/knp.default.deny-all"}}},
	}
	for _, tt := range tests {
		got := table(c.ok(t, tt.args...))
		if !slices.EqualFunc(got, tt.want, slices.Equal) {
			t.Errorf("%s: got %q, want %q", strings.Join(tt.args, " "), got, tt.want)
		}
	}
	if out := c.ok(t, "get", "netpol", "web", "-n", "team-a", "-o", "yaml"); !strings.Contains(out, "namespace: team-a") || !strings.Contains(out, "8000:8080") {
		t.Errorf("get netpol web -o yaml:\n%s", out)
	}
	wantFail(t, c.run("get", "netpol", "web"), exitError, `"default/web"`, "not found")
	wantFail(t, c.run("get", "netpol", "web", "-A"), exitUsage, "-n NAMESPACE")
	wantFail(t, c.run("get", "netpol", "-A", "-n", "x"), exitUsage, "not both")

	if got := c.ok(t, "delete", "netpol", "web", "-n", "team-a"); got != "NetworkPolicy \"team-a/web\" deleted\n" {
		t.Errorf("delete: %q", got)
	}
	wantFail(t, c.run("get", "netpol", "web", "-n", "team-a"), exitError, "not found")
	c.ok(t, "apply", "-f", file, "-n", "team-a")
	wantEach(t, c.ok(t, "delete", "-f", file, "-n", "team-a"), "deleted", refs)
}

// TestIPAMDualStack: ipam show, show --ip and check over both families.
func TestIPAMDualStack(t *testing.T) {
	t.Parallel()
	c := newCluster(t)
	c.okIn(t, `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.99.0.0/24}
---
{apiVersion: margay.dev/v1, kind: IPPool, metadata: {name: pods-v6}, spec: {cidr: "fd00:99::/48"}}
---
{apiVersion: margay.dev/v1, kind: Node, metadata: {name: node1}, spec: {bgp: {ipv4Address: 10.0.0.1/24, ipv6Address: "fd00:0:0:1::1/64"}}}
`, "apply", "-f", "-")
	al := ipam.New(c.store(t), ipam.Options{Logger: slog.New(slog.DiscardHandler)})
	got, err := al.AssignPerFamily(context.Background(), ipam.AssignArgs{Handle: "k8s-pod-network.dual", Node: "node1"},
		[]ipam.FamilyPools{{Family: ipam.IPv4}, {Family: ipam.IPv6}})
	if err != nil || len(got) != 2 {
		t.Fatalf("dual-stack assign: %v, %v", got, err)
	}
	if rows := table(c.ok(t, "get", "nodes")); len(rows) != 2 || !slices.Equal(rows[1], []string{"node1", "-", "10.0.0.1/24", "fd00:0:0:1::1/64"}) {
		t.Errorf("get nodes: %q", rows)
	}
	want := [][]string{
		{"POOL", "CIDR", "IN", "USE", "FREE", "BLOCKS"},
		{"pods", "10.99.0.0/24", "1", "(0%)", "255", "1"},
		{"pods-v6", "fd00:99::/48", "1", "(0%)", "1.209e+24", "1"},
	}
	if rows := table(c.ok(t, "ipam", "show")); !slices.EqualFunc(rows, want, slices.Equal) {
		t.Errorf("ipam show: %q, want %q", rows, want)
	}
	var pu []ipam.PoolUsage
	if err := json.Unmarshal([]byte(c.ok(t, "ipam", "show", "-o", "json")), &pu); err != nil || len(pu) != 2 || pu[1].Size.String() != "1208925819614629174706176" {
		t.Errorf("ipam show -o json: %+v, %v; want the exact size of a /48", pu, err)
	}
	rows := table(c.ok(t, "ipam", "show", "--show-blocks"))
	if len(rows) != 3 || rows[2][0] != got[1].Block.String() || rows[2][4] != "63" || !strings.HasSuffix(rows[2][0], "/122") {
		t.Errorf("ipam show --show-blocks: %q, want the v6 /122 with 63 free", rows)
	}
	var info ipam.IPInfo
	if err := json.Unmarshal([]byte(c.ok(t, "ipam", "show", "--ip", got[1].IP.String(), "-o", "json")), &info); err != nil ||
		!info.Allocated || info.Handle != "k8s-pod-network.dual" || info.Pool != "pods-v6" {
		t.Errorf("ipam show --ip %s: %+v, %v", got[1].IP, info, err)
	}
	// Without a WorkloadEndpoint and with no grace, both addresses are leaks.
	var rep ipam.Report
	r := c.run("ipam", "check", "--grace", "0s", "-o", "json")
	if err := json.Unmarshal([]byte(r.stdout), &rep); err != nil || len(rep.Leaked) != 2 || r.code == 0 {
		t.Errorf("ipam check: %+v, %v; want both addresses leaked\n%s", rep, err, r)
	}
}
