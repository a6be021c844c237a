package vm

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestE2EInVM runs, in the VM's kernel (which has IPIP), the e2e test the host
// kernel cannot: the cross-subnet IPIP suite, with the real margay-node, CNI
// plugin and etcd, built statically.
func TestE2EInVM(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM: make test-vm runs it, not -short")
	}
	dir := t.TempDir()
	bin := filepath.Join(dir, "bin")
	steps := [][]string{
		{"go", "build", "-o", bin + "/", "../../cmd/margay-node", "../../cmd/margay", "../../cmd/margay-ipam", "../../cmd/margayctl", "../etcdtest/etcdserver"},
		{"go", "test", "-c", "-o", filepath.Join(bin, "e2e.test"), "../e2e"},
	}
	for _, s := range steps {
		cmd := exec.Command(s[0], s[1:]...)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", strings.Join(s, " "), err, out)
		}
	}
	files := map[string]string{"/etc/protocols": "/etc/protocols"}
	// The suite's ToR and its wire captures.
	var tools []string
	for _, name := range []string{"bird", "birdc", "tcpdump"} {
		p, err := exec.LookPath(name)
		if err != nil {
			t.Fatalf("the e2e suite in the VM needs the host's %s: make deps installs it", name)
		}
		tools = append(tools, p)
	}
	entries, err := os.ReadDir(bin)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		files["/margay/bin/"+e.Name()] = filepath.Join(bin, e.Name())
	}
	script := filepath.Join(dir, "e2e.sh")
	err = os.WriteFile(script, []byte(`#!/bin/sh
set -e
cd /margay/bin
./e2e.test -test.v -test.count=1 -test.timeout 8m -test.run '^TestCrossSubnetIPIP$'
`), 0o755)
	if err != nil {
		t.Fatal(err)
	}
	files["/margay/e2e.sh"] = script
	start := time.Now()
	out, err := runVM(t, Options{
		Files:   files,
		Tools:   tools,
		Command: []string{"/margay/e2e.sh"},
		Env:     []string{"MARGAY_E2E_BIN=/margay/bin", "MARGAY_ETCD_SERVER=/margay/bin/etcdserver"},
		Timeout: 10 * time.Minute,
	})
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out, "--- PASS: TestCrossSubnetIPIP") {
		t.Error("the VM's output lacks a PASS of TestCrossSubnetIPIP: it skipped or did not run")
	}
	t.Logf("e2e in the VM took %v", time.Since(start).Round(time.Second))
}
