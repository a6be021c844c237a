package calc

import (
	"cmp"
	"crypto/sha256"
	"encoding/base32"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/margay-dev/margay/api"
)

// Policy is the network policy a node enforces, and every node's endpoints:
// a rule's selector matches the addresses of endpoints anywhere.
type Policy struct {
	Tiers     []*api.Tier
	Policies  []*api.NetworkPolicy
	Globals   []*api.GlobalNetworkPolicy
	Endpoints []*api.WorkloadEndpoint // every node's
}

// Policy chains and the marks they pass verdicts with. The marks are above
// kube-proxy's 0x4000 and 0x8000.
const (
	ChainFromEP = "MGY-FROM-EP" // dispatches egress by the pod's interface
	ChainToEP   = "MGY-TO-EP"   // dispatches ingress by the pod's interface
	MarkAccept  = 0x10000
	MarkPass    = 0x20000

	epEgressPrefix  = "MGY-FW-" // + interface: the pod's egress (from workload)
	epIngressPrefix = "MGY-TW-" // + interface: the pod's ingress (to workload)
	polPrefixIn     = "MGY-PI-" // + hash: one policy's ingress rules
	polPrefixOut    = "MGY-PE-" // + hash: one policy's egress rules
	setSelPrefix    = "mgy-s-"  // + hash: the addresses a selector matches
	setNetPrefix    = "mgy-n-"  // + hash: a rule's nets
	setPortPrefix   = "mgy-p-"  // + hash: address,protocol:port of a named port
)

var (
	clearMarks = []string{"-j", "MARK", "--set-xmark", mark(0, MarkAccept|MarkPass)}
	setAccept  = []string{"-j", "MARK", "--set-xmark", mark(MarkAccept, MarkAccept)}
	setPass    = []string{"-j", "MARK", "--set-xmark", mark(MarkPass, MarkPass)}
	ifAccepted = []string{"-m", "mark", "--mark", mark(MarkAccept, MarkAccept)}
	ifNotPass  = []string{"-m", "mark", "--mark", mark(0, MarkPass)}
)

func mark(v, m int) string { return fmt.Sprintf("%#x/%#x", v, m) }

// PolicyRef names a policy in a rule's comment and in reports.
type PolicyRef struct {
	Kind, Namespace, Name, Tier string
}

func (r PolicyRef) String() string {
	if r.Namespace != "" {
		return r.Kind + " " + r.Namespace + "/" + r.Name
	}
	return r.Kind + " " + r.Name
}

// policy is one NetworkPolicy or GlobalNetworkPolicy, parsed.
type policy struct {
	ref      PolicyRef
	spec     *api.PolicySpec
	tierRank int // position of its tier
	selector api.Selector
	nsSel    api.Selector // nil for none
}

// endpointInfo is what selectors see of an endpoint.
type endpointInfo struct {
	namespace string
	labels    map[string]string
	nsLabels  map[string]string
}

func infoOf(w *api.WorkloadEndpoint) endpointInfo {
	ns := map[string]string{}
	for k, v := range w.Metadata.Labels {
		if after, ok := strings.CutPrefix(k, api.NamespaceLabelPrefix); ok {
			ns[after] = v
		}
	}
	return endpointInfo{namespace: w.Spec.Namespace, labels: w.Metadata.Labels, nsLabels: ns}
}

// selects tells whether the policy applies to the endpoint.
func (p *policy) selects(ep endpointInfo) bool {
	if p.ref.Namespace != "" && ep.namespace != p.ref.Namespace {
		return false
	}
	return p.selector.Matches(ep.labels) && (p.nsSel == nil || p.nsSel.Matches(ep.nsLabels))
}

// AppliedTo lists the policies that apply to an endpoint, in the order they
// are evaluated. It is what margayctl shows; Compute decides the same.
func AppliedTo(pol Policy, w *api.WorkloadEndpoint) []PolicyRef {
	pols, _ := sortedPolicies(pol)
	info := infoOf(w)
	var refs []PolicyRef
	for _, p := range pols {
		if p.selects(info) {
			refs = append(refs, p.ref)
		}
	}
	return refs
}

