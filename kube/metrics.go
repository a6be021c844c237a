package kube

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
)

// Metrics are the controller's Prometheus metrics. A nil *Metrics records
// nothing.
type Metrics struct {
	Registry     *prometheus.Registry
	leader       prometheus.Gauge
	passSeconds  prometheus.Histogram
	passFailures prometheus.Counter
	relabels     prometheus.Counter
	deletions    *prometheus.CounterVec
	released     prometheus.Counter
	policies     prometheus.Counter
	untransl     prometheus.Gauge
}

// NewMetrics registers the controller's metrics and Go's on a new registry.
func NewMetrics() *Metrics {
	m := &Metrics{
		Registry: prometheus.NewRegistry(),
		leader: prometheus.NewGauge(prometheus.GaugeOpts{Name: "margay_kube_controllers_leader",
			Help: "1 while this replica holds the lease and writes, 0 while it stands by."}),
		passSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "margay_kube_controllers_pass_duration_seconds",
			Help: "Time of one sync pass.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 14)}),
		passFailures: prometheus.NewCounter(prometheus.CounterOpts{Name: "margay_kube_controllers_pass_errors_total",
			Help: "Sync passes that failed, to be retried."}),
		relabels: prometheus.NewCounter(prometheus.CounterOpts{Name: "margay_kube_controllers_endpoint_relabels_total",
			Help: "WorkloadEndpoint label updates written."}),
		deletions: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "margay_kube_controllers_deletions_total",
			Help: "Resources deleted because their Kubernetes object is gone, by kind."}, []string{"kind"}),
		released: prometheus.NewCounter(prometheus.CounterOpts{Name: "margay_kube_controllers_ipam_repairs_total",
			Help: "Leaked addresses and blocks of deleted nodes released."}),
		policies: prometheus.NewCounter(prometheus.CounterOpts{Name: "margay_kube_controllers_policy_writes_total",
			Help: "Translations of Kubernetes NetworkPolicies created or updated."}),
		untransl: prometheus.NewGauge(prometheus.GaugeOpts{Name: "margay_kube_controllers_untranslatable_policies",
			Help: "Kubernetes NetworkPolicies margay cannot translate, as of the last pass; their last translation stays."}),
	}
	m.Registry.MustRegister(m.leader, m.passSeconds, m.passFailures, m.relabels, m.deletions, m.released, m.policies, m.untransl,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

func (m *Metrics) setLeader(on bool) {
	if m != nil {
		v := 0.0
		if on {
			v = 1
		}
		m.leader.Set(v)
	}
}

func (m *Metrics) observePass(d time.Duration) {
	if m != nil {
		m.passSeconds.Observe(d.Seconds())
	}
}

func (m *Metrics) passFailed() {
	if m != nil {
		m.passFailures.Inc()
	}
}

func (m *Metrics) relabelled() {
	if m != nil {
		m.relabels.Inc()
	}
}

func (m *Metrics) deleted(kind string) {
	if m != nil {
		m.deletions.WithLabelValues(kind).Inc()
	}
}

func (m *Metrics) repaired(n int) {
	if m != nil {
		m.released.Add(float64(n))
	}
}

func (m *Metrics) policyWritten() {
	if m != nil {
		m.policies.Inc()
	}
}

func (m *Metrics) untranslated(n int) {
	if m != nil {
		m.untransl.Set(float64(n))
	}
}
