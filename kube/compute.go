// Package kube keeps margay's etcd datastore in step with a Kubernetes cluster:
// pod and namespace labels on WorkloadEndpoints, and garbage collection after
// deleted pods and nodes. Compute decides, as a pure function of what both
// sides hold; Controller reads the two sides and applies its decisions.
package kube

import (
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/kube/endpoint"
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
	// Orphans is the previous Output's: since when each endpoint or node has
	// been without its Kubernetes object.
	Orphans map[string]time.Time
}

// Output is what to write to etcd. Each change carries its reason.
type Output struct {
	Relabel         []Relabel
	DeleteEndpoints []Deletion
	DeleteNodes     []Deletion
	// Orphans is every endpoint ("wep/" + name) and node ("node/" + name) now
	// without its Kubernetes object, with when that was first seen.
	Orphans map[string]time.Time
}

// Relabel sets an endpoint's labels.
type Relabel struct {
	Name, ResourceVersion string
	Labels                map[string]string
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
		if !maps.Equal(want, w.Metadata.Labels) {
			out.Relabel = append(out.Relabel, Relabel{w.Metadata.Name, w.Metadata.ResourceVersion, want})
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
	slices.SortFunc(out.Relabel, func(a, b Relabel) int { return strings.Compare(a.Name, b.Name) })
	return out
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
