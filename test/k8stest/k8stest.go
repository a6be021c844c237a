// Package k8stest runs a real kube-apiserver for tests, on a real etcd of its
// own. The binaries are Kubernetes' own, built from the module proxy by the
// tools module in test/k8s/tools (go tool, cached by the go command), or
// taken from MARGAY_K8S_BIN.
package k8stest

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/nstest"
)

// BinEnv names a directory holding prebuilt kube-apiserver and kubelet.
const BinEnv = "MARGAY_K8S_BIN"

// RequireEnv, when "1", turns a missing binary into a failure, not a skip.
const RequireEnv = "MARGAY_K8S_REQUIRE"

var (
	binMu sync.Mutex
	bins  = map[string]string{}
)

// Binary returns the path of a Kubernetes command (kube-apiserver, kubelet):
// from MARGAY_K8S_BIN, or built by `go tool -n` in the tools module, which the
// go command caches by content so that only the first run builds it.
func Binary(name string) (string, error) {
	if d := os.Getenv(BinEnv); d != "" {
		return filepath.Join(d, name), nil
	}
	binMu.Lock()
	defer binMu.Unlock()
	if p, ok := bins[name]; ok {
		return p, nil
	}
	_, here, _, _ := runtime.Caller(0)
	cmd := exec.Command("go", "tool", "-n", name)
	cmd.Dir = filepath.Join(filepath.Dir(here), "..", "k8s", "tools")
	out, err := cmd.Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		return "", fmt.Errorf("build %s with 'go tool -n %s' in %s (or set %s): %v: %s", name, name, cmd.Dir, BinEnv, err, stderr)
	}
	p := strings.TrimSpace(string(out))
	bins[name] = p
	return p, nil
}

// NeedBinary skips t (fails it under MARGAY_K8S_REQUIRE=1) without the
// command, and returns its path.
func NeedBinary(t testing.TB, name string) string {
	t.Helper()
	p, err := Binary(name)
	if err == nil {
		if _, err = os.Stat(p); err == nil {
			return p
		}
	}
	if os.Getenv(RequireEnv) == "1" {
		t.Fatalf("%s: %v", name, err)
	}
	t.Skipf("no %s: %v", name, err)
	return ""
}

// APIServer is a running (or stopped) kube-apiserver.
type APIServer struct {
	// NS, when set, is the namespace kube-apiserver and its etcd run in; the
	// test's clients dial into it.
	NS      *nstest.NS
	Etcd    *etcdtest.Server
	URL     string
	Dir     string
	bin     string
	port    int
	tokens  map[string]string // user → bearer token
	cmd     *exec.Cmd
	exited  chan struct{}
	logFile *os.File
}

// Users with a static token: an admin (system:masters) and users with no
// group, which tests bind to the roles under test.
var Users = []string{"admin", "margay-kube-controllers", "margay-cni"}

// StartAPIServer starts etcd and kube-apiserver on loopback, with RBAC
// authorization, and stops both when t ends. With ns they run inside it, on
// its loopback; without, on the test's (which should be a namespace of its
// own: nstest.MainInNetNS).
func StartAPIServer(t testing.TB, ns *nstest.NS) *APIServer {
	t.Helper()
	bin := NeedBinary(t, "kube-apiserver")
	s := &APIServer{NS: ns, Dir: t.TempDir(), bin: bin, tokens: map[string]string{}, port: 6443}
	if ns == nil {
		s.Etcd = etcdtest.StartT(t)
		port, err := etcdtest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		s.port = port
	} else {
		e, err := etcdtest.Start(etcdtest.Options{NetNS: ns.Name})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		s.Etcd = e
	}
	s.URL = fmt.Sprintf("https://127.0.0.1:%d", s.port)
	if err := s.writeFiles(); err != nil {
		t.Fatal(err)
	}
	if err := s.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.Stop)
	return s
}

func (s *APIServer) writeFiles() error {
	var csv strings.Builder
	for i, u := range Users {
		b := make([]byte, 16)
		rand.Read(b)
		s.tokens[u] = hex.EncodeToString(b)
		fmt.Fprintf(&csv, "%s,%s,%d", s.tokens[u], u, 1000+i)
		if u == "admin" {
			csv.WriteString(`,"system:masters"`)
		}
		csv.WriteString("\n")
	}
	if err := os.WriteFile(filepath.Join(s.Dir, "tokens.csv"), []byte(csv.String()), 0o600); err != nil {
		return err
	}
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(s.Dir, "sa.key"), pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(s.Dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o600)
}

