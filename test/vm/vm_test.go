package vm

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// requireEnv makes a host that cannot run the VM fail the tests instead of
// skipping them; make test-vm sets it, so the target never passes vacuously.
const requireEnv = "MARGAY_VM_REQUIRE"

// runVM boots the VM and returns its console output. A host without qemu, apt
// or a route to the mirror skips the test, unless requireEnv is set.
func runVM(t *testing.T, o Options) (string, error) {
	t.Helper()
	if testing.Short() {
		t.Skip("boots a VM: make test-vm runs it, not -short")
	}
	var out syncBuffer
	o.Output = &testOutput{t: t, buf: &out}
	ctx, cancel := context.WithTimeout(context.Background(), o.Timeout+bootSlack+fetchTimeout)
	defer cancel()
	err := Run(ctx, o)
	if errors.Is(err, ErrUnavailable) {
		if os.Getenv(requireEnv) != "" {
			t.Fatalf("%v (%s is set: install qemu-system-x86, or unset it to skip)", err, requireEnv)
		}
		t.Skip(err)
	}
	return out.String(), err
}

// checkScript proves, in the guest, the kernel features margay needs that the
// development hosts lack, the way margay uses them. busybox sh runs its own
// applets before anything on PATH, so the host's iproute2 is called as /bin/ip;
// `ip netns exec` finds the host's iputils ping on PATH.
const checkScript = `#!/bin/sh
set -u
IP=/bin/ip
fail() { echo "check: FAIL: $*"; exit 1; }
step() { echo "check: $*"; }
in_a() { $IP netns exec a "$@"; }
in_b() { $IP netns exec b "$@"; }
counted() { # the rule matching $2 in table $1 of namespace a or b ($3) counted a packet
	$IP netns exec $3 iptables-save -c -t $1 | grep -E "^\[[1-9][0-9]*:[0-9]+\] $2"
}

for m in tunnel4 ip_tunnel ipip veth vxlan bridge nf_tables nft_compat nf_nat nf_conntrack \
	x_tables xt_set ip_set ip_set_hash_ip ip_set_hash_net xt_MASQUERADE nft_masq xt_comment xt_addrtype; do
	[ -d /sys/module/$m ] || fail "module $m is not loaded"
done

step "two namespaces on one underlay subnet"
$IP netns add a && $IP netns add b || fail "ip netns add"
$IP link add va netns a type veth peer name vb netns b || fail "veth"
$IP -n a addr add 198.18.1.1/24 dev va && $IP -n b addr add 198.18.1.2/24 dev vb || fail "underlay addresses"
for n in a b; do
	$IP -n $n link set lo up && $IP -n $n link set v$n up || fail "links up in $n"
done
in_a busybox ping -c 1 -W 5 198.18.1.2 || fail "underlay ping"

step "IPIP as margay routes it: tunl0, with onlink routes via the other node"
# Loading ipip gives every namespace a tunl0, with the underlay MTU less 20.
$IP -n a link set tunl0 up && $IP -n a addr add 10.244.0.1/32 dev tunl0 || fail "tunl0 in a"
$IP -n b link set tunl0 up && $IP -n b addr add 10.244.1.1/32 dev tunl0 || fail "tunl0 in b"
$IP -n a route add 10.244.1.0/26 via 198.18.1.2 dev tunl0 onlink || fail "route in a"
$IP -n b route add 10.244.0.0/26 via 198.18.1.1 dev tunl0 onlink || fail "route in b"
in_a busybox ping -c 3 -i 0.2 -W 3 -I 10.244.0.1 10.244.1.1 || fail "ping through tunl0"
rx=$(in_b cat /sys/class/net/tunl0/statistics/rx_packets)
[ "$rx" -ge 3 ] || fail "b's tunl0 received $rx packets, want at least 3"
in_a ping -c 1 -W 3 -M do -s 1452 -I 10.244.0.1 10.244.1.1 || fail "a full-size DF packet through tunl0"
in_a ping -c 1 -W 1 -M do -s 1453 -I 10.244.0.1 10.244.1.1 && fail "a DF packet over tunl0's MTU of 1480 was sent"

step "a named IPIP device"
$IP -n a link add name ipip1 type ipip local 198.18.1.1 remote 198.18.1.2 || fail "ip link add type ipip in a"
$IP -n b link add name ipip1 type ipip local 198.18.1.2 remote 198.18.1.1 || fail "ip link add type ipip in b"
$IP -n a addr add 10.9.0.1 peer 10.9.0.2 dev ipip1 && $IP -n a link set ipip1 up || fail "ipip1 in a"
$IP -n b addr add 10.9.0.2 peer 10.9.0.1 dev ipip1 && $IP -n b link set ipip1 up || fail "ipip1 in b"
in_a busybox ping -c 2 -i 0.2 -W 3 10.9.0.2 || fail "ping through ipip1"

step "VXLAN and bridge devices"
$IP -n a link add vxlan0 type vxlan id 4096 dstport 4789 dev va || fail "vxlan"
$IP -n a link add br0 type bridge || fail "bridge"

step "IPIP accepted only from the hosts in an ipset, as in margay's MGY-INPUT"
in_b /mkipset mgy-all-hosts hash:ip 198.18.1.99 || fail "ipset create"
in_b iptables -A INPUT -p 4 -m set --match-set mgy-all-hosts src -j ACCEPT || fail "iptables set match"
in_b iptables -A INPUT -p 4 -m comment --comment "margay: IPIP from an unknown host" -j DROP || fail "iptables comment"
in_a busybox ping -c 1 -W 1 -I 10.244.0.1 10.244.1.1 && fail "IPIP from a host outside the set got through"
counted filter "-A INPUT .*-j DROP" b || fail "the DROP rule counted no packet"
in_b /mkipset mgy-all-hosts hash:ip 198.18.1.1 || fail "ipset add"
in_a busybox ping -c 2 -i 0.2 -W 3 -I 10.244.0.1 10.244.1.1 || fail "IPIP from a host in the set was dropped"
counted filter "-A INPUT .*--match-set mgy-all-hosts src -j ACCEPT" b || fail "the set match counted no packet"

step "NAT outgoing: MASQUERADE --random-fully from the pools to outside them"
# b routes back only 10.244.0.0/26: 10.244.0.66 is answered only when NATed.
$IP -n a addr add 10.244.0.66/32 dev lo || fail "pod address"
in_a busybox ping -c 1 -W 1 -I 10.244.0.66 198.18.1.2 && fail "answered without NAT"
in_a /mkipset mgy-masq-pools hash:net 10.244.0.0/16 && in_a /mkipset mgy-all-pools hash:net 10.244.0.0/16 || fail "pool ipsets"
in_a iptables -t nat -N MGY-POSTROUTING && in_a iptables -t nat -A POSTROUTING -j MGY-POSTROUTING || fail "nat chain"
in_a iptables -t nat -A MGY-POSTROUTING -m set --match-set mgy-masq-pools src -m set ! --match-set mgy-all-pools dst \
	-j MASQUERADE --random-fully || fail "MASQUERADE --random-fully"
in_a iptables -A OUTPUT -m addrtype --dst-type LOCAL -j ACCEPT || fail "addrtype"
in_a busybox ping -c 2 -i 0.2 -W 3 -I 10.244.0.66 198.18.1.2 || fail "ping with NAT"
counted nat "-A MGY-POSTROUTING .*-j MASQUERADE --random-fully" a || fail "the MASQUERADE --random-fully rule matched no packet"
step "all passed"
`

