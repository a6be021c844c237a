package agent

import (
	"log/slog"
	"strconv"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/felix"
	"github.com/margay-dev/margay/felix/calc"
)

// The policy counters sum a policy's rules by action, keep what a rewrite
// zeroed, and forget a policy once it is gone.
func TestPolicyCounters(t *testing.T) {
	allow := []string{"-m", "comment", "--comment", "NetworkPolicy x/p ingress[0]", "-j", "MARK", "--set-xmark", "0x10000/0x10000"}
	ret := []string{"-m", "mark", "--mark", "0x10000/0x10000", "-j", "RETURN"}
	deny := []string{"-m", "comment", "--comment", "NetworkPolicy x/p ingress[1]", "-j", "DROP"}
	var kernel []felix.RuleCount
	c := newPolicyCounters(slog.New(slog.DiscardHandler), func() ([]felix.RuleCount, error) { return kernel, nil })
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	ref := calc.PolicyRef{Kind: api.KindNetworkPolicy, Namespace: "x", Name: "p", Tier: "default"}
	c.setChains(map[string]calc.PolicyChain{"MGY-PI-p": {Policy: ref, Direction: api.PolicyIngress}})
	kernel = []felix.RuleCount{
		{Chain: "MGY-PI-p", Rule: allow, Packets: 3, Bytes: 300},
		{Chain: "MGY-PI-p", Rule: ret, Packets: 3, Bytes: 300},
		{Chain: "MGY-PI-p", Rule: deny, Packets: 2, Bytes: 100},
		{Chain: "MGY-TW-mgya", Rule: deny, Packets: 9, Bytes: 900}, // no policy's chain
	}
	const head = `# HELP margay_policy_packets_total Packets that the rules of a policy decided on this node (the first of each flow), by the rules' direction and action.
# TYPE margay_policy_packets_total counter
`
	series := func(allowed, denied int) string {
		return head + strings.NewReplacer("A", strconv.Itoa(allowed), "D", strconv.Itoa(denied)).Replace(
			`margay_policy_packets_total{action="allow",direction="ingress",kind="NetworkPolicy",name="p",namespace="x",tier="default"} A
margay_policy_packets_total{action="deny",direction="ingress",kind="NetworkPolicy",name="p",namespace="x",tier="default"} D
`)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(series(3, 2)), "margay_policy_packets_total"); err != nil {
		t.Error(err)
	}
	// The chain is rewritten: its counts go to retired and the kernel's restart.
	for _, rc := range kernel {
		c.reset(rc)
	}
	kernel = []felix.RuleCount{{Chain: "MGY-PI-p", Rule: allow, Packets: 1, Bytes: 100}, {Chain: "MGY-PI-p", Rule: deny}}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(series(4, 2)), "margay_policy_packets_total"); err != nil {
		t.Error(err)
	}
	// The policy is deleted.
	c.setChains(nil)
	kernel = nil
	if n, err := testutil.GatherAndCount(reg, "margay_policy_packets_total"); err != nil || n != 0 {
		t.Errorf("after the policy went: %d series, %v", n, err)
	}
}
