package api

import (
	"encoding/json"
	"fmt"
	"math"
	"net/netip"
	"strconv"
	"strings"
)

// Kinds of the policy resources.
const (
	KindNetworkPolicy       = "NetworkPolicy"
	KindGlobalNetworkPolicy = "GlobalNetworkPolicy"
	KindTier                = "Tier"
)

// Labels margay gives every Kubernetes WorkloadEndpoint (as Calico's
// projectcalico.org/namespace and pcns.): its namespace, and its namespace's
// labels under a prefix, so that a namespaceSelector is a selector on the
// endpoint.
const (
	LabelNamespace       = "margay.dev/namespace"
	NamespaceLabelPrefix = "margay.ns."
)

// DefaultTier is the tier of a policy that names none. It need not exist, and
// it comes after every Tier resource, as Calico's default tier does.
const DefaultTier = "default"

// PolicyType is a direction a policy applies to.
type PolicyType string

// Policy types.
const (
	PolicyIngress PolicyType = "Ingress"
	PolicyEgress  PolicyType = "Egress"
)

// Action is what a rule does with the packets it matches.
type Action string

// Rule actions, as in Calico. Log logs and goes on to the next rule; Pass
// skips the rest of the tier.
const (
	ActionAllow Action = "Allow"
	ActionDeny  Action = "Deny"
	ActionLog   Action = "Log"
	ActionPass  Action = "Pass"
)

// NetworkPolicy selects endpoints of one namespace and says what traffic they
// may send and receive. Its selectors without a namespaceSelector select in
// its namespace only.
type NetworkPolicy struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta `json:"metadata"`
	Spec     PolicySpec `json:"spec"`
}

// GlobalNetworkPolicy is a NetworkPolicy over every namespace.
type GlobalNetworkPolicy struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta `json:"metadata"`
	Spec     PolicySpec `json:"spec"`
}

// PolicySpec is the shared spec of NetworkPolicy and GlobalNetworkPolicy.
type PolicySpec struct {
	// Tier names the Tier the policy is in; "" is the default tier.
	Tier string `json:"tier,omitempty"`
	// Order sorts policies within a tier, lowest first; a policy without one
	// comes after those with one. Ties are broken by name.
	Order    *float64     `json:"order,omitempty"`
	Selector string       `json:"selector,omitempty"`
	Types    []PolicyType `json:"types,omitempty"`
	Ingress  []Rule       `json:"ingress,omitempty"`
	Egress   []Rule       `json:"egress,omitempty"`
	// NamespaceSelector (GlobalNetworkPolicy only) narrows the endpoints the
	// policy applies to by their namespace's labels.
	NamespaceSelector string `json:"namespaceSelector,omitempty"`
	// Calico's untracked, pre-DNAT and host forwarding policy are host
	// endpoint features margay does not have: they are refused, not ignored.
	DoNotTrack     bool `json:"doNotTrack,omitempty"`
	PreDNAT        bool `json:"preDNAT,omitempty"`
	ApplyOnForward bool `json:"applyOnForward,omitempty"`
}

// Rule matches packets and applies its action to them.
type Rule struct {
	Action      Action     `json:"action"`
	Protocol    *Protocol  `json:"protocol,omitempty"`
	NotProtocol *Protocol  `json:"notProtocol,omitempty"`
	Source      EntityRule `json:"source,omitempty"`
	Destination EntityRule `json:"destination,omitempty"`
}

// EntityRule matches one end of a packet. Every field set must match, and an
// empty one matches everything.
type EntityRule struct {
	// Selector selects endpoints by their labels; NamespaceSelector by their
	// namespace's labels. In a NetworkPolicy, a Selector without a
	// NamespaceSelector selects in the policy's namespace only; a
	// NamespaceSelector alone selects every endpoint of the namespaces it
	// selects. In a GlobalNetworkPolicy a Selector alone selects in every
	// namespace. A rule with either matches endpoints' addresses only.
	Selector          string   `json:"selector,omitempty"`
	NamespaceSelector string   `json:"namespaceSelector,omitempty"`
	Nets              []string `json:"nets,omitempty"`
	NotNets           []string `json:"notNets,omitempty"`
	Ports             []Port   `json:"ports,omitempty"`
	NotPorts          []Port   `json:"notPorts,omitempty"`
}

