// Package k8s runs margay under real Kubernetes in the lab: a kube-apiserver in
// the lab's etcd host, and on every node a real containerd (with runc) and
// kubelet beside margay-node, which get the pod network from the conflist
// `margay-node install-cni` wrote. Pods are made through the Kubernetes API.
// It needs root and the binaries test/k8stest builds; without them every test
// skips (fails under MARGAY_K8S_REQUIRE=1).
package k8s_test

import (
	"context"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/margay-dev/margay/test/k8stest"
	"github.com/margay-dev/margay/test/lab"
)

// binDir holds the margay binaries built for this run.
var binDir string

func TestMain(m *testing.M) {
	flag.Parse()
	if os.Geteuid() != 0 || testing.Short() {
		os.Exit(m.Run()) // every test skips
	}
	dir, err := os.MkdirTemp("", "margay-k8s-bin-")
	if err != nil {
		panic(err)
	}
	out, err := exec.Command("go", "build", "-o", dir, "../../cmd/margay-node", "../../cmd/margay", "../../cmd/margay-ipam",
		"../../cmd/margayctl", "../../cmd/margay-kube-controllers").CombinedOutput()
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

// pool: one pool with VXLAN between the lab's two subnets and masquerade to
// the internet host.
const pool = `apiVersion: margay.dev/v1
kind: IPPool
metadata: {name: pods}
spec: {cidr: 10.244.0.0/16, natOutgoing: true, vxlanMode: CrossSubnet}
`

var podCIDR = netip.MustParsePrefix("10.244.0.0/16")

// cluster is the lab with Kubernetes on it.
type cluster struct {
	t        testing.TB
	lab      *lab.Lab
	api      *k8stest.APIServer
	admin    kubernetes.Interface
	kubelets map[string]*k8stest.Kubelet // by node name
	cniLogs  map[string]string           // the plugin's log file, by node
}

// newCluster brings up a lab of nodes in two subnets, the API server, and a
// kubelet on every node, after install-cni. The controller is not started:
// see startControllers.
func newCluster(t testing.TB, nodes int) *cluster {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if testing.Short() {
		t.Skip("starts kube-apiserver, containerd and kubelets")
	}
	for _, b := range []string{"kube-apiserver", "kube-scheduler", "kube-controller-manager", "kubelet", "kubectl", "containerd", "containerd-shim-runc-v2", "ctr"} {
		k8stest.NeedBinary(t, b)
	}
	opts := lab.Options{Nodes: nodes, Subnets: 2, Pools: pool, Bin: binDir, K8sNodeRefs: true,
		AgentArgs: []string{"--resync-interval", "5s"}}
	if testing.Verbose() {
		opts.Log = os.Stderr
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	l, err := lab.Up(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{t: t, lab: l, kubelets: map[string]*k8stest.Kubelet{}, cniLogs: map[string]string{}}
	t.Cleanup(func() {
		if t.Failed() {
			for _, n := range l.Nodes {
				if b, err := os.ReadFile(n.LogPath()); err == nil {
					t.Logf("%s's margay-node log:\n%s", n.Name, tail(string(b), 40))
				}
				if k := c.kubelets[n.Name]; k != nil {
					t.Logf("%s's kubelet log:\n%s", n.Name, k.LogTail("kubelet", 40))
					t.Logf("%s's containerd log:\n%s", n.Name, k.LogTail("containerd", 20))
				}
				if b, err := os.ReadFile(c.cniLogs[n.Name]); err == nil {
					t.Logf("%s's CNI log:\n%s", n.Name, tail(string(b), 20))
				}
			}
		}
		l.Down()
	})
	var names []string
	for _, n := range l.Nodes {
		names = append(names, n.Name)
	}
	c.api = k8stest.Start(t, k8stest.Options{NS: l.EtcdHost, Addr: lab.EtcdAddr.String(), Nodes: names})
	c.admin = c.api.Client(t, "admin")
	tokenDir := c.cniTokenDir()
	for _, n := range l.Nodes {
		dir := filepath.Join(l.Dir(), n.Name)
		bin, conf := filepath.Join(dir, "cni", "bin"), filepath.Join(dir, "cni", "net.d")
		c.cniLogs[n.Name] = filepath.Join(dir, "cni.log")
		// containerd brings a pod's lo up with the reference loopback plugin,
		// which a node has from its kubernetes-cni package.
		if err := copyTool("loopback", bin); err != nil {
			t.Fatal(err)
		}
		if out, err := n.NS.Run(filepath.Join(binDir, "margay-node"), "install-cni", "--src-dir", binDir,
			"--bin-dir", bin, "--conf-dir", conf, "--etcd-endpoints", l.Endpoint(), "--nodename", n.Name,
			"--mtu-file", n.MTUFile(), "--log-file", c.cniLogs[n.Name],
			"--kubeconfig-token-dir", tokenDir, "--kubernetes-server", c.api.URL); err != nil {
			t.Fatalf("install-cni on %s: %v: %s", n.Name, err, out)
		}
		c.kubelets[n.Name] = k8stest.StartKubelet(t, c.api, k8stest.KubeletOptions{Name: n.Name, NS: n.NS,
			IP: n.IP.Addr().String(), CNIBinDir: bin, CNIConfDir: conf, Dir: filepath.Join(dir, "k8s")})
	}
	return c
}

// cniTokenDir makes the plugin's service account, bound to what it reads at
// ADD, and writes a token of it and the cluster's CA where a service account
// token Secret would be mounted, for install-cni --kubeconfig-token-dir.
func (c *cluster) cniTokenDir() string {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const ns, sa = "margay-system", "margay-cni"
	if _, err := c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
	if _, err := c.admin.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: sa},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods", "namespaces"}, Verbs: []string{"get"}}}}
	if _, err := c.admin.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: sa},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.ServiceAccountKind, Name: sa, Namespace: ns}},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: sa}}
	if _, err := c.admin.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
	tok, err := c.admin.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{ExpirationSeconds: new(int64(3600))}}, metav1.CreateOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	dir := filepath.Join(c.lab.Dir(), "cni-token")
	ca, err := os.ReadFile(c.api.CAFile())
	if err == nil {
		err = os.MkdirAll(dir, 0o700)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "token"), []byte(tok.Status.Token), 0o600)
	}
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "ca.crt"), ca, 0o600)
	}
	if err != nil {
		c.t.Fatal(err)
	}
	return dir
}

