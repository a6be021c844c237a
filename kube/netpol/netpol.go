// Package netpol translates Kubernetes NetworkPolicies into margay's, with
// upstream semantics. It is pure: margay-kube-controllers and `margayctl
// apply` of a networking.k8s.io/v1 file share it, so that the same object
// becomes the same policy either way.
package netpol

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/margay-dev/margay/api"
)

// NamePrefix starts the name of every translated policy, as Calico's
// knp.default.: the controller owns the margay NetworkPolicies so named.
const NamePrefix = "knp.default."

// Order is the order of every translated policy, Calico's for Kubernetes
// policies: after margay policies with a lower order in the default tier.
const Order = 1000.0

// Translate returns the margay NetworkPolicy that enforces np. It refuses,
// rather than approximates, what margay cannot express and what Kubernetes'
// validation would refuse. A np without a namespace (from a file) gets none,
// so that margayctl -n or SetDefaults can give it one, as for a margay
// NetworkPolicy.
func Translate(np *networkingv1.NetworkPolicy) (*api.NetworkPolicy, error) {
	ns := np.Namespace
	if errs := validation.IsDNS1123Label(ns); ns != "" && len(errs) > 0 {
		return nil, fmt.Errorf("metadata.namespace %q: %s", ns, strings.Join(errs, "; "))
	}
	if errs := validation.IsDNS1123Subdomain(np.Name); len(errs) > 0 {
		return nil, fmt.Errorf("metadata.name %q: %s", np.Name, strings.Join(errs, "; "))
	}
	name := NamePrefix + np.Name
	if len(name) > validation.DNS1123SubdomainMaxLength {
		return nil, fmt.Errorf("metadata.name %q: margay names its translation %q, which is longer than %d characters; shorten the name",
			np.Name, name, validation.DNS1123SubdomainMaxLength)
	}
	out := api.NewNetworkPolicy(ns, name)
	s := &out.Spec
	s.Order = new(float64)
	*s.Order = Order
	var err error
	if s.Selector, err = selector(&np.Spec.PodSelector, "spec.podSelector"); err != nil {
		return nil, err
	}
	if s.Types, err = types(&np.Spec); err != nil {
		return nil, err
	}
	// Rules of a direction not in policyTypes never apply upstream; margay
	// refuses them rather than ignore them, so they are left out.
	if s.Applies(api.PolicyIngress) {
		for i, r := range np.Spec.Ingress {
			rs, err := rules(r.From, r.Ports, fmt.Sprintf("spec.ingress[%d]", i), "from", false)
			if err != nil {
				return nil, err
			}
			s.Ingress = append(s.Ingress, rs...)
		}
	}
	if s.Applies(api.PolicyEgress) {
		for i, r := range np.Spec.Egress {
			rs, err := rules(r.To, r.Ports, fmt.Sprintf("spec.egress[%d]", i), "to", true)
			if err != nil {
				return nil, err
			}
			s.Egress = append(s.Egress, rs...)
		}
	}
	return out, nil
}

// types is policyTypes, or upstream's default when it is empty: Ingress,
// and Egress too when there are egress rules. (margay's own default differs:
// a policy with egress rules only is Egress only; so types are always set.)
func types(s *networkingv1.NetworkPolicySpec) ([]api.PolicyType, error) {
	if len(s.PolicyTypes) == 0 {
		if len(s.Egress) > 0 {
			return []api.PolicyType{api.PolicyIngress, api.PolicyEgress}, nil
		}
		return []api.PolicyType{api.PolicyIngress}, nil
	}
	var out []api.PolicyType
	for i, t := range s.PolicyTypes {
		switch t {
		case networkingv1.PolicyTypeIngress, networkingv1.PolicyTypeEgress:
		default:
			return nil, fmt.Errorf("spec.policyTypes[%d]: %q must be Ingress or Egress", i, t)
		}
		if !slices.Contains(out, api.PolicyType(t)) {
			out = append(out, api.PolicyType(t))
		}
	}
	return out, nil
}

