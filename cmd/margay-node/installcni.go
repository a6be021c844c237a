package main

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/margay-dev/margay/cni"
)

// installCNICmd puts margay's CNI plugins into the node's CNI bin dir and writes
// its network configuration, atomically and idempotently. It is what the
// DaemonSet's init container runs. A configuration the plugin would refuse exits
// 2 before anything is written; a failure to install exits 1.
func installCNICmd() *cobra.Command {
	self, _ := os.Executable()
	var (
		o             cni.InstallOptions
		pools, tmpl   string
		tokenDir      string
		server        string
		usage         = func(err error) error { return usageError{fmt.Errorf("install-cni: %w", err)} }
		templateError = func(err error) error { return usage(fmt.Errorf("--conf-template %s: %w", tmpl, err)) }
	)
	cmd := &cobra.Command{
		Use:   "install-cni",
		Short: "install margay's CNI plugins and network configuration on this node",
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usage(fmt.Errorf("unexpected arguments %q", args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, _ []string) error {
			for _, p := range strings.Split(pools, ",") {
				if p = strings.TrimSpace(p); p != "" {
					o.Conf.IPAM.IPv4Pools = append(o.Conf.IPAM.IPv4Pools, p)
				}
			}
			if tokenDir != "" {
				if o.Conf.Kubernetes.Kubeconfig != "" {
					return usage(fmt.Errorf("give --kubeconfig or --kubeconfig-token-dir, not both"))
				}
				if server == "" {
					return usage(fmt.Errorf("--kubeconfig-token-dir needs the API server: set --kubernetes-server, or KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT"))
				}
				o.Kubeconfig = &cni.KubeconfigSource{Server: server, TokenDir: tokenDir}
			}
			if tmpl != "" {
				if o.Conf.IPAM.IPv4Pools != nil {
					return usage(fmt.Errorf("--ipv4-pools does not apply to --conf-template %s: put ipam.ipv4_pools in the template", tmpl))
				}
				b, err := os.ReadFile(tmpl)
				if err != nil {
					return usage(err) // names the file
				}
				o.Template = b
			}
			// Refuse a configuration the plugin itself would refuse, before kubelet sees it.
			if _, err := o.Render(); err != nil {
				if tmpl != "" {
					return templateError(err)
				}
				return usage(err)
			}
			changed, err := cni.Install(o)
			if err != nil {
				return fmt.Errorf("install-cni: %w", err)
			}
			if len(changed) == 0 {
				fmt.Fprintln(cmd.OutOrStdout(), "margay CNI: already installed")
			}
			for _, c := range changed {
				fmt.Fprintln(cmd.OutOrStdout(), "margay CNI: installed", c)
			}
			return nil
		},
	}
	cmd.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usage(err) })
	f := cmd.Flags()
	f.StringVar(&o.SrcDir, "src-dir", filepath.Dir(self), "directory holding the margay and margay-ipam binaries")
	f.StringVar(&o.BinDir, "bin-dir", "/opt/cni/bin", "CNI bin dir")
	f.StringVar(&o.ConfDir, "conf-dir", "/etc/cni/net.d", "CNI conf dir")
	f.StringVar(&o.ConfName, "conf-name", "10-margay.conflist", "file name of the network configuration")
	f.StringVar(&tmpl, "conf-template", env("MARGAY_CNI_CONF_TEMPLATE", ""),
		"conflist template with __ETCD_ENDPOINTS__, __NODENAME__, __MTU__... placeholders, instead of the generated conflist (env MARGAY_CNI_CONF_TEMPLATE)")
	f.StringVar(&o.TLSDir, "tls-dir", "", "copy the etcd TLS files here and name the copies in the conflist, for an installer in a container (the plugin runs on the host)")
	f.StringVar(&o.Conf.EtcdEndpoints, "etcd-endpoints", env("MARGAY_ETCD_ENDPOINTS", ""), "etcd URLs, comma-separated (env MARGAY_ETCD_ENDPOINTS)")
	f.StringVar(&o.Conf.EtcdCACertFile, "etcd-ca-cert-file", env("MARGAY_ETCD_CA_CERT_FILE", ""), "etcd CA certificate (env MARGAY_ETCD_CA_CERT_FILE)")
	f.StringVar(&o.Conf.EtcdCertFile, "etcd-cert-file", env("MARGAY_ETCD_CERT_FILE", ""), "etcd client certificate (env MARGAY_ETCD_CERT_FILE)")
	f.StringVar(&o.Conf.EtcdKeyFile, "etcd-key-file", env("MARGAY_ETCD_KEY_FILE", ""), "etcd client key (env MARGAY_ETCD_KEY_FILE)")
	f.StringVar(&o.Conf.Nodename, "nodename", env("MARGAY_NODENAME", ""), "node name for the plugin; empty: the plugin uses the hostname (env MARGAY_NODENAME)")
	f.IntVar(&o.Conf.MTU, "mtu", 0, "pod MTU; 0 uses the MTU margay-node detects")
	f.StringVar(&o.Conf.MTUFile, "mtu-file", env("MARGAY_MTU_FILE", ""), "where margay-node writes the pod MTU, if not "+cni.DefaultMTUFile+" (env MARGAY_MTU_FILE, as for margay-node)")
	f.StringVar(&o.Conf.LogLevel, "log-level", "info", "plugin log level")
	f.StringVar(&o.Conf.LogFilePath, "log-file", "/var/log/margay/cni.log", "plugin log file")
	f.StringVar(&o.Conf.Kubernetes.Kubeconfig, "kubeconfig", env("MARGAY_CNI_KUBECONFIG", ""),
		"kubeconfig the plugin reads pod and namespace labels with at ADD (conflist kubernetes.kubeconfig); empty: labels come from margay-kube-controllers only (env MARGAY_CNI_KUBECONFIG)")
	f.StringVar(&tokenDir, "kubeconfig-token-dir", env("MARGAY_CNI_TOKEN_DIR", ""),
		"write the plugin a kubeconfig ("+cni.KubeconfigName+" in --conf-dir) from the token and ca.crt in this directory, a service account token Secret's mount, instead of --kubeconfig (env MARGAY_CNI_TOKEN_DIR)")
	f.StringVar(&server, "kubernetes-server", defaultServer(),
		"API server URL for --kubeconfig-token-dir; default from KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT")
	f.StringVar(&pools, "ipv4-pools", "", "comma-separated pools the plugin may assign from; empty: every pool for the node")
	return cmd
}

// defaultServer is the API server as a pod sees it, from the environment
// kubelet gives every pod; empty outside a pod.
func defaultServer() string {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	if host == "" || port == "" {
		return ""
	}
	return "https://" + net.JoinHostPort(host, port)
}
