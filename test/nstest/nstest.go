// Package nstest makes network namespaces for tests: each stands for a node or a
// pod, carries this run's prefix in its name, and is removed when the test ends.
// Nothing here touches the root namespace's addresses or routes.
package nstest

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netns"
)

// Prefix starts the name of every namespace this process makes, so a crashed
// run's namespaces can be found and removed (ip netns list | grep mgytest-).
var Prefix = fmt.Sprintf("mgytest-%d-", os.Getpid())

var seq atomic.Int64

// NS is a named network namespace.
type NS struct {
	Name string
	Path string // /var/run/netns/<name>, what CNI_NETNS takes
}

// New makes a namespace for a test, removed when the test ends, or skips the
// test without root.
func New(t testing.TB, role string) *NS {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to make network namespaces")
	}
	ns, err := Create(role)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(ns.Delete)
	return ns
}

// Create makes a namespace with its loopback up; the caller deletes it.
func Create(role string) (*NS, error) {
	name := fmt.Sprintf("%s%s-%d", Prefix, role, seq.Add(1))
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add %s: %v: %s", name, err, out)
	}
	ns := &NS{Name: name, Path: "/var/run/netns/" + name}
	if out, err := ns.Run("ip", "link", "set", "lo", "up"); err != nil {
		ns.Delete()
		return nil, fmt.Errorf("loopback up in %s: %v: %s", name, err, out)
	}
	return ns, nil
}

// Delete removes the namespace.
func (n *NS) Delete() { exec.Command("ip", "netns", "del", n.Name).Run() }

// MakeHost makes the namespace look like a real host: an uplink with addr
// (CIDR), a default route through the first address of its subnet, and
// forwarding on. Without the default route, proxy ARP does not answer for the pod
// gateway 169.254.1.1. The uplink is a veth whose peer stays in the namespace:
// nothing leaves it.
func (n *NS) MakeHost(addr string) error {
	p, err := netip.ParsePrefix(addr)
	if err != nil {
		return err
	}
	gw := p.Masked().Addr().Next()
	for _, c := range [][]string{
		{"ip", "link", "add", "uplink0", "type", "veth", "peer", "name", "uplink0p"},
		{"ip", "addr", "add", addr, "dev", "uplink0"},
		{"ip", "link", "set", "uplink0p", "up"},
		{"ip", "link", "set", "uplink0", "up"},
		{"ip", "route", "add", "default", "via", gw.String()},
		{"sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward"},
	} {
		if out, err := n.Run(c...); err != nil {
			return fmt.Errorf("in %s: %s: %v: %s", n.Name, strings.Join(c, " "), err, out)
		}
	}
	return nil
}

// Run runs a command inside the namespace and returns its combined output.
func (n *NS) Run(args ...string) (string, error) {
	out, err := exec.Command("ip", append([]string{"netns", "exec", n.Name}, args...)...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// MustRun is Run that fails the test on error.
func (n *NS) MustRun(t testing.TB, args ...string) string {
	t.Helper()
	out, err := n.Run(args...)
	if err != nil {
		t.Fatalf("in %s: %s: %v: %s", n.Name, strings.Join(args, " "), err, out)
	}
	return out
}

// Do runs f on an OS thread that is inside the namespace. Processes f starts
// (such as a CNI plugin) are born in the namespace too.
func (n *NS) Do(f func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	// Hand the thread back only once it is home again; a thread left elsewhere
	// dies with its goroutine instead.
	defer func() {
		if netns.Set(orig) == nil {
			runtime.UnlockOSThread()
		}
	}()
	target, err := netns.GetFromPath(n.Path)
	if err != nil {
		return err
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return err
	}
	return f()
}

// DialContext connects from inside the namespace: the socket is made on a
// thread there and stays there. It is a dialer for clients (HTTP, gRPC) in
// the test's own namespace that must reach a server in n.
func (n *NS) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() (err error) {
		var d net.Dialer
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	return c, err
}