// startControllers runs margay-kube-controllers in the etcd host, with the
// manifest's RBAC, until the test ends.
func (c *cluster) startControllers(grace time.Duration) {
	c.t.Helper()
	c.api.ApplyRoles(c.t, "../../deploy/kubernetes/margay-kube-controllers.yaml", "margay-kube-controllers")
	log := filepath.Join(c.lab.Dir(), "margay-kube-controllers.log")
	f, err := os.Create(log)
	if err != nil {
		c.t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", c.lab.EtcdHost.Name, filepath.Join(binDir, "margay-kube-controllers"),
		"--kubeconfig", c.api.Kubeconfig(c.t, "margay-kube-controllers"), "--etcd-endpoints", c.lab.Endpoint(),
		"--grace", grace.String(), "--resync-interval", "2s", "--identity", "lab")
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		c.t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	c.t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		f.Close()
		if c.t.Failed() {
			b, _ := os.ReadFile(log)
			c.t.Logf("margay-kube-controllers' log:\n%s", tail(string(b), 40))
		}
	})
}

// pod creates a pod of the pause image (see podSpec).
func (c *cluster) pod(ctx context.Context, ns, name, node string, labels map[string]string) *corev1.Pod {
	c.t.Helper()
	p, err := c.admin.CoreV1().Pods(ns).Create(ctx, podSpec(ns, name, node, labels), metav1.CreateOptions{})
	if err != nil {
		c.t.Fatalf("create pod %s/%s: %v", ns, name, err)
	}
	return p
}

// podSpec is a pod bound to node or, with node "", one for kube-scheduler,
// spread one per node among the pods of its labels.
func podSpec(ns, name, node string, labels map[string]string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec: corev1.PodSpec{NodeName: node, TerminationGracePeriodSeconds: new(int64(2)),
			Containers: []corev1.Container{{Name: "main", Image: k8stest.PauseImage, ImagePullPolicy: corev1.PullNever}}},
	}
	if node == "" {
		p.Spec.TopologySpreadConstraints = []corev1.TopologySpreadConstraint{{MaxSkew: 1, TopologyKey: corev1.LabelHostname,
			WhenUnsatisfiable: corev1.DoNotSchedule, LabelSelector: &metav1.LabelSelector{MatchLabels: labels}}}
	}
	return p
}

// waitReady waits until every named pod in ns is Ready and returns them.
func (c *cluster) waitReady(ctx context.Context, ns string, names ...string) map[string]*corev1.Pod {
	c.t.Helper()
	ready := map[string]*corev1.Pod{}
	for len(ready) < len(names) {
		for _, name := range names {
			if ready[name] != nil {
				continue
			}
			p, err := c.admin.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err == nil && podReady(p) {
				ready[name] = p
			}
		}
		select {
		case <-ctx.Done():
			var missing []string
			for _, name := range names {
				if ready[name] == nil {
					p, _ := c.admin.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
					missing = append(missing, fmt.Sprintf("%s (%+v)", name, p.Status))
				}
			}
			c.t.Fatalf("pods not Ready: %s", strings.Join(missing, "; "))
		case <-time.After(200 * time.Millisecond):
		}
	}
	return ready
}

func podReady(p *corev1.Pod) bool {
	for _, cond := range p.Status.Conditions {
		if cond.Type == corev1.PodReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

// inPod runs a command in the network namespace of the pod's container.
func (c *cluster) inPod(p *corev1.Pod, args ...string) (string, error) {
	c.t.Helper()
	if len(p.Status.ContainerStatuses) == 0 {
		c.t.Fatalf("pod %s has no container status", p.Name)
	}
	netns, err := c.kubelets[p.Spec.NodeName].PodNetNS(p.Status.ContainerStatuses[0].ContainerID)
	if err != nil {
		c.t.Fatal(err)
	}
	out, err := exec.Command("nsenter", append([]string{"--net=" + netns, "--"}, args...)...).CombinedOutput()
	return string(out), err
}

// kubectl runs Kubernetes' kubectl as admin, in the API server's namespace.
func (c *cluster) kubectl(args ...string) (string, error) {
	bin, err := k8stest.Binary("kubectl")
	if err != nil {
		return "", err
	}
	return c.lab.EtcdHost.Run(append([]string{bin, "--kubeconfig", c.api.Kubeconfig(c.t, "admin")}, args...)...)
}

// copyTool puts a command of go.mod's tool directive into dir.
func copyTool(name, dir string) error {
	out, err := exec.Command("go", "tool", "-n", name).Output()
	if err != nil {
		return fmt.Errorf("go tool -n %s: %v", name, err)
	}
	b, err := os.ReadFile(strings.TrimSpace(string(out)))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name), b, 0o755)
}

func tail(s string, lines int) string {
	l := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(l[max(0, len(l)-lines):], "\n")
}
