package deploy

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"strings"
	"testing"

	"go.etcd.io/etcd/server/v3/embed"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/margay-dev/margay/agent"
	"github.com/margay-dev/margay/cni"
)

// manifest is deploy/kubernetes/margay.yaml, decoded.
type manifest struct {
	docs      map[string][]byte // by kind
	kinds     []string          // in order
	namespace *corev1.Namespace
	account   *corev1.ServiceAccount
	config    *corev1.ConfigMap
	secret    *corev1.Secret
	ds        *appsv1.DaemonSet
}

var (
	separator = regexp.MustCompile(`(?m)^---[ \t]*$`)
	content   = regexp.MustCompile(`(?m)^[^#\s]`) // a line that is not a comment
)

// documents splits a multi-document YAML file, leaving out documents that are
// only comments.
func documents(data []byte) [][]byte {
	var docs [][]byte
	for _, d := range separator.Split(string(data), -1) {
		if content.MatchString(d) {
			docs = append(docs, []byte(d))
		}
	}
	return docs
}

// decodeStrict decodes a manifest document into its Kubernetes type, refusing
// unknown and duplicate fields as the API server's strict field validation does.
func decodeStrict(doc []byte) (metav1.Object, error) {
	var tm metav1.TypeMeta
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return nil, err
	}
	var obj metav1.Object
	switch tm.APIVersion + " " + tm.Kind {
	case "v1 Namespace":
		obj = &corev1.Namespace{}
	case "v1 ServiceAccount":
		obj = &corev1.ServiceAccount{}
	case "v1 ConfigMap":
		obj = &corev1.ConfigMap{}
	case "v1 Secret":
		obj = &corev1.Secret{}
	case "apps/v1 DaemonSet":
		obj = &appsv1.DaemonSet{}
	default:
		return nil, fmt.Errorf("unexpected apiVersion %q kind %q", tm.APIVersion, tm.Kind)
	}
	return obj, yaml.UnmarshalStrict(doc, obj)
}

func loadManifest(t *testing.T) manifest {
	t.Helper()
	data, err := os.ReadFile("kubernetes/margay.yaml")
	if err != nil {
		t.Fatal(err)
	}
	m := manifest{docs: map[string][]byte{}}
	for i, doc := range documents(data) {
		obj, err := decodeStrict(doc)
		if err != nil {
			t.Fatalf("document %d: %v", i+1, err)
		}
		kind := reflect.TypeOf(obj).Elem().Name()
		if m.docs[kind] != nil {
			t.Fatalf("a second %s, %s", kind, obj.GetName())
		}
		m.docs[kind] = doc
		m.kinds = append(m.kinds, kind)
		switch o := obj.(type) {
		case *corev1.Namespace:
			m.namespace = o
		case *corev1.ServiceAccount:
			m.account = o
		case *corev1.ConfigMap:
			m.config = o
		case *corev1.Secret:
			m.secret = o
		case *appsv1.DaemonSet:
			m.ds = o
		}
	}
	return m
}

func TestManifestObjects(t *testing.T) {
	m := loadManifest(t)
	// The namespace first, so that kubectl apply creates it before what is in it;
	// no RBAC, since margay does not call the Kubernetes API.
	if want := []string{"Namespace", "ServiceAccount", "ConfigMap", "Secret", "DaemonSet"}; !slices.Equal(m.kinds, want) {
		t.Fatalf("kinds %v; want %v", m.kinds, want)
	}
	for _, o := range []struct {
		obj            metav1.Object
		kind, ns, name string
	}{
		{m.namespace, "Namespace", "", "margay-system"},
		{m.account, "ServiceAccount", "margay-system", "margay-node"},
		{m.config, "ConfigMap", "margay-system", "margay-config"},
		{m.secret, "Secret", "margay-system", "margay-etcd-tls"},
		{m.ds, "DaemonSet", "margay-system", "margay-node"},
	} {
		if reflect.ValueOf(o.obj).IsNil() {
			t.Errorf("no %s", o.kind)
			continue
		}
		if o.obj.GetName() != o.name || o.obj.GetNamespace() != o.ns {
			t.Errorf("%s %s/%s; want %s/%s", o.kind, o.obj.GetNamespace(), o.obj.GetName(), o.ns, o.name)
		}
	}
	if m.account.AutomountServiceAccountToken == nil || *m.account.AutomountServiceAccountToken {
		t.Error("the service account mounts a token that nothing uses")
	}
	for _, k := range []string{"etcd_endpoints", "default_ipv4_pool", "cni_network_config"} {
		if m.config.Data[k] == "" {
			t.Errorf("ConfigMap margay-config has no %s", k)
		}
	}
}