// Start starts kube-apiserver (again, after Stop) and waits until /readyz.
func (s *APIServer) Start() error {
	if s.cmd != nil {
		return fmt.Errorf("kube-apiserver is already running")
	}
	args := []string{
		"--etcd-servers=" + strings.Join(s.Etcd.Endpoints(), ","),
		"--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", fmt.Sprintf("--secure-port=%d", s.port),
		"--cert-dir=" + filepath.Join(s.Dir, "certs"),
		"--token-auth-file=" + filepath.Join(s.Dir, "tokens.csv"),
		"--authorization-mode=RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(s.Dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(s.Dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		// No kube-controller-manager creates the default service accounts.
		"--disable-admission-plugins=ServiceAccount",
		"--enable-priority-and-fairness=false",
		// The advertised address is loopback, which the kubernetes Service may not
		// point at; nothing in the tests uses that Service.
		"--endpoint-reconciler-type=none",
	}
	f, err := os.OpenFile(filepath.Join(s.Dir, "kube-apiserver.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	cmd := exec.Command(s.bin, args...)
	if s.NS != nil {
		// ip execs kube-apiserver in place: the process is kube-apiserver's.
		cmd = exec.Command("ip", append([]string{"netns", "exec", s.NS.Name, s.bin}, args...)...)
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return fmt.Errorf("start kube-apiserver: %w", err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	s.cmd, s.exited, s.logFile = cmd, exited, f
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	if err := s.waitReady(ctx); err != nil {
		s.Stop()
		return fmt.Errorf("kube-apiserver: %w; its log: %s", err, s.LogTail(20))
	}
	return nil
}

func (s *APIServer) waitReady(ctx context.Context) error {
	var last error
	for {
		select {
		case <-s.exited:
			return fmt.Errorf("exited")
		case <-ctx.Done():
			return fmt.Errorf("not ready: %v", last)
		case <-time.After(200 * time.Millisecond):
		}
		// The client reads the CA, which kube-apiserver writes at start.
		k, err := kubernetes.NewForConfig(s.Config("admin"))
		if err != nil {
			last = err
			continue
		}
		body, err := k.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && strings.TrimSpace(string(body)) == "ok" {
			return nil
		}
		last = err
	}
}

// Stop kills kube-apiserver.
func (s *APIServer) Stop() {
	if s.cmd == nil {
		return
	}
	s.cmd.Process.Kill()
	<-s.exited
	s.logFile.Close()
	s.cmd = nil
}

// LogTail is the end of kube-apiserver's log.
func (s *APIServer) LogTail(lines int) string {
	b, _ := os.ReadFile(filepath.Join(s.Dir, "kube-apiserver.log"))
	l := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}

// Config is a client config for user (one of Users).
func (s *APIServer) Config(user string) *rest.Config {
	c := &rest.Config{Host: s.URL, BearerToken: s.tokens[user],
		TLSClientConfig: rest.TLSClientConfig{CAFile: filepath.Join(s.Dir, "certs", "apiserver.crt")}}
	if s.NS != nil {
		c.Dial = s.NS.DialContext
	}
	return c
}

// Client is a clientset for user.
func (s *APIServer) Client(t testing.TB, user string) kubernetes.Interface {
	t.Helper()
	k, err := kubernetes.NewForConfig(s.Config(user))
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// Kubeconfig writes a kubeconfig file for user and returns its path.
func (s *APIServer) Kubeconfig(t testing.TB, user string) string {
	t.Helper()
	c := clientcmdapi.NewConfig()
	c.Clusters["lab"] = &clientcmdapi.Cluster{Server: s.URL, CertificateAuthority: filepath.Join(s.Dir, "certs", "apiserver.crt")}
	c.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: s.tokens[user]}
	c.Contexts["lab"] = &clientcmdapi.Context{Cluster: "lab", AuthInfo: user}
	c.CurrentContext = "lab"
	p := filepath.Join(s.Dir, user+".kubeconfig")
	if err := clientcmd.WriteToFile(*c, p); err != nil {
		t.Fatal(err)
	}
	return p
}
