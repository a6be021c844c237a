package k8s_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/test/lab"
)

// TestKubeletPods: pods made through the Kubernetes API and placed by
// kube-scheduler on two kubelet nodes in two subnets get margay addresses, with their labels on the endpoint from
// ADD on; reach each other and the internet host; are relabelled by the
// controller; and leave nothing behind when deleted.
func TestKubeletPods(t *testing.T) {
	c := newCluster(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	n1, n2 := c.lab.Nodes[0], c.lab.Nodes[1]
	if _, err := c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{Name: "prod", Labels: map[string]string{"team": "blue"}}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// kube-scheduler places them, one per node, once kube-controller-manager
	// has lifted the not-ready taint the kubelets registered with.
	c.api.StartControllerManager(t)
	c.api.StartScheduler(t)
	c.pod(ctx, "prod", "web-1", "", map[string]string{"app": "web"})
	c.pod(ctx, "prod", "web-2", "", map[string]string{"app": "web"})
	pods := c.waitReady(ctx, "prod", "web-1", "web-2")
	if a, b := pods["web-1"].Spec.NodeName, pods["web-2"].Spec.NodeName; a == b || a == "" || b == "" {
		t.Fatalf("scheduled to %q and %q; want one pod on each of %s and %s", a, b, n1.Name, n2.Name)
	}

	// Addresses from the pool, as kubectl shows them.
	out, err := c.kubectl("get", "pods", "-n", "prod", "-o", "wide")
	if err != nil {
		t.Fatalf("kubectl get pods: %v: %s", err, out)
	}
	t.Logf("kubectl get pods -n prod -o wide:\n%s", out)
	for _, p := range pods {
		ip, err := netip.ParseAddr(p.Status.PodIP)
		if err != nil || !podCIDR.Contains(ip) {
			t.Errorf("pod %s has IP %q, not from the pool %s", p.Name, p.Status.PodIP, podCIDR)
		}
		if !strings.Contains(out, p.Status.PodIP) || !strings.Contains(out, p.Spec.NodeName) {
			t.Errorf("kubectl does not show %s on %s", p.Status.PodIP, p.Spec.NodeName)
		}
	}

	// The labels were written at ADD: no controller runs yet.
	for _, p := range pods {
		w := c.endpoint(p)
		if w == nil {
			t.Fatalf("no WorkloadEndpoint for %s", p.Name)
		}
		if w.Metadata.Labels["app"] != "web" || w.Metadata.Labels["margay.ns.team"] != "blue" || w.Metadata.Labels["margay.dev/namespace"] != "prod" {
			t.Errorf("endpoint of %s has labels %v; want the pod's and its namespace's from ADD", p.Name, w.Metadata.Labels)
		}
		if got := strings.Join(w.Spec.IPNetworks, ","); got != p.Status.PodIP+"/32" {
			t.Errorf("endpoint of %s has %s, the pod %s", p.Name, got, p.Status.PodIP)
		}
	}

	// Pod to pod across the subnets, and out to the internet host.
	for _, from := range pods {
		for _, to := range pods {
			if from != to {
				if out, err := c.inPod(from, "ping", "-c", "3", "-i", "0.2", "-W", "2", to.Status.PodIP); err != nil {
					t.Errorf("%s → %s: %v: %s", from.Name, to.Name, err, out)
				}
			}
		}
		if out, err := c.inPod(from, "ping", "-c", "3", "-i", "0.2", "-W", "2", lab.InternetAddr.String()); err != nil {
			t.Errorf("%s → internet %s: %v: %s", from.Name, lab.InternetAddr, err, out)
		}
	}

	// Relabelled through the API, the endpoint follows within 2 s.
	c.startControllers(10 * time.Second)
	patch, _ := json.Marshal(map[string]any{"metadata": map[string]any{"labels": map[string]string{"app": "api", "tier": "1"}}})
	start := time.Now()
	if _, err := c.admin.CoreV1().Pods("prod").Patch(ctx, "web-1", types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
	for {
		w := c.endpoint(pods["web-1"])
		if w != nil && w.Metadata.Labels["app"] == "api" && w.Metadata.Labels["tier"] == "1" {
			break
		}
		if time.Since(start) > 2*time.Second {
			t.Fatalf("2 s after the relabel, the endpoint has %v", w.Metadata.Labels)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("the endpoint had the new labels %v after the patch", time.Since(start).Round(time.Millisecond))

	// A NetworkPolicy through the API: prod admits ingress only from app=api
	// (web-1 now). The controller translates it and the agents enforce it.
	np := &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Name: "from-api"},
		Spec: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{{
			From: []networkingv1.NetworkPolicyPeer{{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "api"}}}}}}}}
	start = time.Now()
	if _, err := c.admin.NetworkingV1().NetworkPolicies("prod").Create(ctx, np, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ping := func(from, to *corev1.Pod) bool {
		_, err := c.inPod(from, "ping", "-c", "1", "-W", "1", to.Status.PodIP)
		return err == nil
	}
	w1, w2 := pods["web-1"], pods["web-2"]
	err = lab.WaitFor(30*time.Second, func() error {
		if ok := ping(w2, w1); ok {
			return fmt.Errorf("web-2 → web-1 still gets through")
		}
		if !ping(w1, w2) {
			return fmt.Errorf("web-1 (app=api) → web-2 is denied")
		}
		return nil
	})
	if err != nil {
		t.Fatalf("NetworkPolicy from-api not enforced: %v", err)
	}
	t.Logf("NetworkPolicy from-api enforced %v after its create", time.Since(start).Round(time.Millisecond))
	if err := c.admin.NetworkingV1().NetworkPolicies("prod").Delete(ctx, "from-api", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := lab.WaitFor(30*time.Second, func() error {
		if !ping(w2, w1) {
			return fmt.Errorf("web-2 → web-1 still denied")
		}
		return nil
	}); err != nil {
		t.Fatalf("after the policy's delete: %v", err)
	}

	// Deleted through the API: no address, veth or endpoint is left.
	for name := range pods {
		if err := c.admin.CoreV1().Pods("prod").Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// The API forgets a pod once its containers stopped; the sandbox's CNI DEL
	// may come just after.
	start = time.Now()
	err = lab.WaitFor(time.Minute, func() error {
		l, err := c.admin.CoreV1().Pods("prod").List(ctx, metav1.ListOptions{})
		if err != nil {
			return err
		}
		if len(l.Items) > 0 {
			return fmt.Errorf("%d pods still in the API", len(l.Items))
		}
		for _, n := range c.lab.Nodes {
			if v := podVeths(n); len(v) > 0 {
				return fmt.Errorf("%s still has pod veths %v", n.Name, v)
			}
		}
		for _, p := range pods {
			if c.endpoint(p) != nil {
				return fmt.Errorf("the endpoint of %s is still there", p.Name)
			}
			if out, err := c.lab.Ctl(n1, "ipam", "show", "--ip", p.Status.PodIP); err != nil || !strings.Contains(out, " is free ") {
				return fmt.Errorf("%s's address %s: %v: %s", p.Name, p.Status.PodIP, err, out)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%v after the deletes, no pod, veth, endpoint or address was left", time.Since(start).Round(time.Millisecond))
	if out, err := c.lab.Ctl(n1, "ipam", "check"); err != nil || !strings.Contains(out, "No problems found") {
		t.Errorf("margayctl ipam check: %v: %s", err, out)
	}
}

// podVeths are the host ends of pod veths on node n.
func podVeths(n *lab.Node) []string {
	out, _ := n.NS.Run("ip", "-o", "link", "show", "type", "veth")
	var v []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], "mgy") {
			v = append(v, strings.TrimSuffix(f[1], ":"))
		}
	}
	return v
}

// endpoint reads the pod's WorkloadEndpoint from etcd with margayctl; nil if
// there is none.
func (c *cluster) endpoint(p *corev1.Pod) *api.WorkloadEndpoint {
	c.t.Helper()
	name := strings.ToLower(strings.Join([]string{p.Spec.NodeName, p.Namespace, p.Name, "eth0"}, "."))
	out, err := c.lab.Ctl(c.lab.Nodes[0], "get", "workloadendpoint", name, "-o", "json")
	if err != nil {
		return nil
	}
	var w api.WorkloadEndpoint
	if err := json.Unmarshal([]byte(out), &w); err != nil {
		c.t.Fatalf("endpoint %s: %v: %s", name, err, out)
	}
	return &w
}

// TestDeleteNode: when a node dies and Kubernetes deletes it, the controller
// deletes its Node and frees its blocks and its pods' addresses within the
// grace period (and the dead agent's TTL), while a pod running on another node keeps its address the
// whole time.
func TestDeleteNode(t *testing.T) {
	c := newCluster(t, 2)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	n1, n2 := c.lab.Nodes[0], c.lab.Nodes[1]
	const grace = 5 * time.Second
	c.startControllers(grace)
	c.pod(ctx, "default", "keep", n1.Name, map[string]string{"app": "keep"})
	c.pod(ctx, "default", "lost", n2.Name, map[string]string{"app": "lost"})
	pods := c.waitReady(ctx, "default", "keep", "lost")
	keep, lost := pods["keep"], pods["lost"]

	// node2 dies: its kubelet, containers and agent stop without a CNI DEL.
	c.kubelets[n2.Name].Stop()
	n2.Stop(syscall.SIGKILL)
	start := time.Now()
	if err := c.admin.CoreV1().Nodes().Delete(ctx, n2.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// Until node2's things are gone, keep's address must stay allocated to it.
	var checks int
	var waiting string
	err := lab.WaitFor(grace+30*time.Second, func() (err error) {
		checks++
		defer func() {
			if err != nil && err.Error() != waiting {
				waiting = err.Error()
				t.Logf("%v: %v", time.Since(start).Round(100*time.Millisecond), err)
			}
		}()
		if out, err := c.lab.Ctl(n1, "ipam", "show", "--ip", keep.Status.PodIP); err != nil || strings.Contains(out, " is free ") {
			t.Fatalf("the running pod's address %s was freed: %v: %s", keep.Status.PodIP, err, out)
		}
		if out, _ := c.lab.Ctl(n1, "get", "nodes"); strings.Contains(out, n2.Name) {
			return fmt.Errorf("node %s is still in etcd", n2.Name)
		}
		if out, _ := c.lab.Ctl(n1, "ipam", "show", "--show-blocks"); strings.Contains(out, n2.Name) {
			return fmt.Errorf("blocks still name %s:\n%s", n2.Name, out)
		}
		if c.endpoint(lost) != nil {
			return fmt.Errorf("the endpoint of the lost pod is still there")
		}
		if out, err := c.lab.Ctl(n1, "ipam", "show", "--ip", lost.Status.PodIP); err != nil || !strings.Contains(out, " is free ") {
			return fmt.Errorf("the lost pod's address %s: %v: %s", lost.Status.PodIP, err, out)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	took := time.Since(start)
	t.Logf("%v after the node's deletion (grace %v), its Node, blocks, endpoint and address were gone; the running pod's address held in %d checks",
		took.Round(time.Millisecond), grace, checks)
	if took < grace {
		t.Errorf("the controller acted after %v, before its grace period of %v", took, grace)
	}
	// The blocks wait also for the killed agent's key in etcd to expire: IPAM
	// frees a node's blocks only once no agent can still be using them.
	if limit := max(grace, datastore.AgentTTL) + 5*time.Second; took > limit {
		t.Errorf("the node's things were freed after %v; want within %v (the longer of the grace period and the agent TTL, plus two passes)", took, limit)
	}
	if out, err := c.inPod(keep, "ping", "-c", "2", "-i", "0.2", "-W", "2", lab.InternetAddr.String()); err != nil {
		t.Errorf("the running pod lost its network: %v: %s", err, out)
	}
	if out, err := c.lab.Ctl(n1, "ipam", "check"); err != nil || !strings.Contains(out, "No problems found") {
		t.Errorf("margayctl ipam check: %v: %s", err, out)
	}
}