// policyPlan is what the policy part of Compute decides.
type policyPlan struct {
	chains, chains6 []Chain // iptables' and ip6tables'
	sets            []IPSet // of both families
	problems        []string
	// Applied lists, per local endpoint, the policies that apply to it.
	applied map[string][]PolicyRef
	// policyChains names the policy of each policy chain.
	policyChains map[string]PolicyChain
}

// PolicyChain is what a policy chain is the rules of.
type PolicyChain struct {
	Policy    PolicyRef
	Direction api.PolicyType
}

// RuleAction is the action of a rule of a policy chain, as written in its
// policy, or "" for a rule that is not one of the policy's (the RETURN after
// a verdict).
func RuleAction(rule []string) api.Action {
	j := slices.Index(rule, "-j")
	if j < 0 || j+1 >= len(rule) {
		return ""
	}
	switch verdict := rule[j:]; {
	case verdict[1] == "DROP":
		return api.ActionDeny
	case verdict[1] == "LOG":
		return api.ActionLog
	case slices.Equal(verdict, setAccept):
		return api.ActionAllow
	case slices.Equal(verdict, setPass):
		return api.ActionPass
	}
	return ""
}

// sortedPolicies parses the policies and sorts them in evaluation order: by
// tier, then order, then kind and name. A policy that does not parse (the
// datastore validates, so only a corrupt one) is reported and left out.
func sortedPolicies(pol Policy) ([]*policy, []string) {
	tiers := slices.Clone(pol.Tiers)
	slices.SortFunc(tiers, func(a, b *api.Tier) int {
		return cmp.Or(cmp.Compare(orderOf(a.Spec.Order), orderOf(b.Spec.Order)), strings.Compare(a.Metadata.Name, b.Metadata.Name))
	})
	rank := map[string]int{}
	for i, t := range tiers {
		rank[t.Metadata.Name] = i
	}
	rank[api.DefaultTier] = len(tiers)
	var problems []string
	var out []*policy
	add := func(ref PolicyRef, spec *api.PolicySpec) {
		ref.Tier = cmp.Or(spec.Tier, api.DefaultTier)
		r, ok := rank[ref.Tier]
		if !ok {
			// Enforced rather than ignored, which could open traffic: after
			// the default tier, among the other missing tiers by name.
			problems = append(problems, fmt.Sprintf("%s names tier %q, which does not exist; it is enforced after the default tier: create the Tier", ref, ref.Tier))
			r = len(tiers) + 1
		}
		sel, err := api.ParseSelector(spec.Selector)
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s is left out: spec.selector: %v", ref, err))
			return
		}
		p := &policy{ref: ref, spec: spec, tierRank: r, selector: sel}
		if spec.NamespaceSelector != "" {
			if p.nsSel, err = api.ParseSelector(spec.NamespaceSelector); err != nil {
				problems = append(problems, fmt.Sprintf("%s is left out: spec.namespaceSelector: %v", ref, err))
				return
			}
		}
		out = append(out, p)
	}
	for _, p := range pol.Policies {
		add(PolicyRef{Kind: api.KindNetworkPolicy, Namespace: p.Metadata.Namespace, Name: p.Metadata.Name}, &p.Spec)
	}
	for _, p := range pol.Globals {
		add(PolicyRef{Kind: api.KindGlobalNetworkPolicy, Name: p.Metadata.Name}, &p.Spec)
	}
	slices.SortFunc(out, func(a, b *policy) int {
		return cmp.Or(cmp.Compare(a.tierRank, b.tierRank), strings.Compare(a.ref.Tier, b.ref.Tier),
			cmp.Compare(a.spec.OrderValue(), b.spec.OrderValue()),
			strings.Compare(a.ref.Kind, b.ref.Kind), strings.Compare(a.ref.Namespace, b.ref.Namespace),
			strings.Compare(a.ref.Name, b.ref.Name))
	})
	return out, problems
}

func orderOf(o *float64) float64 {
	if o == nil {
		return (&api.PolicySpec{}).OrderValue()
	}
	return *o
}

