package main

import (
	"bufio"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/margay-dev/margay/test/lab"
)

// testPrefix keeps the tests' labs apart from a person's (mgylab-).
const testPrefix = "mgylabtest-"

var binDirForTests string

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 || testing.Short() {
		os.Exit(m.Run()) // the lab tests skip
	}
	dir, err := os.MkdirTemp("", "margay-lab-bin-")
	if err != nil {
		panic(err)
	}
	out, err := exec.Command("go", "build", "-o", dir+"/", ".", "../margay-node", "../margay", "../margay-ipam", "../margayctl",
		"../../test/etcdtest/etcdserver", "github.com/osrg/gobgp/v3/cmd/gobgp").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building the binaries: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	binDirForTests = dir
	code := m.Run()
	lab.Sweep(testPrefix)
	os.RemoveAll(dir)
	os.Exit(code)
}

// labCmd is margay-lab with the test's state directory and namespace prefix.
func labCmd(t *testing.T, state string, args ...string) *exec.Cmd {
	t.Helper()
	if binDirForTests == "" {
		t.Skip("needs root, and not -short: it builds a lab")
	}
	return exec.Command(filepath.Join(binDirForTests, "margay-lab"), append([]string{"--state-dir", state, "--netns-prefix", testPrefix}, args...)...)
}

func runLab(t *testing.T, state string, args ...string) (string, int) {
	t.Helper()
	out, err := labCmd(t, state, args...).CombinedOutput()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return string(out), code
}

// checkGone checks that no namespace, process or state of a test lab is left.
func checkGone(t *testing.T, state string, pids []int) {
	t.Helper()
	out, _ := exec.Command("ip", "netns", "list").Output()
	if strings.Contains(string(out), testPrefix) {
		t.Errorf("namespaces left:\n%s", out)
	}
	for _, pid := range pids {
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if i := strings.LastIndexByte(string(b), ')'); i > 0 && b[i+2] != 'Z' {
				t.Errorf("process %d left: %s", pid, b)
			}
		}
	}
	if _, err := os.Stat(state); !os.IsNotExist(err) {
		t.Errorf("state directory %s left: %v", state, err)
	}
}

// labPIDs reads the agent, etcd and BIRD PIDs from a lab's state file.
func labPIDs(t *testing.T, state string) []int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(state, "state.json"))
	if err != nil {
		t.Fatal(err)
	}
	var pids []int
	for _, m := range regexp.MustCompile(`"(?:agent|etcd|bird)PID": (\d+)`).FindAllStringSubmatch(string(b), -1) {
		pid, _ := strconv.Atoi(m[1])
		pids = append(pids, pid)
	}
	return pids
}

func iptablesRules(t *testing.T) string {
	out, err := exec.Command("iptables-save").Output()
	if err != nil {
		t.Fatal(err)
	}
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if !strings.HasPrefix(l, "#") {
			keep = append(keep, regexp.MustCompile(`\[\d+:\d+\]`).ReplaceAllString(l, ""))
		}
	}
	return strings.Join(keep, "\n")
}

// Up with two subnets and VXLAN, every command, then down: all reachable, and
// nothing left, the root namespace's iptables untouched.
func TestLabUpDown(t *testing.T) {
	state := filepath.Join(t.TempDir(), "lab")
	if binDirForTests == "" {
		t.Skip("needs root, and not -short: it builds a lab")
	}
	rules := iptablesRules(t)
	t.Cleanup(func() { runLab(t, state, "down") })
	start := time.Now()
	out, code := runLab(t, state, "up", "--nodes", "3", "--subnets", "2", "--encap", "vxlan", "--pods-per-node", "1")
	if code != 0 || !strings.Contains(out, "9 of 9 reachable") || strings.Contains(out, "✗") {
		t.Fatalf("up: exit %d:\n%s", code, out)
	}
	t.Logf("up took %v:\n%s", time.Since(start).Round(100*time.Millisecond), out)
	for _, want := range []string{"VXLAN across subnets", "BGP sessions:", "node-to-node mesh (node2)", "Established"} {
		if !strings.Contains(out, want) {
			t.Errorf("up's output lacks %q", want)
		}
	}
	if out, code := runLab(t, state, "up"); code != 1 || !strings.Contains(out, "already up") {
		t.Errorf("a second up: exit %d, want 1 saying the lab is already up:\n%s", code, out)
	}
	if out, code := runLab(t, state, "exec", "node1", "--", "margayctl", "node", "status"); code != 0 || !strings.Contains(out, "Pod MTU: 1450") || !strings.Contains(out, "Established") {
		t.Errorf("exec margayctl node status: exit %d:\n%s", code, out)
	}
	if out, code := runLab(t, state, "exec", "node1", "--", "gobgp", "global", "rib"); code != 0 || !strings.Contains(out, "198.18.2.2") {
		t.Errorf("exec gobgp global rib: exit %d:\n%s", code, out)
	}
	if _, code := runLab(t, state, "exec", "node1", "--", "sh", "-c", "exit 3"); code != 3 {
		t.Errorf("exec passes the command's exit status: got %d, want 3", code)
	}
	if out, code := runLab(t, state, "pod", "add", "node2", "web"); code != 0 || !regexp.MustCompile(`pod web on node2: 10\.244\.`).MatchString(out) {
		t.Errorf("pod add: exit %d:\n%s", code, out)
	}
	if out, code := runLab(t, state, "status"); code != 0 || !strings.Contains(out, "16 of 16 reachable") {
		t.Errorf("status after pod add: exit %d:\n%s", code, out)
	}
	if out, code := runLab(t, state, "pod", "del", "node2", "web"); code != 0 {
		t.Errorf("pod del: exit %d:\n%s", code, out)
	}
	if out, code := runLab(t, state, "pod", "del", "node2", "web"); code != 1 || !strings.Contains(out, `no pod "web" on node2`) {
		t.Errorf("pod del of a deleted pod: exit %d:\n%s", code, out)
	}
	// A process someone started inside a node goes with the lab too.
	if out, code := runLab(t, state, "exec", "node3", "--", "sh", "-c", "sleep 299 >/dev/null 2>&1 & echo $!"); code != 0 {
		t.Errorf("exec a background sleep: exit %d:\n%s", code, out)
	} else if pid, err := strconv.Atoi(strings.TrimSpace(out)); err == nil {
		t.Cleanup(func() { syscall.Kill(pid, syscall.SIGKILL) })
		defer checkGone(t, state, []int{pid})
	}
	pids := labPIDs(t, state)
	if len(pids) != 4 {
		t.Fatalf("state names %d processes, want 3 agents and etcd", len(pids))
	}
	if out, code := runLab(t, state, "down"); code != 0 {
		t.Fatalf("down: exit %d:\n%s", code, out)
	}
	checkGone(t, state, pids)
	if got := iptablesRules(t); got != rules {
		t.Errorf("the root namespace's iptables changed:\nbefore\n%s\nafter\n%s", rules, got)
	}
}