// HasSelector tells whether the rule matches endpoints rather than any address.
func (e *EntityRule) HasSelector() bool { return e.Selector != "" || e.NamespaceSelector != "" }

// Protocol is an IP protocol, by name (TCP, UDP, ICMP, SCTP, UDPLite, ICMPv6)
// or by number.
type Protocol struct {
	Name   string // canonical name, or ""
	Number uint8  // set when Name is ""
}

var protocolNumbers = map[string]uint8{"TCP": 6, "UDP": 17, "ICMP": 1, "SCTP": 132, "UDPLite": 136, "ICMPv6": 58}

// ProtocolFromName returns a named protocol; ok is false for an unknown name.
func ProtocolFromName(s string) (Protocol, bool) {
	for n := range protocolNumbers {
		if strings.EqualFold(n, s) {
			return Protocol{Name: n}, true
		}
	}
	return Protocol{}, false
}

// Num is the protocol's number.
func (p Protocol) Num() uint8 {
	if p.Name != "" {
		return protocolNumbers[p.Name]
	}
	return p.Number
}

// HasPorts tells whether the protocol has ports to match on.
func (p Protocol) HasPorts() bool {
	switch p.Num() {
	case 6, 17, 132, 136:
		return true
	}
	return false
}

func (p Protocol) String() string {
	if p.Name != "" {
		return p.Name
	}
	return strconv.Itoa(int(p.Number))
}

// MarshalJSON implements json.Marshaler.
func (p Protocol) MarshalJSON() ([]byte, error) {
	if p.Name != "" {
		return json.Marshal(p.Name)
	}
	return json.Marshal(p.Number)
}

// UnmarshalJSON implements json.Unmarshaler.
func (p *Protocol) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if n, err := strconv.Atoi(s); err == nil {
		if n < 1 || n > 255 {
			return fmt.Errorf("protocol %d is out of range: use 1 to 255 or a name (TCP, UDP, ICMP, SCTP, UDPLite, ICMPv6)", n)
		}
		*p = Protocol{Number: uint8(n)}
		return nil
	}
	if q, ok := ProtocolFromName(s); ok && b[0] == '"' {
		*p = q
		return nil
	}
	return fmt.Errorf("protocol %s: use TCP, UDP, ICMP, SCTP, UDPLite, ICMPv6 or a number from 1 to 255", b)
}

// Port is a port number, a range "min:max", or the name of a port of the
// destination endpoint.
type Port struct {
	Min, Max uint16
	Name     string
}

func (p Port) String() string {
	switch {
	case p.Name != "":
		return p.Name
	case p.Min == p.Max:
		return strconv.Itoa(int(p.Min))
	}
	return fmt.Sprintf("%d:%d", p.Min, p.Max)
}

// MarshalJSON implements json.Marshaler.
func (p Port) MarshalJSON() ([]byte, error) {
	if p.Name == "" && p.Min == p.Max {
		return json.Marshal(p.Min)
	}
	return json.Marshal(p.String())
}

// UnmarshalJSON implements json.Unmarshaler.
func (p *Port) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	bad := fmt.Errorf("port %s: use a number from 0 to 65535, a range such as \"8000:8080\", or a port name", b)
	num := func(s string) (uint16, bool) {
		n, err := strconv.ParseUint(s, 10, 16)
		return uint16(n), err == nil
	}
	if lo, hi, ok := strings.Cut(s, ":"); ok {
		a, ok1 := num(lo)
		z, ok2 := num(hi)
		if !ok1 || !ok2 || b[0] != '"' {
			return bad
		}
		if a > z {
			return fmt.Errorf("port range %s: the first port must not be above the second", s)
		}
		*p = Port{Min: a, Max: z}
		return nil
	}
	if n, ok := num(s); ok {
		*p = Port{Min: n, Max: n}
		return nil
	}
	if b[0] != '"' {
		return bad
	}
	if !ValidPortName(s) {
		return fmt.Errorf("port name %q: use at most 15 lower-case letters, digits and '-', with at least one letter", s)
	}
	*p = Port{Name: s}
	return nil
}

