package agent

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/felix/calc"
)

// An ignored path is logged and counted once, and only when it has been
// ignored for ignoredGrace; one that goes before then is never reported, and
// one that comes back is reported again.
func TestReportIgnored(t *testing.T) {
	var logs bytes.Buffer
	a := &Agent{log: slog.New(slog.NewTextHandler(&logs, nil)), metrics: newMetrics(), kickC: make(chan struct{}, 1)}
	tor := netip.MustParseAddr("198.18.1.1")
	hijack := calc.IgnoredPath{Path: api.BGPPath{Prefix: netip.MustParsePrefix("10.244.0.0/28"), NextHop: tor, Peer: tor}, Owner: "node1", Reason: "falls in a block"}
	brief := calc.IgnoredPath{Path: api.BGPPath{Prefix: netip.MustParsePrefix("10.244.0.65/32"), NextHop: tor, Peer: tor}, Reason: "no pod"}
	counted := func() float64 { return value(t, a.metrics.ignoredPaths.WithLabelValues(tor.String())) }
	now := func() float64 { return value(t, a.metrics.ignoredNow.WithLabelValues(tor.String())) }
	t0 := time.Unix(1000, 0)
	steps := []struct {
		at       time.Duration
		paths    []calc.IgnoredPath
		total    float64
		current  float64
		logLines int
	}{
		{0, []calc.IgnoredPath{hijack, brief}, 0, 0, 0},
		{time.Second, []calc.IgnoredPath{hijack}, 0, 0, 0}, // brief went within the grace
		{ignoredGrace, []calc.IgnoredPath{hijack}, 1, 1, 1},
		{2 * ignoredGrace, []calc.IgnoredPath{hijack}, 1, 1, 1}, // once only
		{3 * ignoredGrace, nil, 1, 0, 1},
		{3*ignoredGrace + time.Second, []calc.IgnoredPath{hijack}, 1, 0, 1},
		{4*ignoredGrace + time.Second, []calc.IgnoredPath{hijack}, 2, 1, 2}, // back: reported again
	}
	for i, s := range steps {
		a.reportIgnored(s.paths, t0.Add(s.at))
		if got := counted(); got != s.total {
			t.Errorf("step %d: counted %v, want %v", i, got, s.total)
		}
		if got := now(); got != s.current {
			t.Errorf("step %d: ignored now %v, want %v", i, got, s.current)
		}
		if got := strings.Count(logs.String(), "ignoring a BGP path"); got != s.logLines {
			t.Errorf("step %d: %d log lines, want %d:\n%s", i, got, s.logLines, logs.String())
		}
	}
	if !strings.Contains(logs.String(), `prefix=10.244.0.0/28 peer=198.18.1.1 nextHop=198.18.1.1 claimant="" owner=node1`) {
		t.Errorf("the log does not name the prefix, peer, next hop, claimant and owner:\n%s", logs.String())
	}
}

func value(t *testing.T, m prometheus.Metric) float64 {
	t.Helper()
	var d dto.Metric
	if err := m.Write(&d); err != nil {
		t.Fatal(err)
	}
	if d.Counter != nil {
		return d.Counter.GetValue()
	}
	return d.Gauge.GetValue()
}
