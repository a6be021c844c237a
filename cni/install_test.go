package cni

import (
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"k8s.io/client-go/tools/clientcmd"
)

func TestInstall(t *testing.T) {
	src, bin, conf := t.TempDir(), filepath.Join(t.TempDir(), "bin"), filepath.Join(t.TempDir(), "net.d")
	for _, p := range []string{"margay", "margay-ipam"} {
		os.WriteFile(filepath.Join(src, p), []byte("#!/bin/sh\necho "+p+"\n"), 0o700)
	}
	o := InstallOptions{SrcDir: src, BinDir: bin, ConfDir: conf, Conf: NetConf{
		EtcdEndpoints: "https://10.0.0.1:2379", EtcdCACertFile: "/etc/margay/ca.pem",
		EtcdCertFile: "/etc/margay/cert.pem", EtcdKeyFile: "/etc/margay/key.pem", Nodename: "node-a", MTUFile: "/run/margay/mtu"}}
	changed, err := Install(o)
	if err != nil || len(changed) != 3 {
		t.Fatalf("first install changed %v, err %v; want 2 binaries and the conflist", changed, err)
	}
	for _, p := range []string{"margay", "margay-ipam"} {
		st, err := os.Stat(filepath.Join(bin, p))
		if err != nil || st.Mode().Perm() != 0o755 {
			t.Errorf("%s: %v, mode %v; want an executable copy", p, err, st.Mode())
		}
	}
	list, err := libcni.ConfListFromFile(filepath.Join(conf, "10-margay.conflist"))
	if err != nil {
		t.Fatalf("kubelet's library cannot read the conflist: %v", err)
	}
	if list.Name != "k8s-pod-network" || len(list.Plugins) != 1 || list.Plugins[0].Network.Type != "margay" {
		t.Errorf("conflist %s", list.Bytes)
	}
	c, err := ParseConf(list.Plugins[0].Bytes, hostname)
	if err != nil || c.EtcdCACertFile != "/etc/margay/ca.pem" || c.EtcdKeyFile != "/etc/margay/key.pem" || c.IPAM.Type != "margay-ipam" || c.MTUFile != "/run/margay/mtu" {
		t.Errorf("plugin configuration %+v, %v: want the TLS paths carried through", c, err)
	}
	// Idempotent: nothing changes the second time, and no temporary file is left.
	if changed, err := Install(o); err != nil || len(changed) != 0 {
		t.Errorf("second install changed %v, err %v; want nothing", changed, err)
	}
	for _, dir := range []string{bin, conf} {
		entries, _ := os.ReadDir(dir)
		for _, e := range entries {
			if strings.Contains(e.Name(), ".tmp-") {
				t.Errorf("temporary file %s left in %s", e.Name(), dir)
			}
		}
	}
	// A changed setting rewrites only the conflist.
	o.Conf.MTU = 1400
	if changed, err := Install(o); err != nil || !slices.Equal(changed, []string{filepath.Join(conf, "10-margay.conflist")}) {
		t.Errorf("install with a new MTU changed %v, err %v; want only the conflist", changed, err)
	}
}

