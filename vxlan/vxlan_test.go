package vxlan

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/nstest"
)

// Each family's VXLAN device in a node namespace: made with VNI 4096, port
// 4789, no learning, the node's MTU less the overhead and its tunnel address;
// one permanent neighbour and forwarding entry per peer; nothing changes on a
// second pass; a gone peer's entries go; no device wanted removes it.
func TestDeviceApply(t *testing.T) {
	a := netip.MustParseAddr
	for _, c := range []struct {
		name   string
		v6     bool
		local  netip.Addr
		dev    *calc.TunnelDevice
		peers  []calc.VXLANPeer
		device []string // what ip -d addr shows of it
		neigh  []string
		fdb    []string
	}{{
		name: "vxlan.margay", local: a("198.18.1.2"),
		dev: &calc.TunnelDevice{Addr: a("10.246.1.1"), MAC: "66:00:00:00:00:01", MTU: 1450},
		peers: []calc.VXLANPeer{
			{Node: "n2", TunnelAddr: a("10.246.2.1"), MAC: "66:00:00:00:00:02", NodeIP: a("198.18.2.2")},
			{Node: "n3", TunnelAddr: a("10.246.3.1"), MAC: "66:00:00:00:00:03", NodeIP: a("198.18.1.3")},
		},
		device: []string{"mtu 1450", "66:00:00:00:00:01", "vxlan id 4096", "local 198.18.1.2", "dev uplink0", "dstport 4789", "nolearning", "inet 10.246.1.1/32", "UP"},
		neigh:  []string{"10.246.2.1 lladdr 66:00:00:00:00:02 PERMANENT", "10.246.3.1 lladdr 66:00:00:00:00:03 PERMANENT"},
		fdb:    []string{"66:00:00:00:00:02 dst 198.18.2.2 self permanent", "66:00:00:00:00:03 dst 198.18.1.3 self permanent"},
	}, {
		name: "vxlan-v6.margay", v6: true, local: a("fd00:18:1::2"),
		dev: &calc.TunnelDevice{Addr: a("fd00:246::1"), MAC: "66:00:00:00:06:01", MTU: 1430},
		peers: []calc.VXLANPeer{
			{Node: "n2", TunnelAddr: a("fd00:246::2:1"), MAC: "66:00:00:00:06:02", NodeIP: a("fd00:18:2::2")},
			{Node: "n3", TunnelAddr: a("fd00:246::3:1"), MAC: "66:00:00:00:06:03", NodeIP: a("fd00:18:1::3")},
		},
		device: []string{"mtu 1430", "66:00:00:00:06:01", "vxlan id 4096", "local fd00:18:1::2", "dev uplink0", "dstport 4789", "nolearning", "inet6 fd00:246::1/128", "UP"},
		neigh:  []string{"fd00:246::2:1 lladdr 66:00:00:00:06:02 PERMANENT", "fd00:246::3:1 lladdr 66:00:00:00:06:03 PERMANENT"},
		fdb:    []string{"66:00:00:00:06:02 dst fd00:18:2::2 self permanent", "66:00:00:00:06:03 dst fd00:18:1::3 self permanent"},
	}} {
		t.Run(c.name, func(t *testing.T) {
			ns := nstest.New(t, "node")
			if err := ns.MakeHost("198.18.1.2/24"); err != nil {
				t.Fatal(err)
			}
			ns.MustRun(t, "ip", "addr", "add", "fd00:18:1::2/64", "dev", "uplink0", "nodad")
			d := New(slog.Default(), c.v6)
			apply := func(want *calc.TunnelDevice, peers []calc.VXLANPeer) bool {
				t.Helper()
				var changed bool
				err := ns.Do(func() (err error) { changed, err = d.Apply(want, c.local, "uplink0", peers); return err })
				if err != nil {
					t.Fatal(err)
				}
				return changed
			}
			show := func(args ...string) string { return ns.MustRun(t, append(args, "dev", c.name)...) }
			if !apply(c.dev, c.peers) {
				t.Error("first Apply changed nothing")
			}
			link := ns.MustRun(t, "ip", "-d", "addr", "show", c.name)
			for _, want := range c.device {
				if !strings.Contains(link, want) {
					t.Errorf("device lacks %q:\n%s", want, link)
				}
			}
			neigh, fdb := show("ip", "neigh", "show"), show("bridge", "fdb", "show")
			for _, want := range c.neigh {
				if !strings.Contains(neigh, want) {
					t.Errorf("neighbours lack %q:\n%s", want, neigh)
				}
			}
			for _, want := range c.fdb {
				if !strings.Contains(fdb, want) {
					t.Errorf("forwarding entries lack %q:\n%s", want, fdb)
				}
			}
			if apply(c.dev, c.peers) {
				t.Error("second Apply changed something")
			}
			// While BGP converges after a restart, a peer missing from the
			// (still empty) table keeps its entries.
			d.KeepStale(true)
			if apply(c.dev, nil) {
				t.Error("with KeepStale, an Apply without peers changed something")
			}
			d.KeepStale(false)
			if !apply(c.dev, c.peers[:1]) {
				t.Error("dropping a peer changed nothing")
			}
			if neigh := show("ip", "neigh", "show"); strings.Contains(neigh, c.peers[1].TunnelAddr.String()) {
				t.Errorf("n3's neighbour entry stayed:\n%s", neigh)
			}
			if fdb := show("bridge", "fdb", "show"); strings.Contains(fdb, c.peers[1].MAC) {
				t.Errorf("n3's forwarding entry stayed:\n%s", fdb)
			}
			if !apply(nil, nil) {
				t.Error("removing the device changed nothing")
			}
			if out, err := ns.Run("ip", "link", "show", c.name); err == nil {
				t.Errorf("device still there:\n%s", out)
			}
		})
	}
}
