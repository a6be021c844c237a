package agent

import (
	"net/netip"
	"testing"

	"github.com/margay-dev/margay/test/nstest"
)

// --ip given: a local address brings its interface; one that is not local (a
// NAT address) the interface the kernel routes towards it, for the MTU and VXLAN.
func TestNodeAddressGiven(t *testing.T) {
	ns := nstest.New(t, "node")
	if err := ns.MakeHost("198.18.1.2/24"); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ ip, iface string }{
		{"198.18.1.2/24", "uplink0"},
		{"203.0.113.7/32", "uplink0"},
	} {
		var p netip.Prefix
		var iface string
		err := ns.Do(func() (err error) { p, iface, err = nodeAddress(tc.ip, ""); return err })
		if err != nil || p.String() != tc.ip || iface != tc.iface {
			t.Errorf("nodeAddress(%s) = %s, %q, %v; want %s on %s", tc.ip, p, iface, err, tc.ip, tc.iface)
		}
	}
}
