package calc

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/margay-dev/margay/api"
)

// Packet is the first packet of a flow as the filter table's FORWARD chain
// sees it: after DNAT, before SNAT.
type Packet struct {
	In, Out      string // interfaces; "" for one that is no pod's
	Src, Dst     netip.Addr
	Proto        uint8
	SPort, DPort uint16
}

func (p Packet) String() string {
	return fmt.Sprintf("%s:%d -> %s:%d proto %d (in %q, out %q)", p.Src, p.SPort, p.Dst, p.DPort, p.Proto, p.In, p.Out)
}

// Evaluator runs packets through margay's filter chains as the kernel would,
// so that the agent can tell which established flows the rules it just
// programmed would no longer let start (and cut them). It evaluates the
// rules calc writes, not the policies, so its verdicts cannot drift from
// what the kernel enforces; it knows only the matches and targets calc
// writes, and reports any other as an error rather than guess.
type Evaluator struct {
	chains map[string][]evalRule
	nets   map[string]netSet
	ports  map[string]map[IPPort]bool
}

type netSet struct {
	addrs map[netip.Addr]bool
	nets  []netip.Prefix
}

func (s netSet) contains(a netip.Addr) bool {
	if s.addrs[a] {
		return true
	}
	for _, p := range s.nets {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// evalRule is one rule, parsed: its matches, then where it goes.
type evalRule struct {
	matches []func(*evalState) bool
	target  string   // ACCEPT, DROP, RETURN, MARK, LOG or a chain
	gotoJ   bool     // -g rather than -j
	xmark   [2]int   // MARK --set-xmark value/mask
	err     error    // a word Evaluator does not know, reported when reached
	text    []string // for errors
}

type evalState struct {
	p    Packet
	mark int
}

// NewEvaluator takes the filter chains and the ipsets of an Output.
func NewEvaluator(chains []Chain, sets []IPSet) *Evaluator {
	e := &Evaluator{chains: map[string][]evalRule{}, nets: map[string]netSet{}, ports: map[string]map[IPPort]bool{}}
	for _, s := range sets {
		if s.Type == "hash:ip,port" {
			m := map[IPPort]bool{}
			for _, p := range s.Ports {
				m[p] = true
			}
			e.ports[s.Name] = m
			continue
		}
		ns := netSet{addrs: map[netip.Addr]bool{}}
		for _, p := range s.Members {
			if p.IsSingleIP() {
				ns.addrs[p.Addr()] = true
			} else {
				ns.nets = append(ns.nets, p)
			}
		}
		e.nets[s.Name] = ns
	}
	for _, c := range chains {
		if c.Table != "filter" {
			continue
		}
		rules := make([]evalRule, len(c.Rules))
		for i, r := range c.Rules {
			rules[i] = e.parse(r)
		}
		e.chains[c.Name] = rules
	}
	return e
}

// Forward tells whether p, as the first packet of a new flow, gets through
// ChainForward.
func (e *Evaluator) Forward(p Packet) (bool, error) {
	st := &evalState{p: p}
	v, err := e.run(ChainForward, st, 0)
	return v != "DROP", err
}

// run walks a chain and returns ACCEPT, DROP, or "" when it returns.
func (e *Evaluator) run(chain string, st *evalState, depth int) (string, error) {
	if depth > 16 {
		return "", fmt.Errorf("chain %s: calls nest too deep", chain)
	}
	rules, ok := e.chains[chain]
	if !ok {
		return "", fmt.Errorf("chain %s does not exist", chain)
	}
rules:
	for _, r := range rules {
		for _, m := range r.matches {
			if !m(st) {
				continue rules
			}
		}
		if r.err != nil {
			return "", fmt.Errorf("chain %s rule %q: %w", chain, strings.Join(r.text, " "), r.err)
		}
		switch r.target {
		case "ACCEPT", "DROP":
			return r.target, nil
		case "RETURN":
			return "", nil
		case "MARK":
			st.mark = st.mark&^r.xmark[1] ^ r.xmark[0]
		case "LOG", "":
		default:
			v, err := e.run(r.target, st, depth+1)
			if err != nil || v != "" || r.gotoJ {
				return v, err
			}
		}
	}
	return "", nil
}

// parse reads one rule as iptables-save writes it.
func (e *Evaluator) parse(words []string) evalRule {
	r := evalRule{text: words}
	fail := func(format string, a ...any) evalRule {
		r.err = fmt.Errorf(format, a...)
		return r
	}
	neg := false
	add := func(m func(*evalState) bool) {
		if n := neg; n {
			r.matches = append(r.matches, func(st *evalState) bool { return !m(st) })
		} else {
			r.matches = append(r.matches, m)
		}
		neg = false
	}
	for i := 0; i < len(words); i++ {
		w := words[i]
		arg := func() string {
			if i+1 < len(words) {
				i++
				return words[i]
			}
			return ""
		}
		switch w {
		case "!":
			neg = true
		case "-i", "-o":
			name, in := arg(), w == "-i"
			add(func(st *evalState) bool {
				iface := st.p.Out
				if in {
					iface = st.p.In
				}
				if prefix, ok := strings.CutSuffix(name, "+"); ok {
					return iface != "" && strings.HasPrefix(iface, prefix)
				}
				return iface == name
			})
		case "-s", "-d":
			pfx, err := netip.ParsePrefix(arg())
			if err != nil {
				return fail("%s: %v", w, err)
			}
			src := w == "-s"
			add(func(st *evalState) bool {
				if src {
					return pfx.Contains(st.p.Src)
				}
				return pfx.Contains(st.p.Dst)
			})
		case "-p":
			a := arg()
			proto, ok := protocolNumber(a)
			if !ok {
				return fail("unknown protocol %q", a)
			}
			add(func(st *evalState) bool { return st.p.Proto == proto })
		case "-m":
			switch m := arg(); m {
			case "comment", "mark", "conntrack", "set", "multiport", "tcp", "udp", "sctp":
			default:
				return fail("unknown match %q", m)
			}
		case "--comment", "--log-prefix":
			arg()
		case "--tcp-flags":
			// The first packet of a new TCP flow has SYN set and no other flag:
			// the flags of MASK it has must be exactly COMP.
			mask, comp := arg(), arg()
			synInMask := mask == "ALL" || slices.Contains(strings.Split(mask, ","), "SYN")
			want := synInMask && comp == "SYN" || !synInMask && comp == "NONE"
			add(func(st *evalState) bool { return st.p.Proto == 6 && want })
		case "--mark":
			v, m, err := parseMark(arg())
			if err != nil {
				return fail("--mark: %v", err)
			}
			add(func(st *evalState) bool { return st.mark&m == v })
		case "--ctstate":
			// A new flow's first packet is NEW, and nothing else.
			isNew := false
			for _, s := range strings.Split(arg(), ",") {
				isNew = isNew || s == "NEW"
			}
			add(func(*evalState) bool { return isNew })
		case "--match-set":
			name, dir := arg(), arg()
			m, err := e.setMatch(name, dir)
			if err != nil {
				return fail("%v", err)
			}
			add(m)
		case "--dports", "--sports", "--dport", "--sport":
			ranges, err := parsePorts(arg())
			if err != nil {
				return fail("%s: %v", w, err)
			}
			dst := strings.HasPrefix(w, "--d")
			add(func(st *evalState) bool {
				port := st.p.SPort
				if dst {
					port = st.p.DPort
				}
				for _, r := range ranges {
					if port >= r[0] && port <= r[1] {
						return true
					}
				}
				return false
			})
		case "-j", "-g":
			r.target, r.gotoJ = arg(), w == "-g"
		case "--set-xmark":
			v, m, err := parseMark(arg())
			if err != nil {
				return fail("--set-xmark: %v", err)
			}
			r.xmark = [2]int{v, m}
		default:
			return fail("unknown word %q", w)
		}
	}
	return r
}

// setMatch matches an ipset by the packet's source or destination, or the
// destination address, protocol and port.
func (e *Evaluator) setMatch(name, dir string) (func(*evalState) bool, error) {
	switch dir {
	case "src", "dst":
		s, ok := e.nets[name]
		if !ok {
			return nil, fmt.Errorf("set %s is not a hash:net set of this output", name)
		}
		if dir == "src" {
			return func(st *evalState) bool { return s.contains(st.p.Src) }, nil
		}
		return func(st *evalState) bool { return s.contains(st.p.Dst) }, nil
	case "dst,dst":
		s, ok := e.ports[name]
		if !ok {
			return nil, fmt.Errorf("set %s is not a hash:ip,port set of this output", name)
		}
		return func(st *evalState) bool {
			return s[IPPort{Addr: st.p.Dst, Proto: st.p.Proto, Port: st.p.DPort}]
		}, nil
	}
	return nil, fmt.Errorf("set %s: unknown direction %q", name, dir)
}

func parseMark(s string) (v, m int, err error) {
	vs, ms, ok := strings.Cut(s, "/")
	if !ok {
		ms = "0xffffffff"
	}
	v64, err := strconv.ParseInt(vs, 0, 64)
	if err != nil {
		return 0, 0, err
	}
	m64, err := strconv.ParseInt(ms, 0, 64)
	return int(v64), int(m64), err
}

// parsePorts reads "80", "80,81" or "80:90,443".
func parsePorts(s string) ([][2]uint16, error) {
	var out [][2]uint16
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, ":")
		if !isRange {
			hi = lo
		}
		a, err := strconv.ParseUint(lo, 10, 16)
		if err != nil {
			return nil, err
		}
		b, err := strconv.ParseUint(hi, 10, 16)
		if err != nil {
			return nil, err
		}
		out = append(out, [2]uint16{uint16(a), uint16(b)})
	}
	return out, nil
}

// protocolNumber reads a protocol as iptProtocol writes it.
func protocolNumber(s string) (uint8, bool) {
	for _, n := range []uint8{1, 6, 17, 132, 136, 58} {
		if iptProtocol(api.Protocol{Number: n}) == s {
			return n, true
		}
	}
	n, err := strconv.ParseUint(s, 10, 8)
	return uint8(n), err == nil
}