// rules translates one ingress or egress rule: every peer with every
// protocol of its ports is an Allow rule, since a margay rule has one
// protocol. An empty peer list allows any address; an empty port list, any
// protocol and port. The ports are those of the destination in both
// directions: on ingress, the selected pod is the destination.
func rules(peers []networkingv1.NetworkPolicyPeer, ports []networkingv1.NetworkPolicyPort, field, peersField string, egress bool) ([]api.Rule, error) {
	groups, err := portGroups(ports, field+".ports")
	if err != nil {
		return nil, err
	}
	ents := []api.EntityRule{{}}
	if len(peers) > 0 {
		ents = ents[:0]
		for i := range peers {
			e, err := peer(&peers[i], fmt.Sprintf("%s.%s[%d]", field, peersField, i))
			if err != nil {
				return nil, err
			}
			ents = append(ents, e)
		}
	}
	var out []api.Rule
	for _, e := range ents {
		for _, g := range groups {
			r := api.Rule{Action: api.ActionAllow}
			if egress {
				r.Destination = e
			} else {
				r.Source = e
			}
			// Each rule gets copies, so that no two rules share what one
			// of them might change.
			r.Source.Nets, r.Source.NotNets = slices.Clone(r.Source.Nets), slices.Clone(r.Source.NotNets)
			r.Destination.Nets, r.Destination.NotNets = slices.Clone(r.Destination.Nets), slices.Clone(r.Destination.NotNets)
			r.Destination.Ports = slices.Clone(g.ports)
			if g.proto != nil {
				p := *g.proto
				r.Protocol = &p
			}
			out = append(out, r)
		}
	}
	return out, nil
}

// portGroup is the ports of one protocol; nil ports is every port of it. A
// group without a protocol (no ports given) matches every protocol.
type portGroup struct {
	proto *api.Protocol
	ports []api.Port
}

// portGroups groups ports by protocol, in the order the protocols first
// appear. A port entry without a port number opens its whole protocol.
func portGroups(ports []networkingv1.NetworkPolicyPort, field string) ([]portGroup, error) {
	if len(ports) == 0 {
		return []portGroup{{}}, nil
	}
	var groups []portGroup
	all := map[string]bool{} // protocols with an entry that has no port
	for i, p := range ports {
		f := fmt.Sprintf("%s[%d]", field, i)
		proto := corev1.ProtocolTCP
		if p.Protocol != nil {
			proto = *p.Protocol
		}
		switch proto {
		case corev1.ProtocolTCP, corev1.ProtocolUDP, corev1.ProtocolSCTP:
		default:
			return nil, fmt.Errorf("%s.protocol: %q must be TCP, UDP or SCTP", f, proto)
		}
		gi := slices.IndexFunc(groups, func(g portGroup) bool { return g.proto.Name == string(proto) })
		if gi < 0 {
			ap, _ := api.ProtocolFromName(string(proto))
			groups = append(groups, portGroup{proto: &ap})
			gi = len(groups) - 1
		}
		port, err := portOf(&p, f)
		if err != nil {
			return nil, err
		}
		if port == nil {
			all[string(proto)] = true
			continue
		}
		groups[gi].ports = append(groups[gi].ports, *port)
	}
	for i := range groups {
		if all[groups[i].proto.Name] {
			groups[i].ports = nil
		}
	}
	return groups, nil
}

// portOf is the port or range of p, nil when p has none (every port).
func portOf(p *networkingv1.NetworkPolicyPort, f string) (*api.Port, error) {
	if p.Port == nil {
		if p.EndPort != nil {
			return nil, fmt.Errorf("%s.endPort: needs a numeric port", f)
		}
		return nil, nil
	}
	if p.Port.Type == intstr.String {
		if p.EndPort != nil {
			return nil, fmt.Errorf("%s.endPort: needs a numeric port, not the named port %q", f, p.Port.StrVal)
		}
		if !api.ValidPortName(p.Port.StrVal) {
			return nil, fmt.Errorf("%s.port: %q is neither a port number nor a port name (at most 15 lower-case letters, digits and '-', with a letter)", f, p.Port.StrVal)
		}
		return &api.Port{Name: p.Port.StrVal}, nil
	}
	n := p.Port.IntVal
	if n < 1 || n > 65535 {
		return nil, fmt.Errorf("%s.port: %d must be from 1 to 65535", f, n)
	}
	end := n
	if p.EndPort != nil {
		end = *p.EndPort
		if end < n || end > 65535 {
			return nil, fmt.Errorf("%s.endPort: %d must be from port (%d) to 65535", f, end, n)
		}
	}
	return &api.Port{Min: uint16(n), Max: uint16(end)}, nil
}

