// Command margay-kube-controllers keeps margay's etcd datastore in step with
// a Kubernetes cluster: pod and namespace labels on WorkloadEndpoints, and
// garbage collection after deleted pods and nodes. Replicas elect a leader;
// only the leader writes.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spf13/cobra"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/kube"
)

func main() {
	if err := rootCmd().Execute(); err != nil {
		fmt.Fprintf(os.Stderr, "margay-kube-controllers: %v\n", err)
		os.Exit(1)
	}
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func rootCmd() *cobra.Command {
	var (
		ds                                datastore.Config
		endpoints, kubeconfig, logLevel   string
		grace, resync                     time.Duration
		leaseNS, identity                 string
		healthAddr, metricsAddr           string
		leaderElect                       bool
		leaseDuration, renewDeadline, rtr time.Duration
	)
	hostname, _ := os.Hostname()
	root := &cobra.Command{
		Use:           "margay-kube-controllers",
		Short:         "keep margay's etcd in step with Kubernetes: endpoint labels, garbage collection",
		Args:          cobra.NoArgs,
		SilenceUsage:  true,
		SilenceErrors: true,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: use debug, info, warn or error", logLevel)
			}
			log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
			if grace <= 0 || resync <= 0 {
				return errors.New("--grace and --resync-interval must be positive durations such as 1m")
			}
			rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
			if err != nil {
				return fmt.Errorf("Kubernetes client config (--kubeconfig %q; empty means in-cluster): %w", kubeconfig, err)
			}
			rc.UserAgent = "margay-kube-controllers/" + api.Version
			k, err := kubernetes.NewForConfig(rc)
			if err != nil {
				return fmt.Errorf("Kubernetes client: %w", err)
			}
			ds.Endpoints = strings.Split(endpoints, ",")
			store, err := datastore.New(ds)
			if err != nil {
				return err
			}
			defer store.Close()
			m := kube.NewMetrics()
			c := kube.New(kube.Config{Kube: k, Store: store, Grace: grace, Resync: resync, Logger: log, Metrics: m})

			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGTERM, syscall.SIGINT)
			defer stop()
			metrics := http.NewServeMux()
			metrics.Handle("/metrics", promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{}))
			if err := serve(ctx, log, healthAddr, c.Health()); err != nil {
				return fmt.Errorf("--health-listen %s: %w", healthAddr, err)
			}
			if err := serve(ctx, log, metricsAddr, metrics); err != nil {
				return fmt.Errorf("--metrics-listen %s: %w", metricsAddr, err)
			}
			log.Info("margay-kube-controllers starting", "version", api.Version, "grace", grace, "resync", resync, "leaderElect", leaderElect)
			if !leaderElect {
				err = c.Run(ctx)
			} else {
				e := kube.DefaultElection(leaseNS, identity)
				e.LeaseDuration, e.RenewDeadline, e.RetryPeriod = leaseDuration, renewDeadline, rtr
				err = kube.RunElected(ctx, k, c, e)
			}
			if ctx.Err() != nil {
				return nil
			}
			return err
		},
	}
	f := root.Flags()
	f.StringVar(&kubeconfig, "kubeconfig", env("KUBECONFIG", ""), "kubeconfig file; empty for the in-cluster service account (env KUBECONFIG)")
	f.StringVar(&endpoints, "etcd-endpoints", env("MARGAY_ETCD_ENDPOINTS", datastore.DefaultEndpoint), "comma-separated etcd URLs (env MARGAY_ETCD_ENDPOINTS)")
	f.StringVar(&ds.CAFile, "etcd-ca-cert-file", env("MARGAY_ETCD_CA_CERT_FILE", ""), "CA certificate of etcd (env MARGAY_ETCD_CA_CERT_FILE)")
	f.StringVar(&ds.CertFile, "etcd-cert-file", env("MARGAY_ETCD_CERT_FILE", ""), "client certificate for etcd (env MARGAY_ETCD_CERT_FILE)")
	f.StringVar(&ds.KeyFile, "etcd-key-file", env("MARGAY_ETCD_KEY_FILE", ""), "client key for etcd (env MARGAY_ETCD_KEY_FILE)")
	f.DurationVar(&grace, "grace", kube.DefaultGrace, "how long an endpoint or node stays without its Kubernetes object before it is deleted")
	f.DurationVar(&resync, "resync-interval", 10*time.Second, "how often to sync without an event")
	f.BoolVar(&leaderElect, "leader-elect", true, "take a lease so that only one replica writes; turn off only for a single replica")
	f.StringVar(&leaseNS, "lease-namespace", env("POD_NAMESPACE", "margay-system"), "namespace of the leader lease (env POD_NAMESPACE)")
	f.StringVar(&identity, "identity", env("POD_NAME", hostname), "this replica's name in the lease (env POD_NAME; default the hostname)")
	d := kube.DefaultElection("", "")
	f.DurationVar(&leaseDuration, "lease-duration", d.LeaseDuration, "how long a lease lasts unrenewed before another replica may take it")
	f.DurationVar(&renewDeadline, "renew-deadline", d.RenewDeadline, "how long the leader tries to renew before it stops writing; less than --lease-duration")
	f.DurationVar(&rtr, "retry-period", d.RetryPeriod, "how often replicas try to take or renew the lease")
	f.StringVar(&healthAddr, "health-listen", env("MARGAY_HEALTH_LISTEN", ":9095"), "address of /livez and /readyz (env MARGAY_HEALTH_LISTEN)")
	f.StringVar(&metricsAddr, "metrics-listen", env("MARGAY_METRICS_LISTEN", ":9094"), "address of Prometheus /metrics; empty for none (env MARGAY_METRICS_LISTEN)")
	f.StringVar(&logLevel, "log-level", env("MARGAY_LOG_LEVEL", "info"), "debug, info, warn or error (env MARGAY_LOG_LEVEL)")
	root.AddCommand(&cobra.Command{
		Use:   "version",
		Short: "print the version",
		Args:  cobra.NoArgs,
		Run: func(cmd *cobra.Command, _ []string) {
			fmt.Fprintln(cmd.OutOrStdout(), "margay-kube-controllers", api.Version)
		},
	})
	root.SetContext(context.Background())
	return root
}

// serve serves h on addr until ctx is done; "" serves nothing.
func serve(ctx context.Context, log *slog.Logger, addr string, h http.Handler) error {
	if addr == "" {
		return nil
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("HTTP server", "addr", addr, "err", err)
		}
	}()
	go func() { <-ctx.Done(); srv.Close() }()
	return nil
}