// policyRules decides the policy chains of the local endpoints and the
// ipsets their rules match on, for each family. Each endpoint has an ingress
// and an egress chain; each policy that applies to some local endpoint has a
// chain per direction, shared by the endpoints. A verdict leaves a chain as a
// mark: MarkAccept, or MarkPass to skip the rest of a tier; a Deny drops at
// once. The families' chains differ only in their ipsets and in the rules
// that can match one family alone.
func policyRules(local []Endpoint, pol Policy) policyPlan {
	plan := policyPlan{applied: map[string][]PolicyRef{}, policyChains: map[string]PolicyChain{}}
	pols, problems := sortedPolicies(pol)
	plan.problems = problems
	infos := make(map[string]endpointInfo, len(pol.Endpoints))
	for _, w := range pol.Endpoints {
		infos[w.Metadata.Name] = infoOf(w)
	}
	b4 := &setBuilder{family: ipv4, endpoints: pol.Endpoints, infos: infos, sets: map[string]*IPSet{}}
	b6 := &setBuilder{family: ipv6, endpoints: pol.Endpoints, infos: infos, sets: map[string]*IPSet{}}
	used := map[*policy]bool{}
	dispatchOut := Chain{Table: "filter", Name: ChainFromEP}
	dispatchIn := Chain{Table: "filter", Name: ChainToEP}
	var epChains []Chain
	for _, ep := range local {
		info := infos[ep.Name]
		var mine []*policy
		for _, p := range pols {
			if p.selects(info) { // as AppliedTo
				mine = append(mine, p)
				plan.applied[ep.Name] = append(plan.applied[ep.Name], p.ref)
				used[p] = true
			}
		}
		for _, dir := range []api.PolicyType{api.PolicyIngress, api.PolicyEgress} {
			name, dispatch, flag := epIngressPrefix+ep.Interface, &dispatchIn, "-o"
			if dir == api.PolicyEgress {
				name, dispatch, flag = epEgressPrefix+ep.Interface, &dispatchOut, "-i"
			}
			epChains = append(epChains, Chain{Table: "filter", Name: name, Rules: endpointChain(mine, dir)})
			dispatch.Rules = append(dispatch.Rules, []string{flag, ep.Interface, "-g", name})
		}
	}
	for _, p := range pols {
		if !used[p] {
			continue
		}
		for _, dir := range []api.PolicyType{api.PolicyIngress, api.PolicyEgress} {
			if !p.spec.Applies(dir) {
				continue
			}
			rules, probs := b4.policyChain(p, dir)
			rules6, probs6 := b6.policyChain(p, dir)
			plan.problems = append(plan.problems, probs...)
			for _, pr := range probs6 { // mostly the same: a rule's error is the family's only when the other skips the rule
				if !slices.Contains(probs, pr) {
					plan.problems = append(plan.problems, pr)
				}
			}
			name := policyChainName(p.ref, dir)
			plan.chains = append(plan.chains, Chain{Table: "filter", Name: name, Rules: rules})
			plan.chains6 = append(plan.chains6, Chain{Table: "filter", Name: name, Rules: rules6})
			plan.policyChains[name] = PolicyChain{Policy: p.ref, Direction: dir}
		}
	}
	plan.chains = append(plan.chains, epChains...)
	plan.chains = append(plan.chains, dispatchOut, dispatchIn)
	plan.chains6 = append(plan.chains6, epChains...)
	plan.chains6 = append(plan.chains6, dispatchOut, dispatchIn)
	for _, b := range []*setBuilder{b4, b6} {
		for _, s := range b.sets {
			slices.SortFunc(s.Members, comparePrefix)
			s.Members = slices.Compact(s.Members)
			slices.SortFunc(s.Ports, compareIPPort)
			s.Ports = slices.Compact(s.Ports)
			plan.sets = append(plan.sets, *s)
		}
	}
	slices.SortFunc(plan.sets, func(a, b IPSet) int { return strings.Compare(a.Name, b.Name) })
	return plan
}

