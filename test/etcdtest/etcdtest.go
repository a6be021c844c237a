// Package etcdtest runs a real etcd on loopback for tests, benchmarks and the lab.
// etcd runs as a separate process (the etcdserver command beside this file, built
// from the same etcd server package margay depends on), so it is not slowed by the
// race detector and can be killed and restarted like a real server.
package etcdtest

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
)

// ServerEnv names a prebuilt etcdserver binary, for use outside this module.
const ServerEnv = "MARGAY_ETCD_SERVER"

// Options tune the server.
type Options struct {
	// Dir holds the data; empty means a new temporary directory removed by Close.
	Dir string
	// Fsync keeps etcd's fsyncs. Tests leave it off for speed; benchmarks that
	// compare with etcd's own rate may turn it on.
	Fsync bool
	// TLS, when set, serves clients over TLS with these files.
	TLS *transport.TLSInfo
	// NetNS, when set, runs etcd inside this named network namespace (ip netns),
	// for clients that live there; its loopback is not the caller's.
	NetNS string
	// Host is the address clients reach etcd at, on port 2379; empty means a
	// free loopback port. Set it with NetNS, to serve a lab's other namespaces.
	Host string
	// Detach lets etcd outlive this process (margay-lab): it gets its own
	// session and writes its output to Dir/etcd.log instead of to pipes that
	// would break when this process exits.
	Detach bool
}

// Server is a running (or stopped) etcd.
type Server struct {
	opts      Options
	ownDir    bool
	clientURL string
	peerURL   string
	cmd       *exec.Cmd
	exited    chan struct{}
}

// Start starts a single-member etcd on free loopback ports.
func Start(opts Options) (*Server, error) {
	s := &Server{opts: opts}
	if s.opts.Dir == "" {
		d, err := os.MkdirTemp("", "margay-etcd-")
		if err != nil {
			return nil, err
		}
		s.opts.Dir, s.ownDir = d, true
	}
	scheme := "http"
	if opts.TLS != nil {
		scheme = "https"
	}
	if opts.Host != "" {
		s.clientURL = fmt.Sprintf("%s://%s", scheme, net.JoinHostPort(opts.Host, "2379"))
		s.peerURL = "http://127.0.0.1:2380"
		if err := s.Restart(); err != nil {
			s.Close()
			return nil, err
		}
		return s, nil
	}
	// Another listener may still take a port between the check and etcd's
	// bind; then try other ports.
	var err error
	for range 3 {
		var cp, pp int
		if cp, err = FreePort(); err != nil {
			break
		}
		if pp, err = FreePort(); err != nil {
			break
		}
		s.clientURL = fmt.Sprintf("%s://127.0.0.1:%d", scheme, cp)
		s.peerURL = fmt.Sprintf("http://127.0.0.1:%d", pp)
		if err = s.Restart(); err == nil {
			return s, nil
		}
		if !strings.Contains(err.Error(), "address already in use") || !s.ownDir {
			break
		}
		os.RemoveAll(filepath.Join(s.opts.Dir, "data"))
	}
	s.Close()
	return nil, err
}

// StartT starts a server for a test and stops it when the test ends.
func StartT(t testing.TB) *Server {
	t.Helper()
	s, err := Start(Options{})
	if err != nil {
		t.Fatalf("start etcd: %v", err)
	}
	t.Cleanup(s.Close)
	return s
}

// FreePort returns a loopback TCP port that is free now and lies below the
// kernel's ephemeral range. A port from that range (what listening on :0
// gives) can be taken by any outgoing connection between the check and the
// server's bind, or while a stopped server waits for Restart; one below it can
// only be taken by another listener.
func FreePort() (int, error) {
	lo := 32768
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		if f := strings.Fields(string(b)); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil && n > 12000 {
				lo = n
			}
		}
	}
	const base = 10000
	for range 100 {
		port := base + rand.IntN(lo-base)
		l, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			continue
		}
		l.Close()
		return port, nil
	}
	return 0, fmt.Errorf("no free loopback port in [%d, %d)", base, lo)
}

