package nstest

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"syscall"
	"testing"
)

const inNetNSEnv = "MARGAY_TEST_NETNS"

// MainInNetNS runs the test binary inside a fresh network namespace, for packages
// whose libraries open sockets from goroutines of their own (GoBGP, HTTP
// servers), which Do cannot confine. Call it from TestMain: as root it re-runs
// the binary under `ip netns exec` and exits with its status; in the re-run, or
// without root, it runs the tests in place (where tests needing root skip).
// The namespace holds only its loopback, which is up.
func MainInNetNS(m *testing.M) {
	if os.Getenv(inNetNSEnv) != "" || os.Geteuid() != 0 {
		os.Exit(m.Run())
	}
	ns, err := Create("pkg")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cmd := exec.Command("ip", append([]string{"netns", "exec", ns.Name, os.Args[0]}, os.Args[1:]...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
	cmd.Env = append(os.Environ(), inNetNSEnv+"="+ns.Name)
	// An interrupt reaches the child too (same process group); wait for it, so the
	// namespace is removed on that path as well.
	signal.Ignore(os.Interrupt, syscall.SIGTERM)
	err = cmd.Run()
	ns.Delete()
	var ee *exec.ExitError
	switch {
	case errors.As(err, &ee):
		os.Exit(ee.ExitCode())
	case err != nil:
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Exit(0)
}

// InNetNS reports whether MainInNetNS put this test binary in its own namespace.
func InNetNS() bool { return os.Getenv(inNetNSEnv) != "" }