// endpointChain is one endpoint's chain for one direction: its policies of
// that direction, tier by tier. A tier that has policies for the endpoint
// but allows nothing drops; one that passes goes on; after the last tier, or
// with no policy at all, the packet is accepted, as Kubernetes does.
func endpointChain(mine []*policy, dir api.PolicyType) [][]string {
	rules := [][]string{clearMarks}
	for i := 0; i < len(mine); {
		j := i
		for j < len(mine) && mine[j].tierRank == mine[i].tierRank && mine[j].ref.Tier == mine[i].ref.Tier {
			j++
		}
		tier := mine[i].ref.Tier
		n := 0
		for _, p := range mine[i:j] {
			if !p.spec.Applies(dir) {
				continue
			}
			n++
			rules = append(rules,
				concat(ifNotPass, []string{"-j", policyChainName(p.ref, dir)}),
				concat(ifAccepted, []string{"-j", "RETURN"}))
		}
		if n > 0 {
			rules = append(rules,
				concat(ifNotPass, comment(fmt.Sprintf("margay: no %s policy of tier %s allowed it", strings.ToLower(string(dir)), tier)), []string{"-j", "DROP"}),
				[]string{"-j", "MARK", "--set-xmark", mark(0, MarkPass)})
		}
		i = j
	}
	return append(rules, setAccept, []string{"-j", "RETURN"})
}

func policyChainName(r PolicyRef, dir api.PolicyType) string {
	prefix := polPrefixIn
	if dir == api.PolicyEgress {
		prefix = polPrefixOut
	}
	return prefix + shortHash(r.Kind, r.Namespace, r.Name)
}

// shortHash names a chain or set after what it is for: iptables allows 28
// characters in a chain name and ipset 31 in a set name.
func shortHash(parts ...string) string {
	h := sha256.Sum256([]byte(strings.Join(parts, "\x00")))
	return strings.ToLower(base32.StdEncoding.EncodeToString(h[:])[:16])
}

func comment(s string) []string { return []string{"-m", "comment", "--comment", s} }