// An interrupted up removes everything it made.
func TestLabUpInterrupted(t *testing.T) {
	state := filepath.Join(t.TempDir(), "lab")
	cmd := labCmd(t, state, "up", "--nodes", "3", "--subnets", "2", "--encap", "vxlan")
	t.Cleanup(func() { runLab(t, state, "down") })
	out := startUntil(t, cmd, "started margay-node on node2")
	cmd.Process.Signal(syscall.SIGINT)
	err := cmd.Wait()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(out(), "interrupted: removing everything") {
		t.Errorf("interrupted up: %v, want exit 1 saying it was interrupted:\n%s", err, out())
	}
	checkGone(t, state, nil)
}

// After an up killed outright, down cleans up, and so does the next up.
func TestLabUpAfterCrash(t *testing.T) {
	state := filepath.Join(t.TempDir(), "lab")
	t.Cleanup(func() { runLab(t, state, "down") })
	// Killed while etcd starts, up has saved no state: down must find the
	// namespaces by name. Killed later, it may have saved it.
	for _, c := range []struct{ killAt, then string }{{"starting etcd", "down"}, {"started margay-node on node2", "up"}} {
		cmd := labCmd(t, state, "up", "--nodes", "2", "--subnets", "2", "--encap", "vxlan", "--pods-per-node", "1")
		startUntil(t, cmd, c.killAt)
		cmd.Process.Kill()
		cmd.Wait()
		out, _ := exec.Command("ip", "netns", "list").Output()
		if !strings.Contains(string(out), testPrefix) {
			t.Fatalf("the killed up left no namespaces to clean: the test proves nothing")
		}
		switch c.then {
		case "down":
			if out, code := runLab(t, state, "down"); code != 0 || !strings.Contains(out, "leftover namespaces") {
				t.Errorf("down after a crash: exit %d:\n%s", code, out)
			}
			checkGone(t, state, nil)
		case "up":
			out, code := runLab(t, state, "up", "--nodes", "2", "--subnets", "2", "--encap", "vxlan", "--pods-per-node", "1")
			if code != 0 || !strings.Contains(out, "removed an earlier lab that did not finish") || !strings.Contains(out, "4 of 4 reachable") {
				t.Errorf("up after a crash: exit %d:\n%s", code, out)
			}
			pids := labPIDs(t, state)
			if out, code := runLab(t, state, "down"); code != 0 {
				t.Errorf("down: exit %d:\n%s", code, out)
			}
			checkGone(t, state, pids)
		}
	}
}

// startUntil starts cmd and returns once its output has a line containing
// want. The output keeps accumulating; output returns all of it once cmd
// and every process that shares its stdout have ended.
func startUntil(t *testing.T, cmd *exec.Cmd, want string) (output func() string) {
	t.Helper()
	pr, pw, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = pw, pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	pw.Close()
	var out strings.Builder
	seen, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		found := false
		for sc.Scan() {
			out.WriteString(sc.Text() + "\n")
			if !found && strings.Contains(sc.Text(), want) {
				found = true
				close(seen)
			}
		}
		if !found {
			close(seen)
		}
	}()
	select {
	case <-seen:
	case <-time.After(time.Minute):
		cmd.Process.Kill()
		t.Fatalf("no %q from margay-lab within a minute", want)
	}
	return func() string {
		select {
		case <-done:
			return out.String()
		case <-time.After(time.Minute):
			return "(no end of output a minute on: some process still holds margay-lab's stdout)"
		}
	}
}

