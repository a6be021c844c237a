package cni

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// binDir holds the plugin binaries built for this test run: the tests call them
// exactly as a runtime does, through the CNI library.
var binDir string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "margay-cni-bin-")
	if err != nil {
		panic(err)
	}
	if err := buildPlugins(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func buildPlugins(dir string) error {
	out, err := exec.Command("go", "build", "-o", dir, "../cmd/margay-ipam", "../cmd/margay", "../cmd/margayctl").CombinedOutput()
	if err != nil {
		return fmt.Errorf("building the plugins: %v\n%s", err, out)
	}
	// The reference plugins, for interop: go.mod's tool directive pins their
	// version and the go command builds them into its cache.
	for _, tool := range []string{"host-local", "bridge", "portmap"} {
		path, err := exec.Command("go", "tool", "-n", tool).Output()
		if err == nil {
			err = os.Symlink(strings.TrimSpace(string(path)), filepath.Join(dir, tool))
		}
		if err != nil {
			return fmt.Errorf("building the reference plugin %s: %v", tool, err)
		}
	}
	return nil
}