// A misspelt field fails to decode instead of being dropped.
func TestManifestStrict(t *testing.T) {
	doc := loadManifest(t).docs["DaemonSet"]
	for _, tc := range []struct{ from, to, want string }{
		{"hostNetwork: true", "hostNetwrok: true", `unknown field "hostNetwrok"`},
		{"periodSeconds: 10", "periodSecond: 10", `unknown field "periodSecond"`},
		{"priorityClassName: system-node-critical", "priorityClassName: system-node-critical\n      hostNetwork: false", `key "hostNetwork" already set`},
	} {
		bad := bytes.Replace(doc, []byte(tc.from), []byte(tc.to), 1)
		if bytes.Equal(bad, doc) {
			t.Fatalf("%q is not in the DaemonSet", tc.from)
		}
		if _, err := decodeStrict(bad); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: err = %v, want %s", tc.to, err, tc.want)
		}
	}
}

// flagValue is the value of --name in a command line, as --name=value or --name value.
func flagValue(args []string, name string) string {
	for i, a := range args {
		if v, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			return v
		}
		if a == "--"+name && i+1 < len(args) {
			return args[i+1]
		}
	}
	return ""
}

func envValue(c corev1.Container, name string) *corev1.EnvVar {
	for i := range c.Env {
		if c.Env[i].Name == name {
			return &c.Env[i]
		}
	}
	return nil
}

// mountOf returns the volume mounted in c at the directory holding file, and the
// mount.
func mountOf(spec corev1.PodSpec, c corev1.Container, file string) (*corev1.Volume, *corev1.VolumeMount) {
	for _, vm := range c.VolumeMounts {
		if file == vm.MountPath || strings.HasPrefix(file, vm.MountPath+"/") {
			for i := range spec.Volumes {
				if spec.Volumes[i].Name == vm.Name {
					return &spec.Volumes[i], &vm
				}
			}
		}
	}
	return nil, nil
}

// onHost checks that file, as c sees it, is on the host at the same path: what
// install-cni writes into the conflist and the agent writes for the plugin is
// read on the host.
func onHost(t *testing.T, spec corev1.PodSpec, c corev1.Container, file string) {
	t.Helper()
	v, vm := mountOf(spec, c, file)
	if v == nil || v.HostPath == nil || v.HostPath.Path != vm.MountPath || vm.ReadOnly {
		t.Errorf("%s: %s is not on a writable host path mounted at the same path", c.Name, file)
	}
}