func TestKernelFeatures(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM: make test-vm runs it, not -short")
	}
	dir := t.TempDir()
	mkipset := filepath.Join(dir, "mkipset")
	build := exec.Command("go", "build", "-o", mkipset, "./mkipset")
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building mkipset: %v\n%s", err, out)
	}
	script := filepath.Join(dir, "check.sh")
	if err := os.WriteFile(script, []byte(checkScript), 0o755); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	out, err := runVM(t, Options{
		Files:   map[string]string{"/check.sh": script, "/mkipset": mkipset},
		Command: []string{"/check.sh"},
		Timeout: 90 * time.Second,
	})
	if err != nil {
		t.Fatalf("%v", err)
	}
	if !strings.Contains(out, "check: all passed\n") {
		t.Error("the payload passed without finishing the check")
	}
	if n := len(regexp.MustCompile(`(?m)^VM-RESULT: PASS$`).FindAllString(out, -1)); n != 1 {
		t.Errorf("the console has %d VM-RESULT: PASS lines, want 1", n)
	}
	t.Logf("the VM ran for %v", time.Since(start).Round(100*time.Millisecond))
}

// A failing payload is a FAIL with its exit status, whatever it prints: the
// result travels on a port of its own.
func TestFailingPayload(t *testing.T) {
	out, err := runVM(t, Options{
		Command: []string{"sh", "-c", `echo "VM-RESULT: PASS"; exit 3`},
		Timeout: 30 * time.Second,
	})
	var fail *FailError
	if !errors.As(err, &fail) || fail.ExitCode != 3 {
		t.Fatalf("got %v, want a FailError with exit status 3", err)
	}
	if !strings.Contains(out, "VM-RESULT: FAIL (exit 3)\n") {
		t.Error("the console has no VM-RESULT: FAIL (exit 3) line")
	}
}

