package kube_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net/http/httptest"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/kube"
	"github.com/margay-dev/margay/kube/endpoint"
	"github.com/margay-dev/margay/kube/netpol"
	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/k8stest"
	"github.com/margay-dev/margay/test/nstest"
)

// cluster is a real kube-apiserver (on its own etcd) and margay's etcd, with
// the controller's RBAC applied from the manifest to the test user.
// The package's tests run in a network namespace of their own: the
// kube-apiserver, the two etcds and the controllers meet on its loopback.
func TestMain(m *testing.M) { nstest.MainInNetNS(m) }

type cluster struct {
	t     *testing.T
	api   *k8stest.APIServer
	admin kubernetes.Interface
	etcd  *etcdtest.Server
	store *datastore.Store
	alloc *ipam.Allocator
}

func newCluster(t *testing.T) *cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a kube-apiserver")
	}
	c := &cluster{t: t, api: k8stest.StartAPIServer(t, nil)}
	c.admin = c.api.Client(t, "admin")
	c.etcd = etcdtest.StartT(t)
	s, err := datastore.New(datastore.Config{Endpoints: c.etcd.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	c.store, c.alloc = s, ipam.New(s, ipam.Options{})
	// The controller runs with exactly the manifest's rights.
	c.api.ApplyRoles(t, "../deploy/kubernetes/margay-kube-controllers.yaml", "margay-kube-controllers")
	pool := api.NewIPPool("pool")
	pool.Spec.CIDR = "10.244.0.0/16"
	c.create(pool)
	return c
}

func (c *cluster) kubeCreate(what string, f func(context.Context) error) {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := f(ctx); err != nil {
		c.t.Fatalf("create %s: %v", what, err)
	}
}

func (c *cluster) create(r api.Resource) {
	c.t.Helper()
	if _, err := c.store.Create(context.Background(), r); err != nil {
		c.t.Fatal(err)
	}
}

func (c *cluster) node(name string) {
	c.t.Helper()
	c.kubeCreate("node "+name, func(ctx context.Context) error {
		_, err := c.admin.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
		return err
	})
	n := api.NewNode(name)
	n.Spec.OrchRefs = []api.OrchRef{{Orchestrator: api.OrchestratorK8s, NodeName: name}}
	c.create(n)
}

// pod creates a pod bound to node, and what the CNI plugin's ADD leaves in
// etcd: an address with the pod recorded, and a WorkloadEndpoint.
func (c *cluster) pod(ns, name, node string, labels map[string]string, endpoint bool, ports ...corev1.ContainerPort) netip.Addr {
	c.t.Helper()
	c.kubeCreate("pod "+ns+"/"+name, func(ctx context.Context) error {
		_, err := c.admin.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
			Spec: corev1.PodSpec{NodeName: node, ServiceAccountName: "web",
				Containers: []corev1.Container{{Name: "c", Image: "pause", Ports: ports}}},
		}, metav1.CreateOptions{})
		return err
	})
	cid := "cid-" + ns + "-" + name
	got, err := c.alloc.AutoAssign(context.Background(), ipam.AssignArgs{Handle: ipam.PodHandle(cid), Node: node,
		Attrs: map[string]string{"namespace": ns, "pod": name}})
	if err != nil {
		c.t.Fatal(err)
	}
	if endpoint {
		w := api.NewWorkloadEndpoint(node + "." + ns + "." + name + ".eth0")
		w.Spec = api.WorkloadEndpointSpec{Node: node, Orchestrator: api.OrchestratorK8s, Namespace: ns, Pod: name,
			ContainerID: cid, InterfaceName: "eth0", IPNetworks: []string{netip.PrefixFrom(got[0].IP, 32).String()}}
		c.create(w)
	}
	return got[0].IP
}

func (c *cluster) namespace(name string, labels map[string]string) {
	c.t.Helper()
	c.kubeCreate("namespace "+name, func(ctx context.Context) error {
		_, err := c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
		return err
	})
}

type replica struct {
	t      *testing.T
	once   sync.Once
	c      *kube.Controller
	cancel context.CancelFunc
	done   chan error
	health *httptest.Server
	log    *syncBuffer
}

