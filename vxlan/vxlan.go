// Package vxlan keeps the node's VXLAN devices and their entries for remote
// nodes: vxlan.margay for IPv4, the alternative to IPIP where IP protocol 4 is
// blocked, and vxlan-v6.margay for IPv6 over the IPv6 underlay.
package vxlan

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/ipip"
)

// Device keeps one family's VXLAN device in the calling thread's network
// namespace.
type Device struct {
	log       *slog.Logger
	name      string
	family    int // of the device's addresses, its neighbours and its underlay
	keepStale bool
}

// KeepStale makes Apply keep neighbour and forwarding entries for nodes no
// longer among the peers, while BGP converges after a restart: peers come from
// the BGP table, which starts empty, and removing the entries would cut
// VXLAN traffic until the sessions are back (as felix.Routes.KeepRemote).
func (d *Device) KeepStale(keep bool) { d.keepStale = keep }

// New returns the reconciler of vxlan.margay, or of vxlan-v6.margay for IPv6.
func New(log *slog.Logger, v6 bool) *Device {
	if v6 {
		return &Device{log: log.With("device", calc.VXLANV6Device), name: calc.VXLANV6Device, family: netlink.FAMILY_V6}
	}
	return &Device{log: log.With("device", calc.VXLANDevice), name: calc.VXLANDevice, family: netlink.FAMILY_V4}
}

// Apply makes the device match want (nil: remove it), sending from local out
// of the interface parent, and its neighbour and forwarding entries match
// peers. It reports whether it changed anything.
func (d *Device) Apply(want *calc.TunnelDevice, local netip.Addr, parent string, peers []calc.VXLANPeer) (changed bool, err error) {
	cur, err := netlink.LinkByName(d.name)
	if err != nil && !isNotFound(err) {
		return false, err
	}
	if want == nil {
		if cur == nil {
			return false, nil
		}
		d.log.Info("removing the VXLAN device: no pool needs it")
		return true, netlink.LinkDel(cur)
	}
	mac, err := net.ParseMAC(want.MAC)
	if err != nil || !want.Addr.IsValid() {
		return false, fmt.Errorf("%s: no tunnel address and MAC yet (address %s, MAC %q)", d.name, want.Addr, want.MAC)
	}
	if !local.IsValid() || local.Is6() != (d.family == netlink.FAMILY_V6) {
		return false, fmt.Errorf("%s: the node has no underlay address of the family (%s)", d.name, local)
	}
	p, err := netlink.LinkByName(parent)
	if err != nil {
		return false, fmt.Errorf("%s: uplink %s: %w", d.name, parent, err)
	}
	spec := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: d.name, MTU: want.MTU, HardwareAddr: mac},
		VxlanId:      calc.VXLANVNI,
		Port:         calc.VXLANPort,
		SrcAddr:      local.AsSlice(),
		VtepDevIndex: p.Attrs().Index,
		Learning:     false,
	}
	if cur != nil && !sameDevice(cur, spec) {
		d.log.Info("recreating the VXLAN device: its settings differ")
		if err := netlink.LinkDel(cur); err != nil {
			return false, err
		}
		cur = nil
	}
	if cur == nil {
		if err := netlink.LinkAdd(spec); err != nil {
			return false, fmt.Errorf("create %s: %w", d.name, err)
		}
		if cur, err = netlink.LinkByName(d.name); err != nil {
			return false, err
		}
		changed = true
		d.log.Info("VXLAN device created", "mtu", want.MTU, "mac", want.MAC, "local", local.String())
	}
	if cur.Attrs().MTU != want.MTU {
		if err := netlink.LinkSetMTU(cur, want.MTU); err != nil {
			return changed, err
		}
		changed = true
	}
	if cur.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(cur); err != nil {
			return changed, err
		}
		changed = true
	}
	c, err := ipip.SetOnlyAddr(cur, want.Addr)
	if err != nil {
		return changed, err
	}
	c2, err := d.syncPeers(cur, peers)
	return changed || c || c2, err
}

func sameDevice(cur netlink.Link, want *netlink.Vxlan) bool {
	v, ok := cur.(*netlink.Vxlan)
	return ok && v.VxlanId == want.VxlanId && v.Port == want.Port && v.SrcAddr.Equal(want.SrcAddr) &&
		v.VtepDevIndex == want.VtepDevIndex && v.HardwareAddr.String() == want.HardwareAddr.String() && !v.Learning
}

// syncPeers keeps one permanent neighbour entry (tunnel address -> MAC) and one
// forwarding entry (MAC -> node address) per remote node, and nothing else.
func (d *Device) syncPeers(link netlink.Link, peers []calc.VXLANPeer) (changed bool, err error) {
	idx := link.Attrs().Index
	wantNeigh := map[netip.Addr]string{}
	wantFDB := map[string]netip.Addr{}
	for _, p := range peers {
		wantNeigh[p.TunnelAddr] = p.MAC
		wantFDB[p.MAC] = p.NodeIP
	}
	var errs []error
	neighs, err := netlink.NeighList(idx, d.family)
	if err != nil {
		return false, err
	}
	for _, n := range neighs {
		ip, _ := netip.AddrFromSlice(n.IP)
		mac, ok := wantNeigh[ip.Unmap()]
		if ok && n.HardwareAddr.String() == mac && n.State == netlink.NUD_PERMANENT {
			delete(wantNeigh, ip.Unmap())
			continue
		}
		if !ok && (d.keepStale || ip.IsMulticast()) {
			continue // multicast entries are the kernel's own (IPv6's MLD)
		}
		d.log.Info("VXLAN neighbour removed", "ip", ip.Unmap().String(), "mac", n.HardwareAddr.String(), "state", n.State)
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
		changed = true
	}
	for ip, m := range wantNeigh {
		mac, _ := net.ParseMAC(m)
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: d.family, State: netlink.NUD_PERMANENT,
			IP: ip.AsSlice(), HardwareAddr: mac}); err != nil {
			errs = append(errs, fmt.Errorf("neighbour %s: %w", ip, err))
		}
		changed = true
	}
	fdb, err := netlink.NeighList(idx, unix.AF_BRIDGE)
	if err != nil {
		return changed, err
	}
	for _, n := range fdb {
		dst, _ := netip.AddrFromSlice(n.IP)
		want, ok := wantFDB[n.HardwareAddr.String()]
		if ok && dst.Unmap() == want {
			delete(wantFDB, n.HardwareAddr.String())
			continue
		}
		if !ok && d.keepStale {
			continue
		}
		if n.HardwareAddr.String() == "00:00:00:00:00:00" && !dst.IsValid() {
			continue
		}
		if err := netlink.NeighDel(&n); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, err)
		}
		changed = true
	}
	for m, dst := range wantFDB {
		mac, _ := net.ParseMAC(m)
		if err := netlink.NeighSet(&netlink.Neigh{LinkIndex: idx, Family: unix.AF_BRIDGE, State: netlink.NUD_PERMANENT,
			Flags: netlink.NTF_SELF, IP: dst.AsSlice(), HardwareAddr: mac}); err != nil {
			errs = append(errs, fmt.Errorf("forwarding entry %s -> %s: %w", m, dst, err))
		}
		changed = true
	}
	if changed {
		d.log.Info("VXLAN peers updated", "peers", len(peers))
	}
	return changed, errors.Join(errs...)
}

func isNotFound(err error) bool {
	var nf netlink.LinkNotFoundError
	return errors.As(err, &nf)
}