func TestUsage(t *testing.T) {
	for _, args := range [][]string{{"up", "--nodes", "x"}, {"exec", "node1"}, {"pod", "add", "node1"}, {"status", "extra"}, {"--netns-prefix", "", "down"}, {"up", "--ip-family", "ipv6"}, {"up", "--ip-family", "ip4"}} {
		var out strings.Builder
		if code := run(args, &out, &out); code != 2 {
			t.Errorf("margay-lab %q: exit %d, want 2:\n%s", args, code, out.String())
		}
	}
}

// A dual-stack lab: every pod reaches every pod and the internet host over
// both families, across the subnets through VXLAN.
func TestLabUpDualStack(t *testing.T) {
	state := filepath.Join(t.TempDir(), "lab")
	if binDirForTests == "" {
		t.Skip("needs root, and not -short: it builds a lab")
	}
	t.Cleanup(func() { runLab(t, state, "down") })
	out, code := runLab(t, state, "up", "--nodes", "2", "--subnets", "2", "--encap", "vxlan", "--pods-per-node", "1", "--ip-family", "dual")
	// 2 pods, each to the other and the internet host, over both families.
	if code != 0 || !strings.Contains(out, "8 of 8 reachable") || strings.Contains(out, "✗") || !strings.Contains(out, "internet v6") {
		t.Fatalf("up --ip-family dual: exit %d:\n%s", code, out)
	}
	if out, code := runLab(t, state, "exec", "node1", "--", "ip", "-6", "route", "show", "dev", "vxlan-v6.margay"); code != 0 || !strings.Contains(out, "fd00:244:") {
		t.Errorf("node1's routes through vxlan-v6.margay: exit %d:\n%s", code, out)
	}
	if out, code := runLab(t, state, "down"); code != 0 {
		t.Fatalf("down: exit %d:\n%s", code, out)
	}
	checkGone(t, state, nil)
}

func TestLabPools(t *testing.T) {
	for _, c := range []struct {
		mode string
		dual bool
		want []string
	}{
		{"vxlanMode", false, []string{`cidr: "10.244.0.0/16", natOutgoing: true, vxlanMode: CrossSubnet`}},
		{"", true, []string{`cidr: "10.244.0.0/16", natOutgoing: true}`, `cidr: "fd00:244::/48", natOutgoing: true}`}},
		// IPIP carries IPv4 only: the IPv6 pool takes VXLAN.
		{"ipipMode", true, []string{"ipipMode: CrossSubnet", `cidr: "fd00:244::/48", natOutgoing: true, vxlanMode: CrossSubnet`}},
	} {
		got := labPools(c.mode, c.dual)
		for _, w := range c.want {
			if !strings.Contains(got, w) {
				t.Errorf("labPools(%q, %v) lacks %q:\n%s", c.mode, c.dual, w, got)
			}
		}
		if strings.Contains(got, "fd00:") != c.dual {
			t.Errorf("labPools(%q, %v):\n%s", c.mode, c.dual, got)
		}
	}
}

func TestEncapsulation(t *testing.T) {
	for choice, want := range map[string]string{"ipip": "ipipMode", "vxlan": "vxlanMode", "none": ""} {
		if mode, _ := encapsulation(choice); mode != want {
			t.Errorf("--encap %s: mode %q, want %q", choice, mode, want)
		}
	}
	mode, why := encapsulation("auto")
	if want := map[bool]string{true: "ipipMode", false: "vxlanMode"}[kernelHasIPIP()]; mode != want || !strings.Contains(why, "auto:") {
		t.Errorf("--encap auto: %q, %q; want %q and a reason", mode, why, want)
	}
}

// With no way across subnets (--encap none, no ToR) up says which checks
// failed, exits 1 and leaves the lab up for a look; down removes it.
func TestLabUpUnreachable(t *testing.T) {
	state := filepath.Join(t.TempDir(), "lab")
	t.Cleanup(func() { runLab(t, state, "down") })
	out, code := runLab(t, state, "up", "--nodes", "2", "--subnets", "2", "--encap", "none", "--pods-per-node", "1")
	if code != 1 || !strings.Contains(out, "will not reach each other") || !strings.Contains(out, "2 of 4 reachable") || !strings.Contains(out, "the lab stays up") {
		t.Fatalf("up without a way across subnets: exit %d:\n%s", code, out)
	}
	if out, code := runLab(t, state, "exec", "node1-a", "--", "ping", "-c", "1", "-W", "1", "203.0.113.10"); code != 0 {
		t.Errorf("the lab is not up after a partial failure: exit %d:\n%s", code, out)
	}
	pids := labPIDs(t, state)
	if out, code := runLab(t, state, "down"); code != 0 {
		t.Fatalf("down: exit %d:\n%s", code, out)
	}
	checkGone(t, state, pids)
}