// The conflist is written last and only after everything it needs is in place: the
// runtime calls the node's network ready as soon as a configuration exists.
func TestInstallWritesConfListLast(t *testing.T) {
	src, bin, conf := t.TempDir(), filepath.Join(t.TempDir(), "bin"), filepath.Join(t.TempDir(), "net.d")
	os.WriteFile(filepath.Join(src, "margay"), []byte("plugin"), 0o755)
	os.WriteFile(filepath.Join(src, "margay-ipam"), []byte("ipam"), 0o755)
	// A configuration the plugin would refuse writes nothing at all.
	o := InstallOptions{SrcDir: src, BinDir: bin, ConfDir: conf, Conf: NetConf{EtcdEndpoints: "http://10.0.0.1:2379", MTU: 100}}
	if changed, err := Install(o); err == nil || len(changed) != 0 || !strings.Contains(err.Error(), "mtu") {
		t.Errorf("install with MTU 100: changed %v, err %v; want a refusal naming mtu and nothing written", changed, err)
	}
	if _, err := os.Stat(bin); !os.IsNotExist(err) {
		t.Errorf("a refused configuration still created %s", bin)
	}
	o.Conf.MTU = 0
	os.Remove(filepath.Join(src, "margay-ipam"))
	if changed, err := Install(o); err == nil || !strings.Contains(err.Error(), "margay-ipam") {
		t.Fatalf("install without margay-ipam: changed %v, err %v; want an error naming it", changed, err)
	}
	if _, err := os.Stat(filepath.Join(conf, "10-margay.conflist")); !os.IsNotExist(err) {
		t.Errorf("the conflist was written although a plugin is missing (stat: %v)", err)
	}
	// So does an empty file, as an unfilled Secret gives.
	os.WriteFile(filepath.Join(src, "margay-ipam"), []byte("ipam"), 0o755)
	key := filepath.Join(src, "etcd.key")
	os.WriteFile(key, nil, 0o600)
	o.TLSDir, o.Conf.EtcdCertFile, o.Conf.EtcdKeyFile = filepath.Join(conf, "tls"), filepath.Join(src, "margay"), key
	if _, err := Install(o); err == nil || !strings.Contains(err.Error(), key+" is empty") {
		t.Errorf("install with an empty key: %v; want it named", err)
	}
	if _, err := os.Stat(filepath.Join(conf, "10-margay.conflist")); !os.IsNotExist(err) {
		t.Errorf("the conflist was written with an empty key (stat: %v)", err)
	}
}

// With TLSDir the etcd files are copied next to the configuration, whose paths name
// the copies, and a template is rendered instead of the generated list.
func TestInstallTLSDirAndTemplate(t *testing.T) {
	src, secret, root := t.TempDir(), t.TempDir(), t.TempDir()
	for _, p := range []string{"margay", "margay-ipam"} {
		os.WriteFile(filepath.Join(src, p), []byte(p), 0o755)
	}
	for _, f := range []string{"ca.crt", "tls.crt", "tls.key"} {
		os.WriteFile(filepath.Join(secret, f), []byte("pem of "+f), 0o644)
	}
	conf, tls := filepath.Join(root, "net.d"), filepath.Join(root, "net.d", "margay-tls")
	o := InstallOptions{SrcDir: src, BinDir: filepath.Join(root, "bin"), ConfDir: conf, TLSDir: tls,
		Template: []byte(`{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
		  {"type": "margay", "etcd_endpoints": "__ETCD_ENDPOINTS__", "etcd_ca_cert_file": "__ETCD_CA_CERT_FILE__",
		   "etcd_cert_file": "__ETCD_CERT_FILE__", "etcd_key_file": "__ETCD_KEY_FILE__", "nodename": "__NODENAME__",
		   "mtu": __MTU__, "ipam": {"type": "margay-ipam"}},
		  {"type": "portmap", "capabilities": {"portMappings": true}}]}`),
		Conf: NetConf{EtcdEndpoints: "https://10.0.0.11:2379", EtcdCACertFile: filepath.Join(secret, "ca.crt"),
			EtcdCertFile: filepath.Join(secret, "tls.crt"), EtcdKeyFile: filepath.Join(secret, "tls.key"), Nodename: "node-a"}}
	changed, err := Install(o)
	if err != nil || len(changed) != 6 || changed[5] != filepath.Join(conf, "10-margay.conflist") {
		t.Fatalf("install changed %v, err %v; want 2 plugins, 3 TLS files, then the conflist", changed, err)
	}
	for name, want := range map[string]os.FileMode{"etcd-ca": 0o644, "etcd-cert": 0o644, "etcd-key": 0o600} {
		if st, err := os.Stat(filepath.Join(tls, name)); err != nil || st.Mode().Perm() != want {
			t.Errorf("%s: %v; want mode %v", name, err, want)
		}
	}
	list, err := libcni.ConfListFromFile(filepath.Join(conf, "10-margay.conflist"))
	if err != nil || len(list.Plugins) != 2 || list.Plugins[1].Network.Type != "portmap" {
		t.Fatalf("conflist %v: %v; want margay chained to portmap", list, err)
	}
	c, err := ParseConf(list.Plugins[0].Bytes, hostname)
	if err != nil || c.EtcdKeyFile != filepath.Join(tls, "etcd-key") || c.EtcdCACertFile != filepath.Join(tls, "etcd-ca") || c.MTU != 0 || c.Nodename != "node-a" {
		t.Errorf("plugin configuration %+v, %v: want the copies' paths, MTU 0 and node-a", c, err)
	}
	if changed, err := Install(o); err != nil || len(changed) != 0 {
		t.Errorf("second install changed %v, err %v; want nothing", changed, err)
	}
}

