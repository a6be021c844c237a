// Package e2e runs margay end to end in network namespaces: real etcd, the real
// margay-node agents as processes, pods made through the real CNI plugin. It
// needs root; without it every test skips.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
)

// binDir holds the binaries built for this run.
var binDir string

// BinEnv names a directory of prebuilt margay binaries to use instead of
// building them.
const BinEnv = "MARGAY_E2E_BIN"

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 || testing.Short() {
		os.Exit(m.Run()) // every test skips
	}
	// In the kernel VM there is no Go toolchain: the runner puts the binaries
	// (static, built on the host) in a directory and names it.
	if dir := os.Getenv(BinEnv); dir != "" {
		binDir = dir
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "margay-e2e-bin-")
	if err != nil {
		panic(err)
	}
	out, err := exec.Command("go", "build", "-o", dir, "../../cmd/margay-node", "../../cmd/margay", "../../cmd/margay-ipam", "../../cmd/margayctl").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building the binaries: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// up starts a lab for a test and tears it down when the test ends, printing the
// agents' logs if the test failed.
func up(t *testing.T, opts lab.Options) *lab.Lab {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if testing.Short() {
		t.Skip("e2e runs in make integration, not under -short")
	}
	opts.Bin = binDir
	if testing.Verbose() {
		opts.Log = os.Stderr
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("MARGAY_E2E_LOGS") != "" {
			for _, n := range l.Nodes {
				if b, err := os.ReadFile(n.LogPath()); err == nil {
					t.Logf("%s's log:\n%s", n.Name, tail(string(b), 60))
				}
			}
		}
		l.Down()
	})
	return l
}

func tail(s string, lines int) string {
	n := 0
	for i := len(s) - 1; i >= 0; i-- {
		if s[i] == '\n' {
			if n++; n > lines {
				return s[i+1:]
			}
		}
	}
	return s
}

// apply runs `margayctl apply` on node1 with the given YAML.
func apply(l *lab.Lab, yaml string) (string, error) {
	f, err := os.CreateTemp(l.Dir(), "apply-*.yaml")
	if err != nil {
		return "", err
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(yaml); err != nil {
		f.Close()
		return "", err
	}
	if err := f.Close(); err != nil {
		return "", err
	}
	return l.Ctl(l.Nodes[0], "apply", "-f", f.Name())
}