func concat(parts ...[]string) []string {
	var out []string
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// setBuilder makes the ipsets of one family that rules match on, one per
// distinct selector or list of nets, shared by every rule that uses it.
type setBuilder struct {
	family    family
	endpoints []*api.WorkloadEndpoint
	infos     map[string]endpointInfo
	sets      map[string]*IPSet
}

// entitySelector is what an entity rule's selectors select: endpoints in
// namespace ns ("" for any) whose labels sel matches and whose namespace's
// labels nsSel matches (nil for any). A namespaceSelector lifts the
// confinement to ns, which is the policy's own ("" for a global one).
type entitySelector struct {
	ns         string
	sel, nsSel api.Selector
}

func parseEntity(ns string, e *api.EntityRule) (entitySelector, error) {
	es := entitySelector{ns: ns}
	if e.NamespaceSelector != "" {
		es.ns = ""
	}
	var err error
	if es.sel, err = api.ParseSelector(e.Selector); err != nil {
		return es, fmt.Errorf("selector: %v", err)
	}
	if e.NamespaceSelector != "" {
		if es.nsSel, err = api.ParseSelector(e.NamespaceSelector); err != nil {
			return es, fmt.Errorf("namespaceSelector: %v", err)
		}
	}
	return es, nil
}

func (es entitySelector) key() string {
	return es.ns + "\x00" + es.sel.String() + "\x00" + fmt.Sprint(es.nsSel)
}

func (es entitySelector) matches(info endpointInfo) bool {
	return (es.ns == "" || info.namespace == es.ns) && es.sel.Matches(info.labels) && (es.nsSel == nil || es.nsSel.Matches(info.nsLabels))
}

// selected calls f for every endpoint es selects.
func (b *setBuilder) selected(es entitySelector, f func(*api.WorkloadEndpoint)) {
	for _, w := range b.endpoints {
		if es.matches(b.infos[w.Metadata.Name]) {
			f(w)
		}
	}
}

// addrs are an endpoint's addresses of the builder's family.
func (b *setBuilder) addrs(w *api.WorkloadEndpoint) []netip.Prefix {
	var out []netip.Prefix
	for _, n := range w.Spec.IPNetworks {
		if p, err := netip.ParsePrefix(n); err == nil && b.family.has(p.Addr()) {
			out = append(out, p.Masked())
		}
	}
	return out
}

// newSet makes a set of the builder's family, named after what it is for.
func (b *setBuilder) newSet(prefix, typ string, what ...string) (*IPSet, bool) {
	name := b.family.set(prefix + shortHash(what...))
	if s, ok := b.sets[name]; ok {
		return s, false
	}
	s := &IPSet{Name: name, Type: typ, IPv6: b.family.v6}
	b.sets[name] = s
	return s, true
}

// selectorSet is the set of the addresses of the endpoints an entity rule's
// selectors match.
func (b *setBuilder) selectorSet(es entitySelector) string {
	s, fresh := b.newSet(setSelPrefix, "hash:net", "sel", es.key())
	if fresh {
		b.selected(es, func(w *api.WorkloadEndpoint) { s.Members = append(s.Members, b.addrs(w)...) })
	}
	return s.Name
}

// namedPortSet is the set of address,protocol:port of the port called name
// on each endpoint the entity selects: a named port means the port of that
// name on whichever endpoint a packet goes to.
func (b *setBuilder) namedPortSet(es entitySelector, proto uint8, name string) string {
	s, fresh := b.newSet(setPortPrefix, "hash:ip,port", "port", es.key(), strconv.Itoa(int(proto)), name)
	if !fresh {
		return s.Name
	}
	b.selected(es, func(w *api.WorkloadEndpoint) {
		for _, p := range w.Spec.Ports {
			if p.Name != name || p.Protocol.Num() != proto {
				continue
			}
			for _, a := range b.addrs(w) {
				s.Ports = append(s.Ports, IPPort{Addr: a.Addr(), Proto: proto, Port: p.Port})
			}
		}
	})
	return s.Name
}

// netSet is the set of the nets of a list of the builder's family; ok is
// false when it has none.
func (b *setBuilder) netSet(nets []string) (string, bool) {
	var ps []netip.Prefix
	for _, n := range nets {
		if p, err := netip.ParsePrefix(n); err == nil && b.family.has(p.Addr()) {
			ps = append(ps, p.Masked())
		}
	}
	if len(ps) == 0 {
		return "", false
	}
	slices.SortFunc(ps, comparePrefix)
	ps = slices.Compact(ps)
	var key []string
	for _, p := range ps {
		key = append(key, p.String())
	}
	s, fresh := b.newSet(setNetPrefix, "hash:net", append([]string{"nets"}, key...)...)
	if fresh {
		s.Members = ps
	}
	return s.Name, true
}

// policyChain renders one policy's rules for one direction.
func (b *setBuilder) policyChain(p *policy, dir api.PolicyType) ([][]string, []string) {
	rules := p.spec.Ingress
	field := "ingress"
	if dir == api.PolicyEgress {
		rules, field = p.spec.Egress, "egress"
	}
	var out [][]string
	var problems []string
	for i := range rules {
		why := fmt.Sprintf("%s %s[%d]", p.ref, field, i)
		matches, err := b.matches(p.ref.Namespace, &rules[i])
		if err != nil {
			problems = append(problems, fmt.Sprintf("%s is left out: %v", why, err))
			continue
		}
		for _, m := range matches {
			m = concat(m, comment(why))
			switch rules[i].Action {
			case api.ActionAllow:
				out = append(out, concat(m, setAccept), concat(ifAccepted, []string{"-j", "RETURN"}))
			case api.ActionDeny:
				out = append(out, concat(m, []string{"-j", "DROP"}))
			case api.ActionPass:
				out = append(out, concat(m, setPass), concat(ifPassed, []string{"-j", "RETURN"}))
			case api.ActionLog:
				out = append(out, concat(m, []string{"-j", "LOG", "--log-prefix", logPrefix(p.ref)}))
			}
		}
	}
	return out, problems
}

// ifPassed matches a packet that a Pass rule marked.
var ifPassed = []string{"-m", "mark", "--mark", mark(MarkPass, MarkPass)}

// logPrefix is at most 29 characters, as the LOG target allows.
func logPrefix(r PolicyRef) string {
	s := "margay " + r.Name
	if len(s) > 28 {
		s = s[:28]
	}
	return s + " "
}

// maxMultiport is how many ports, a range counting twice, one multiport
// match takes.
const maxMultiport = 15

// matches renders a rule's match part. A rule can need several iptables
// rules: more ports than one multiport match takes, or named ports beside
// numbered ones. None at all means the rule can match no packet of the
// builder's family: its nets are all of the other, or its protocol is the
// other's ICMP.
func (b *setBuilder) matches(ns string, r *api.Rule) ([][]string, error) {
	var base []string
	var proto uint8
	if r.Protocol != nil && otherICMP[b.family.v6] == r.Protocol.Num() {
		return nil, nil
	}
	if r.Protocol != nil {
		base = append(base, "-p", iptProtocol(*r.Protocol))
		proto = r.Protocol.Num()
	}
	if r.NotProtocol != nil {
		base = append(base, "!", "-p", iptProtocol(*r.NotProtocol))
	}
	dports := [][]string{nil}
	sports := [][]string{nil}
	for _, side := range []struct {
		e     *api.EntityRule
		dir   string
		ports *[][]string
		flag  string
	}{{&r.Source, "src", &sports, "--sports"}, {&r.Destination, "dst", &dports, "--dports"}} {
		e := side.e
		es, err := parseEntity(ns, e)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", side.dir, err)
		}
		if e.HasSelector() {
			base = append(base, "-m", "set", "--match-set", b.selectorSet(es), side.dir)
		}
		if len(e.Nets) > 0 {
			name, ok := b.netSet(e.Nets)
			if !ok {
				return nil, nil
			}
			base = append(base, "-m", "set", "--match-set", name, side.dir)
		}
		if name, ok := b.netSet(e.NotNets); ok {
			base = append(base, "-m", "set", "!", "--match-set", name, side.dir)
		}
		// Named ports are destination ports only (api validates).
		if len(e.Ports) > 0 {
			*side.ports = nil
			for _, c := range portChunks(e.Ports) {
				*side.ports = append(*side.ports, []string{"-m", "multiport", side.flag, c})
			}
			for _, p := range e.Ports {
				if p.Name != "" {
					*side.ports = append(*side.ports, []string{"-m", "set", "--match-set", b.namedPortSet(es, proto, p.Name), "dst,dst"})
				}
			}
		}
		for _, c := range portChunks(e.NotPorts) {
			base = append(base, "-m", "multiport", "!", side.flag, c)
		}
		for _, p := range e.NotPorts {
			if p.Name != "" {
				base = append(base, "-m", "set", "!", "--match-set", b.namedPortSet(es, proto, p.Name), "dst,dst")
			}
		}
	}
	var out [][]string
	for _, s := range sports {
		for _, d := range dports {
			out = append(out, concat(base, s, d))
		}
	}
	return out, nil
}