// peer translates one from or to entry. Pod and namespace selectors become
// the entity's; a podSelector alone selects in the policy's namespace, which
// is what a margay NetworkPolicy's selector without a namespaceSelector does.
func peer(p *networkingv1.NetworkPolicyPeer, field string) (api.EntityRule, error) {
	var e api.EntityRule
	if b := p.IPBlock; b != nil {
		if p.PodSelector != nil || p.NamespaceSelector != nil {
			return e, fmt.Errorf("%s: ipBlock cannot be combined with podSelector or namespaceSelector; make them separate peers", field)
		}
		cidr, err := netip.ParsePrefix(b.CIDR)
		if err != nil {
			return e, fmt.Errorf("%s.ipBlock.cidr: %q is not a CIDR such as 10.0.0.0/8", field, b.CIDR)
		}
		// Kubernetes accepts host bits and ignores them, as margay does not.
		cidr = cidr.Masked()
		e.Nets = []string{cidr.String()}
		for i, x := range b.Except {
			ex, err := netip.ParsePrefix(x)
			if err != nil {
				return e, fmt.Errorf("%s.ipBlock.except[%d]: %q is not a CIDR such as 10.0.0.0/8", field, i, x)
			}
			ex = ex.Masked()
			if ex.Addr().Is4() != cidr.Addr().Is4() || ex.Bits() <= cidr.Bits() || !cidr.Contains(ex.Addr()) {
				return e, fmt.Errorf("%s.ipBlock.except[%d]: %s must be inside cidr %s, and smaller", field, i, ex, cidr)
			}
			e.NotNets = append(e.NotNets, ex.String())
		}
		return e, nil
	}
	if p.PodSelector == nil && p.NamespaceSelector == nil {
		return e, fmt.Errorf("%s: a peer needs a podSelector, a namespaceSelector or an ipBlock ({} selects everything)", field)
	}
	var err error
	if p.PodSelector != nil {
		if e.Selector, err = selector(p.PodSelector, field+".podSelector"); err != nil {
			return e, err
		}
	}
	if p.NamespaceSelector != nil {
		if e.NamespaceSelector, err = selector(p.NamespaceSelector, field+".namespaceSelector"); err != nil {
			return e, err
		}
	}
	return e, nil
}

// selector writes a label selector in margay's selector language, in the
// canonical form api.ParseSelector prints back: matchLabels by key, then
// matchExpressions in order, joined by &&; an empty selector is all().
func selector(ls *metav1.LabelSelector, field string) (string, error) {
	var terms []string
	keys := make([]string, 0, len(ls.MatchLabels))
	for k := range ls.MatchLabels {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		v := ls.MatchLabels[k]
		if !api.ValidLabelKey(k) {
			return "", fmt.Errorf("%s.matchLabels: %q is not a valid label key", field, k)
		}
		if !api.ValidLabelValue(v) {
			return "", fmt.Errorf("%s.matchLabels.%s: %q is not a valid label value (at most 63 letters, digits, '-', '_' or '.')", field, k, v)
		}
		terms = append(terms, k+" == "+quote(v))
	}
	for i, x := range ls.MatchExpressions {
		f := fmt.Sprintf("%s.matchExpressions[%d]", field, i)
		if !api.ValidLabelKey(x.Key) {
			return "", fmt.Errorf("%s.key: %q is not a valid label key", f, x.Key)
		}
		switch x.Operator {
		case metav1.LabelSelectorOpIn, metav1.LabelSelectorOpNotIn:
			if len(x.Values) == 0 {
				return "", fmt.Errorf("%s.values: %s needs at least one value", f, x.Operator)
			}
			vals := slices.Clone(x.Values)
			slices.Sort(vals)
			vals = slices.Compact(vals)
			for j, v := range vals {
				if !api.ValidLabelValue(v) {
					return "", fmt.Errorf("%s.values: %q is not a valid label value (at most 63 letters, digits, '-', '_' or '.')", f, v)
				}
				vals[j] = quote(v)
			}
			op := " in "
			if x.Operator == metav1.LabelSelectorOpNotIn {
				op = " not in "
			}
			terms = append(terms, x.Key+op+"{"+strings.Join(vals, ", ")+"}")
		case metav1.LabelSelectorOpExists, metav1.LabelSelectorOpDoesNotExist:
			if len(x.Values) > 0 {
				return "", fmt.Errorf("%s.values: %s takes no values", f, x.Operator)
			}
			t := "has(" + x.Key + ")"
			if x.Operator == metav1.LabelSelectorOpDoesNotExist {
				t = "!" + t
			}
			terms = append(terms, t)
		default:
			return "", fmt.Errorf("%s.operator: %q must be In, NotIn, Exists or DoesNotExist", f, x.Operator)
		}
	}
	if len(terms) == 0 {
		return "all()", nil
	}
	return strings.Join(terms, " && "), nil
}

// quote quotes a label value; valid ones hold no quote character.
func quote(v string) string { return "'" + v + "'" }
