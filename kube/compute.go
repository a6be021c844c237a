// Package kube keeps margay's etcd datastore in step with a Kubernetes cluster:
// pod and namespace labels and named ports on WorkloadEndpoints, Kubernetes
// NetworkPolicies translated to margay's, and garbage collection after
// deleted pods and nodes. Compute decides, as a pure function of what both
// sides hold; Controller reads the two sides and applies its decisions.
package kube

import (
	"encoding/json"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"

	networkingv1 "k8s.io/api/networking/v1"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/kube/endpoint"
	"github.com/margay-dev/margay/kube/netpol"
)

// DefaultGrace is how long a WorkloadEndpoint without its pod, or a Node
// without its Kubernetes node, must stay so before it is deleted. It covers a
// CNI ADD that has written its endpoint before the controller's informer has
// seen the pod, and an agent that registers before its kubelet does.
const DefaultGrace = time.Minute

// PodKey names a pod.
type PodKey struct{ Namespace, Name string }

func (k PodKey) String() string { return k.Namespace + "/" + k.Name }

// Input is both sides of the sync, read after the informers have synced.
type Input struct {
	Now        time.Time
	Grace      time.Duration
	Pods       map[PodKey]endpoint.Pod
	Namespaces map[string]map[string]string // name → labels
	K8sNodes   map[string]bool
	Endpoints  []*api.WorkloadEndpoint
	Nodes      []*api.Node
	// K8sPolicies are the cluster's NetworkPolicies. Policies are margay's,
	// of which the controller owns those named netpol.NamePrefix + name.
	K8sPolicies []*networkingv1.NetworkPolicy
	Policies    []*api.NetworkPolicy
	// Orphans is the previous Output's: since when each endpoint or node has
	// been without its Kubernetes object.
	Orphans map[string]time.Time
}

// Output is what to write to etcd. Each change carries its reason.
type Output struct {
	UpdateEndpoints []EndpointUpdate
	DeleteEndpoints []Deletion
	DeleteNodes     []Deletion
	// PutPolicies are translations to create (ResourceVersion "") or update;
	// DeletePolicies name, as namespace/name, translations whose Kubernetes
	// policy is gone.
	PutPolicies    []*api.NetworkPolicy
	DeletePolicies []Deletion
	// Problems are Kubernetes policies margay cannot translate. Their last
	// translation, if any, is kept: deleting it could open traffic.
	Problems []string
	// Orphans is every endpoint ("wep/" + name) and node ("node/" + name) now
	// without its Kubernetes object, with when that was first seen.
	Orphans map[string]time.Time
}

// EndpointUpdate sets an endpoint's labels and named ports.
type EndpointUpdate struct {
	Name, ResourceVersion string
	Labels                map[string]string
	Ports                 []api.EndpointPort
}

// Deletion removes a resource as it was read.
type Deletion struct {
	Name, ResourceVersion string
	Reason                string
}

// Compute decides the labels of every Kubernetes endpoint and which
// endpoints and nodes to delete. Only Kubernetes objects are touched: an
// endpoint whose orchestrator is not k8s, and a node with no k8s orchRef,
// are none of the controller's business.
func Compute(in Input) Output {
	out := Output{Orphans: map[string]time.Time{}}
	for _, w := range in.Endpoints {
		if w.Spec.Orchestrator != api.OrchestratorK8s || w.Spec.Pod == "" {
			continue
		}
		key := PodKey{w.Spec.Namespace, w.Spec.Pod}
		pod, ok := in.Pods[key]
		var why string
		switch {
		case !ok:
			why = "pod " + key.String() + " no longer exists"
		case !in.nodeLive(pod.Node):
			why = "pod " + key.String() + " is bound to node " + pod.Node + ", which no longer exists"
		case pod.Node != w.Spec.Node:
			why = "pod " + key.String() + " now runs on node " + pod.Node + ", not " + w.Spec.Node
		}
		if why != "" {
			if d, orphan := in.orphan(&out, "wep/"+w.Metadata.Name); orphan {
				out.DeleteEndpoints = append(out.DeleteEndpoints, Deletion{w.Metadata.Name, w.Metadata.ResourceVersion,
					why + " (for " + d.Round(time.Second).String() + ")"})
			}
			continue
		}
		want := endpoint.Labels(key.Namespace, pod, in.Namespaces[key.Namespace])
		if !maps.Equal(want, w.Metadata.Labels) || !slices.Equal(pod.Ports, w.Spec.Ports) {
			out.UpdateEndpoints = append(out.UpdateEndpoints, EndpointUpdate{w.Metadata.Name, w.Metadata.ResourceVersion, want, pod.Ports})
		}
	}
	for _, n := range in.Nodes {
		k8s := n.K8sNodeName()
		if k8s == "" || in.K8sNodes[k8s] {
			continue
		}
		if d, orphan := in.orphan(&out, "node/"+n.Metadata.Name); orphan {
			out.DeleteNodes = append(out.DeleteNodes, Deletion{n.Metadata.Name, n.Metadata.ResourceVersion,
				"Kubernetes node " + k8s + " no longer exists (for " + d.Round(time.Second).String() + ")"})
		}
	}
	for _, l := range [][]Deletion{out.DeleteEndpoints, out.DeleteNodes} {
		slices.SortFunc(l, func(a, b Deletion) int { return strings.Compare(a.Name, b.Name) })
	}
	slices.SortFunc(out.UpdateEndpoints, func(a, b EndpointUpdate) int { return strings.Compare(a.Name, b.Name) })
	out.PutPolicies, out.DeletePolicies, out.Problems = policies(in.K8sPolicies, in.Policies)
	return out
}

