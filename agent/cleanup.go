package agent

import (
	"context"
	"errors"
	"log/slog"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/felix"
	"github.com/margay-dev/margay/ipip"
	"github.com/margay-dev/margay/vxlan"
)

// watchRoutes kicks the loop when someone deletes one of margay's routes, so it
// is back at once rather than at the next resync.
func (a *Agent) watchRoutes(ctx context.Context) {
	ch := make(chan netlink.RouteUpdate, 256)
	err := netlink.RouteSubscribeWithOptions(ch, ctx.Done(), netlink.RouteSubscribeOptions{
		ErrorCallback: func(err error) { a.log.Warn("route events", "err", err) },
	})
	if err != nil {
		a.log.Warn("cannot watch route events; relying on the resync timer", "err", err)
		return
	}
	for u := range ch {
		if u.Type == unix.RTM_DELROUTE && u.Protocol == felix.RouteProtocol {
			a.kick()
		}
	}
}

// Cleanup removes everything margay-node programs on this node: its iptables
// and ip6tables chains and jumps, its ipsets (after the rules that use them), its routes, its
// VXLAN device and tunl0's address.
// Pods lose connectivity; it is for taking margay off a node.
func Cleanup(log *slog.Logger) error {
	ipt, ipt6, err := newIPTables(log)
	if err != nil {
		return err
	}
	errs := []error{ipt.Cleanup()}
	if ipt6 != nil {
		errs = append(errs, ipt6.Cleanup())
	}
	_, errVXLAN := vxlan.New(log, false).Apply(nil, netip.Addr{}, "", nil)
	_, errVXLAN6 := vxlan.New(log, true).Apply(nil, netip.Addr{}, "", nil)
	_, errIPIP := ipip.New(log).Apply(nil)
	return errors.Join(append(errs, felix.NewIPSets(log).Cleanup(), felix.NewRoutes(log).Cleanup(), errVXLAN, errVXLAN6, errIPIP)...)
}