func TestDaemonSet(t *testing.T) {
	m := loadManifest(t)
	ds, spec := m.ds, m.ds.Spec.Template.Spec
	if !reflect.DeepEqual(ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels) {
		t.Errorf("selector %v does not select the pods' labels %v", ds.Spec.Selector.MatchLabels, ds.Spec.Template.Labels)
	}
	if !spec.HostNetwork || spec.PriorityClassName != "system-node-critical" || spec.ServiceAccountName != m.account.Name ||
		spec.AutomountServiceAccountToken == nil || *spec.AutomountServiceAccountToken {
		t.Errorf("pod spec: hostNetwork %v, priority %q, service account %q, automount %v", spec.HostNetwork,
			spec.PriorityClassName, spec.ServiceAccountName, spec.AutomountServiceAccountToken)
	}
	if u := ds.Spec.UpdateStrategy; u.Type != appsv1.RollingUpdateDaemonSetStrategyType || u.RollingUpdate == nil ||
		u.RollingUpdate.MaxUnavailable == nil || u.RollingUpdate.MaxUnavailable.IntValue() != 1 {
		t.Errorf("update strategy %+v; want RollingUpdate with maxUnavailable 1", u)
	}
	if g := spec.TerminationGracePeriodSeconds; g == nil || *g <= 0 || *g > 30 {
		t.Errorf("terminationGracePeriodSeconds %v", g)
	}
	for _, effect := range []corev1.TaintEffect{corev1.TaintEffectNoSchedule, corev1.TaintEffectNoExecute} {
		if !slices.ContainsFunc(spec.Tolerations, func(tl corev1.Toleration) bool {
			return tl.Key == "" && tl.Operator == corev1.TolerationOpExists && tl.Effect == effect
		}) {
			t.Errorf("no toleration of every %s taint: it would not run on every node", effect)
		}
	}
	if len(spec.InitContainers) != 1 || len(spec.Containers) != 1 {
		t.Fatalf("%d init containers and %d containers; want one of each", len(spec.InitContainers), len(spec.Containers))
	}
	install, node := spec.InitContainers[0], spec.Containers[0]
	if install.Image != node.Image {
		t.Errorf("images %q and %q differ", install.Image, node.Image)
	}

	// The init container: margay-node install-cni with the ConfigMap's template,
	// writing to the host's CNI directories.
	if len(install.Command) < 2 || install.Command[0] != "margay-node" || install.Command[1] != "install-cni" {
		t.Fatalf("init container command %q; want margay-node install-cni", install.Command)
	}
	tmpl := flagValue(install.Command, "conf-template")
	if v, vm := mountOf(spec, install, tmpl); v == nil || v.ConfigMap == nil || v.ConfigMap.Name != m.config.Name ||
		!slices.Contains(v.ConfigMap.Items, corev1.KeyToPath{Key: "cni_network_config", Path: strings.TrimPrefix(tmpl, vm.MountPath+"/")}) {
		t.Errorf("--conf-template %q is not margay-config's cni_network_config", tmpl)
	}
	onHost(t, spec, install, "/opt/cni/bin")
	onHost(t, spec, install, "/etc/cni/net.d")
	onHost(t, spec, install, flagValue(install.Command, "tls-dir"))
	if install.SecurityContext != nil && install.SecurityContext.Privileged != nil && *install.SecurityContext.Privileged {
		t.Error("install-cni only writes files: it needs no privilege")
	}

	// The agent.
	if len(node.Command) != 1 || node.Command[0] != "margay-node" || len(node.Args) != 0 {
		t.Errorf("agent command %q %q", node.Command, node.Args)
	}
	if sc := node.SecurityContext; sc == nil || sc.Privileged == nil || !*sc.Privileged {
		t.Error("the agent is not privileged: it writes /proc/sys/net")
	}
	onHost(t, spec, node, cni.DefaultMTUFile)
	onHost(t, spec, node, "/var/log/margay")
	onHost(t, spec, node, "/run/xtables.lock")
	if v, vm := mountOf(spec, node, "/lib/modules"); v == nil || v.HostPath == nil || v.HostPath.Path != "/lib/modules" || !vm.ReadOnly {
		t.Error("/lib/modules is not the host's, read-only")
	}
	for _, c := range []corev1.Container{install, node} {
		if e := envValue(c, "MARGAY_NODENAME"); e == nil || e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
			t.Errorf("%s: MARGAY_NODENAME is not the pod's spec.nodeName", c.Name)
		}
		for _, e := range c.Env {
			if r := e.ValueFrom; r != nil && r.ConfigMapKeyRef != nil && (r.ConfigMapKeyRef.Name != m.config.Name || m.config.Data[r.ConfigMapKeyRef.Key] == "") {
				t.Errorf("%s: %s refers to %s %s, not in margay-config", c.Name, e.Name, r.ConfigMapKeyRef.Name, r.ConfigMapKeyRef.Key)
			}
		}
		for _, name := range []string{"MARGAY_ETCD_CA_CERT_FILE", "MARGAY_ETCD_CERT_FILE", "MARGAY_ETCD_KEY_FILE"} {
			e := envValue(c, name)
			if e == nil {
				t.Errorf("%s: no %s", c.Name, name)
				continue
			}
			v, vm := mountOf(spec, c, e.Value)
			if v == nil || v.Secret == nil || v.Secret.SecretName != m.secret.Name || m.secret.Data[strings.TrimPrefix(e.Value, vm.MountPath+"/")] == nil {
				t.Errorf("%s: %s=%s is not a key of the mounted %s", c.Name, name, e.Value, m.secret.Name)
			}
		}
		if e := envValue(c, "MARGAY_ETCD_ENDPOINTS"); e == nil || e.ValueFrom == nil || e.ValueFrom.ConfigMapKeyRef == nil || e.ValueFrom.ConfigMapKeyRef.Key != "etcd_endpoints" {
			t.Errorf("%s: MARGAY_ETCD_ENDPOINTS is not margay-config's etcd_endpoints", c.Name)
		}
	}
	if e := envValue(node, "MARGAY_DEFAULT_IPV4_POOL"); e == nil || e.ValueFrom == nil || e.ValueFrom.ConfigMapKeyRef == nil || e.ValueFrom.ConfigMapKeyRef.Key != "default_ipv4_pool" {
		t.Error("MARGAY_DEFAULT_IPV4_POOL is not margay-config's default_ipv4_pool")
	}

	// Probes and ports. Health listens on loopback only, and with hostNetwork
	// kubelet probes it there.
	health := agent.DefaultHealthAddr
	if e := envValue(node, "MARGAY_HEALTH_LISTEN"); e != nil {
		health = e.Value
	}
	if health != "127.0.0.1:9099" {
		t.Errorf("health listens on %q; want 127.0.0.1:9099, where the probes look", health)
	}
	if slices.ContainsFunc(node.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == 9099 }) {
		t.Errorf("ports %+v list 9099, which listens on loopback only", node.Ports)
	}
	for _, p := range []struct {
		probe *corev1.Probe
		path  string
	}{{node.LivenessProbe, "/livez"}, {node.ReadinessProbe, "/readyz"}} {
		if p.probe == nil || p.probe.HTTPGet == nil || p.probe.HTTPGet.Path != p.path || p.probe.HTTPGet.Port.IntValue() != 9099 || p.probe.HTTPGet.Host != "127.0.0.1" {
			t.Errorf("probe %+v; want GET %s on 127.0.0.1:9099", p.probe, p.path)
		}
	}
	metrics := agent.DefaultMetricsAddr
	if e := envValue(node, "MARGAY_METRICS_LISTEN"); e != nil {
		metrics = e.Value
	}
	if !slices.Contains(node.Ports, corev1.ContainerPort{Name: "metrics", ContainerPort: 9091, Protocol: corev1.ProtocolTCP}) || !strings.HasSuffix(metrics, ":9091") {
		t.Errorf("ports %+v, metrics on %q; want 9091 named metrics", node.Ports, metrics)
	}
	want := corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("100m"), corev1.ResourceMemory: resource.MustParse("64Mi")}
	for name, q := range want {
		if got := node.Resources.Requests[name]; got.Cmp(q) != 0 {
			t.Errorf("request %s %s; want %s", name, got.String(), q.String())
		}
	}
}

