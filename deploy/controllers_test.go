package deploy

import (
	"fmt"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// controllersManifest is deploy/kubernetes/margay-kube-controllers.yaml,
// decoded strictly.
type controllersManifest struct {
	account     *corev1.ServiceAccount
	clusterRole *rbacv1.ClusterRole
	crb         *rbacv1.ClusterRoleBinding
	role        *rbacv1.Role
	rb          *rbacv1.RoleBinding
	deploy      *appsv1.Deployment
}

func loadControllers(t *testing.T) controllersManifest {
	t.Helper()
	data, err := os.ReadFile("kubernetes/margay-kube-controllers.yaml")
	if err != nil {
		t.Fatal(err)
	}
	var m controllersManifest
	for i, doc := range documents(data) {
		var tm metav1.TypeMeta
		if err := yaml.Unmarshal(doc, &tm); err != nil {
			t.Fatal(err)
		}
		var obj any
		switch tm.APIVersion + " " + tm.Kind {
		case "v1 ServiceAccount":
			m.account = &corev1.ServiceAccount{}
			obj = m.account
		case "rbac.authorization.k8s.io/v1 ClusterRole":
			m.clusterRole = &rbacv1.ClusterRole{}
			obj = m.clusterRole
		case "rbac.authorization.k8s.io/v1 ClusterRoleBinding":
			m.crb = &rbacv1.ClusterRoleBinding{}
			obj = m.crb
		case "rbac.authorization.k8s.io/v1 Role":
			m.role = &rbacv1.Role{}
			obj = m.role
		case "rbac.authorization.k8s.io/v1 RoleBinding":
			m.rb = &rbacv1.RoleBinding{}
			obj = m.rb
		case "apps/v1 Deployment":
			m.deploy = &appsv1.Deployment{}
			obj = m.deploy
		default:
			t.Fatalf("document %d: unexpected %s %s", i+1, tm.APIVersion, tm.Kind)
		}
		if err := yaml.UnmarshalStrict(doc, obj); err != nil {
			t.Fatalf("document %d (%s): %v", i+1, tm.Kind, err)
		}
	}
	if m.account == nil || m.clusterRole == nil || m.crb == nil || m.role == nil || m.rb == nil || m.deploy == nil {
		t.Fatalf("want a ServiceAccount, ClusterRole, ClusterRoleBinding, Role, RoleBinding and Deployment: %+v", m)
	}
	return m
}

// The controller's rights are what its code uses: list and watch on pods,
// namespaces and nodes (its informers), and get, create, update on leases in
// its own namespace (client-go's lease lock). Nothing writes to the API.
// (kube's TestController* run it with exactly these rules, which proves them
// enough.)
func TestControllersRBAC(t *testing.T) {
	m := loadControllers(t)
	type rule struct{ group, resource, verb string }
	flat := func(rules []rbacv1.PolicyRule) []rule {
		var out []rule
		for _, r := range rules {
			if len(r.ResourceNames) > 0 || len(r.NonResourceURLs) > 0 {
				t.Errorf("rule %+v: want no resourceNames or nonResourceURLs", r)
			}
			for _, g := range r.APIGroups {
				for _, res := range r.Resources {
					for _, v := range r.Verbs {
						out = append(out, rule{g, res, v})
					}
				}
			}
		}
		slices.SortFunc(out, func(a, b rule) int { return strings.Compare(a.group+a.resource+a.verb, b.group+b.resource+b.verb) })
		return out
	}
	wantCluster := []rule{{"", "namespaces", "list"}, {"", "namespaces", "watch"}, {"networking.k8s.io", "networkpolicies", "list"}, {"networking.k8s.io", "networkpolicies", "watch"},
		{"", "nodes", "list"}, {"", "nodes", "watch"}, {"", "pods", "list"}, {"", "pods", "watch"}}
	if got := flat(m.clusterRole.Rules); !slices.Equal(got, wantCluster) {
		t.Errorf("ClusterRole rules %v\nwant %v", got, wantCluster)
	}
	wantRole := []rule{{"coordination.k8s.io", "leases", "create"}, {"coordination.k8s.io", "leases", "get"}, {"coordination.k8s.io", "leases", "update"}}
	if got := flat(m.role.Rules); !slices.Equal(got, wantRole) {
		t.Errorf("Role rules %v\nwant %v", got, wantRole)
	}
	ns := m.account.Namespace
	spec := m.deploy.Spec.Template.Spec
	for _, b := range []struct {
		what     string
		subjects []rbacv1.Subject
		ref      rbacv1.RoleRef
		kind     string
		name     string
	}{{"ClusterRoleBinding", m.crb.Subjects, m.crb.RoleRef, "ClusterRole", m.clusterRole.Name},
		{"RoleBinding", m.rb.Subjects, m.rb.RoleRef, "Role", m.role.Name}} {
		if len(b.subjects) != 1 || b.subjects[0].Kind != "ServiceAccount" || b.subjects[0].Name != m.account.Name || b.subjects[0].Namespace != ns {
			t.Errorf("%s subjects %+v: want the service account %s/%s", b.what, b.subjects, ns, m.account.Name)
		}
		if b.ref.Kind != b.kind || b.ref.Name != b.name {
			t.Errorf("%s roleRef %+v: want %s %s", b.what, b.ref, b.kind, b.name)
		}
	}
	if m.role.Namespace != ns || m.rb.Namespace != ns || m.deploy.Namespace != ns || spec.ServiceAccountName != m.account.Name {
		t.Errorf("the Role, RoleBinding and Deployment must be in %s and run as %s", ns, m.account.Name)
	}
}

// The Deployment sets only variables the command reads, probes the health
// address it sets, and exposes the metrics port it sets.
func TestControllersDeployment(t *testing.T) {
	m := loadControllers(t)
	spec := m.deploy.Spec.Template.Spec
	if len(spec.Containers) != 1 {
		t.Fatalf("want one container, got %d", len(spec.Containers))
	}
	c := spec.Containers[0]
	if len(c.Command) != 1 || c.Command[0] != "/usr/local/bin/margay-kube-controllers" {
		t.Errorf("command %v: want the image's margay-kube-controllers", c.Command)
	}
	reads := envRead(t, "../cmd/margay-kube-controllers/main.go")
	src, err := os.ReadFile("../cmd/margay-kube-controllers/main.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range regexp.MustCompile(`\benv\("([A-Z][A-Z0-9_]+)"`).FindAllSubmatch(src, -1) {
		reads[string(m[1])] = true
	}
	vals := map[string]string{}
	for _, e := range c.Env {
		if !reads[e.Name] {
			t.Errorf("the Deployment sets %s, which margay-kube-controllers does not read", e.Name)
		}
		vals[e.Name] = e.Value
	}
	for _, name := range []string{"POD_NAME", "POD_NAMESPACE"} {
		if e := envValue(c, name); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil {
			t.Errorf("%s must come from the downward API: the lease's identity and namespace", name)
		}
	}
	if m.deploy.Spec.Replicas == nil || *m.deploy.Spec.Replicas < 2 {
		t.Errorf("replicas %v: want at least 2, with leader election", m.deploy.Spec.Replicas)
	}
	health := vals["MARGAY_HEALTH_LISTEN"]
	for _, p := range []*corev1.Probe{c.LivenessProbe, c.ReadinessProbe} {
		if p == nil || p.HTTPGet == nil {
			t.Fatalf("want HTTP liveness and readiness probes")
		}
		if got := p.HTTPGet.Host + ":" + p.HTTPGet.Port.String(); got != health {
			t.Errorf("probe %s at %s; health listens on %s", p.HTTPGet.Path, got, health)
		}
	}
	if len(c.Ports) != 1 || fmt.Sprintf(":%d", c.Ports[0].ContainerPort) != vals["MARGAY_METRICS_LISTEN"] {
		t.Errorf("ports %+v: want the metrics port of %s", c.Ports, vals["MARGAY_METRICS_LISTEN"])
	}
	sc := c.SecurityContext
	if sc == nil || sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot || sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Errorf("security context %+v: want non-root without privilege escalation", sc)
	}
	onHost := false
	for _, v := range spec.Volumes {
		onHost = onHost || v.HostPath != nil
	}
	if onHost {
		t.Errorf("the controller mounts a host path; it needs none")
	}
}
