package calc

import "net/netip"

// Chain is one of margay's iptables chains with its complete rule list. Rules are
// written as iptables-save prints them (`-s` before `-i`, /32 masks spelled
// out), so that the reconciler can compare them with what the kernel holds.
type Chain struct {
	Table string // "filter" or "nat"
	Name  string
	Rules [][]string // the arguments after `-A <Name>`
}

// Jump sends a base chain's traffic through one of margay's chains first.
type Jump struct {
	Table, From, To string
}

// margay's chains.
const (
	ChainForward     = "MGY-FORWARD"
	ChainInput       = "MGY-INPUT"
	ChainFromWL      = "MGY-FROM-WL"
	ChainToWL        = "MGY-TO-WL"
	ChainPostrouting = "MGY-POSTROUTING"
)

// family is one IP family's share of the rules: iptables holds IPv4's chains
// and ip6tables IPv6's, with the same names, and the ipsets of each have
// names of their own (a set holds one family, and set names are shared).
type family struct{ v6 bool }

var (
	ipv4 = family{}
	ipv6 = family{v6: true}
)

// has tells whether a is of the family.
func (f family) has(a netip.Addr) bool { return a.IsValid() && a.Is6() == f.v6 && !a.Is4In6() }

// set is the family's name of an ipset.
func (f family) set(name string) string {
	if f.v6 {
		return name + "-v6"
	}
	return name
}

// rules is margay's rule set for one family:
//   - anti-spoofing: a packet from a pod interface must come from that pod's
//     address, on the way to the node (INPUT) and through it (FORWARD);
//     IPv6 neighbour discovery from a pod, sent from its link-local address,
//     reaches the node;
//   - forwarding to a pod interface margay does not know is dropped, and
//     from and to known ones is accepted if the pods' policy accepts it
//     (policyRules);
//   - NAT outgoing: traffic from a natOutgoing pool to anything outside every
//     pool leaves with the node's address (NAT66 for IPv6).
func rules(in Input, f family) ([]Chain, []Jump) {
	// Pods may not send tunnel packets at all: NAT outgoing would otherwise give
	// them a node's source address, which every node accepts tunnels from.
	from := Chain{Table: "filter", Name: ChainFromWL, Rules: [][]string{
		{"-p", "4", "-m", "comment", "--comment", "margay: IPIP from a pod", "-j", "DROP"},
		{"-p", "udp", "-m", "udp", "--dport", "4789", "-m", "comment", "--comment", "margay: VXLAN from a pod", "-j", "DROP"},
	}}
	to := Chain{Table: "filter", Name: ChainToWL}
	for _, ep := range in.Endpoints {
		for _, ip := range ep.IPs {
			if f.has(ip.Addr()) {
				from.Rules = append(from.Rules, []string{"-s", ip.Masked().String(), "-i", ep.Interface, "-j", "RETURN"})
			}
		}
		to.Rules = append(to.Rules, []string{"-o", ep.Interface, "-j", "RETURN"})
	}
	from.Rules = append(from.Rules, []string{"-m", "comment", "--comment", "margay: spoofed or unknown pod", "-j", "DROP"})
	to.Rules = append(to.Rules, []string{"-m", "comment", "--comment", "margay: unknown pod", "-j", "DROP"})
	// Policy: a packet of a new flow from a pod goes through its egress chain,
	// and one to a pod through its ingress chain, both when the pods share the
	// node. Each must leave MarkAccept, so that a missing or flushed chain
	// drops rather than lets through; the mark is cleared in between.
	notAccepted := []string{"-m", "mark", "--mark", mark(0, MarkAccept)}
	forward := Chain{Table: "filter", Name: ChainForward, Rules: [][]string{
		{"-i", "mgy+", "-j", ChainFromWL},
		{"-o", "mgy+", "-j", ChainToWL},
		{"-i", "mgy+", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"},
		{"-o", "mgy+", "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED", "-j", "ACCEPT"},
		// A TCP packet without a flow that is not a SYN is conntrack's loose
		// pickup of a connection it has no entry for, such as one whose entry
		// the cut deleted: taken up from the allowed side, it would open the
		// denied one again. Such a connection must start over.
		concat([]string{"-i", "mgy+"}, midStream, comment("margay: TCP without a flow and no SYN"), []string{"-j", "DROP"}),
		concat([]string{"-o", "mgy+"}, midStream, comment("margay: TCP without a flow and no SYN"), []string{"-j", "DROP"}),
		concat([]string{"-i", "mgy+"}, clearMarks),
		{"-i", "mgy+", "-j", ChainFromEP},
		concat([]string{"-i", "mgy+"}, notAccepted, comment("margay: egress policy did not accept"), []string{"-j", "DROP"}),
		concat([]string{"-o", "mgy+"}, clearMarks),
		{"-o", "mgy+", "-j", ChainToEP},
		concat([]string{"-o", "mgy+"}, notAccepted, comment("margay: ingress policy did not accept"), []string{"-j", "DROP"}),
		{"-i", "mgy+", "-j", "ACCEPT"},
		{"-o", "mgy+", "-j", "ACCEPT"},
	}}
	// Tunnel packets are accepted only from known nodes: anyone else, pods
	// included, could otherwise inject packets into the pod network. IPIP
	// is IPv4 only; no IPv6 tunnel device takes it.
	hosts := f.set(SetAllHosts)
	input := Chain{Table: "filter", Name: ChainInput}
	if f.v6 {
		// A pod finds its gateway, the host end's link-local address, with
		// neighbour solicitations from its own link-local address, which
		// anti-spoofing would drop; nothing else comes from link-local.
		for _, typ := range []string{"135", "136"} {
			input.Rules = append(input.Rules, concat([]string{"-i", "mgy+", "-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type", typ},
				comment("margay: IPv6 neighbour discovery from a pod"), []string{"-j", "ACCEPT"}))
		}
	}
	input.Rules = append(input.Rules, []string{"-i", "mgy+", "-j", ChainFromWL})
	if !f.v6 {
		input.Rules = append(input.Rules,
			[]string{"-p", "4", "-m", "set", "--match-set", hosts, "src", "-j", "ACCEPT"},
			[]string{"-p", "4", "-m", "comment", "--comment", "margay: IPIP from an unknown host", "-j", "DROP"})
	}
	input.Rules = append(input.Rules,
		[]string{"-p", "udp", "-m", "udp", "--dport", "4789", "-m", "set", "--match-set", hosts, "src", "-j", "ACCEPT"},
		[]string{"-p", "udp", "-m", "udp", "--dport", "4789", "-m", "comment", "--comment", "margay: VXLAN from an unknown host", "-j", "DROP"})
	masq := []string{"-m", "set", "--match-set", f.set(SetMasqPools), "src", "-m", "set", "!", "--match-set", f.set(SetAllPools), "dst", "-j", "MASQUERADE"}
	if in.RandomFully {
		masq = append(masq, "--random-fully")
	}
	post := Chain{Table: "nat", Name: ChainPostrouting, Rules: [][]string{masq}}
	return []Chain{from, to, forward, input, post}, []Jump{
		{Table: "filter", From: "FORWARD", To: ChainForward},
		{Table: "filter", From: "INPUT", To: ChainInput},
		{Table: "nat", From: "POSTROUTING", To: ChainPostrouting},
	}
}

// midStream matches a TCP packet that starts a flow without being a SYN.
var midStream = []string{"-p", "tcp", "-m", "tcp", "!", "--tcp-flags", "FIN,SYN,RST,ACK", "SYN", "-m", "conntrack", "--ctstate", "NEW"}
