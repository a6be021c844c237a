package cni

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
)

func TestInstall(t *testing.T) {
	src, bin, conf := t.TempDir(), filepath.Join(t.TempDir(), "bin"), filepath.Join(t.TempDir(), "net.d")
	for _, p := range []string{"margay", "margay-ipam"} {
		os.WriteFile(filepath.Join(src, p), []byte("#!/bin/sh\necho "+p+"\n"), 0o700)
	}
	o := InstallOptions{SrcDir: src, BinDir: bin, ConfDir: conf, Conf: NetConf{
		EtcdEndpoints: "https://10.0.0.1:2379", EtcdCACertFile: "/etc/margay/ca.pem",
		EtcdCertFile: "/etc/margay/cert.pem", EtcdKeyFile: "/etc/margay/key.pem", Nodename: "node-a"}}
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
	if err != nil || c.EtcdCACertFile != "/etc/margay/ca.pem" || c.EtcdKeyFile != "/etc/margay/key.pem" || c.IPAM.Type != "margay-ipam" {
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
	if err := CheckConfList([]byte(`{"plugins":[{"type":"margay"}]}`)); err == nil || !strings.Contains(err.Error(), "etcd_endpoints") {
		t.Errorf("a conflist without etcd_endpoints passed: %v", err)
	}
}
