// Command margay-install-cni puts margay's CNI plugins into the node's CNI bin dir
// and writes its network configuration, atomically and idempotently. It is what
// the DaemonSet's init container runs.
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/margay-dev/margay/cni"
)

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func main() {
	self, _ := os.Executable()
	var (
		o     cni.InstallOptions
		pools string
	)
	flag.StringVar(&o.SrcDir, "src-dir", filepath.Dir(self), "directory holding the margay and margay-ipam binaries")
	flag.StringVar(&o.BinDir, "bin-dir", "/opt/cni/bin", "CNI bin dir")
	flag.StringVar(&o.ConfDir, "conf-dir", "/etc/cni/net.d", "CNI conf dir")
	flag.StringVar(&o.ConfName, "conf-name", "10-margay.conflist", "file name of the network configuration")
	flag.StringVar(&o.Conf.EtcdEndpoints, "etcd-endpoints", env("MARGAY_ETCD_ENDPOINTS", ""), "etcd URLs, comma-separated (env MARGAY_ETCD_ENDPOINTS)")
	flag.StringVar(&o.Conf.EtcdCACertFile, "etcd-ca-cert-file", env("MARGAY_ETCD_CA_CERT_FILE", ""), "etcd CA certificate (env MARGAY_ETCD_CA_CERT_FILE)")
	flag.StringVar(&o.Conf.EtcdCertFile, "etcd-cert-file", env("MARGAY_ETCD_CERT_FILE", ""), "etcd client certificate (env MARGAY_ETCD_CERT_FILE)")
	flag.StringVar(&o.Conf.EtcdKeyFile, "etcd-key-file", env("MARGAY_ETCD_KEY_FILE", ""), "etcd client key (env MARGAY_ETCD_KEY_FILE)")
	flag.StringVar(&o.Conf.Nodename, "nodename", env("MARGAY_NODENAME", ""), "node name for the plugin; empty: the plugin uses the hostname (env MARGAY_NODENAME)")
	flag.IntVar(&o.Conf.MTU, "mtu", 0, "pod MTU; 0 uses the MTU margay-node detects")
	flag.StringVar(&o.Conf.LogLevel, "log-level", "info", "plugin log level")
	flag.StringVar(&o.Conf.LogFilePath, "log-file", "/var/log/margay/cni.log", "plugin log file")
	flag.StringVar(&pools, "ipv4-pools", "", "comma-separated pools the plugin may assign from; empty: every pool for the node")
	flag.Parse()
	if flag.NArg() > 0 {
		fail(2, fmt.Errorf("unexpected arguments %q", flag.Args()))
	}
	for _, p := range strings.Split(pools, ",") {
		if p = strings.TrimSpace(p); p != "" {
			o.Conf.IPAM.IPv4Pools = append(o.Conf.IPAM.IPv4Pools, p)
		}
	}
	// Refuse a configuration the plugin itself would refuse, before kubelet sees it.
	list, err := cni.ConfList(o.Conf)
	if err == nil {
		err = cni.CheckConfList(list)
	}
	if err != nil {
		fail(2, err)
	}
	changed, err := cni.Install(o)
	if err != nil {
		fail(1, err)
	}
	if len(changed) == 0 {
		fmt.Println("margay CNI: already installed")
	}
	for _, c := range changed {
		fmt.Println("margay CNI: installed", c)
	}
}

func fail(code int, err error) {
	fmt.Fprintf(os.Stderr, "margay-install-cni: %v\n", err)
	os.Exit(code)
}
