package agent

import (
	"log/slog"
	"strings"
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/felix"
	"github.com/margay-dev/margay/felix/calc"
)

// policyKey is one series of the policy counters.
type policyKey struct {
	kind, namespace, name, tier string
	direction                   api.PolicyType
	action                      api.Action
}

func (k policyKey) labels() []string {
	return []string{k.kind, k.namespace, k.name, k.tier, strings.ToLower(string(k.direction)), strings.ToLower(string(k.action))}
}

var policyLabels = []string{"kind", "namespace", "name", "tier", "direction", "action"}

// policyCounters exports what each policy's rules matched on this node, from
// the iptables counters of its chains. Only a flow's first packet meets
// policy (established ones are accepted before), so these count the
// packets policy decided, not all traffic. Rewriting a chain zeroes its
// counters; what they held is kept here first, so the series only reset
// when the agent restarts.
type policyCounters struct {
	log            *slog.Logger
	read           func() ([]felix.RuleCount, error)
	packets, bytes *prometheus.Desc

	// io is held while the chains are read or written, so that a count is
	// never both retired and read from its rule.
	io      sync.Mutex
	mu      sync.Mutex
	chains  map[string]calc.PolicyChain // the policy chains now programmed
	retired map[policyKey][2]uint64     // counts of rewritten rules
}

func newPolicyCounters(log *slog.Logger, read func() ([]felix.RuleCount, error)) *policyCounters {
	return &policyCounters{log: log, read: read, retired: map[policyKey][2]uint64{},
		packets: prometheus.NewDesc("margay_policy_packets_total",
			"Packets that the rules of a policy decided on this node (the first of each flow), by the rules' direction and action.", policyLabels, nil),
		bytes: prometheus.NewDesc("margay_policy_bytes_total",
			"Bytes of the packets counted by margay_policy_packets_total.", policyLabels, nil),
	}
}

func (c *policyCounters) key(chain string, rule []string) (policyKey, bool) {
	pc, ok := c.chains[chain]
	if !ok {
		return policyKey{}, false
	}
	action := calc.RuleAction(rule)
	if action == "" {
		return policyKey{}, false
	}
	r := pc.Policy
	return policyKey{kind: r.Kind, namespace: r.Namespace, name: r.Name, tier: r.Tier, direction: pc.Direction, action: action}, true
}

// reset keeps the counts of a rule whose chain is about to be rewritten or
// removed; it runs inside IPTables.Apply, before setChains.
func (c *policyCounters) reset(rc felix.RuleCount) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if k, ok := c.key(rc.Chain, rc.Rule); ok {
		v := c.retired[k]
		c.retired[k] = [2]uint64{v[0] + rc.Packets, v[1] + rc.Bytes}
	}
}

// setChains takes the policy chains just programmed, and forgets the counts
// of policies no longer among them.
func (c *policyCounters) setChains(chains map[string]calc.PolicyChain) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.chains = chains
	live := map[calc.PolicyRef]bool{}
	for _, pc := range chains {
		live[pc.Policy] = true
	}
	for k := range c.retired {
		if !live[calc.PolicyRef{Kind: k.kind, Namespace: k.namespace, Name: k.name, Tier: k.tier}] {
			delete(c.retired, k)
		}
	}
}

func (c *policyCounters) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.packets
	ch <- c.bytes
}

func (c *policyCounters) Collect(ch chan<- prometheus.Metric) {
	c.io.Lock()
	counts, err := c.read()
	if err != nil {
		c.io.Unlock()
		c.log.Warn("policy counters", "err", err)
		ch <- prometheus.NewInvalidMetric(c.packets, err)
		return
	}
	c.mu.Lock()
	sums := make(map[policyKey][2]uint64, len(c.retired))
	for k, v := range c.retired {
		sums[k] = v
	}
	// Every rule of a programmed policy makes its series, zero or not, so
	// that rate() has a start.
	for _, rc := range counts {
		if k, ok := c.key(rc.Chain, rc.Rule); ok {
			v := sums[k]
			sums[k] = [2]uint64{v[0] + rc.Packets, v[1] + rc.Bytes}
		}
	}
	c.mu.Unlock()
	c.io.Unlock()
	for k, v := range sums {
		ch <- prometheus.MustNewConstMetric(c.packets, prometheus.CounterValue, float64(v[0]), k.labels()...)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, float64(v[1]), k.labels()...)
	}
}
