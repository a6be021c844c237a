package felix

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/felix/calc"
)

// RouteProtocol marks the kernel routes margay owns (`ip route show proto 77`).
// Routes with any other protocol are never changed or removed by the reconciler.
const RouteProtocol netlink.RouteProtocol = 77

// Routes keeps the main table's margay routes equal to the desired ones. It works
// in the network namespace of the thread that calls it.
type Routes struct {
	log        *slog.Logger
	keepRemote bool
}

// KeepRemote makes Apply keep margay's routes via a next hop even when they are
// not desired, while BGP converges after a restart: the routes learned before
// it are still right, and removing them would drop traffic until the peers have
// sent their routes again.
func (r *Routes) KeepRemote(keep bool) { r.keepRemote = keep }

// NewRoutes returns a route reconciler.
func NewRoutes(log *slog.Logger) *Routes { return &Routes{log: log} }

// Apply adds or replaces the desired routes that are missing or differ and
// deletes margay's routes that are no longer desired. A local route whose
// interface does not exist (yet) is skipped; the next Apply tries again.
func (r *Routes) Apply(desired []calc.Route) (changed bool, err error) {
	have, err := r.list()
	if err != nil {
		return false, err
	}
	byDst := map[netip.Prefix]netlink.Route{}
	for _, rt := range have {
		if p, ok := prefixOf(rt.Dst); ok {
			byDst[p] = rt
		}
	}
	var errs []error
	want := map[netip.Prefix]bool{}
	for _, d := range desired {
		want[d.Dst] = true
		nr, err := kernelRoute(d)
		if err != nil {
			r.log.Debug("route skipped", "route", d.String(), "err", err)
			continue
		}
		if cur, ok := byDst[d.Dst]; ok && same(cur, nr) {
			continue
		}
		if err := netlink.RouteReplace(nr); err != nil {
			errs = append(errs, fmt.Errorf("route %s: %w", d, err))
			continue
		}
		r.log.Info("route programmed", "route", d.String())
		changed = true
	}
	for p, rt := range byDst {
		if want[p] || r.keepRemote && rt.Gw != nil {
			continue
		}
		if err := netlink.RouteDel(&rt); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("delete route %s: %w", p, err))
			continue
		}
		r.log.Info("route removed", "dst", p.String())
		changed = true
	}
	return changed, errors.Join(errs...)
}

// Cleanup deletes every route margay owns.
func (r *Routes) Cleanup() error {
	_, err := r.Apply(nil)
	return err
}

// Count is how many routes margay owns now.
func (r *Routes) Count() (int, error) {
	have, err := r.list()
	return len(have), err
}

func (r *Routes) list() ([]netlink.Route, error) {
	rs, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN, Protocol: RouteProtocol},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL)
	if err != nil {
		return nil, fmt.Errorf("list routes: %w", err)
	}
	return rs, nil
}

func kernelRoute(d calc.Route) (*netlink.Route, error) {
	nr := &netlink.Route{Dst: ipNet(d.Dst), Protocol: RouteProtocol, Table: unix.RT_TABLE_MAIN, Type: unix.RTN_UNICAST}
	switch d.Kind {
	case calc.Blackhole:
		nr.Type = unix.RTN_BLACKHOLE
	case calc.Local:
		l, err := netlink.LinkByName(d.Dev)
		if err != nil {
			return nil, fmt.Errorf("interface %s: %w", d.Dev, err)
		}
		nr.LinkIndex, nr.Scope = l.Attrs().Index, netlink.SCOPE_LINK
	case calc.Via:
		nr.Gw = d.Gw.AsSlice()
	case calc.Tunnel:
		l, err := netlink.LinkByName(d.Dev)
		if err != nil {
			return nil, fmt.Errorf("tunnel %s: %w", d.Dev, err)
		}
		// onlink: the remote end is not in any subnet of the tunnel's.
		nr.LinkIndex, nr.Gw, nr.Flags = l.Attrs().Index, d.Gw.AsSlice(), int(netlink.FLAG_ONLINK)
		if d.Src.IsValid() {
			nr.Src = d.Src.AsSlice()
		}
	}
	return nr, nil
}

// same compares what matters of a route margay programs.
func same(cur netlink.Route, want *netlink.Route) bool {
	if cur.Type != want.Type {
		return false
	}
	switch {
	case want.Type == unix.RTN_BLACKHOLE:
		return true
	case want.Gw != nil && want.LinkIndex != 0: // through a tunnel
		return cur.Gw.Equal(want.Gw) && cur.LinkIndex == want.LinkIndex && cur.Src.Equal(want.Src) && cur.Flags&int(netlink.FLAG_ONLINK) != 0
	case want.Gw != nil:
		return cur.Gw.Equal(want.Gw)
	}
	return cur.LinkIndex == want.LinkIndex && cur.Gw == nil
}

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func prefixOf(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	bits, _ := n.Mask.Size()
	return netip.PrefixFrom(a.Unmap(), bits), true
}
