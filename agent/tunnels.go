package agent

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/ipam"
)

// syncTunnelAddrs gives the node a tunnel address (and, for VXLAN, a MAC) for
// each tunnel its pools need, and releases the ones no pool needs any more. The
// address comes from IPAM under the node's tunnel handle, so it lies in one of
// the node's blocks and is routed with them. It reports whether the Node changed;
// the watch then brings the change back for the next pass. A recorded address
// is checked against IPAM only on full (timer) passes: the others run on every
// change and need no etcd round trip for it.
func (a *Agent) syncTunnelAddrs(ctx context.Context, self *api.Node, pools []*api.IPPool, out calc.Output, full bool) error {
	bgpSpec := self.Spec.BGP
	if bgpSpec == nil {
		bgpSpec = &api.NodeBGPSpec{}
	}
	var ipipAddr, vxlanAddr, vxlanMAC, vxlanAddr6, vxlanMAC6 string
	var err error
	if out.IPIP != nil {
		if ipipAddr, err = a.tunnelAddr(ctx, ipam.TunnelIPIP, bgpSpec.IPv4IPIPTunnelAddr, full, pools, func(p *api.IPPool) bool { return p.Spec.IPIPMode.Enabled() }); err != nil {
			return err
		}
	} else if err := a.releaseTunnel(ctx, ipam.TunnelIPIP, bgpSpec.IPv4IPIPTunnelAddr); err != nil {
		return err
	}
	if out.VXLAN != nil {
		if vxlanAddr, err = a.tunnelAddr(ctx, ipam.TunnelVXLAN, self.Spec.IPv4VXLANTunnelAddr, full, pools, func(p *api.IPPool) bool { return p.Spec.VXLANMode.Enabled() && !p.IsIPv6() }); err != nil {
			return err
		}
		vxlanMAC = TunnelMAC(a.cfg.NodeName, false)
	} else if err := a.releaseTunnel(ctx, ipam.TunnelVXLAN, self.Spec.IPv4VXLANTunnelAddr); err != nil {
		return err
	}
	if out.VXLAN6 != nil {
		if vxlanAddr6, err = a.tunnelAddr(ctx, ipam.TunnelVXLANV6, self.Spec.IPv6VXLANTunnelAddr, full, pools, func(p *api.IPPool) bool { return p.Spec.VXLANMode.Enabled() && p.IsIPv6() }); err != nil {
			return err
		}
		vxlanMAC6 = TunnelMAC(a.cfg.NodeName, true)
	} else if err := a.releaseTunnel(ctx, ipam.TunnelVXLANV6, self.Spec.IPv6VXLANTunnelAddr); err != nil {
		return err
	}
	if bgpSpec.IPv4IPIPTunnelAddr == ipipAddr && self.Spec.IPv4VXLANTunnelAddr == vxlanAddr && self.Spec.VXLANTunnelMACAddr == vxlanMAC &&
		self.Spec.IPv6VXLANTunnelAddr == vxlanAddr6 && self.Spec.VXLANTunnelMACAddrV6 == vxlanMAC6 {
		return nil
	}
	return a.updateNode(ctx, func(n *api.Node) {
		if n.Spec.BGP == nil {
			n.Spec.BGP = &api.NodeBGPSpec{}
		}
		n.Spec.BGP.IPv4IPIPTunnelAddr = ipipAddr
		n.Spec.IPv4VXLANTunnelAddr, n.Spec.VXLANTunnelMACAddr = vxlanAddr, vxlanMAC
		n.Spec.IPv6VXLANTunnelAddr, n.Spec.VXLANTunnelMACAddrV6 = vxlanAddr6, vxlanMAC6
		a.log.Info("tunnel addresses", "ipip", ipipAddr, "vxlan", vxlanAddr, "vxlanMAC", vxlanMAC, "vxlanV6", vxlanAddr6, "vxlanMACV6", vxlanMAC6)
	})
}

// tunnelAddr is the node's address for a tunnel kind: the recorded one, or one
// assigned from the pools that use the tunnel.
func (a *Agent) tunnelAddr(ctx context.Context, kind ipam.TunnelKind, recorded string, verify bool, pools []*api.IPPool, uses func(*api.IPPool) bool) (string, error) {
	if recorded != "" && !verify {
		return recorded, nil
	}
	var names []string
	for _, p := range pools {
		if uses(p) && !p.Spec.Disabled {
			names = append(names, p.Metadata.Name)
		}
	}
	if len(names) == 0 {
		return recorded, nil // only disabled pools use it: keep what there is
	}
	ip, err := a.ipam().EnsureTunnelAddr(ctx, a.cfg.NodeName, kind, names)
	if err != nil {
		return "", fmt.Errorf("%s tunnel address: %w", kind, err)
	}
	return ip.String(), nil
}

func (a *Agent) releaseTunnel(ctx context.Context, kind ipam.TunnelKind, recorded string) error {
	if recorded == "" {
		return nil
	}
	if _, err := a.ipam().ReleaseByHandle(ctx, ipam.TunnelHandle(kind, a.cfg.NodeName)); err != nil {
		return fmt.Errorf("release the %s tunnel address: %w", kind, err)
	}
	a.log.Info("released the tunnel address: no pool needs it", "kind", kind, "addr", recorded)
	return nil
}

// ipam is the agent's allocator, made on first use.
func (a *Agent) ipam() *ipam.Allocator {
	if a.alloc == nil {
		a.alloc = ipam.New(a.store, ipam.Options{Logger: a.log})
	}
	return a.alloc
}

// updateNode applies mutate to the stored Node, retrying on conflicts.
func (a *Agent) updateNode(ctx context.Context, mutate func(*api.Node)) error {
	for attempt := 0; ; attempt++ {
		n, err := datastore.Get[*api.Node](ctx, a.store, a.cfg.NodeName)
		if err != nil {
			return err
		}
		mutate(n)
		_, err = a.store.Update(ctx, n)
		if err == nil || !errors.Is(err, datastore.ErrConflict) || attempt == 5 {
			return err
		}
		time.Sleep(time.Duration(attempt+1) * 20 * time.Millisecond)
	}
}

// TunnelMAC is the MAC of a node's VXLAN device, or of its IPv6 one:
// locally administered, unicast, and derived from the node's name, so it
// survives restarts and re-registration.
func TunnelMAC(node string, v6 bool) string {
	seed := "margay-vxlan:"
	if v6 {
		seed = "margay-vxlan-v6:"
	}
	h := sha256.Sum256([]byte(seed + node))
	mac := net.HardwareAddr(h[:6])
	mac[0] = mac[0]&0xfe | 0x02
	return mac.String()
}
