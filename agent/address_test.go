package agent

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/nstest"
)

// --ip given: a local address brings its interface; one that is not local (a
// NAT address) the interface the kernel routes towards it, for the MTU and VXLAN.
func TestNodeAddressGiven(t *testing.T) {
	ns := nstest.New(t, "node")
	if err := ns.MakeHost("198.18.1.2/24"); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "ip", "-6", "addr", "add", "fd00:18:1::2/64", "dev", "uplink0", "nodad")
	for _, tc := range []struct {
		ip     string
		family ipam.Family
		iface  string
	}{
		{"198.18.1.2/24", ipam.IPv4, "uplink0"},
		{"203.0.113.7/32", ipam.IPv4, "uplink0"},
		{"fd00:18:1::2/64", ipam.IPv6, "uplink0"},
		{"autodetect", ipam.IPv6, "uplink0"},
	} {
		var p netip.Prefix
		var iface string
		err := ns.Do(func() (err error) { p, iface, err = nodeAddress(tc.ip, "", tc.family); return err })
		want := tc.ip
		if want == "autodetect" {
			want = "fd00:18:1::2/64"
		}
		if err != nil || p.String() != want || iface != tc.iface {
			t.Errorf("nodeAddress(%s) = %s, %q, %v; want %s on %s", tc.ip, p, iface, err, want, tc.iface)
		}
	}
	for _, tc := range []struct {
		ip     string
		family ipam.Family
		err    string
	}{
		{"fd00:18:1::2/64", ipam.IPv4, "--ip \"fd00:18:1::2/64\": give the node's IPv4 address"},
		{"198.18.1.2/24", ipam.IPv6, "--ip6 \"198.18.1.2/24\": give the node's global IPv6 address"},
		{"fe80::2/64", ipam.IPv6, "global IPv6 address"},
	} {
		err := ns.Do(func() error { _, _, err := nodeAddress(tc.ip, "", tc.family); return err })
		if err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("nodeAddress(%s, %s): %v, want %q", tc.ip, tc.family, err, tc.err)
		}
	}
}