// envRead is the MARGAY_* variables the Go files matching pattern read with
// env("..."): taken from the source, so a renamed variable fails the tests that
// compare the deployment's with them.
func envRead(t *testing.T, pattern string) map[string]bool {
	t.Helper()
	files, _ := filepath.Glob(pattern)
	names := map[string]bool{}
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		src, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range regexp.MustCompile(`\benv\("(MARGAY_[A-Z0-9_]+)"`).FindAllSubmatch(src, -1) {
			names[string(m[1])] = true
		}
	}
	if len(names) == 0 {
		t.Fatalf("no env(\"MARGAY_...\") in %s", pattern)
	}
	return names
}

// envFile is the settings of margay-node.env, set or shown commented with the default.
func envFile(t *testing.T) map[string]string {
	t.Helper()
	data, err := os.ReadFile("systemd/margay-node.env")
	if err != nil {
		t.Fatal(err)
	}
	settings := map[string]string{}
	for _, m := range regexp.MustCompile(`(?m)^#?([A-Z][A-Z0-9_]*)=(.*)$`).FindAllStringSubmatch(string(data), -1) {
		settings[m[1]] = m[2]
	}
	return settings
}

// Every MARGAY_* variable the deployment sets is one the binaries read, so a
// renamed variable fails here instead of being ignored on a node.
func TestEnvNames(t *testing.T) {
	agentEnv, installEnv := envRead(t, "../cmd/margay-node/main.go"), envRead(t, "../cmd/margay-node/installcni.go")
	spec := loadManifest(t).ds.Spec.Template.Spec
	for _, c := range []struct {
		container corev1.Container
		reads     map[string]bool
	}{{spec.InitContainers[0], installEnv}, {spec.Containers[0], agentEnv}} {
		for _, e := range c.container.Env {
			if !c.reads[e.Name] {
				t.Errorf("container %s sets %s, which it does not read", c.container.Name, e.Name)
			}
		}
	}
	settings := envFile(t)
	for name := range settings {
		if !agentEnv[name] && !installEnv[name] {
			t.Errorf("margay-node.env sets %s, which margay-node does not read", name)
		}
	}
	for name := range agentEnv {
		if _, ok := settings[name]; !ok {
			t.Errorf("margay-node.env does not document %s", name)
		}
	}
	for name := range installEnv {
		if _, ok := settings[name]; !ok {
			t.Errorf("margay-node.env does not document install-cni's %s", name)
		}
	}
}

