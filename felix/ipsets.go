package felix

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"strings"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/felix/calc"
)

// SetPrefix starts the name of every ipset margay owns. Sets with other names
// are never changed or destroyed.
const SetPrefix = "mgy-"

// IPSets keeps margay's ipsets equal to the desired ones, through netlink (no
// ipset binary needed). Apply and Cleanup work in the network namespace of the
// thread that calls them: they open their netlink socket there.
//
// Listing the kernel's sets costs about a millisecond a set (netlink's
// attribute parser), so Apply works from what it last left in the kernel,
// and lists only when that is unknown: the first time, after an error, and
// after Resync, which the agent calls on its timer to repair drift.
type IPSets struct {
	log   *slog.Logger
	known map[string]*kernelSet // the kernel's sets after the last Apply; nil: unknown
}

// Resync makes the next Apply read the kernel's sets rather than trust what
// the last one left, so that it repairs what others changed.
func (s *IPSets) Resync() { s.known = nil }

// NewIPSets returns an ipset reconciler.
func NewIPSets(log *slog.Logger) *IPSets { return &IPSets{log: log} }

// kernelSet is what the kernel holds for one set.
type kernelSet struct {
	typ     string
	family  uint8
	members map[member]bool
}

// member is one entry of a set: a prefix (hash:net, hash:ip, whose prefixes
// are single addresses) or an address, protocol and port (hash:ip,port).
type member struct {
	prefix netip.Prefix
	proto  uint8
	port   uint16
}

func (m member) String() string {
	if m.proto != 0 {
		return calc.IPPort{Addr: m.prefix.Addr(), Proto: m.proto, Port: m.port}.String()
	}
	return m.prefix.String()
}

// members are a desired set's entries.
func members(d calc.IPSet) []member {
	out := make([]member, 0, len(d.Members)+len(d.Ports))
	for _, p := range d.Members {
		out = append(out, member{prefix: p.Masked()})
	}
	for _, p := range d.Ports {
		out = append(out, member{prefix: netip.PrefixFrom(p.Addr, p.Addr.BitLen()), proto: p.Proto, port: p.Port})
	}
	return out
}

// Apply creates the desired sets that are missing, recreates a set of the wrong
// type, adds missing members and removes extra ones, and destroys margay's sets
// that are no longer desired. Members change in place, so iptables rules that
// reference a set keep working throughout. A set that is no longer desired but
// still referenced (its rule goes in the iptables pass that follows) is left
// for the next Apply; a set of the wrong type that a rule uses is an error.
func (s *IPSets) Apply(desired []calc.IPSet) (changed bool, err error) {
	defer recoverNetlink(&err)
	h, err := openIPSets()
	if err != nil {
		return false, err
	}
	defer h.Close()
	have := s.known
	s.known = nil // until this Apply has succeeded
	if have == nil {
		if have, err = listSets(h); err != nil {
			return false, err
		}
	}
	var errs []error
	want := map[string]bool{}
	after := map[string]*kernelSet{}
	for _, d := range desired {
		want[d.Name] = true // even if invalid: a bad input must not destroy the set
		if err := validSet(d); err != nil {
			errs = append(errs, err)
			continue
		}
		c, err := s.applySet(h, d, have[d.Name])
		changed = changed || c
		if err != nil {
			errs = append(errs, fmt.Errorf("ipset %s: %w", d.Name, err))
		}
		k := &kernelSet{typ: d.Type, family: familyOf(d), members: map[member]bool{}}
		for _, m := range members(d) {
			k.members[m] = true
		}
		after[d.Name] = k
	}
	for name := range have {
		if want[name] {
			continue
		}
		err := h.IpsetDestroy(name)
		switch {
		case errors.Is(err, nl.IPSetError(nl.IPSET_ERR_BUSY)):
			s.log.Debug("stale ipset still referenced; retried on the next Apply", "set", name)
			after[name] = have[name]
		case err != nil && !errors.Is(err, unix.ENOENT):
			errs = append(errs, fmt.Errorf("destroy ipset %s: %w", name, err))
		default:
			s.log.Info("ipset destroyed", "set", name)
			changed = true
		}
	}
	if len(errs) == 0 {
		s.known = after
	}
	return changed, errors.Join(errs...)
}

