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
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
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

// BinEnv names a directory holding the prebuilt commands Binary names.
const BinEnv = "MARGAY_K8S_BIN"

// RequireEnv, when "1", turns a missing binary into a failure, not a skip.
const RequireEnv = "MARGAY_K8S_REQUIRE"

var (
	binMu sync.Mutex
	bins  = map[string]string{}
)

// toolModules are the modules under test/k8s whose go.mod names a command as
// a tool; a command not listed is in "tools" (Kubernetes').
var toolModules = map[string]string{"containerd": "containerd", "containerd-shim-runc-v2": "containerd", "ctr": "containerd"}

// Binary returns the path of a command of the Kubernetes tests
// (kube-apiserver, kubelet, kubectl, containerd, containerd-shim-runc-v2,
// ctr): from MARGAY_K8S_BIN, or built by `go tool -n` in its tools module
// under test/k8s, which the go command caches by content so that only the
// first run builds it.
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
	module := toolModules[name]
	if module == "" {
		module = "tools"
	}
	cmd.Dir = filepath.Join(filepath.Dir(here), "..", "k8s", module)
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
	addr    string
	port    int
	nodes   []string
	tokens  map[string]string // user → bearer token
	cmd     *exec.Cmd
	exited  chan struct{}
	logFile *os.File
}

// Users with a static token: an admin (system:masters), kube-scheduler's user
// (bound to its role by the API server's bootstrap RBAC) and users with no
// group, which tests bind to the roles under test.
var Users = []string{"admin", "system:kube-scheduler", "margay-kube-controllers", "margay-cni"}

// Options place a kube-apiserver.
type Options struct {
	// NS, when set, is the namespace kube-apiserver and its etcd run in;
	// without, they run on the test's loopback (which should be a namespace of
	// its own: nstest.MainInNetNS).
	NS *nstest.NS
	// Addr, with NS, is the address kube-apiserver serves and advertises on
	// port 6443, for kubelets in other namespaces; empty means 127.0.0.1.
	Addr string
	// Nodes get a static token each, as user system:node:<name> in group
	// system:nodes, which the Node authorizer serves (NodeUser).
	Nodes []string
}

// StartAPIServer starts etcd and kube-apiserver on loopback, with RBAC
// authorization, and stops both when t ends. With ns they run inside it, on
// its loopback; without, on the test's.
func StartAPIServer(t testing.TB, ns *nstest.NS) *APIServer {
	t.Helper()
	return Start(t, Options{NS: ns})
}

// Start starts etcd and kube-apiserver as o says, with Node and RBAC
// authorization, and stops both when t ends.
func Start(t testing.TB, o Options) *APIServer {
	t.Helper()
	bin := NeedBinary(t, "kube-apiserver")
	s := &APIServer{NS: o.NS, Dir: t.TempDir(), bin: bin, tokens: map[string]string{}, port: 6443, addr: "127.0.0.1", nodes: o.Nodes}
	if o.Addr != "" {
		if o.NS == nil {
			t.Fatal("k8stest: Options.Addr needs Options.NS")
		}
		s.addr = o.Addr
	}
	if o.NS == nil {
		s.Etcd = etcdtest.StartT(t)
		port, err := etcdtest.FreePort()
		if err != nil {
			t.Fatal(err)
		}
		s.port = port
	} else {
		e, err := etcdtest.Start(etcdtest.Options{NetNS: o.NS.Name})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Close)
		s.Etcd = e
	}
	s.URL = fmt.Sprintf("https://%s", net.JoinHostPort(s.addr, strconv.Itoa(s.port)))
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
	users := slices.Clone(Users)
	for _, n := range s.nodes {
		users = append(users, NodeUser(n))
	}
	for i, u := range users {
		b := make([]byte, 16)
		rand.Read(b)
		s.tokens[u] = hex.EncodeToString(b)
		fmt.Fprintf(&csv, "%s,%s,%d", s.tokens[u], u, 1000+i)
		switch {
		case u == "admin":
			csv.WriteString(`,"system:masters"`)
		case strings.HasPrefix(u, "system:node:"):
			csv.WriteString(`,"system:nodes"`)
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
		"--bind-address=" + s.addr, "--advertise-address=" + s.addr, fmt.Sprintf("--secure-port=%d", s.port),
		"--cert-dir=" + filepath.Join(s.Dir, "certs"),
		"--token-auth-file=" + filepath.Join(s.Dir, "tokens.csv"),
		"--authorization-mode=Node,RBAC",
		"--service-account-issuer=https://kubernetes.default.svc",
		"--service-account-key-file=" + filepath.Join(s.Dir, "sa.pub"),
		"--service-account-signing-key-file=" + filepath.Join(s.Dir, "sa.key"),
		"--service-cluster-ip-range=10.96.0.0/24",
		// No kube-controller-manager creates the default service accounts.
		"--disable-admission-plugins=ServiceAccount",
		"--enable-priority-and-fairness=false",
		// The advertised address may be loopback, which the kubernetes Service may
		// not point at; nothing in the tests uses that Service.
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
	return tailFile(filepath.Join(s.Dir, "kube-apiserver.log"), lines)
}

// tailFile is the last lines of a file.
func tailFile(path string, lines int) string {
	b, _ := os.ReadFile(path)
	l := strings.Split(strings.TrimSpace(string(b)), "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}

// CAFile is the certificate clients verify the API server with.
func (s *APIServer) CAFile() string { return filepath.Join(s.Dir, "certs", "apiserver.crt") }

// NodeUser is the user a kubelet on node authenticates as.
func NodeUser(node string) string { return "system:node:" + node }

// Config is a client config for user (one of Users, or a NodeUser).
func (s *APIServer) Config(user string) *rest.Config {
	c := &rest.Config{Host: s.URL, BearerToken: s.tokens[user],
		TLSClientConfig: rest.TLSClientConfig{CAFile: s.CAFile()}}
	if s.NS != nil {
		c.Dial = s.NS.DialContext
	}
	return c
}

// Client is a clientset for user.
func (s *APIServer) Client(t testing.TB, user string) kubernetes.Interface {
	t.Helper()
	k, err := s.clientset(user)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func (s *APIServer) clientset(user string) (kubernetes.Interface, error) {
	return kubernetes.NewForConfig(s.Config(user))
}

// Kubeconfig writes a kubeconfig file for user and returns its path.
func (s *APIServer) Kubeconfig(t testing.TB, user string) string {
	t.Helper()
	p := filepath.Join(s.Dir, user+".kubeconfig")
	if err := s.writeKubeconfig(p, user); err != nil {
		t.Fatal(err)
	}
	return p
}

func (s *APIServer) writeKubeconfig(path, user string) error {
	c := clientcmdapi.NewConfig()
	c.Clusters["lab"] = &clientcmdapi.Cluster{Server: s.URL, CertificateAuthority: s.CAFile()}
	c.AuthInfos[user] = &clientcmdapi.AuthInfo{Token: s.tokens[user]}
	c.Contexts["lab"] = &clientcmdapi.Context{Cluster: "lab", AuthInfo: user}
	c.CurrentContext = "lab"
	return clientcmd.WriteToFile(*c, path)
}
