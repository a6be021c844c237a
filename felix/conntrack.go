package felix

import (
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/felix/calc"
)

// CutDenied deletes the conntrack entries of the flows through local pods
// that out's rules would no longer let start, in both families. Policy is checked
// on a flow's first packet only (established packets are accepted early),
// so without this a connection opened before a Deny would outlive it. A
// flow still allowed keeps its entry, so NAT and the connection are
// untouched. It reads the conntrack table of the calling thread's network
// namespace, as iptables does.
func CutDenied(out calc.Output, endpoints []calc.Endpoint) (cut uint, err error) {
	ifaces := map[netip.Addr]string{}
	for _, ep := range endpoints {
		for _, ip := range ep.IPs {
			ifaces[ip.Addr()] = ep.Interface
		}
	}
	if len(ifaces) == 0 {
		return 0, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return 0, fmt.Errorf("local addresses: %w", err)
	}
	host := map[netip.Addr]bool{}
	for _, a := range addrs {
		if n, ok := a.(*net.IPNet); ok {
			if ip, ok := netip.AddrFromSlice(n.IP); ok {
				host[ip.Unmap()] = true
			}
		}
	}
	var errs []error
	for _, fam := range []struct {
		af     netlink.InetFamily
		chains []calc.Chain
	}{{unix.AF_INET, out.Chains}, {unix.AF_INET6, out.Chains6}} {
		f := &deniedFilter{ev: calc.NewEvaluator(fam.chains, out.IPSets), ifaces: ifaces, host: host}
		n, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, fam.af, f)
		cut += n
		if err != nil {
			errs = append(errs, fmt.Errorf("conntrack: %w", err))
		}
		errs = append(errs, f.errs...)
	}
	return cut, errors.Join(errs...)
}

// deniedFilter matches the flows to delete.
type deniedFilter struct {
	ev     *calc.Evaluator
	ifaces map[netip.Addr]string // local pod address -> its interface
	host   map[netip.Addr]bool   // this namespace's own addresses
	errs   []error
}

func (f *deniedFilter) MatchConntrackFlow(flow *netlink.ConntrackFlow) bool {
	p, ok := forwardPacket(flow, f.ifaces, f.host)
	if !ok {
		return false
	}
	accepted, err := f.ev.Forward(p)
	if err != nil {
		// Not knowing is no reason to cut; report it once per pass.
		if len(f.errs) == 0 {
			f.errs = append(f.errs, fmt.Errorf("flow %s: %w", p, err))
		}
		return false
	}
	return !accepted
}

// forwardPacket is the first packet of a conntrack flow as FORWARD saw it:
// from the original source to the reply's source, which is the
// destination after DNAT (a Service's pod). ok is false for flows that did
// not go through FORWARD to or from a local pod: the node's own, and those
// of other hosts only.
func forwardPacket(flow *netlink.ConntrackFlow, ifaces map[netip.Addr]string, host map[netip.Addr]bool) (calc.Packet, bool) {
	src, ok1 := netip.AddrFromSlice(flow.Forward.SrcIP)
	dst, ok2 := netip.AddrFromSlice(flow.Reverse.SrcIP)
	if !ok1 || !ok2 {
		return calc.Packet{}, false
	}
	src, dst = src.Unmap(), dst.Unmap()
	p := calc.Packet{In: ifaces[src], Out: ifaces[dst], Src: src, Dst: dst, Proto: flow.Forward.Protocol,
		SPort: flow.Forward.SrcPort, DPort: flow.Reverse.SrcPort}
	if p.In == "" && p.Out == "" || host[src] || host[dst] {
		return calc.Packet{}, false
	}
	return p, true
}
