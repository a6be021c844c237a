package kube

import (
	"maps"
	"slices"
	"testing"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/kube/endpoint"
)

var t0 = time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)

func wep(name, node, ns, pod string, labels map[string]string) *api.WorkloadEndpoint {
	w := api.NewWorkloadEndpoint(name)
	w.Metadata.ResourceVersion = "7"
	w.Metadata.Labels = labels
	w.Spec = api.WorkloadEndpointSpec{Node: node, Orchestrator: api.OrchestratorK8s, Namespace: ns, Pod: pod,
		ContainerID: "c-" + pod, InterfaceName: "eth0"}
	return w
}

func node(name, k8s string) *api.Node {
	n := api.NewNode(name)
	n.Metadata.ResourceVersion = "9"
	if k8s != "" {
		n.Spec.OrchRefs = []api.OrchRef{{Orchestrator: api.OrchestratorK8s, NodeName: k8s}}
	}
	return n
}

func TestCompute(t *testing.T) {
	web := endpoint.Pod{Node: "n1", Labels: map[string]string{"app": "web"}}
	webLabels := endpoint.Labels("prod", web, map[string]string{"team": "blue"})
	grace := time.Minute
	cases := []struct {
		name        string
		in          Input
		relabel     []string
		delWEPs     []string
		delNodes    []string
		orphans     map[string]time.Time
		wantReasons []string
	}{{
		name: "labels already right: nothing to do",
		in: Input{K8sNodes: map[string]bool{"n1": true}, Pods: map[PodKey]endpoint.Pod{{"prod", "web"}: web}, Namespaces: map[string]map[string]string{"prod": {"team": "blue"}},
			Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", webLabels)}},
	}, {
		name: "a new endpoint, a relabelled pod and a relabelled namespace get labels",
		in: Input{K8sNodes: map[string]bool{"n1": true}, Pods: map[PodKey]endpoint.Pod{{"prod", "web"}: web, {"dev", "db"}: {Node: "n1"}},
			Namespaces: map[string]map[string]string{"prod": {"team": "red"}},
			Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", webLabels),
				wep("n1.dev.db.eth0", "n1", "dev", "db", nil)}},
		relabel: []string{"n1.dev.db.eth0", "n1.prod.web.eth0"},
	}, {
		name:    "an endpoint whose pod is gone waits out the grace period",
		in:      Input{Now: t0, Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", nil)}},
		orphans: map[string]time.Time{"wep/n1.prod.web.eth0": t0},
	}, {
		name: "then it is deleted, with its reason",
		in: Input{Now: t0.Add(grace), Orphans: map[string]time.Time{"wep/n1.prod.web.eth0": t0, "wep/gone-since": t0},
			Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", nil)}},
		delWEPs:     []string{"n1.prod.web.eth0"},
		orphans:     map[string]time.Time{"wep/n1.prod.web.eth0": t0},
		wantReasons: []string{"pod prod/web no longer exists (for 1m0s)"},
	}, {
		name: "a pod that came back clears the count",
		in: Input{K8sNodes: map[string]bool{"n1": true}, Now: t0.Add(grace), Orphans: map[string]time.Time{"wep/n1.prod.web.eth0": t0},
			Pods:      map[PodKey]endpoint.Pod{{"prod", "web"}: web},
			Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", nil)}},
		relabel: []string{"n1.prod.web.eth0"},
	}, {
		name: "a pod of the same name on another node orphans the old node's endpoint",
		in: Input{K8sNodes: map[string]bool{"n1": true, "n2": true}, Now: t0.Add(2 * grace), Orphans: map[string]time.Time{"wep/n2.prod.web.eth0": t0},
			Pods: map[PodKey]endpoint.Pod{{"prod", "web"}: web}, Namespaces: map[string]map[string]string{"prod": {"team": "blue"}},
			Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", webLabels),
				wep("n2.prod.web.eth0", "n2", "prod", "web", webLabels)}},
		delWEPs:     []string{"n2.prod.web.eth0"},
		orphans:     map[string]time.Time{"wep/n2.prod.web.eth0": t0},
		wantReasons: []string{"pod prod/web now runs on node n1, not n2 (for 2m0s)"},
	}, {
		name: "a pod bound to a deleted node holds nothing",
		in: Input{Now: t0.Add(grace), Orphans: map[string]time.Time{"wep/n1.prod.web.eth0": t0},
			Pods:      map[PodKey]endpoint.Pod{{"prod", "web"}: web},
			Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", webLabels)}},
		delWEPs:     []string{"n1.prod.web.eth0"},
		orphans:     map[string]time.Time{"wep/n1.prod.web.eth0": t0},
		wantReasons: []string{"pod prod/web is bound to node n1, which no longer exists (for 1m0s)"},
	}, {
		name: "endpoints of other orchestrators are left alone",
		in: Input{Now: t0.Add(grace), Endpoints: func() []*api.WorkloadEndpoint {
			w := wep("n1.cni.abc.eth0", "n1", "", "", nil)
			w.Spec.Orchestrator = "cni"
			return []*api.WorkloadEndpoint{w}
		}()},
	}, {
		name: "a node whose Kubernetes node is gone is deleted after the grace; one without a k8s ref never",
		in: Input{Now: t0.Add(grace), K8sNodes: map[string]bool{"k1": true},
			Orphans: map[string]time.Time{"node/n2": t0, "node/n3": t0.Add(time.Second)},
			Nodes:   []*api.Node{node("n1", "k1"), node("n2", "k2"), node("n3", "k3"), node("bare", "")}},
		delNodes:    []string{"n2"},
		orphans:     map[string]time.Time{"node/n2": t0, "node/n3": t0.Add(time.Second)},
		wantReasons: []string{"Kubernetes node k2 no longer exists (for 1m0s)"},
	}, {
		name: "an orphan time in the future (a clock step back) restarts the count",
		in: Input{Now: t0, Orphans: map[string]time.Time{"node/n2": t0.Add(time.Hour)},
			Nodes: []*api.Node{node("n2", "k2")}},
		orphans: map[string]time.Time{"node/n2": t0},
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tc.in.Grace = grace
			out := Compute(tc.in)
			var relabel, delW, delN, reasons []string
			for _, r := range out.Relabel {
				relabel = append(relabel, r.Name)
				for _, w := range tc.in.Endpoints {
					if w.Metadata.Name == r.Name {
						p := tc.in.Pods[PodKey{w.Spec.Namespace, w.Spec.Pod}]
						if want := endpoint.Labels(w.Spec.Namespace, p, tc.in.Namespaces[w.Spec.Namespace]); !maps.Equal(r.Labels, want) || r.ResourceVersion != "7" {
							t.Errorf("relabel %s to %v at %s; want %v at 7", r.Name, r.Labels, r.ResourceVersion, want)
						}
					}
				}
			}
			for _, d := range out.DeleteEndpoints {
				delW, reasons = append(delW, d.Name), append(reasons, d.Reason)
			}
			for _, d := range out.DeleteNodes {
				delN, reasons = append(delN, d.Name), append(reasons, d.Reason)
			}
			check := func(what string, got, want []string) {
				if !slices.Equal(got, want) {
					t.Errorf("%s = %q, want %q", what, got, want)
				}
			}
			check("relabel", relabel, tc.relabel)
			check("delete endpoints", delW, tc.delWEPs)
			check("delete nodes", delN, tc.delNodes)
			check("reasons", reasons, tc.wantReasons)
			if tc.orphans == nil {
				tc.orphans = map[string]time.Time{}
			}
			if !maps.Equal(out.Orphans, tc.orphans) {
				t.Errorf("orphans = %v, want %v", out.Orphans, tc.orphans)
			}
		})
	}
}

func TestSelectRepairs(t *testing.T) {
	leaked := []ipam.Finding{
		{Handle: ipam.PodHandle("a"), Pod: "prod/gone", Reason: "no WorkloadEndpoint has container a"},
		{Handle: ipam.PodHandle("b"), Pod: "prod/web", Reason: "no WorkloadEndpoint has container b"},
		{Handle: ipam.PodHandle("c"), Reason: "no WorkloadEndpoint has container c"},
		{Handle: "margay-tunnel-x", Reason: "something else"},
	}
	leaked = append(leaked, ipam.Finding{Handle: ipam.PodHandle("d"), Pod: "prod/stranded", Reason: "no WorkloadEndpoint has container d"})
	got := SelectRepairs(&ipam.Report{Revision: 5, Leaked: leaked, BadAffinities: []ipam.Finding{{Node: "n1", Reason: "stale claim"}}},
		Input{Pods: map[PodKey]endpoint.Pod{{"prod", "web"}: {Node: "n1"}, {"prod", "stranded"}: {Node: "n9"}}, K8sNodes: map[string]bool{"n1": true}})
	var pods []string
	for _, f := range got.Leaked {
		pods = append(pods, f.Pod)
	}
	if got.Revision != 5 || !slices.Equal(pods, []string{"prod/gone", "prod/stranded"}) || len(got.BadAffinities) != 0 {
		t.Errorf("SelectRepairs = %+v; want the addresses of prod/gone and prod/stranded (on a deleted node)", got)
	}
}
