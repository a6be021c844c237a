package vxlan

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/nstest"
)

// vxlan.margay in a node namespace: made with VNI 4096, port 4789, no learning,
// the node's MTU less 50 and its tunnel address; one permanent neighbour and
// forwarding entry per peer; nothing changes on a second pass; a gone peer's
// entries go; no device wanted removes it.
func TestDeviceApply(t *testing.T) {
	ns := nstest.New(t, "node")
	if err := ns.MakeHost("198.18.1.2/24"); err != nil {
		t.Fatal(err)
	}
	d := New(slog.Default())
	local := netip.MustParseAddr("198.18.1.2")
	dev := &calc.TunnelDevice{Addr: netip.MustParseAddr("10.246.1.1"), MAC: "66:00:00:00:00:01", MTU: 1450}
	peers := []calc.VXLANPeer{
		{Node: "n2", TunnelAddr: netip.MustParseAddr("10.246.2.1"), MAC: "66:00:00:00:00:02", NodeIP: netip.MustParseAddr("198.18.2.2")},
		{Node: "n3", TunnelAddr: netip.MustParseAddr("10.246.3.1"), MAC: "66:00:00:00:00:03", NodeIP: netip.MustParseAddr("198.18.1.3")},
	}
	apply := func(want *calc.TunnelDevice, peers []calc.VXLANPeer) bool {
		t.Helper()
		var changed bool
		err := ns.Do(func() (err error) { changed, err = d.Apply(want, local, "uplink0", peers); return err })
		if err != nil {
			t.Fatal(err)
		}
		return changed
	}
	if !apply(dev, peers) {
		t.Error("first Apply changed nothing")
	}
	link := ns.MustRun(t, "ip", "-d", "addr", "show", "vxlan.margay")
	for _, want := range []string{"mtu 1450", "66:00:00:00:00:01", "vxlan id 4096", "local 198.18.1.2", "dev uplink0", "dstport 4789", "nolearning", "inet 10.246.1.1/32", "UP"} {
		if !strings.Contains(link, want) {
			t.Errorf("device lacks %q:\n%s", want, link)
		}
	}
	neigh := ns.MustRun(t, "ip", "neigh", "show", "dev", "vxlan.margay")
	fdb := ns.MustRun(t, "bridge", "fdb", "show", "dev", "vxlan.margay")
	for _, want := range []string{"10.246.2.1 lladdr 66:00:00:00:00:02 PERMANENT", "10.246.3.1 lladdr 66:00:00:00:00:03 PERMANENT"} {
		if !strings.Contains(neigh, want) {
			t.Errorf("neighbours lack %q:\n%s", want, neigh)
		}
	}
	for _, want := range []string{"66:00:00:00:00:02 dst 198.18.2.2 self permanent", "66:00:00:00:00:03 dst 198.18.1.3 self permanent"} {
		if !strings.Contains(fdb, want) {
			t.Errorf("forwarding entries lack %q:\n%s", want, fdb)
		}
	}
	if apply(dev, peers) {
		t.Error("second Apply changed something")
	}
	// While BGP converges after a restart, a peer missing from the (still
	// empty) table keeps its entries.
	d.KeepStale(true)
	if apply(dev, nil) {
		t.Error("with KeepStale, an Apply without peers changed something")
	}
	d.KeepStale(false)
	if !apply(dev, peers[:1]) {
		t.Error("dropping a peer changed nothing")
	}
	if neigh := ns.MustRun(t, "ip", "neigh", "show", "dev", "vxlan.margay"); strings.Contains(neigh, "10.246.3.1") {
		t.Errorf("n3's neighbour entry stayed:\n%s", neigh)
	}
	if fdb := ns.MustRun(t, "bridge", "fdb", "show", "dev", "vxlan.margay"); strings.Contains(fdb, "66:00:00:00:00:03") {
		t.Errorf("n3's forwarding entry stayed:\n%s", fdb)
	}
	if !apply(nil, nil) {
		t.Error("removing the device changed nothing")
	}
	if out, err := ns.Run("ip", "link", "show", "vxlan.margay"); err == nil {
		t.Errorf("device still there:\n%s", out)
	}
}
