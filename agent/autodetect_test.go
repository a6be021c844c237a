package agent

import (
	"errors"
	"net/netip"
	"strings"
	"testing"

	"github.com/margay-dev/margay/ipam"
)

func TestChooseAddress(t *testing.T) {
	p := netip.MustParsePrefix
	ifaces := []Iface{
		{Name: "lo", Addrs: []netip.Prefix{p("127.0.0.1/8")}},
		{Name: "docker0", Addrs: []netip.Prefix{p("172.17.0.1/16")}},
		{Name: "mgy0123456789a", Addrs: []netip.Prefix{p("169.254.1.1/32")}},
		{Name: "eth0", Addrs: []netip.Prefix{p("169.254.9.9/16"), p("fe80::1/64"), p("198.18.1.2/24"), p("fd00:18:1::2/64")}},
		{Name: "eth1", Addrs: []netip.Prefix{p("198.18.2.7/24"), p("::ffff:198.18.2.7/120"), p("2001:db8:2::7/64")}},
	}
	reach := func(dst netip.Addr) (netip.Addr, error) {
		switch {
		case p("198.18.2.0/24").Contains(dst):
			return netip.MustParseAddr("198.18.2.7"), nil
		case p("2001:db8:2::/64").Contains(dst):
			return netip.MustParseAddr("2001:db8:2::7"), nil
		}
		return netip.Addr{}, errors.New("network unreachable")
	}
	v4, v6 := ipam.IPv4, ipam.IPv6
	tests := []struct {
		f                        ipam.Family
		method, want, iface, err string
	}{
		{v4, "first-found", "198.18.1.2/24", "eth0", ""},
		{v4, "", "198.18.1.2/24", "eth0", ""},
		{v4, "interface=eth1", "198.18.2.7/24", "eth1", ""},
		{v4, "interface=eth.*", "198.18.1.2/24", "eth0", ""},
		{v4, "interface=docker0", "172.17.0.1/16", "docker0", ""},
		{v4, "interface=wlan0", "", "", "found no IPv4 address"},
		{v4, "interface=(", "", "", "regular expression"},
		{v4, "cidr=198.18.2.0/24", "198.18.2.7/24", "eth1", ""},
		{v4, "cidr=10.0.0.0", "", "", "needs an IPv4 CIDR"},
		{v4, "cidr=fd00::/8", "", "", "needs an IPv4 CIDR"},
		{v4, "can-reach=198.18.2.1", "198.18.2.7/24", "eth1", ""},
		{v4, "can-reach=203.0.113.10", "", "", "no route to 203.0.113.10"},
		{v4, "can-reach=x", "", "", "needs an IPv4 address"},
		{v4, "magic", "", "", "use first-found"},
		{v6, "first-found", "fd00:18:1::2/64", "eth0", ""},
		{v6, "interface=eth1", "2001:db8:2::7/64", "eth1", ""},
		{v6, "cidr=2001:db8::/32", "2001:db8:2::7/64", "eth1", ""},
		{v6, "cidr=198.18.0.0/16", "", "", "--ip6-autodetection-method \"cidr=198.18.0.0/16\": cidr= needs an IPv6 CIDR"},
		{v6, "can-reach=2001:db8:2::1", "2001:db8:2::7/64", "eth1", ""},
		{v6, "can-reach=198.18.2.1", "", "", "can-reach= needs an IPv6 address"},
		{v6, "interface=docker0", "", "", "found no IPv6 address; give the node's address with --ip6 CIDR"},
	}
	for _, tc := range tests {
		got, iface, err := ChooseAddress(tc.method, tc.f, ifaces, reach)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%s %q: err %v, want %q", tc.f, tc.method, err, tc.err)
			}
			continue
		}
		if err != nil || got.String() != tc.want || iface != tc.iface {
			t.Errorf("%s %q = %s on %s, %v; want %s on %s", tc.f, tc.method, got, iface, err, tc.want, tc.iface)
		}
	}
	if _, _, err := ChooseAddress("first-found", ipam.IPv4, ifaces[:3], reach); err == nil {
		t.Error("first-found picked a virtual interface")
	}
}
