package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/margay-dev/margay/cni"
)

// installCNI runs margay-node install-cni with args and returns its exit code,
// its output and its error.
func installCNI(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	root := rootCmd()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetArgs(append([]string{"install-cni"}, args...))
	if err := root.Execute(); err != nil {
		return exitCode(err), out.String(), err.Error()
	}
	return 0, out.String(), ""
}

func TestInstallCNI(t *testing.T) {
	src, dir := t.TempDir(), t.TempDir()
	for _, p := range []string{"margay", "margay-ipam"} {
		os.WriteFile(filepath.Join(src, p), []byte(p), 0o755)
	}
	conf := filepath.Join(dir, "net.d")
	tmpl := filepath.Join(dir, "10-margay.conflist.template")
	os.WriteFile(tmpl, []byte(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [{"type": "margay",
	  "etcd_endpoints": "__ETCD_ENDPOINTS__", "nodename": "__NODENAME__", "mtu": __MTU__, "ipam": {"type": "margay-ipam"}}]}`), 0o644)
	dirs := []string{"--src-dir", src, "--bin-dir", filepath.Join(dir, "bin"), "--conf-dir", conf}
	t.Setenv("MARGAY_ETCD_ENDPOINTS", "https://10.0.0.11:2379")
	t.Setenv("MARGAY_NODENAME", "node-a")
	t.Setenv("MARGAY_CNI_CONF_TEMPLATE", tmpl)

	code, out, errs := installCNI(t, append(dirs, "--mtu", "1400")...)
	if code != 0 || strings.Count(out, "installed") != 3 {
		t.Fatalf("install: exit %d, %q, %s; want 2 plugins and the conflist installed", code, out, errs)
	}
	data, _ := os.ReadFile(filepath.Join(conf, "10-margay.conflist"))
	if err := cni.CheckConfList(data); err != nil || !strings.Contains(string(data), `"nodename": "node-a", "mtu": 1400`) ||
		!strings.Contains(string(data), `"https://10.0.0.11:2379"`) {
		t.Errorf("conflist from the template (%v):\n%s", err, data)
	}
	if code, out, _ := installCNI(t, dirs...); code != 0 || out != "margay CNI: installed "+filepath.Join(conf, "10-margay.conflist")+"\n" {
		t.Errorf("install with another MTU: exit %d, %q; want only the conflist rewritten", code, out)
	}
	if code, out, _ := installCNI(t, dirs...); code != 0 || out != "margay CNI: already installed\n" {
		t.Errorf("repeated install: exit %d, %q", code, out)
	}

	// Without a template the generated conflist is written.
	t.Setenv("MARGAY_CNI_CONF_TEMPLATE", "")
	if code, _, errs := installCNI(t, append(dirs, "--ipv4-pools", "pool-a, pool-b")...); code != 0 {
		t.Fatalf("install without a template: exit %d, %s", code, errs)
	}
	data, _ = os.ReadFile(filepath.Join(conf, "10-margay.conflist"))
	if want, _ := cni.ConfList(cni.NetConf{EtcdEndpoints: "https://10.0.0.11:2379", Nodename: "node-a", LogLevel: "info",
		LogFilePath: "/var/log/margay/cni.log", IPAM: cni.IPAMConf{IPv4Pools: []string{"pool-a", "pool-b"}}}); !bytes.Equal(data, want) {
		t.Errorf("generated conflist:\n%s\nwant\n%s", data, want)
	}
}

func TestInstallCNIRefuses(t *testing.T) {
	src, dir := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(src, "margay"), []byte("margay"), 0o755) // no margay-ipam
	dirs := []string{"--src-dir", src, "--bin-dir", filepath.Join(dir, "bin"), "--conf-dir", filepath.Join(dir, "net.d"),
		"--etcd-endpoints", "http://10.0.0.11:2379"}
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		os.WriteFile(p, []byte(s), 0o644)
		return p
	}
	unknown := write("unknown.json", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"margay","nodename":"__KUBERNETES_NODE_NAME__"}]}`)
	broken := write("broken.json", "{\"cniVersion\":\"1.0.0\",\n\"name\":\"n\",\n\"plugins\":[{\"type\":\"margay\",}]}")
	noEtcd := write("noetcd.json", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"margay"}]}`)
	cases := []struct {
		name string
		args []string
		code int
		err  string
	}{
		{"unknown placeholder", []string{"--conf-template", unknown}, 2, "--conf-template " + unknown + ": unknown placeholder __KUBERNETES_NODE_NAME__"},
		{"broken JSON", []string{"--conf-template", broken}, 2, "--conf-template " + broken + ": not a configuration list: line 3: invalid character '}'"},
		{"plugin would refuse", []string{"--conf-template", noEtcd}, 2, "--conf-template " + noEtcd + ": invalid network configuration: etcd_endpoints: required"},
		{"no template file", []string{"--conf-template", filepath.Join(dir, "missing")}, 2, "install-cni: open " + filepath.Join(dir, "missing")},
		{"pools with a template", []string{"--conf-template", noEtcd, "--ipv4-pools", "p"}, 2, "--ipv4-pools does not apply"},
		{"bad MTU", []string{"--mtu", "100"}, 2, "mtu: 100 is out of range"},
		{"relative MTU file", []string{"--mtu-file", "x"}, 2, `mtu_file: "x" is not an absolute path`},
		{"unknown flag", []string{"--health-listen", "x"}, 2, "unknown flag: --health-listen"},
		{"argument", []string{"now"}, 2, `unexpected arguments ["now"]`},
		{"missing plugin", nil, 1, "margay-ipam"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			code, _, errs := installCNI(t, append(dirs, tc.args...)...)
			if code != tc.code || !strings.Contains(errs, tc.err) || strings.Contains(errs, "\n") {
				t.Errorf("exit %d, %q; want exit %d and one line with %q", code, errs, tc.code, tc.err)
			}
		})
	}
	if _, err := os.Stat(filepath.Join(dir, "net.d")); !os.IsNotExist(err) {
		t.Errorf("a refused install wrote the conf dir (stat: %v)", err)
	}
}

// The plugin's kubeconfig: from a token directory, with the API server from
// the pod's environment; refused, with nothing written, when it is ambiguous or
// has no server.
func TestInstallCNIKubeconfig(t *testing.T) {
	src, dir, tokens := t.TempDir(), t.TempDir(), t.TempDir()
	for _, p := range []string{"margay", "margay-ipam"} {
		os.WriteFile(filepath.Join(src, p), []byte(p), 0o755)
	}
	os.WriteFile(filepath.Join(tokens, "token"), []byte("t0ken"), 0o600)
	os.WriteFile(filepath.Join(tokens, "ca.crt"), []byte("ca"), 0o600)
	conf := filepath.Join(dir, "net.d")
	args := []string{"--src-dir", src, "--bin-dir", filepath.Join(dir, "bin"), "--conf-dir", conf,
		"--etcd-endpoints", "https://10.0.0.11:2379", "--kubeconfig-token-dir", tokens}
	t.Setenv("KUBERNETES_SERVICE_HOST", "")
	if code, _, errs := installCNI(t, args...); code != 2 || !strings.Contains(errs, "KUBERNETES_SERVICE_HOST") {
		t.Errorf("no API server: exit %d, %s; want a usage error naming the variables", code, errs)
	}
	if code, _, errs := installCNI(t, append(args, "--kubernetes-server", "https://10.96.0.1:443", "--kubeconfig", "/etc/k")...); code != 2 || !strings.Contains(errs, "not both") {
		t.Errorf("--kubeconfig and --kubeconfig-token-dir: exit %d, %s; want a usage error", code, errs)
	}
	if _, err := os.Stat(conf); err == nil {
		t.Error("a refused install wrote into the conf dir")
	}
	t.Setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
	t.Setenv("KUBERNETES_SERVICE_PORT", "443")
	if code, out, errs := installCNI(t, args...); code != 0 || !strings.Contains(out, cni.KubeconfigName) {
		t.Fatalf("install: exit %d, %q, %s", code, out, errs)
	}
	kc, _ := os.ReadFile(filepath.Join(conf, cni.KubeconfigName))
	list, _ := os.ReadFile(filepath.Join(conf, "10-margay.conflist"))
	if !strings.Contains(string(kc), "server: https://10.96.0.1:443") || !strings.Contains(string(list), filepath.Join(conf, cni.KubeconfigName)) {
		t.Errorf("kubeconfig:\n%s\nconflist:\n%s", kc, list)
	}
}