func TestRenderTemplate(t *testing.T) {
	c := NetConf{EtcdEndpoints: "https://10.0.0.11:2379,https://10.0.0.12:2379", EtcdCACertFile: `/etc/a "b"\c`,
		Nodename: "node-a", MTU: 1440, MTUFile: "/run/margay/mtu", LogLevel: "debug", LogFilePath: "/var/log/margay/cni.log"}
	cases := []struct {
		name, tmpl, want, err string
	}{
		{"strings", `{"e":"__ETCD_ENDPOINTS__","n":"__NODENAME__","l":"__LOG_LEVEL__","f":"__LOG_FILE_PATH__"}`,
			`{"e":"https://10.0.0.11:2379,https://10.0.0.12:2379","n":"node-a","l":"debug","f":"/var/log/margay/cni.log"}`, ""},
		{"escaped for JSON", `{"ca":"__ETCD_CA_CERT_FILE__"}`, `{"ca":"/etc/a \"b\"\\c"}`, ""},
		{"empty values", `{"cert":"__ETCD_CERT_FILE__","key":"__ETCD_KEY_FILE__"}`, `{"cert":"","key":""}`, ""},
		{"bare MTU", `{"mtu": __MTU__}`, `{"mtu": 1440}`, ""},
		{"MTU file", `{"mtu_file": "__MTU_FILE__"}`, `{"mtu_file": "/run/margay/mtu"}`, ""},
		{"twice", `"__NODENAME__/__NODENAME__"`, `"node-a/node-a"`, ""},
		{"no placeholders", `{"a":"__b__ _X_"}`, `{"a":"__b__ _X_"}`, ""},
		{"Calico's node name", `{"n":"__KUBERNETES_NODE_NAME__","m":__CNI_MTU__,"o":"__CNI_MTU__"}`, "",
			"unknown placeholder __CNI_MTU__, __KUBERNETES_NODE_NAME__; known: __ETCD_CA_CERT_FILE__,"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got, err := RenderTemplate([]byte(tc.tmpl), c)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Errorf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || string(got) != tc.want {
				t.Errorf("got %s, %v; want %s", got, err, tc.want)
			}
		})
	}
	// The escaped value decodes back to the value.
	got, _ := RenderTemplate([]byte(`"__ETCD_CA_CERT_FILE__"`), c)
	var s string
	if err := json.Unmarshal(got, &s); err != nil || s != c.EtcdCACertFile {
		t.Errorf("decoded %q, %v; want %q", s, err, c.EtcdCACertFile)
	}
}

