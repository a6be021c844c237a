// Go 1.24 and later listen with MPTCP by default, and the kernel refuses TCP MD5
// keys (BGP passwords) on MPTCP sockets with ENOPROTOOPT: GoBGP's listener must
// be plain TCP.
//
//go:debug multipathtcp=0

// Command margay-node is margay's per-node agent: it registers the node, speaks
// BGP through an embedded GoBGP, and programs routes, ipsets and iptables rules.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/margay-dev/margay/agent"
	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/cni"
	"github.com/margay-dev/margay/datastore"
)

func main() {
	if err := rootCmd().Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "margay-node: %v\n", err)
		os.Exit(exitCode(err))
	}
}

// usageError marks a mistake in how margay-node was called, or a configuration it
// refuses to install: exit code 2.
type usageError struct{ error }

func exitCode(err error) int {
	if errors.As(err, new(usageError)) {
		return 2
	}
	return 1
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func rootCmd() *cobra.Command {
	var cfg agent.Config
	var endpoints, as, resync, logLevel string
	root := &cobra.Command{
		Use:           "margay-node",
		Short:         "margay's node agent: BGP, routes, NAT",
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
			}
			cfg.Logger = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
			cfg.Datastore.Endpoints = strings.Split(endpoints, ",")
			if as != "" {
				if err := cfg.AS.UnmarshalJSON([]byte(strconv.Quote(as))); err != nil || cfg.AS == 0 {
					return fmt.Errorf("--as %q: give an AS number from 1 to 4294967295, or asdot such as 1.10", as)
				}
			}
			d, err := time.ParseDuration(resync)
			if err != nil || d <= 0 {
				return fmt.Errorf("--resync-interval %q: give a duration such as 10s", resync)
			}
			cfg.ResyncInterval = d
			// SIGTERM and SIGINT stop the agent without touching routes, rules or
			// BGP sessions' routes at peers: a restart loses no traffic.
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			return agent.Run(ctx, cfg)
		},
	}
	f := root.Flags()
	f.StringVar(&cfg.NodeName, "nodename", env("MARGAY_NODENAME", ""), "this node's name (env MARGAY_NODENAME; default the hostname)")
	f.StringVar(&cfg.K8sNodeRef, "k8s-node-ref", env("MARGAY_K8S_NODE_REF", ""),
		"the node's name in Kubernetes, recorded in the Node's orchRefs so that margay-kube-controllers cleans up after its deletion (env MARGAY_K8S_NODE_REF)")
	f.StringVar(&endpoints, "etcd-endpoints", env("MARGAY_ETCD_ENDPOINTS", datastore.DefaultEndpoint), "comma-separated etcd URLs (env MARGAY_ETCD_ENDPOINTS)")
	f.StringVar(&cfg.Datastore.CAFile, "etcd-ca-cert-file", env("MARGAY_ETCD_CA_CERT_FILE", ""), "CA certificate of etcd (env MARGAY_ETCD_CA_CERT_FILE)")
	f.StringVar(&cfg.Datastore.CertFile, "etcd-cert-file", env("MARGAY_ETCD_CERT_FILE", ""), "client certificate for etcd (env MARGAY_ETCD_CERT_FILE)")
	f.StringVar(&cfg.Datastore.KeyFile, "etcd-key-file", env("MARGAY_ETCD_KEY_FILE", ""), "client key for etcd (env MARGAY_ETCD_KEY_FILE)")
	f.StringVar(&cfg.IP, "ip", env("MARGAY_IP", "autodetect"), "the node's address with its subnet's prefix length (198.18.1.2/24), or autodetect (env MARGAY_IP)")
	f.StringVar(&cfg.AutodetectMethod, "ip-autodetection-method", env("MARGAY_IP_AUTODETECTION_METHOD", "first-found"),
		"first-found, interface=REGEX, can-reach=IP or cidr=CIDR (env MARGAY_IP_AUTODETECTION_METHOD)")
	f.StringVar(&cfg.IP6, "ip6", env("MARGAY_IP6", "none"), "the node's IPv6 address with its subnet's prefix length (fd00:18:1::2/64), autodetect, or none (env MARGAY_IP6)")
	f.StringVar(&cfg.Autodetect6Method, "ip6-autodetection-method", env("MARGAY_IP6_AUTODETECTION_METHOD", "first-found"),
		"how --ip6 autodetect finds the address: first-found, interface=REGEX, can-reach=IP or cidr=CIDR (env MARGAY_IP6_AUTODETECTION_METHOD)")
	f.StringVar(&as, "as", env("MARGAY_AS", ""), "this node's AS number, overriding BGPConfiguration (env MARGAY_AS)")
	f.StringVar(&cfg.DefaultPool, "default-ipv4-pool", env("MARGAY_DEFAULT_IPV4_POOL", agent.DefaultPoolCIDR),
		"pool to create when the datastore has none; empty for none (env MARGAY_DEFAULT_IPV4_POOL)")
	f.StringVar(&cfg.MTUFile, "mtu-file", env("MARGAY_MTU_FILE", cni.DefaultMTUFile), "where to write the pod MTU for the CNI plugin (env MARGAY_MTU_FILE)")
	f.StringVar(&cfg.HealthAddr, "health-listen", env("MARGAY_HEALTH_LISTEN", agent.DefaultHealthAddr), "address of /livez and /readyz (env MARGAY_HEALTH_LISTEN)")
	f.StringVar(&cfg.MetricsAddr, "metrics-listen", env("MARGAY_METRICS_LISTEN", agent.DefaultMetricsAddr), "address of Prometheus /metrics (env MARGAY_METRICS_LISTEN)")
	f.StringVar(&cfg.GRPCAddr, "bgp-api-listen", env("MARGAY_BGP_API_LISTEN", agent.DefaultGRPCAddr), "GoBGP gRPC API address, for the gobgp CLI; keep it on loopback (env MARGAY_BGP_API_LISTEN)")
	f.StringVar(&resync, "resync-interval", env("MARGAY_RESYNC_INTERVAL", agent.DefaultResyncInterval.String()), "how often to re-assert routes and rules (env MARGAY_RESYNC_INTERVAL)")
	f.StringVar(&logLevel, "log-level", env("MARGAY_LOG_LEVEL", "info"), "debug, info, warn or error (env MARGAY_LOG_LEVEL)")
	root.AddCommand(installCNICmd(), &cobra.Command{
		Use:   "cleanup",
		Short: "remove margay's routes, iptables chains and ipsets from this node",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return agent.Cleanup(slog.New(slog.NewTextHandler(os.Stderr, nil)))
		},
	}, &cobra.Command{
		Use:   "version",
		Short: "print the version",
		Args:  cobra.NoArgs,
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(cmd.OutOrStdout(), "margay-node", api.Version) },
	})
	root.SetContext(context.Background())
	return root
}