// The command, its environment, its working directory and its files reach the
// guest unchanged, quotes and spaces included.
func TestPayloadEnvironment(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	if err := os.WriteFile(data, []byte("margay\n"), 0o640); err != nil {
		t.Fatal(err)
	}
	_, err := runVM(t, Options{
		Files: map[string]string{"/opt/it's here/data": data},
		Command: []string{"sh", "-c", `set -e
test "$1" = "two words" && test "$2" = "it's" && test "$#" -eq 2
test "$GREETING" = "hello, \"world\" 'and' \$HOME"
test "$(pwd)" = "/opt/it's here"
test "$(cat data)" = margay
test "$(stat -c %a data)" = 640
# What a Go program finds on PATH: iproute2 (busybox's ip has no netns), iputils.
"$(which ip)" netns add x && "$(which ip)" netns del x
"$(which ping)" -V | grep -q iputils
`, "sh", "two words", "it's"},
		Env:     []string{`GREETING=hello, "world" 'and' $HOME`},
		Dir:     "/opt/it's here",
		Timeout: 30 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
}

// A payload that hangs is ended by the guest's watchdog and reported as a timeout.
func TestWatchdog(t *testing.T) {
	start := time.Now()
	out, err := runVM(t, Options{Command: []string{"sleep", "600"}, Timeout: 3 * time.Second})
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("got %v, want ErrTimeout", err)
	}
	if !strings.Contains(out, "VM-RESULT: TIMEOUT\n") {
		t.Error("the console has no VM-RESULT: TIMEOUT line")
	}
	if d := time.Since(start); d > time.Minute {
		t.Errorf("the run took %v: the guest's watchdog did not end it", d)
	}
}

func TestModuleClosure(t *testing.T) {
	if testing.Short() {
		t.Skip("downloads the kernel: make test-vm runs it, not -short")
	}
	cache, err := CacheDir()
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), fetchTimeout)
	defer cancel()
	a, err := fetch(ctx, cache)
	if errors.Is(err, ErrUnavailable) && os.Getenv(requireEnv) == "" {
		t.Skip(err)
	}
	if err != nil {
		t.Fatal(err)
	}
	ms, err := loadModuleSet(a.modDir, a.release)
	if err != nil {
		t.Fatal(err)
	}
	mods, err := ms.closure(ctx, DefaultModules)
	if err != nil {
		t.Fatal(err)
	}
	pos := map[string]int{}
	for i, m := range mods {
		if _, dup := pos[m.name]; dup {
			t.Errorf("%s is in the load order twice", m.name)
		}
		pos[m.name] = i
	}
	for i, m := range mods {
		info, err := modinfo(m.data)
		if err != nil {
			t.Fatalf("%s: %v", m.rel, err)
		}
		for _, d := range strings.Split(info["depends"], ",") {
			if d == "" {
				continue
			}
			if p, ok := pos[d]; !ok || p > i {
				t.Errorf("%s depends on %s, which is not loaded before it", m.name, d)
			}
		}
	}
	for _, want := range append([]string{"nfnetlink", "libcrc32c"}, DefaultModules...) {
		if _, ok := pos[want]; !ok {
			t.Errorf("%s is not in the load order", want)
		}
	}
	if _, err := ms.closure(ctx, []string{"no_such_module"}); err == nil || !strings.Contains(err.Error(), "no module no_such_module") {
		t.Errorf("an unknown module gave %v", err)
	}
}