var (
	buildOnce sync.Once
	builtBin  string
	buildErr  error
)

// serverBinary returns the etcdserver binary: MARGAY_ETCD_SERVER if set, else the
// module tool (go.mod's tool directive), which the go command builds once and
// caches by content.
func serverBinary() (string, error) {
	if p := os.Getenv(ServerEnv); p != "" {
		return p, nil
	}
	buildOnce.Do(func() {
		out, err := exec.Command("go", "tool", "-n", "etcdserver").Output()
		if err != nil {
			var stderr []byte
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = ee.Stderr
			}
			buildErr = fmt.Errorf("build etcdserver with 'go tool -n etcdserver' (or set %s): %v: %s", ServerEnv, err, stderr)
			return
		}
		builtBin = strings.TrimSpace(string(out))
	})
	return builtBin, buildErr
}

// Endpoints returns the client URLs.
func (s *Server) Endpoints() []string { return []string{s.clientURL} }

// Restart starts the server again after Stop, on the same data and ports.
func (s *Server) Restart() error {
	if s.cmd != nil {
		return fmt.Errorf("etcd is already running")
	}
	bin, err := serverBinary()
	if err != nil {
		return err
	}
	args := []string{"--data-dir", filepath.Join(s.opts.Dir, "data"), "--client-url", s.clientURL, "--peer-url", s.peerURL}
	if s.opts.Fsync {
		args = append(args, "--fsync")
	}
	if t := s.opts.TLS; t != nil {
		args = append(args, "--cert-file", t.CertFile, "--key-file", t.KeyFile, "--trusted-ca-file", t.TrustedCAFile)
		if t.ClientCertAuth {
			args = append(args, "--client-cert-auth")
		}
	}
	cmd := exec.Command(bin, args...)
	if s.opts.NetNS != "" {
		// ip execs etcd in place, so the process (and its death signal) is etcd's.
		cmd = exec.Command("ip", append([]string{"netns", "exec", s.opts.NetNS, bin}, args...)...)
	}
	if s.opts.Detach {
		return s.startDetached(cmd)
	}
	// If the test process dies, etcd dies with it.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	ready := make(chan bool, 1)
	go func() {
		sc := bufio.NewScanner(stdout)
		ok := sc.Scan() && sc.Text() == "ready"
		ready <- ok
		for sc.Scan() {
		}
	}()
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	select {
	case ok := <-ready:
		if ok {
			s.cmd, s.exited = cmd, exited
			return nil
		}
	case <-time.After(60 * time.Second):
	}
	cmd.Process.Kill()
	<-exited
	return fmt.Errorf("etcd did not become ready: %s", strings.TrimSpace(stderr.String()))
}

// startDetached starts etcd in its own session with its output in a log file,
// and waits for the "ready" line there.
func (s *Server) startDetached(cmd *exec.Cmd) error {
	logPath := filepath.Join(s.opts.Dir, "etcd.log")
	if err := os.MkdirAll(s.opts.Dir, 0o755); err != nil {
		return err
	}
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	err = cmd.Start()
	logf.Close() // etcd has its own descriptor
	if err != nil {
		return fmt.Errorf("start etcd: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	deadline := time.After(60 * time.Second)
	for {
		b, _ := os.ReadFile(logPath)
		if strings.Contains("\n"+string(b), "\nready\n") {
			s.cmd, s.exited = cmd, exited
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("etcd exited before it was ready: %s", strings.TrimSpace(string(b)))
		case <-deadline:
			cmd.Process.Kill()
			<-exited
			return fmt.Errorf("etcd did not become ready: %s", strings.TrimSpace(string(b)))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// PID is the running server's process ID, 0 when it is stopped.
func (s *Server) PID() int {
	if s.cmd == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Stop kills the server, as a crash would; its data stays for Restart.
func (s *Server) Stop() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.exited
	s.cmd = nil
}

// Close stops the server and removes its data if Start created the directory.
func (s *Server) Close() {
	s.Stop()
	if s.ownDir {
		os.RemoveAll(s.opts.Dir)
	}
}