// otherICMP is, by family (IPv6 or not), the ICMP of the other family.
var otherICMP = map[bool]uint8{false: 58, true: 1}

// portChunks writes numbered ports as multiport lists of at most
// maxMultiport entries, leaving out named ports.
func portChunks(ports []api.Port) []string {
	var out []string
	var cur []string
	n := 0
	for _, p := range ports {
		if p.Name != "" {
			continue
		}
		w := 1
		s := strconv.Itoa(int(p.Min))
		if p.Max != p.Min {
			w, s = 2, s+":"+strconv.Itoa(int(p.Max))
		}
		if n+w > maxMultiport {
			out = append(out, strings.Join(cur, ","))
			cur, n = nil, 0
		}
		cur = append(cur, s)
		n += w
	}
	if len(cur) > 0 {
		out = append(out, strings.Join(cur, ","))
	}
	return out
}

// iptProtocol is a protocol as iptables-save prints it: by name for the ones
// iptables knows without /etc/protocols, otherwise by number.
func iptProtocol(p api.Protocol) string {
	switch n := p.Num(); n {
	case 1:
		return "icmp"
	case 6:
		return "tcp"
	case 17:
		return "udp"
	case 132:
		return "sctp"
	case 136:
		return "udplite"
	case 58:
		return "ipv6-icmp"
	default:
		return strconv.Itoa(int(n))
	}
}