// Cleanup destroys every margay ipset. Run it after IPTables.Cleanup: the kernel
// refuses to destroy a set that a rule references.
func (s *IPSets) Cleanup() (err error) {
	s.known = nil
	defer recoverNetlink(&err)
	h, err := openIPSets()
	if err != nil {
		return err
	}
	defer h.Close()
	have, err := listSets(h)
	if err != nil {
		return err
	}
	var errs []error
	for name := range have {
		if err := h.IpsetDestroy(name); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("destroy ipset %s (is an iptables rule still using it?): %w", name, err))
			continue
		}
		s.log.Info("ipset destroyed", "set", name)
	}
	return errors.Join(errs...)
}

// openIPSets opens a netfilter netlink socket in the calling thread's namespace;
// the socket stays there, whichever thread uses it later.
func openIPSets() (*netlink.Handle, error) {
	h, err := netlink.NewHandle(unix.NETLINK_NETFILTER)
	if err != nil {
		return nil, fmt.Errorf("ipset netlink socket: %w", err)
	}
	// A handle's sockets have no timeout: bound each call, so a lost reply cannot
	// stall the agent loop.
	if err := h.SetSocketTimeout(10 * time.Second); err != nil {
		h.Close()
		return nil, fmt.Errorf("ipset netlink socket: %w", err)
	}
	return h, nil
}

func validSet(d calc.IPSet) error {
	if !strings.HasPrefix(d.Name, SetPrefix) || len(d.Name) >= nl.IPSET_MAXNAMELEN {
		return fmt.Errorf("ipset name %q: want %s<name> shorter than %d characters", d.Name, SetPrefix, nl.IPSET_MAXNAMELEN)
	}
	switch {
	case d.Type != "hash:net" && d.Type != "hash:ip" && d.Type != "hash:ip,port":
		return fmt.Errorf("ipset %s: type %q is not hash:net, hash:ip or hash:ip,port", d.Name, d.Type)
	case d.Type == "hash:ip,port" && len(d.Members) > 0:
		return fmt.Errorf("ipset %s: a hash:ip,port set has address,port members only", d.Name)
	case d.Type != "hash:ip,port" && len(d.Ports) > 0:
		return fmt.Errorf("ipset %s: a %s set has no address,port members", d.Name, d.Type)
	}
	fam := "IPv4"
	if d.IPv6 {
		fam = "IPv6"
	}
	for _, p := range d.Ports {
		if !p.Addr.IsValid() || p.Addr.Is6() != d.IPv6 || p.Addr.Is4In6() || p.Proto == 0 {
			return fmt.Errorf("ipset %s: member %s is not an %s address with a protocol", d.Name, p, fam)
		}
	}
	for _, m := range d.Members {
		if !m.IsValid() || m.Addr().Is6() != d.IPv6 || m.Addr().Is4In6() {
			return fmt.Errorf("ipset %s: member %s is not an %s prefix", d.Name, m, fam)
		}
		if d.Type == "hash:ip" && !m.IsSingleIP() {
			// The kernel would store every address of the prefix, which then never
			// compares equal to the one desired member.
			return fmt.Errorf("ipset %s: hash:ip member %s is not a single address", d.Name, m)
		}
	}
	return nil
}

