package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"maps"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/libcni"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/kube/endpoint"
	"github.com/margay-dev/margay/test/k8stest"
	"github.com/margay-dev/margay/test/nstest"
)

// With kubernetes.kubeconfig, ADD reads the pod and its namespace from a real
// kube-apiserver (in the node's namespace, beside etcd) and writes their
// labels on the endpoint. The plugin's user may only get pods and namespaces.
// Without access, ADD fails with "try again later" and leaves nothing behind.
func TestPluginPodLabelsFromKubernetes(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a kube-apiserver")
	}
	r := newRuntime(t, "1.1.0")
	k8s := k8stest.StartAPIServer(t, r.node)
	admin := k8s.Client(t, "admin")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kubeconfig := k8s.Kubeconfig(t, "margay-cni")
	conf := fmt.Sprintf(`{"cniVersion": "1.1.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": "node-a", "mtu": 1440, "ipam": {"type": "margay-ipam"},
		 "kubernetes": {"kubeconfig": %q}}]}`, r.etcd, kubeconfig)
	var err error
	if r.list, err = libcni.ConfListFromBytes([]byte(conf)); err != nil {
		t.Fatal(err)
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "prod", Labels: map[string]string{"team": "blue"}}}
	if _, err := admin.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "prod", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{NodeName: "node-a", ServiceAccountName: "web-sa", Containers: []corev1.Container{{Name: "c", Image: "pause", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}}}}
	if _, err := admin.CoreV1().Pods("prod").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	podNS := nstest.New(t, "pod")
	rt := podRT(podNS, "web")
	rt.Args[1][1] = "prod"

	// No role yet: the API server refuses, and so does ADD, cleanly.
	_, err = r.add(rt)
	if err == nil || !strings.Contains(err.Error(), "cannot read the pod's labels") || !strings.Contains(err.Error(), "forbidden") {
		t.Fatalf("ADD without RBAC: %v; want a refusal naming the pod's labels and forbidden", err)
	}
	if out, _ := r.ctl("ipam", "check"); !strings.Contains(out, "0 allocations") {
		t.Errorf("a refused ADD left an address: %s", out)
	}

	role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: "margay-cni"},
		Rules: []rbacv1.PolicyRule{{APIGroups: []string{""}, Resources: []string{"pods", "namespaces"}, Verbs: []string{"get"}}}}
	if _, err := admin.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	binding := &rbacv1.ClusterRoleBinding{ObjectMeta: metav1.ObjectMeta{Name: "margay-cni"},
		Subjects: []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: "margay-cni"}},
		RoleRef:  rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: "margay-cni"}}
	if _, err := admin.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// RBAC is cached by the API server: retry until the binding applies.
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err = r.add(rt); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("ADD with RBAC: %v", err)
	}
	var wep api.WorkloadEndpoint
	out, err := r.ctl("get", "workloadendpoints", "node-a.prod.web.eth0", "-o", "json")
	if err != nil || json.Unmarshal([]byte(out), &wep) != nil {
		t.Fatalf("WorkloadEndpoint: %v: %s", err, out)
	}
	want := map[string]string{"app": "web", endpoint.LabelNamespace: "prod", endpoint.LabelOrchestrator: "k8s",
		endpoint.LabelServiceAccount: "web-sa", endpoint.NamespaceLabelPrefix + "team": "blue",
		endpoint.NamespaceLabelPrefix + "kubernetes.io/metadata.name": "prod"}
	if !maps.Equal(wep.Metadata.Labels, want) {
		t.Errorf("endpoint labels at ADD = %v\nwant %v", wep.Metadata.Labels, want)
	}
	if got := fmt.Sprint(wep.Spec.Ports); got != "[{http TCP 8080}]" {
		t.Errorf("endpoint ports at ADD = %s, want the pod's named port", got)
	}
	if err := r.del(rt); err != nil {
		t.Fatalf("DEL: %v", err)
	}
}