func TestCheckConfList(t *testing.T) {
	const ok = `{"type":"margay","etcd_endpoints":"http://10.0.0.1:2379"}`
	cases := []struct{ name, list, err string }{
		{"good", `{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[` + ok + `,{"type":"portmap"}]}`, ""},
		{"syntax error with its line", "{\"cniVersion\":\"1.0.0\",\n\"name\":\"n\",\n\"plugins\":[" + ok + ",]}", "not a configuration list: line 3: invalid character ']'"},
		{"type error", `{"cniVersion":"1.0.0","name":5}`, "line 1: json: cannot unmarshal number"},
		{"no name", `{"cniVersion":"1.0.0","plugins":[` + ok + `]}`, "has no name"},
		{"old version", `{"cniVersion":"0.2.0","name":"n","plugins":[` + ok + `]}`, `cniVersion "0.2.0": margay speaks 0.3.1, 0.4.0, 1.0.0, 1.1.0`},
		{"no plugins", `{"cniVersion":"1.0.0","name":"n","plugins":[]}`, "has no plugins"},
		{"margay not first", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"portmap"},` + ok + `]}`, `first plugin's type is "portmap", not margay`},
		{"plugin refuses", `{"cniVersion":"1.0.0","name":"n","plugins":[{"type":"margay"}]}`, "etcd_endpoints: required"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := CheckConfList([]byte(tc.list))
			if tc.err == "" && err != nil || tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)) {
				t.Errorf("err = %v, want %q", err, tc.err)
			}
		})
	}
}

// With a KubeconfigSource, Install writes the plugin's kubeconfig, token and CA
// inline and readable by root only, before the conflist that names it; an
// empty token (an unfilled Secret) writes nothing.
func TestInstallKubeconfig(t *testing.T) {
	src, bin, conf, tokens := t.TempDir(), filepath.Join(t.TempDir(), "bin"), filepath.Join(t.TempDir(), "net.d"), t.TempDir()
	for _, p := range []string{"margay", "margay-ipam"} {
		os.WriteFile(filepath.Join(src, p), []byte("#!/bin/sh\n"), 0o700)
	}
	os.WriteFile(filepath.Join(tokens, "token"), nil, 0o600)
	os.WriteFile(filepath.Join(tokens, "ca.crt"), []byte("-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"), 0o600)
	o := InstallOptions{SrcDir: src, BinDir: bin, ConfDir: conf,
		Kubeconfig: &KubeconfigSource{Server: "https://10.96.0.1:443", TokenDir: tokens},
		Conf:       NetConf{EtcdEndpoints: "https://10.0.0.1:2379", Nodename: "node-a"}}
	if _, err := Install(o); err == nil || !strings.Contains(err.Error(), "empty token") {
		t.Errorf("install with an empty token: %v; want a refusal naming it", err)
	}
	if _, err := os.Stat(filepath.Join(conf, "10-margay.conflist")); err == nil {
		t.Error("the conflist was written although the kubeconfig was not")
	}

	os.WriteFile(filepath.Join(tokens, "token"), []byte("sa-token\n"), 0o600)
	if _, err := Install(o); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(conf, KubeconfigName)
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("kubeconfig: %v, mode %v; want 0600", err, st.Mode())
	}
	kc, err := clientcmd.LoadFromFile(path)
	if err != nil {
		t.Fatal(err)
	}
	ctx := kc.Contexts[kc.CurrentContext]
	if ctx == nil || kc.Clusters[ctx.Cluster].Server != "https://10.96.0.1:443" || kc.AuthInfos[ctx.AuthInfo].Token != "sa-token" ||
		!strings.Contains(string(kc.Clusters[ctx.Cluster].CertificateAuthorityData), "BEGIN CERTIFICATE") {
		t.Errorf("kubeconfig %+v: want the server, the token and the CA", kc)
	}
	list, err := libcni.ConfListFromFile(filepath.Join(conf, "10-margay.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := ParseConf(list.Plugins[0].Bytes, hostname)
	if err != nil || c.Kubernetes.Kubeconfig != path {
		t.Errorf("conflist names kubeconfig %q (%v); want %s", c.Kubernetes.Kubeconfig, err, path)
	}
}