// policies decides the translations of the Kubernetes NetworkPolicies: one
// per policy, rewritten when it differs from what the translation would be
// now, deleted when its Kubernetes policy is gone. margay's own policies are
// left alone.
func policies(k8s []*networkingv1.NetworkPolicy, have []*api.NetworkPolicy) (put []*api.NetworkPolicy, del []Deletion, problems []string) {
	owned := map[string]*api.NetworkPolicy{}
	for _, p := range have {
		if strings.HasPrefix(p.Metadata.Name, netpol.NamePrefix) {
			owned[api.StorageName(&p.Metadata)] = p
		}
	}
	keep := map[string]bool{}
	for _, np := range k8s {
		key := np.Namespace + "/" + netpol.NamePrefix + np.Name
		keep[key] = true
		want, err := netpol.Translate(np)
		if err != nil {
			problems = append(problems, fmt.Sprintf("NetworkPolicy %s/%s is not enforced as it is now: %v", np.Namespace, np.Name, err))
			continue
		}
		want.SetDefaults()
		cur := owned[key]
		if cur != nil {
			if samePolicy(cur, want) {
				continue
			}
			want.Metadata.ResourceVersion = cur.Metadata.ResourceVersion
		}
		put = append(put, want)
	}
	for key, p := range owned {
		if !keep[key] {
			del = append(del, Deletion{key, p.Metadata.ResourceVersion, "Kubernetes NetworkPolicy " + p.Metadata.Namespace + "/" + strings.TrimPrefix(p.Metadata.Name, netpol.NamePrefix) + " no longer exists"})
		}
	}
	slices.SortFunc(put, func(a, b *api.NetworkPolicy) int {
		return strings.Compare(api.StorageName(&a.Metadata), api.StorageName(&b.Metadata))
	})
	slices.SortFunc(del, func(a, b Deletion) int { return strings.Compare(a.Name, b.Name) })
	slices.Sort(problems)
	return put, del, problems
}

// samePolicy compares what a translation holds: labels and spec.
func samePolicy(a, b *api.NetworkPolicy) bool {
	ja, _ := json.Marshal(a.Spec)
	jb, _ := json.Marshal(b.Spec)
	return string(ja) == string(jb) && maps.Equal(a.Metadata.Labels, b.Metadata.Labels)
}

// nodeLive tells whether a pod bound to node may run: a node that Kubernetes
// no longer has runs nothing, and its pods wait only for PodGC. A pod not yet
// scheduled ("") is live.
func (in *Input) nodeLive(node string) bool { return node == "" || in.K8sNodes[node] }

// podLive tells whether a pod exists and may run.
func (in *Input) podLive(k PodKey) bool {
	p, ok := in.Pods[k]
	return ok && in.nodeLive(p.Node)
}

// orphan records key as without its Kubernetes object and says for how long,
// and whether that is the grace period already.
func (in *Input) orphan(out *Output, key string) (time.Duration, bool) {
	since, ok := in.Orphans[key]
	if !ok || since.After(in.Now) {
		since = in.Now
	}
	out.Orphans[key] = since
	d := in.Now.Sub(since)
	return d, d >= in.Grace
}