// The ConfigMap's template, filled in as the init container's install-cni fills
// it, is a configuration the plugin accepts, and the same as the one install-cni
// generates without a template.
func TestConfListTemplate(t *testing.T) {
	m := loadManifest(t)
	install := m.ds.Spec.Template.Spec.InitContainers[0]
	value := func(name string) string {
		e := envValue(install, name)
		if e == nil {
			t.Fatalf("install-cni has no %s", name)
		}
		return e.Value
	}
	tmpl := []byte(m.config.Data["cni_network_config"])
	// The values install-cni takes from its environment and flag defaults.
	o := cni.InstallOptions{Template: tmpl, TLSDir: flagValue(install.Command, "tls-dir"), Conf: cni.NetConf{
		EtcdEndpoints:  m.config.Data["etcd_endpoints"],
		EtcdCACertFile: value("MARGAY_ETCD_CA_CERT_FILE"),
		EtcdCertFile:   value("MARGAY_ETCD_CERT_FILE"),
		EtcdKeyFile:    value("MARGAY_ETCD_KEY_FILE"),
		Nodename:       "node-a", LogLevel: "info", LogFilePath: "/var/log/margay/cni.log",
	}}
	list, err := o.Render()
	if err != nil {
		t.Fatalf("the template does not render to a configuration the plugin accepts: %v", err)
	}
	var l struct {
		Plugins []cni.NetConf `json:"plugins"`
	}
	if err := json.Unmarshal(list, &l); err != nil || l.Plugins[0].EtcdKeyFile != filepath.Join(o.TLSDir, "etcd-key") || l.Plugins[0].MTU != 0 {
		t.Errorf("rendered %s (%v); want the TLS copies' paths and MTU 0", list, err)
	}

	// With every value set (nothing left out by omitempty), the template and the
	// generated list are the same JSON.
	c := o.Conf
	c.MTU, c.MTUFile = 1440, "/var/lib/margay/mtu"
	rendered, err := cni.RenderTemplate(tmpl, c)
	if err != nil {
		t.Fatal(err)
	}
	generated, err := cni.ConfList(c)
	if err != nil {
		t.Fatal(err)
	}
	var a, b map[string]any
	if err := json.Unmarshal(rendered, &a); err != nil {
		t.Fatal(err)
	}
	json.Unmarshal(generated, &b)
	// ConfList carries the "dns": {} that types.PluginConf cannot omit; it means nothing.
	if p := b["plugins"].([]any)[0].(map[string]any); reflect.DeepEqual(p["dns"], map[string]any{}) {
		delete(p, "dns")
	}
	if !reflect.DeepEqual(a, b) {
		t.Errorf("the template gives\n%s\nbut install-cni generates\n%s", rendered, generated)
	}
}

// etcdMember is one of deploy/etcd's member configurations.
type etcdMember struct {
	file string
	cfg  *embed.Config
}

func etcdMembers(t *testing.T) []etcdMember {
	t.Helper()
	files, _ := filepath.Glob("etcd/etcd-*.yaml")
	if len(files) != 3 {
		t.Fatalf("member configurations %v; want three", files)
	}
	var members []etcdMember
	for _, f := range files {
		cfg, err := embed.ConfigFromFile(f)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		members = append(members, etcdMember{f, cfg})
	}
	return members
}

// jsonKeys is the JSON names of a struct's fields, including embedded structs'.
func jsonKeys(typ reflect.Type, keys map[string]bool) {
	for f := range typ.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case f.Anonymous && name == "" && f.Type.Kind() == reflect.Struct:
			jsonKeys(f.Type, keys)
		case name != "" && name != "-":
			keys[name] = true
		}
	}
}