// ValidPortName tells whether s may name a port, as a Kubernetes container
// port's name may (IANA_SVC_NAME).
func ValidPortName(s string) bool {
	letter := false
	for i, c := range s {
		switch {
		case c >= 'a' && c <= 'z':
			letter = true
		case c >= '0' && c <= '9':
		case c == '-' && i > 0 && i < len(s)-1 && s[i-1] != '-':
		default:
			return false
		}
	}
	return letter && len(s) <= 15
}

// NewNetworkPolicy returns an empty NetworkPolicy in namespace ns.
func NewNetworkPolicy(ns, name string) *NetworkPolicy {
	return &NetworkPolicy{TypeMeta: typeMeta(KindNetworkPolicy), Metadata: ObjectMeta{Namespace: ns, Name: name}}
}

// NewGlobalNetworkPolicy returns an empty GlobalNetworkPolicy.
func NewGlobalNetworkPolicy(name string) *GlobalNetworkPolicy {
	return &GlobalNetworkPolicy{TypeMeta: typeMeta(KindGlobalNetworkPolicy), Metadata: ObjectMeta{Name: name}}
}

// GetMetadata implements Resource.
func (p *NetworkPolicy) GetMetadata() *ObjectMeta { return &p.Metadata }

// GetMetadata implements Resource.
func (p *GlobalNetworkPolicy) GetMetadata() *ObjectMeta { return &p.Metadata }

// SetDefaults implements Resource. The namespace is not defaulted here:
// who writes the policy gives it (margayctl -n, default DefaultNamespace),
// so that a file's policy without one can take the command line's.
func (p *NetworkPolicy) SetDefaults() { p.Spec.setDefaults() }

// SetDefaults implements Resource.
func (p *GlobalNetworkPolicy) SetDefaults() { p.Spec.setDefaults() }

// setDefaults fills types as Calico does: Ingress, plus Egress when there are
// egress rules, and Egress alone when there are only egress rules.
func (s *PolicySpec) setDefaults() {
	if s.Types != nil {
		return
	}
	switch {
	case len(s.Egress) > 0 && len(s.Ingress) == 0:
		s.Types = []PolicyType{PolicyEgress}
	case len(s.Egress) > 0:
		s.Types = []PolicyType{PolicyIngress, PolicyEgress}
	default:
		s.Types = []PolicyType{PolicyIngress}
	}
}

// Validate implements Resource.
func (p *NetworkPolicy) Validate() error {
	var e errs
	e.checkMeta(KindNetworkPolicy, &p.TypeMeta, &p.Metadata)
	if p.Spec.NamespaceSelector != "" {
		e.add("spec.namespaceSelector", p.Spec.NamespaceSelector, "is for GlobalNetworkPolicy; a NetworkPolicy applies in its own namespace")
	}
	p.Spec.validate(&e)
	return e.result(p)
}

// Validate implements Resource.
func (p *GlobalNetworkPolicy) Validate() error {
	var e errs
	e.checkMeta(KindGlobalNetworkPolicy, &p.TypeMeta, &p.Metadata)
	p.Spec.validate(&e)
	return e.result(p)
}

// Applies tells whether the policy has rules for direction t.
func (s *PolicySpec) Applies(t PolicyType) bool {
	for _, x := range s.Types {
		if x == t {
			return true
		}
	}
	return false
}

// OrderValue is the policy's order, with an unset one last.
func (s *PolicySpec) OrderValue() float64 {
	if s.Order == nil {
		return math.Inf(1)
	}
	return *s.Order
}

