package kube

import (
	"maps"
	"slices"
	"strings"
	"testing"
	"time"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/kube/endpoint"
	"github.com/margay-dev/margay/kube/netpol"
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
		name: "a pod's named ports reach its endpoint",
		in: Input{K8sNodes: map[string]bool{"n1": true}, Namespaces: map[string]map[string]string{"prod": {"team": "blue"}},
			Pods:      map[PodKey]endpoint.Pod{{"prod", "web"}: {Node: "n1", Labels: web.Labels, Ports: []api.EndpointPort{{Name: "http", Protocol: api.Protocol{Name: "TCP"}, Port: 80}}}},
			Endpoints: []*api.WorkloadEndpoint{wep("n1.prod.web.eth0", "n1", "prod", "web", webLabels)}},
		relabel: []string{"n1.prod.web.eth0"},
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
			for _, r := range out.UpdateEndpoints {
				relabel = append(relabel, r.Name)
				for _, w := range tc.in.Endpoints {
					if w.Metadata.Name == r.Name {
						p := tc.in.Pods[PodKey{w.Spec.Namespace, w.Spec.Pod}]
						if want := endpoint.Labels(w.Spec.Namespace, p, tc.in.Namespaces[w.Spec.Namespace]); !maps.Equal(r.Labels, want) || r.ResourceVersion != "7" {
							t.Errorf("relabel %s to %v at %s; want %v at 7", r.Name, r.Labels, r.ResourceVersion, want)
						}
						if !slices.Equal(r.Ports, p.Ports) {
							t.Errorf("ports of %s: %v, want %v", r.Name, r.Ports, p.Ports)
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

// knp is a Kubernetes NetworkPolicy in namespace ns admitting ingress from
// cidr.
func knp(ns, name, cidr string) *networkingv1.NetworkPolicy {
	return &networkingv1.NetworkPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: networkingv1.NetworkPolicySpec{Ingress: []networkingv1.NetworkPolicyIngressRule{
			{From: []networkingv1.NetworkPolicyPeer{{IPBlock: &networkingv1.IPBlock{CIDR: cidr}}}}}}}
}

// stored is np's translation as the datastore returns it.
func stored(t *testing.T, np *networkingv1.NetworkPolicy, rv string) *api.NetworkPolicy {
	t.Helper()
	p, err := netpol.Translate(np)
	if err != nil {
		t.Fatal(err)
	}
	p.SetDefaults()
	p.Metadata.ResourceVersion = rv
	return p
}

func TestComputePolicies(t *testing.T) {
	mine := api.NewNetworkPolicy("prod", "mine") // margay's own: never touched
	mine.Spec.Selector = "all()"
	cases := []struct {
		name     string
		k8s      []*networkingv1.NetworkPolicy
		have     []*api.NetworkPolicy
		put      []string // namespace/name@resourceVersion
		del      []string
		problems int
	}{{
		name: "a new policy is translated",
		k8s:  []*networkingv1.NetworkPolicy{knp("prod", "web", "10.0.0.0/8")},
		have: []*api.NetworkPolicy{mine},
		put:  []string{"prod/knp.default.web@"},
	}, {
		name: "an unchanged translation is left alone",
		k8s:  []*networkingv1.NetworkPolicy{knp("prod", "web", "10.0.0.0/8")},
		have: []*api.NetworkPolicy{stored(t, knp("prod", "web", "10.0.0.0/8"), "5"), mine},
	}, {
		name: "a changed policy rewrites its translation at the version read",
		k8s:  []*networkingv1.NetworkPolicy{knp("prod", "web", "10.1.0.0/16")},
		have: []*api.NetworkPolicy{stored(t, knp("prod", "web", "10.0.0.0/8"), "5")},
		put:  []string{"prod/knp.default.web@5"},
	}, {
		name: "a translation edited in etcd is put back",
		k8s:  []*networkingv1.NetworkPolicy{knp("prod", "web", "10.0.0.0/8")},
		have: func() []*api.NetworkPolicy {
			p := stored(t, knp("prod", "web", "10.0.0.0/8"), "6")
			p.Spec.Ingress = nil
			return []*api.NetworkPolicy{p}
		}(),
		put: []string{"prod/knp.default.web@6"},
	}, {
		name: "a deleted policy's translation goes; margay's own stay",
		have: []*api.NetworkPolicy{stored(t, knp("prod", "web", "10.0.0.0/8"), "5"), stored(t, knp("dev", "web", "10.0.0.0/8"), "8"), mine},
		del:  []string{"dev/knp.default.web@8", "prod/knp.default.web@5"},
	}, {
		name:     "an untranslatable policy is reported and its last translation kept",
		k8s:      []*networkingv1.NetworkPolicy{knp("prod", "web", "10.0.0.0/33"), knp("prod", "db", "10.0.0.0/8")},
		have:     []*api.NetworkPolicy{stored(t, knp("prod", "web", "10.0.0.0/8"), "5")},
		put:      []string{"prod/knp.default.db@"},
		problems: 1,
	}}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			out := Compute(Input{K8sPolicies: tc.k8s, Policies: tc.have})
			var put, del []string
			for _, p := range out.PutPolicies {
				if err := p.Validate(); err != nil {
					t.Error(err)
				}
				put = append(put, api.StorageName(&p.Metadata)+"@"+p.Metadata.ResourceVersion)
			}
			for _, d := range out.DeletePolicies {
				del = append(del, d.Name+"@"+d.ResourceVersion)
				if !strings.Contains(d.Reason, "no longer exists") {
					t.Errorf("reason %q", d.Reason)
				}
			}
			if !slices.Equal(put, tc.put) || !slices.Equal(del, tc.del) {
				t.Errorf("put %q, delete %q; want %q, %q", put, del, tc.put, tc.del)
			}
			if len(out.Problems) != tc.problems {
				t.Errorf("problems %q, want %d", out.Problems, tc.problems)
			}
			for _, p := range out.Problems {
				if !strings.Contains(p, "prod/web") || !strings.Contains(p, "10.0.0.0/33") {
					t.Errorf("problem %q does not name the policy and what is wrong", p)
				}
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