func TestEtcdConfigs(t *testing.T) {
	// etcd's loader ignores unknown keys: check them against its schema, which
	// is embed.Config plus the URL and TLS keys that it translates.
	known := map[string]bool{"listen-peer-urls": true, "listen-client-urls": true, "listen-client-http-urls": true, "initial-advertise-peer-urls": true,
		"advertise-client-urls": true, "client-transport-security": true, "peer-transport-security": true}
	jsonKeys(reflect.TypeFor[embed.Config](), known)
	knownTLS := map[string]bool{"cert-file": true, "key-file": true, "trusted-ca-file": true, "client-cert-auth": true}
	members := etcdMembers(t)
	var endpoints []string
	for _, m := range members {
		data, _ := os.ReadFile(m.file)
		var raw map[string]any
		if err := yaml.Unmarshal(data, &raw); err != nil {
			t.Fatal(err)
		}
		for k, v := range raw {
			if !known[k] {
				t.Errorf("%s: etcd has no setting %q", m.file, k)
			}
			if sec, ok := v.(map[string]any); ok {
				for k2 := range sec {
					if !knownTLS[k2] {
						t.Errorf("%s: %s.%s is not a setting used here", m.file, k, k2)
					}
				}
			}
		}

		c, name := m.cfg, strings.TrimSuffix(filepath.Base(m.file), ".yaml")
		if c.Name != name {
			t.Errorf("%s: name %q; want %q", m.file, c.Name, name)
		}
		if c.InitialCluster != members[0].cfg.InitialCluster || c.InitialClusterToken != members[0].cfg.InitialClusterToken || c.ClusterState != "new" {
			t.Errorf("%s: initial-cluster %q, token %q, state %q; want the same as %s's, and new", m.file, c.InitialCluster, c.InitialClusterToken, c.ClusterState, members[0].file)
		}
		if len(c.AdvertisePeerUrls) != 1 || len(c.AdvertiseClientUrls) != 1 {
			t.Fatalf("%s: advertises %v and %v; want one URL each", m.file, c.AdvertisePeerUrls, c.AdvertiseClientUrls)
		}
		peer, client := c.AdvertisePeerUrls[0], c.AdvertiseClientUrls[0]
		if !slices.Contains(strings.Split(c.InitialCluster, ","), name+"="+peer.String()) {
			t.Errorf("%s: initial-cluster %q does not have %s=%s", m.file, c.InitialCluster, name, peer.String())
		}
		if peer.Scheme != "https" || peer.Port() != "2380" || client.Scheme != "https" || client.Port() != "2379" || peer.Hostname() != client.Hostname() {
			t.Errorf("%s: peer URL %s, client URL %s; want https on 2380 and 2379 of one address", m.file, peer.String(), client.String())
		}
		if !slices.ContainsFunc(c.ListenPeerUrls, func(u url.URL) bool { return u.Host == peer.Host }) ||
			!slices.ContainsFunc(c.ListenClientUrls, func(u url.URL) bool { return u.Host == client.Host }) {
			t.Errorf("%s: does not listen where it advertises", m.file)
		}
		for _, ti := range []struct {
			what string
			info interface{ Empty() bool }
			auth bool
		}{{"client", c.ClientTLSInfo, c.ClientTLSInfo.ClientCertAuth}, {"peer", c.PeerTLSInfo, c.PeerTLSInfo.ClientCertAuth}} {
			if ti.info.Empty() || !ti.auth {
				t.Errorf("%s: %s TLS %+v; want certificates and client-cert-auth", m.file, ti.what, ti.info)
			}
		}
		endpoints = append(endpoints, client.String())
	}
	if len(strings.Split(members[0].cfg.InitialCluster, ",")) != len(members) {
		t.Errorf("initial-cluster %q does not list exactly the %d members", members[0].cfg.InitialCluster, len(members))
	}
	// margay is pointed at this cluster.
	want := strings.Join(endpoints, ",")
	if got := loadManifest(t).config.Data["etcd_endpoints"]; got != want {
		t.Errorf("margay-config's etcd_endpoints %q; the members serve %q", got, want)
	}
	if got := envFile(t)["MARGAY_ETCD_ENDPOINTS"]; got != want {
		t.Errorf("margay-node.env's MARGAY_ETCD_ENDPOINTS %q; the members serve %q", got, want)
	}
}