// start runs a controller replica as the manifest's user, elected.
func (c *cluster) start(id string, grace time.Duration, e kube.Election) *replica {
	c.t.Helper()
	k := c.api.Client(c.t, "margay-kube-controllers")
	buf := &syncBuffer{}
	log := slog.New(slog.NewTextHandler(buf, &slog.HandlerOptions{Level: slog.LevelDebug})).With("replica", id)
	ctl := kube.New(kube.Config{Kube: k, Store: c.store, Grace: grace, Resync: time.Second, Logger: log, Metrics: kube.NewMetrics()})
	ctx, cancel := context.WithCancel(context.Background())
	r := &replica{t: c.t, c: ctl, cancel: cancel, done: make(chan error, 1), health: httptest.NewServer(ctl.Health()), log: buf}
	if e.Identity == "" {
		e = fastElection(id)
	}
	go func() { r.done <- kube.RunElected(ctx, k, ctl, e) }()
	c.t.Cleanup(func() {
		r.stop()
		if c.t.Failed() {
			c.t.Logf("replica %s's log:\n%s", id, buf.String())
		}
	})
	return r
}

// stop stops the replica once, and waits for it.
func (r *replica) stop() {
	r.once.Do(func() {
		r.cancel()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			r.t.Errorf("replica did not stop within 30s")
		}
		r.health.Close()
	})
}