func (s *PolicySpec) validate(e *errs) {
	if s.Tier != "" && !nameRE.MatchString(s.Tier) {
		e.add("spec.tier", s.Tier, "must be the name of a Tier")
	}
	if s.Order != nil && (math.IsNaN(*s.Order) || math.IsInf(*s.Order, 0)) {
		e.add("spec.order", *s.Order, "must be a finite number")
	}
	e.checkSelector("spec.selector", s.Selector)
	e.checkSelector("spec.namespaceSelector", s.NamespaceSelector)
	seen := map[PolicyType]bool{}
	for _, t := range s.Types {
		if t != PolicyIngress && t != PolicyEgress {
			e.add("spec.types", t, "must be Ingress or Egress")
		} else if seen[t] {
			e.add("spec.types", t, "is listed twice")
		}
		seen[t] = true
	}
	if len(s.Ingress) > 0 && !seen[PolicyIngress] {
		e.add("spec.ingress", nil, "has rules, but spec.types lacks Ingress, so they would never apply")
	}
	if len(s.Egress) > 0 && !seen[PolicyEgress] {
		e.add("spec.egress", nil, "has rules, but spec.types lacks Egress, so they would never apply")
	}
	for field, on := range map[string]bool{"spec.doNotTrack": s.DoNotTrack, "spec.preDNAT": s.PreDNAT, "spec.applyOnForward": s.ApplyOnForward} {
		if on {
			e.add(field, true, "is not supported: margay has no host endpoints, and policy applies to workloads only")
		}
	}
	for i := range s.Ingress {
		s.Ingress[i].validate(e, fmt.Sprintf("spec.ingress[%d]", i))
	}
	for i := range s.Egress {
		s.Egress[i].validate(e, fmt.Sprintf("spec.egress[%d]", i))
	}
}

func (r *Rule) validate(e *errs, field string) {
	switch r.Action {
	case ActionAllow, ActionDeny, ActionLog, ActionPass:
	case "":
		e.add(field+".action", nil, "is required: Allow, Deny, Log or Pass")
	default:
		e.add(field+".action", r.Action, "must be Allow, Deny, Log or Pass")
	}
	if r.Protocol != nil && r.NotProtocol != nil && r.Protocol.Num() == r.NotProtocol.Num() {
		e.add(field+".notProtocol", r.NotProtocol, "equals protocol, so the rule can never match")
	}
	ports := r.Protocol != nil && r.Protocol.HasPorts()
	for side, ent := range map[string]*EntityRule{"source": &r.Source, "destination": &r.Destination} {
		f := field + "." + side
		e.checkSelector(f+".selector", ent.Selector)
		e.checkSelector(f+".namespaceSelector", ent.NamespaceSelector)
		for _, n := range ent.Nets {
			checkNet(e, f+".nets", n)
		}
		for _, n := range ent.NotNets {
			checkNet(e, f+".notNets", n)
		}
		for name, ps := range map[string][]Port{"ports": ent.Ports, "notPorts": ent.NotPorts} {
			if len(ps) > 0 && !ports {
				e.add(f+"."+name, nil, "needs protocol TCP, UDP, SCTP or UDPLite")
			}
			for _, p := range ps {
				if p.Name != "" && side == "source" {
					e.add(f+"."+name, p.Name, "a named port can only be a destination port")
				}
			}
		}
	}
}

func checkNet(e *errs, field, n string) {
	p, err := netip.ParsePrefix(n)
	if err != nil {
		e.add(field, n, "must be a CIDR such as 10.0.0.0/8")
		return
	}
	if p.Masked() != p {
		e.add(field, n, "has host bits set; write %s", p.Masked())
	}
}

// Tier is an ordered group of policies. Tiers are evaluated lowest order
// first; a policy's Pass goes on to the next tier.
type Tier struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta `json:"metadata"`
	Spec     TierSpec   `json:"spec"`
}

// TierSpec orders a tier.
type TierSpec struct {
	Order *float64 `json:"order,omitempty"`
}

// NewTier returns an empty Tier.
func NewTier(name string) *Tier {
	return &Tier{TypeMeta: typeMeta(KindTier), Metadata: ObjectMeta{Name: name}}
}

// GetMetadata implements Resource.
func (t *Tier) GetMetadata() *ObjectMeta { return &t.Metadata }

// SetDefaults implements Resource.
func (t *Tier) SetDefaults() {}

// Validate implements Resource.
func (t *Tier) Validate() error {
	var e errs
	e.checkMeta(KindTier, &t.TypeMeta, &t.Metadata)
	if t.Metadata.Name == DefaultTier {
		e.add("metadata.name", t.Metadata.Name, "is the implicit default tier, which comes after every Tier; choose another name")
	}
	if t.Spec.Order == nil {
		e.add("spec.order", nil, "is required")
	} else if math.IsNaN(*t.Spec.Order) || math.IsInf(*t.Spec.Order, 0) {
		e.add("spec.order", *t.Spec.Order, "must be a finite number")
	}
	return e.result(t)
}
