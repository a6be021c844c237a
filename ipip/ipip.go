// Package ipip keeps the node's IPIP device, tunl0: up, with the node's tunnel
// address and an MTU that leaves room for the 20-byte outer header. The routes
// through it are the route reconciler's.
package ipip

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

// ErrNoKernelSupport says the kernel cannot make IPIP tunnels.
var ErrNoKernelSupport = errors.New("the kernel has no IPIP support: load it (modprobe ipip) or give the pool vxlanMode instead of ipipMode")

// Device keeps tunl0 in the calling thread's network namespace.
type Device struct {
	log *slog.Logger
}

// New returns a Device reconciler.
func New(log *slog.Logger) *Device { return &Device{log: log} }

// Apply makes tunl0 match want. With want nil it takes margay's address off
// tunl0 and sets it down; the device itself belongs to the ipip module, which
// makes it in every namespace and does not let it be deleted.
func (d *Device) Apply(want *calc.TunnelDevice) (changed bool, err error) {
	cur, err := netlink.LinkByName(calc.IPIPDevice)
	var nf netlink.LinkNotFoundError
	if err != nil && !errors.As(err, &nf) {
		return false, err
	}
	if want == nil {
		if cur == nil {
			return false, nil
		}
		return d.release(cur)
	}
	if cur == nil {
		// A named ipip device with no remote makes the module create tunl0.
		err := netlink.LinkAdd(&netlink.Iptun{LinkAttrs: netlink.LinkAttrs{Name: calc.IPIPDevice}})
		if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EAFNOSUPPORT) || errors.Is(err, unix.ENOENT) {
			return false, ErrNoKernelSupport
		}
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return false, fmt.Errorf("create %s: %w", calc.IPIPDevice, err)
		}
		if cur, err = netlink.LinkByName(calc.IPIPDevice); err != nil {
			return false, ErrNoKernelSupport
		}
		changed = true
		d.log.Info("IPIP device created")
	}
	if cur.Attrs().MTU != want.MTU {
		if err := netlink.LinkSetMTU(cur, want.MTU); err != nil {
			return changed, fmt.Errorf("%s MTU %d: %w", calc.IPIPDevice, want.MTU, err)
		}
		changed = true
	}
	if cur.Attrs().Flags&net.FlagUp == 0 {
		if err := netlink.LinkSetUp(cur); err != nil {
			return changed, err
		}
		changed = true
	}
	if want.Addr.IsValid() {
		c, err := SetOnlyAddr(cur, want.Addr)
		changed = changed || c
		if err != nil {
			return changed, err
		}
	}
	return changed, nil
}

func (d *Device) release(cur netlink.Link) (changed bool, err error) {
	addrs, err := netlink.AddrList(cur, netlink.FAMILY_V4)
	if err != nil {
		return false, err
	}
	for _, a := range addrs {
		if err := netlink.AddrDel(cur, &a); err != nil {
			return changed, err
		}
		changed = true
	}
	if cur.Attrs().Flags&net.FlagUp != 0 {
		if err := netlink.LinkSetDown(cur); err != nil {
			return changed, err
		}
		changed = true
	}
	if changed {
		d.log.Info("IPIP device released: no pool needs it")
	}
	return changed, nil
}

// SetOnlyAddr gives a tunnel device exactly one address of addr's family,
// addr/32 or addr/128, beside IPv6's link-local one (vxlan uses it too).
func SetOnlyAddr(link netlink.Link, addr netip.Addr) (changed bool, err error) {
	family, bits := netlink.FAMILY_V4, 32
	if addr.Is6() {
		family, bits = netlink.FAMILY_V6, 128
	}
	addrs, err := netlink.AddrList(link, family)
	if err != nil {
		return false, err
	}
	found := false
	for _, a := range addrs {
		ip, ok := netip.AddrFromSlice(a.IP)
		if ok && ip.Unmap() == addr {
			found = true
			continue
		}
		if ok && ip.IsLinkLocalUnicast() && ip.Is6() {
			continue // the kernel's own, which IPv6 needs on every link
		}
		if err := netlink.AddrDel(link, &a); err != nil {
			return changed, err
		}
		changed = true
	}
	if !found {
		a := &netlink.Addr{IPNet: &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(bits, bits)}}
		if addr.Is6() {
			a.Flags = unix.IFA_F_NODAD // IPAM made it unique; usable as a source at once
		}
		if err := netlink.AddrAdd(link, a); err != nil {
			return changed, fmt.Errorf("address %s on %s: %w", addr, link.Attrs().Name, err)
		}
		changed = true
	}
	return changed, nil
}