// fastElection keeps the test short: a rival takes over 3 s after the
// leader goes silent.
func fastElection(id string) kube.Election {
	e := kube.DefaultElection("margay-system", id)
	e.LeaseDuration, e.RenewDeadline, e.RetryPeriod = 3*time.Second, 2*time.Second, 250*time.Millisecond
	return e
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
func (s *syncBuffer) String() string { s.mu.Lock(); defer s.mu.Unlock(); return s.b.String() }

func waitFor(t *testing.T, d time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	var last string
	for time.Since(start) < d {
		var ok bool
		if ok, last = cond(); ok {
			return time.Since(start)
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not within %s; last: %s", what, d, last)
	return 0
}

func (c *cluster) labels(name string) (map[string]string, error) {
	w, err := datastore.Get[*api.WorkloadEndpoint](context.Background(), c.store, name)
	if err != nil {
		return nil, err
	}
	return w.Metadata.Labels, nil
}

func (c *cluster) waitLabels(name string, want map[string]string, d time.Duration) time.Duration {
	c.t.Helper()
	return waitFor(c.t, d, "labels of "+name, func() (bool, string) {
		got, err := c.labels(name)
		return err == nil && maps.Equal(got, want), fmt.Sprint(got, err)
	})
}

// A pod's labels, its namespace's and its service account reach its
// endpoint; a relabelled pod or namespace is followed within 2 s.
func TestControllerLabels(t *testing.T) {
	c := newCluster(t)
	c.node("n1")
	c.namespace("prod", map[string]string{"team": "blue"})
	c.pod("prod", "web", "n1", map[string]string{"app": "web"}, true)
	c.start("a", time.Minute, kube.Election{})
	ep := "n1.prod.web.eth0"
	want := map[string]string{"app": "web", endpoint.LabelNamespace: "prod", endpoint.LabelOrchestrator: "k8s",
		endpoint.LabelServiceAccount: "web", endpoint.NamespaceLabelPrefix + "team": "blue",
		endpoint.NamespaceLabelPrefix + "kubernetes.io/metadata.name": "prod"}
	c.waitLabels(ep, want, 60*time.Second)

	ctx := context.Background()
	p, err := c.admin.CoreV1().Pods("prod").Get(ctx, "web", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	p.Labels = map[string]string{"app": "web", "tier": "front"}
	if _, err := c.admin.CoreV1().Pods("prod").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want["tier"] = "front"
	d := c.waitLabels(ep, want, 2*time.Second)
	t.Logf("pod relabelled: endpoint followed in %s", d.Round(time.Millisecond))

	ns, err := c.admin.CoreV1().Namespaces().Get(ctx, "prod", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ns.Labels["team"] = "red"
	if _, err := c.admin.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want[endpoint.NamespaceLabelPrefix+"team"] = "red"
	d = c.waitLabels(ep, want, 2*time.Second)
	t.Logf("namespace relabelled: endpoint followed in %s", d.Round(time.Millisecond))
}

// Kubernetes NetworkPolicies are translated into etcd and followed as they
// change; a translation changed or deleted in etcd is put back, margay's own
// policies are left alone, and a pod's named ports reach its endpoint.
func TestControllerNetworkPolicy(t *testing.T) {
	c := newCluster(t)
	c.node("n1")
	c.namespace("prod", nil)
	c.pod("prod", "web", "n1", map[string]string{"app": "web"}, true,
		corev1.ContainerPort{Name: "http", ContainerPort: 8080}, corev1.ContainerPort{ContainerPort: 9090},
		corev1.ContainerPort{Name: "dns", Protocol: corev1.ProtocolUDP, ContainerPort: 53})
	own := api.NewNetworkPolicy("prod", "mine")
	own.Spec.Selector = "all()"
	c.create(own)
	ctx := context.Background()
	nps := c.admin.NetworkingV1().NetworkPolicies("prod")
	np, err := nps.Create(ctx, &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: networkingv1.NetworkPolicySpec{PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
			Ingress: []networkingv1.NetworkPolicyIngressRule{{Ports: []networkingv1.NetworkPolicyPort{{Port: new(intstr.FromString("http"))}}}}}},
		metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	c.start("a", time.Minute, kube.Election{})

	const name = "prod/knp.default.web"
	// want waits for the stored translation to be np's.
	want := func(what string, np *networkingv1.NetworkPolicy, d time.Duration) {
		t.Helper()
		tr, err := netpol.Translate(np)
		if err != nil {
			t.Fatal(err)
		}
		tr.SetDefaults()
		wantJS, _ := json.Marshal(tr.Spec)
		took := waitFor(t, d, what, func() (bool, string) {
			p, err := datastore.Get[*api.NetworkPolicy](ctx, c.store, name)
			if err != nil {
				return false, err.Error()
			}
			js, _ := json.Marshal(p.Spec)
			return string(js) == string(wantJS), string(js)
		})
		t.Logf("%s: in etcd after %s", what, took.Round(time.Millisecond))
	}
	want("created", np, 60*time.Second)
	ports := waitFor(t, 5*time.Second, "named ports on the endpoint", func() (bool, string) {
		w, err := datastore.Get[*api.WorkloadEndpoint](ctx, c.store, "n1.prod.web.eth0")
		if err != nil {
			return false, err.Error()
		}
		return fmt.Sprint(w.Spec.Ports) == "[{http TCP 8080} {dns UDP 53}]", fmt.Sprint(w.Spec.Ports)
	})
	t.Logf("named ports on the endpoint after %s", ports.Round(time.Millisecond))

	np.Spec.Ingress[0].Ports = append(np.Spec.Ingress[0].Ports, networkingv1.NetworkPolicyPort{Port: new(intstr.FromInt32(443))})
	if np, err = nps.Update(ctx, np, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	want("updated", np, 2*time.Second)

	npKind := api.KindOf((*api.NetworkPolicy)(nil))
	if _, err := c.store.Delete(ctx, npKind, name, ""); err != nil {
		t.Fatal(err)
	}
	want("deleted in etcd, put back", np, 5*time.Second)

	if err := nps.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	gone := waitFor(t, 2*time.Second, "translation deleted", func() (bool, string) {
		_, err := c.store.GetResource(ctx, npKind, name)
		return errors.Is(err, datastore.ErrNotFound), fmt.Sprint(err)
	})
	t.Logf("deleted: gone from etcd after %s", gone.Round(time.Millisecond))
	if _, err := c.store.GetResource(ctx, npKind, "prod/mine"); err != nil {
		t.Errorf("margay's own policy: %v", err)
	}
}

// A deleted pod's endpoint and address go after the grace period; a pod that
// still exists keeps its address even without an endpoint. A deleted node's
// Node, blocks and addresses go; the other node's pods keep theirs.
func TestControllerGC(t *testing.T) {
	c := newCluster(t)
	c.node("n1")
	c.node("n2")
	c.namespace("prod", nil)
	keep := c.pod("prod", "keep", "n1", nil, true)
	noEndpoint := c.pod("prod", "no-endpoint", "n1", nil, false)
	doomed := c.pod("prod", "doomed", "n1", nil, true)
	onN2 := c.pod("prod", "on-n2", "n2", nil, true)
	const grace = 3 * time.Second
	c.start("a", grace, kube.Election{})
	time.Sleep(grace) // every allocation is older than the grace now

	ctx := context.Background()
	deleted := time.Now()
	// Without a kubelet to finish the pod's termination, only a forced delete
	// removes it; until then it is terminating, and keeps its address.
	if err := c.admin.CoreV1().Pods("prod").Delete(ctx, "doomed", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, grace+10*time.Second, "the deleted pod's endpoint and address go", func() (bool, string) {
		_, err := datastore.Get[*api.WorkloadEndpoint](ctx, c.store, "n1.prod.doomed.eth0")
		held, _ := c.alloc.IPsByHandle(ctx, ipam.PodHandle("cid-prod-doomed"))
		return errors.Is(err, datastore.ErrNotFound) && len(held) == 0, fmt.Sprint(err, held)
	})
	t.Logf("deleted pod: endpoint and address %s released %s after the pod's deletion (grace %s)", doomed, time.Since(deleted).Round(time.Millisecond), grace)
	if time.Since(deleted) < grace {
		t.Errorf("the endpoint went %s after its pod, within the grace period %s", time.Since(deleted), grace)
	}

	deleted = time.Now()
	if err := c.admin.CoreV1().Nodes().Delete(ctx, "n2", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, grace+10*time.Second, "node n2's Node, endpoint, address and block go", func() (bool, string) {
		_, nerr := datastore.Get[*api.Node](ctx, c.store, "n2")
		_, werr := datastore.Get[*api.WorkloadEndpoint](ctx, c.store, "n2.prod.on-n2.eth0")
		held, _ := c.alloc.IPsByHandle(ctx, ipam.PodHandle("cid-prod-on-n2"))
		r, err := c.alloc.Check(ctx, grace)
		if err != nil {
			return false, err.Error()
		}
		// What is left for the IPAM check is the pod kept without its
		// endpoint, which only an operator may release.
		kept := len(r.Leaked) == 1 && r.Leaked[0].Pod == "prod/no-endpoint" && r.Problems() == 1
		return errors.Is(nerr, datastore.ErrNotFound) && errors.Is(werr, datastore.ErrNotFound) && len(held) == 0 && kept,
			fmt.Sprintf("node: %v, endpoint: %v, held: %v, check: %+v", nerr, werr, held, r)
	})
	t.Logf("deleted node: its Node, blocks and address %s released %s after the node's deletion", onN2, time.Since(deleted).Round(time.Millisecond))

	// What still exists keeps its address, checked over a window of passes.
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(200 * time.Millisecond) {
		for cid, ip := range map[string]netip.Addr{"cid-prod-keep": keep, "cid-prod-no-endpoint": noEndpoint} {
			held, err := c.alloc.IPsByHandle(ctx, ipam.PodHandle(cid))
			if err != nil || len(held) != 1 || held[0].IP != ip {
				t.Fatalf("pod %s lost its address %s: %v, %v", cid, ip, held, err)
			}
		}
	}
}

// Two replicas: one leads, the other stands by; they never both lead, and
// the standby takes over when the leader stops, within the lease duration.
func TestControllerLeaderElection(t *testing.T) {
	c := newCluster(t)
	c.node("n1")
	c.namespace("prod", nil)
	a := c.start("a", time.Minute, kube.Election{})
	b := c.start("b", time.Minute, kube.Election{})
	leaders := func() []string {
		var l []string
		for id, r := range map[string]*replica{"a": a, "b": b} {
			if r.readyz() == "ok: leading" {
				l = append(l, id)
			}
		}
		return l
	}
	waitFor(t, 30*time.Second, "one replica leads", func() (bool, string) { l := leaders(); return len(l) == 1, fmt.Sprint(l) })
	var both atomic.Int64
	stopWatch := make(chan struct{})
	watched := make(chan struct{})
	go func() {
		defer close(watched)
		for {
			select {
			case <-stopWatch:
				return
			case <-time.After(20 * time.Millisecond):
			}
			if len(leaders()) > 1 {
				both.Add(1)
			}
		}
	}()
	first, standby := a, b
	if leaders()[0] == "b" {
		first, standby = b, a
	}
	// The leader works: a new pod's endpoint gets labels.
	c.pod("prod", "one", "n1", map[string]string{"n": "1"}, true)
	c.waitLabels("n1.prod.one.eth0", endpoint.Labels("prod", endpoint.Pod{ServiceAccount: "web", Labels: map[string]string{"n": "1"}}, prodLabels), 10*time.Second)
	first.stop()
	d := waitFor(t, 20*time.Second, "the standby leads", func() (bool, string) {
		return standby.readyz() == "ok: leading", standby.readyz()
	})
	t.Logf("standby took over %s after the leader stopped", d.Round(time.Millisecond))
	c.pod("prod", "two", "n1", map[string]string{"n": "2"}, true)
	c.waitLabels("n1.prod.two.eth0", endpoint.Labels("prod", endpoint.Pod{ServiceAccount: "web", Labels: map[string]string{"n": "2"}}, prodLabels), 10*time.Second)
	close(stopWatch)
	<-watched
	if n := both.Load(); n > 0 {
		t.Errorf("both replicas led at once in %d samples", n)
	}
}

// The controller carries on through a kube-apiserver restart and a restart
// of margay's etcd.
func TestControllerSurvivesRestarts(t *testing.T) {
	c := newCluster(t)
	c.node("n1")
	c.namespace("prod", nil)
	r := c.start("a", time.Minute, kube.Election{LeaseDuration: time.Minute, RenewDeadline: 50 * time.Second,
		RetryPeriod: time.Second, Namespace: "margay-system", Name: "margay-kube-controllers", Identity: "a"})
	waitFor(t, 30*time.Second, "leading", func() (bool, string) { return r.readyz() == "ok: leading", r.readyz() })

	c.api.Stop()
	time.Sleep(2 * time.Second)
	if err := c.api.Start(); err != nil {
		t.Fatal(err)
	}
	c.pod("prod", "after-api", "n1", map[string]string{"n": "1"}, true)
	c.waitLabels("n1.prod.after-api.eth0", endpoint.Labels("prod", endpoint.Pod{ServiceAccount: "web", Labels: map[string]string{"n": "1"}}, prodLabels), 30*time.Second)

	c.etcd.Stop()
	time.Sleep(2 * time.Second)
	if err := c.etcd.Restart(); err != nil {
		t.Fatal(err)
	}
	c.pod("prod", "after-etcd", "n1", map[string]string{"n": "2"}, true)
	c.waitLabels("n1.prod.after-etcd.eth0", endpoint.Labels("prod", endpoint.Pod{ServiceAccount: "web", Labels: map[string]string{"n": "2"}}, prodLabels), 30*time.Second)
	select {
	case err := <-r.done:
		t.Fatalf("the controller stopped: %v", err)
	default:
	}
}

// prodLabels are the labels kube-apiserver gives namespace prod.
var prodLabels = map[string]string{"kubernetes.io/metadata.name": "prod"}

func (r *replica) readyz() string {
	resp, err := r.health.Client().Get(r.health.URL + "/readyz")
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	b.ReadFrom(resp.Body)
	return string(bytes.TrimSpace(b.Bytes()))
}

// Pods come and go while the controller runs with a short grace: the pods
// that stay never lose their addresses or endpoints, checked on every
// sample, and what the others held is gone once they are.
func TestControllerChurnKeepsLivePods(t *testing.T) {
	c := newCluster(t)
	c.node("n1")
	c.node("n2")
	c.namespace("prod", nil)
	const grace = time.Second
	c.start("a", grace, kube.Election{})
	ctx := context.Background()
	stable := map[string]netip.Addr{}
	for i := range 6 {
		name := fmt.Sprintf("stable-%d", i)
		stable[name] = c.pod("prod", name, []string{"n1", "n2"}[i%2], nil, true)
	}
	check := func() {
		t.Helper()
		for name, ip := range stable {
			held, err := c.alloc.IPsByHandle(ctx, ipam.PodHandle("cid-prod-"+name))
			if err != nil || len(held) != 1 || held[0].IP != ip {
				t.Fatalf("pod %s lost its address %s: %v, %v", name, ip, held, err)
			}
		}
	}
	start := time.Now()
	var churned []string
	for i := range 20 {
		name := fmt.Sprintf("churn-%d", i)
		c.pod("prod", name, []string{"n1", "n2"}[i%2], nil, true)
		churned = append(churned, name)
		if i%2 == 0 {
			// Deleted at once: its endpoint is younger than the grace.
			if err := c.admin.CoreV1().Pods("prod").Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
				t.Fatal(err)
			}
		}
		check()
		time.Sleep(100 * time.Millisecond)
	}
	for _, name := range churned {
		if err := c.admin.CoreV1().Pods("prod").Delete(ctx, name, metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil && !strings.Contains(err.Error(), "not found") {
			t.Fatal(err)
		}
	}
	waitFor(t, 30*time.Second, "the churned pods' endpoints and addresses go", func() (bool, string) {
		check()
		for _, name := range churned {
			if held, _ := c.alloc.IPsByHandle(ctx, ipam.PodHandle("cid-prod-"+name)); len(held) > 0 {
				return false, name + " still holds " + held[0].IP.String()
			}
		}
		weps, err := datastore.List[*api.WorkloadEndpoint](ctx, c.store)
		if err != nil || len(weps) != len(stable) {
			return false, fmt.Sprint(len(weps), " endpoints, ", err)
		}
		return true, ""
	})
	t.Logf("20 pods churned over %s beside %d that stayed: none of those lost its address", time.Since(start).Round(time.Millisecond), len(stable))
}