// The pin check passes for the pinned kernel and, for a version apt lacks,
// says what apt has now and where the pin is.
func TestVerifyPin(t *testing.T) {
	if testing.Short() {
		t.Skip("reads apt's index: make test-vm runs it, not -short")
	}
	if _, err := exec.LookPath("apt-cache"); err != nil {
		t.Skip("no apt-cache: not a Debian host")
	}
	ctx := context.Background()
	if err := verifyPin(ctx, KernelPackage, KernelVersion); err != nil {
		t.Errorf("the pinned kernel: %v", err)
	}
	err := verifyPin(ctx, KernelPackage, "0.0-0")
	if err == nil || !strings.Contains(err.Error(), "test/vm/fetch.go") || !strings.Contains(err.Error(), "now depends on linux-image-") {
		t.Errorf("a version apt lacks gave %v", err)
	} else {
		t.Log(err)
	}
}

func TestCheckPayload(t *testing.T) {
	for _, tc := range []struct {
		o    Options
		want string // in the error; "" for none
	}{
		{Options{Command: []string{"true"}, Files: map[string]string{"/vm/x": "x"}, Env: []string{"A_1=x y"}, Dir: "/vm"}, ""},
		{Options{}, "no command"},
		{Options{Command: []string{"true"}, Files: map[string]string{"vm/x": "x"}}, "not a clean absolute"},
		{Options{Command: []string{"true"}, Files: map[string]string{"/vm/../x": "x"}}, "not a clean absolute"},
		{Options{Command: []string{"true"}, Files: map[string]string{"/init": "x"}}, "own init"},
		{Options{Command: []string{"true"}, Files: map[string]string{"/tmp/x": "x"}}, "mounts over"},
		{Options{Command: []string{"true"}, Files: map[string]string{"/run": "x"}}, "mounts over"},
		{Options{Command: []string{"true"}, Env: []string{"1A=x"}}, "not NAME=value"},
		{Options{Command: []string{"true"}, Env: []string{"A"}}, "not NAME=value"},
		{Options{Command: []string{"true"}, Dir: "vm"}, "not absolute"},
		{Options{Command: []string{"true"}, Tools: []string{"usr/bin/tcpdump"}}, "tool \"usr/bin/tcpdump\" is not a clean absolute path"},
	} {
		err := checkPayload(&tc.o)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%+v: got %v, want %q", tc.o, err, tc.want)
		}
	}
}

func TestShquote(t *testing.T) {
	for _, s := range []string{"", "plain", "two words", "it's", `"$HOME" \n ` + "`x`", "'", "a\nb"} {
		out, err := exec.Command("sh", "-c", "printf %s "+shquote(s)).Output()
		if err != nil || string(out) != s {
			t.Errorf("shquote(%q) came back as %q (%v)", s, out, err)
		}
	}
}

// testOutput logs the console line by line and keeps it for the test to read.
type testOutput struct {
	t       *testing.T
	buf     *syncBuffer
	mu      sync.Mutex
	partial []byte
}

func (w *testOutput) Write(p []byte) (int, error) {
	w.buf.Write(p)
	w.mu.Lock()
	defer w.mu.Unlock()
	w.partial = append(w.partial, p...)
	for {
		i := bytes.IndexByte(w.partial, '\n')
		if i < 0 {
			return len(p), nil
		}
		w.t.Log(string(w.partial[:i]))
		w.partial = w.partial[i+1:]
	}
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