// gen-certs.sh makes what the member configurations and margay's settings name,
// and the certificates verify for the members' addresses.
func TestGenCerts(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("no openssl")
	}
	out := filepath.Join(t.TempDir(), "pki")
	if b, err := exec.Command("bash", "etcd/gen-certs.sh", out).CombinedOutput(); err != nil {
		t.Fatalf("gen-certs.sh: %v\n%s", err, b)
	}
	roots := x509.NewCertPool()
	ca, err := os.ReadFile(filepath.Join(out, "ca.crt"))
	if err != nil || !roots.AppendCertsFromPEM(ca) {
		t.Fatalf("ca.crt: %v", err)
	}
	// check loads a certificate and key pair and verifies it for usage and host.
	check := func(dir, certFile, keyFile string, usage x509.ExtKeyUsage, host string) {
		t.Helper()
		pair, err := tls.LoadX509KeyPair(filepath.Join(dir, certFile), filepath.Join(dir, keyFile))
		if err != nil {
			t.Errorf("%s: %v", dir, err)
			return
		}
		cert, _ := x509.ParseCertificate(pair.Certificate[0])
		if _, err := cert.Verify(x509.VerifyOptions{Roots: roots, DNSName: host, KeyUsages: []x509.ExtKeyUsage{usage}}); err != nil {
			t.Errorf("%s/%s for %s: %v", dir, certFile, host, err)
		}
	}
	for _, m := range etcdMembers(t) {
		dir := filepath.Join(out, m.cfg.Name)
		ip := m.cfg.AdvertiseClientUrls[0].Hostname()
		ct, pt := m.cfg.ClientTLSInfo, m.cfg.PeerTLSInfo
		for _, f := range []string{ct.TrustedCAFile, pt.TrustedCAFile} {
			if b, err := os.ReadFile(filepath.Join(dir, path.Base(f))); err != nil || !bytes.Equal(b, ca) {
				t.Errorf("%s: %s is not the CA (%v)", m.file, f, err)
			}
		}
		for _, host := range []string{ip, "127.0.0.1"} {
			check(dir, path.Base(ct.CertFile), path.Base(ct.KeyFile), x509.ExtKeyUsageServerAuth, host)
		}
		for _, usage := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
			check(dir, path.Base(pt.CertFile), path.Base(pt.KeyFile), usage, m.cfg.AdvertisePeerUrls[0].Hostname())
		}
	}
	// margay's client certificate, under the names the systemd settings use.
	env := envFile(t)
	check(out, path.Base(env["MARGAY_ETCD_CERT_FILE"]), path.Base(env["MARGAY_ETCD_KEY_FILE"]), x509.ExtKeyUsageClientAuth, "")
	if b, err := os.ReadFile(filepath.Join(out, path.Base(env["MARGAY_ETCD_CA_CERT_FILE"]))); err != nil || !bytes.Equal(b, ca) {
		t.Errorf("MARGAY_ETCD_CA_CERT_FILE %s is not the CA (%v)", env["MARGAY_ETCD_CA_CERT_FILE"], err)
	}
}

// instruction is one Dockerfile instruction, continuation lines joined.
type instruction struct{ op, args string }