func (s *IPSets) applySet(h *netlink.Handle, d calc.IPSet, cur *kernelSet) (changed bool, err error) {
	switch {
	case cur == nil:
		if err := create(h, d); err != nil {
			return false, err
		}
		s.log.Info("ipset created", "set", d.Name, "type", d.Type, "ipv6", d.IPv6)
		cur, changed = &kernelSet{}, true
	case cur.typ != d.Type || cur.family != familyOf(d):
		// The kernel swaps only sets of the same features (hash:ip and hash:net
		// differ), so the set is remade, which it refuses while a rule uses it.
		err := h.IpsetDestroy(d.Name)
		if errors.Is(err, nl.IPSetError(nl.IPSET_ERR_BUSY)) {
			return false, fmt.Errorf("has type %s, want %s, and an iptables rule still uses it: remove margay's rules (IPTables.Cleanup) and apply again", cur.typ, d.Type)
		}
		if err != nil {
			return false, fmt.Errorf("destroy it to fix its type %s: %w", cur.typ, err)
		}
		if err := create(h, d); err != nil {
			return true, err
		}
		s.log.Info("ipset recreated", "set", d.Name, "was", cur.typ, "type", d.Type)
		cur, changed = &kernelSet{}, true
	}
	want := map[member]bool{}
	for _, m := range members(d) {
		want[m] = true
		if cur.members[m] {
			continue
		}
		err := h.IpsetAdd(d.Name, entry(d.Type, m))
		if err != nil && !errors.Is(err, nl.IPSetError(nl.IPSET_ERR_EXIST)) {
			return changed, fmt.Errorf("add %s: %w", m, err)
		}
		s.log.Info("ipset member added", "set", d.Name, "member", m.String())
		changed = true
	}
	for m := range cur.members {
		if want[m] {
			continue
		}
		err := h.IpsetDel(d.Name, entry(d.Type, m))
		if err != nil && !errors.Is(err, nl.IPSetError(nl.IPSET_ERR_EXIST)) {
			return changed, fmt.Errorf("remove %s: %w", m, err)
		}
		s.log.Info("ipset member removed", "set", d.Name, "member", m.String())
		changed = true
	}
	return changed, nil
}

func create(h *netlink.Handle, d calc.IPSet) error {
	if err := h.IpsetCreate(d.Name, d.Type, netlink.IpsetCreateOptions{Family: familyOf(d)}); err != nil {
		return fmt.Errorf("create %s %s: %w", d.Name, d.Type, err)
	}
	return nil
}

// familyOf is a set's address family as netlink names it.
func familyOf(d calc.IPSet) uint8 {
	if d.IPv6 {
		return unix.AF_INET6
	}
	return unix.AF_INET
}

func entry(typ string, m member) *netlink.IPSetEntry {
	e := &netlink.IPSetEntry{IP: net.IP(m.prefix.Addr().AsSlice())}
	switch typ {
	case "hash:net":
		e.CIDR = uint8(m.prefix.Bits())
	case "hash:ip,port":
		e.Protocol, e.Port = &m.proto, &m.port
	}
	return e
}

// listSets reads margay's sets and their members in one dump.
func listSets(h *netlink.Handle) (map[string]*kernelSet, error) {
	results, err := h.IpsetListAll()
	if err != nil {
		return nil, fmt.Errorf("list ipsets: %w", err)
	}
	sets := map[string]*kernelSet{}
	// A large set spans several dump messages; only the first carries its type.
	for _, r := range results {
		if !strings.HasPrefix(r.SetName, SetPrefix) {
			continue
		}
		k := sets[r.SetName]
		if k == nil {
			k = &kernelSet{members: map[member]bool{}}
			sets[r.SetName] = k
		}
		if r.TypeName != "" {
			k.typ, k.family = r.TypeName, r.Family
		}
		for _, e := range r.Entries {
			a, ok := netip.AddrFromSlice(e.IP)
			if !ok {
				continue
			}
			bits := int(e.CIDR)
			if bits == 0 { // hash:ip lists bare addresses
				bits = a.Unmap().BitLen()
			}
			if p, err := a.Unmap().Prefix(bits); err == nil {
				m := member{prefix: p}
				if e.Protocol != nil && e.Port != nil {
					m.proto, m.port = *e.Protocol, *e.Port
				}
				k.members[m] = true
			}
		}
	}
	return sets, nil
}

// recoverNetlink turns into an error the panic that netlink v1.3.1 raises when a
// netlink call fails with an error that is not a syscall.Errno (its ipset code
// type-asserts, for example on an interrupted dump).
func recoverNetlink(err *error) {
	r := recover()
	if r == nil {
		return
	}
	if te, ok := r.(*runtime.TypeAssertionError); ok && strings.Contains(te.Error(), "syscall.Errno") {
		*err = fmt.Errorf("ipset netlink: %v", te)
		return
	}
	panic(r)
}
