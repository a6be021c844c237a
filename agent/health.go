package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/margay-dev/margay/bgp"
)

type metrics struct {
	registry         *prometheus.Registry
	peers            *prometheus.GaugeVec
	routes           prometheus.Gauge
	blocks           prometheus.Gauge
	reconcileSeconds *prometheus.HistogramVec
	reconcileErrors  *prometheus.CounterVec
	ignoredPaths     *prometheus.CounterVec
	ignoredNow       *prometheus.GaugeVec
	flowsCut         prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		peers: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "margay_bgp_peers",
			Help: "BGP peers by session state."}, []string{"state"}),
		routes: prometheus.NewGauge(prometheus.GaugeOpts{Name: "margay_routes_programmed",
			Help: "Kernel routes margay owns on this node."}),
		blocks: prometheus.NewGauge(prometheus.GaugeOpts{Name: "margay_ipam_blocks_owned",
			Help: "IPAM blocks this node holds a confirmed affinity for."}),
		reconcileSeconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "margay_reconcile_duration_seconds",
			Help: "Time to apply one data plane pass, by reconciler.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}, []string{"reconciler"}),
		reconcileErrors: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "margay_reconcile_errors_total",
			Help: "Failed data plane passes, by reconciler."}, []string{"reconciler"}),
		ignoredPaths: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "margay_bgp_ignored_paths_total",
			Help: "BGP paths inside an IP pool that did not lead to their prefix's owner and were not routed, by the peer that sent them; each counts once, after 5 s."}, []string{"peer"}),
		ignoredNow: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "margay_bgp_ignored_paths",
			Help: "BGP paths inside an IP pool being ignored now for not leading to their prefix's owner, by the peer that sent them."}, []string{"peer"}),
		flowsCut: prometheus.NewCounter(prometheus.CounterOpts{Name: "margay_policy_flows_cut_total",
			Help: "Established flows through local pods whose conntrack entries were deleted because policy no longer allows them to start."}),
	}
	m.registry.MustRegister(m.peers, m.routes, m.blocks, m.reconcileSeconds, m.reconcileErrors, m.ignoredPaths, m.ignoredNow, m.flowsCut,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// health decides /livez and /readyz.
type health struct {
	mu       sync.Mutex
	registry *prometheus.Registry
	lastBeat time.Time
	bgpSince time.Time
	synced   bool
	trouble  map[string]string // component -> why it is not ready
	expected []netip.Addr
	everUp   map[netip.Addr]time.Time // when each peer was first seen Established
}

func newHealth(r *prometheus.Registry) *health {
	return &health{registry: r, trouble: map[string]string{}, everUp: map[netip.Addr]time.Time{}, lastBeat: time.Now()}
}

func (h *health) beat() { h.mu.Lock(); h.lastBeat = time.Now(); h.mu.Unlock() }

func (h *health) set(component, trouble string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if trouble == "" {
		delete(h.trouble, component)
	} else {
		h.trouble[component] = trouble
	}
}

func (h *health) bgpStarted() {
	h.mu.Lock()
	h.bgpSince = time.Now()
	h.mu.Unlock()
}

func (h *health) dataplaneSynced() { h.mu.Lock(); h.synced = true; h.mu.Unlock() }

func (h *health) expectPeers(ps []bgp.Peer) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.expected = h.expected[:0]
	for _, p := range ps {
		h.expected = append(h.expected, p.Address)
	}
}

func (h *health) established(a netip.Addr) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.everUp[a].IsZero() {
		h.everUp[a] = time.Now()
	}
}

// notReady lists why the node is not ready, empty when it is.
func (h *health) notReady() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	var why []string
	for c, t := range h.trouble {
		why = append(why, c+": "+t)
	}
	sort.Strings(why)
	switch {
	case h.bgpSince.IsZero():
		why = append(why, "bgp: not started (waiting for the datastore sync)")
	case time.Since(h.bgpSince) < peerGrace:
		var waiting []string
		for _, a := range h.expected {
			if h.everUp[a].IsZero() {
				waiting = append(waiting, a.String())
			}
		}
		if len(waiting) > 0 {
			why = append(why, fmt.Sprintf("bgp: waiting up to %s for peers to be established: %s", peerGrace, strings.Join(waiting, ", ")))
		}
	}
	if !h.synced {
		why = append(why, "dataplane: first sync not done")
	}
	return why
}

// converged says BGP has had its chance to learn every route after a start:
// every expected peer was established once, a few seconds ago, or the grace
// period is over.
func (h *health) converged() bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.bgpSince.IsZero() {
		return false
	}
	if time.Since(h.bgpSince) > peerGrace {
		return true
	}
	for _, a := range h.expected {
		if h.everUp[a].IsZero() || time.Since(h.everUp[a]) < settleTime {
			return false
		}
	}
	return true
}

// settleTime is how long after a session comes up its routes are taken to have
// arrived.
const settleTime = 3 * time.Second

func (h *health) alive() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	// The loop beats on every pass, and passes at least every resync interval.
	if since := time.Since(h.lastBeat); since > 2*time.Minute {
		return fmt.Errorf("the reconcile loop has not run for %s", since.Round(time.Second))
	}
	return nil
}

// serve starts the health and metrics listeners. A health address that cannot
// be bound stops the start: it is almost always another margay-node on this
// host, and two agents on one node would fight over it (the second would also
// free the first's name hold when it exits). A metrics port is only logged.
func (h *health) serve(ctx context.Context, healthAddr, metricsAddr string, log *slog.Logger) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		if err := h.alive(); err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		if why := h.notReady(); len(why) > 0 {
			http.Error(w, strings.Join(why, "\n"), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	metrics := http.NewServeMux()
	metrics.Handle("/metrics", promhttp.HandlerFor(h.registry, promhttp.HandlerOpts{}))
	for _, s := range []struct {
		addr    string
		handler http.Handler
	}{{healthAddr, mux}, {metricsAddr, metrics}} {
		if s.addr == "" {
			continue
		}
		l, err := net.Listen("tcp", s.addr)
		if err != nil && s.addr == healthAddr {
			return fmt.Errorf("health address %s: %w; is another margay-node running on this host? (--health-listen moves it)", s.addr, err)
		}
		if err != nil {
			log.Error("cannot listen; continuing without it", "addr", s.addr, "err", err)
			continue
		}
		srv := &http.Server{Handler: s.handler, ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("HTTP server", "addr", s.addr, "err", err)
			}
		}()
		go func() { <-ctx.Done(); srv.Close() }()
	}
	return nil
}