func dockerfile(t *testing.T) (stages [][]instruction) {
	t.Helper()
	data, err := os.ReadFile("../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	var line string
	for l := range strings.Lines(string(data)) {
		l = strings.TrimSpace(l)
		if line == "" && (l == "" || strings.HasPrefix(l, "#")) {
			continue
		}
		if rest, ok := strings.CutSuffix(l, "\\"); ok {
			line += rest + " "
			continue
		}
		op, args, _ := strings.Cut(line+l, " ")
		line = ""
		if op = strings.ToUpper(op); op == "FROM" {
			stages = append(stages, nil)
		}
		if len(stages) == 0 {
			t.Fatalf("%s before FROM", op)
		}
		stages[len(stages)-1] = append(stages[len(stages)-1], instruction{op, strings.Join(strings.Fields(args), " ")})
	}
	return stages
}

// dockerIgnored says whether .dockerignore leaves path (slash-separated, relative
// to the repository) out of the build context. It handles the pattern forms that
// file uses: a path, and **/ followed by a name.
func dockerIgnored(patterns []string, p string) bool {
	elems := strings.Split(p, "/")
	for _, pat := range patterns {
		for i := range elems {
			if name, ok := strings.CutPrefix(pat, "**/"); ok {
				if m, _ := path.Match(name, elems[i]); m {
					return true
				}
			} else if m, _ := path.Match(pat, strings.Join(elems[:i+1], "/")); m {
				return true
			}
		}
	}
	return false
}

// The image cannot be built here (no docker), so check what can be: every COPY
// source is in the build context, every command is built with the Makefile's
// version flag, and the entrypoint and the plugins install-cni copies are in the
// final image.
func TestDockerfile(t *testing.T) {
	stages := dockerfile(t)
	if len(stages) != 2 {
		t.Fatalf("%d stages; want a builder and the final image", len(stages))
	}
	ignore, err := os.ReadFile("../.dockerignore")
	if err != nil {
		t.Fatal(err)
	}
	var patterns []string
	for l := range strings.Lines(string(ignore)) {
		if l = strings.TrimSpace(l); l != "" && !strings.HasPrefix(l, "#") {
			patterns = append(patterns, strings.TrimSuffix(l, "/"))
		}
	}

	// The builder runs the go.mod's Go, and gets every file the build needs.
	gomod, _ := os.ReadFile("../go.mod")
	goVersion := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindSubmatch(gomod)
	if goVersion == nil || stages[0][0].args != "golang:"+string(goVersion[1])+"-bookworm AS build" {
		t.Errorf("builder %q; want golang:%s-bookworm AS build, go.mod's Go", stages[0][0].args, goVersion[1])
	}
	var build string
	for _, in := range stages[0] {
		switch {
		case in.op == "COPY":
			srcs := strings.Fields(in.args)
			for _, src := range srcs[:len(srcs)-1] {
				if _, err := os.Stat(filepath.Join("..", src)); err != nil || src != "." && dockerIgnored(patterns, src) {
					t.Errorf("COPY %s: not in the build context (%v)", src, err)
				}
			}
		case in.op == "RUN" && strings.Contains(in.args, "go build"):
			build = in.args
		}
	}
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if .Module}}{{if .Module.Main}}{{.Dir}} {{join .GoFiles \" \"}}{{end}}{{end}}", "../cmd/...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	root, _ := filepath.Abs("..")
	for l := range strings.Lines(string(out)) {
		f := strings.Fields(l)
		dir, _ := filepath.Rel(root, f[0])
		for _, file := range f[1:] {
			if p := filepath.ToSlash(filepath.Join(dir, file)); dockerIgnored(patterns, p) {
				t.Errorf(".dockerignore leaves out %s, which the build needs", p)
			}
		}
	}
	for _, f := range []string{"go.mod", "go.sum"} {
		if dockerIgnored(patterns, f) {
			t.Errorf(".dockerignore leaves out %s", f)
		}
	}
	makefile, _ := os.ReadFile("../Makefile")
	ldflags := regexp.MustCompile(`(?m)^LDFLAGS\s*:?=\s*(.*)$`).FindSubmatch(makefile)
	if ldflags == nil {
		t.Fatal("no LDFLAGS in the Makefile")
	}
	want := strings.ReplaceAll(string(ldflags[1]), "$(VERSION)", "${VERSION}")
	if !strings.Contains(build, "CGO_ENABLED=0") || !strings.Contains(build, `-ldflags "`+want+`"`) || !strings.Contains(build, "-o /out/ ./cmd/...") {
		t.Errorf("build %q; want CGO_ENABLED=0, -ldflags %q and -o /out/ ./cmd/...", build, want)
	}

	// The final image: the tools the agent runs, every command in /usr/local/bin,
	// margay-node as the entrypoint.
	final := stages[1]
	if final[0].args != "debian:bookworm-slim" {
		t.Errorf("final image from %q", final[0].args)
	}
	var installed, copied, entrypoint bool
	for _, in := range final {
		switch {
		case in.op == "RUN" && strings.Contains(in.args, "apt-get install"):
			pkgs := strings.Fields(in.args)
			installed = !slices.ContainsFunc([]string{"iptables", "ipset", "iproute2", "ca-certificates"}, func(p string) bool { return !slices.Contains(pkgs, p) })
		case in.op == "COPY":
			copied = copied || in.args == "--from=build /out/ /usr/local/bin/"
		case in.op == "ENTRYPOINT":
			entrypoint = in.args == `["/usr/local/bin/margay-node"]`
		}
	}
	if !installed || !copied || !entrypoint {
		t.Errorf("final stage %+v: packages installed %v, binaries copied to /usr/local/bin %v, entrypoint margay-node %v", final, installed, copied, entrypoint)
	}
	// ./cmd/... builds one binary per main package, named after its directory.
	mains, err := exec.Command("go", "list", "-f", `{{if eq .Name "main"}}{{.Dir}}{{end}}`, "../cmd/...").Output()
	if err != nil {
		t.Fatal(err)
	}
	var binaries []string
	for _, d := range strings.Fields(string(mains)) {
		binaries = append(binaries, filepath.Base(d))
	}
	for _, b := range []string{"margay-node", "margay", "margay-ipam", "margayctl"} {
		if !slices.Contains(binaries, b) {
			t.Errorf("the image has no %s (it has %v)", b, binaries)
		}
	}
}
