package agent

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
)

func TestChooseAddress(t *testing.T) {
	p := netip.MustParsePrefix
	ifaces := []Iface{
		{Name: "lo", Addrs: []netip.Prefix{p("127.0.0.1/8")}},
		{Name: "docker0", Addrs: []netip.Prefix{p("172.17.0.1/16")}},
		{Name: "mgy0123456789a", Addrs: []netip.Prefix{p("169.254.1.1/32")}},
		{Name: "eth0", Addrs: []netip.Prefix{p("169.254.9.9/16"), p("198.18.1.2/24")}},
		{Name: "eth1", Addrs: []netip.Prefix{p("198.18.2.7/24")}},
	}
	reach := func(dst netip.Addr) (netip.Addr, error) {
		if p("198.18.2.0/24").Contains(dst) {
			return netip.MustParseAddr("198.18.2.7"), nil
		}
		return netip.Addr{}, errors.New("network unreachable")
	}
	tests := []struct{ method, want, iface, err string }{
		{"first-found", "198.18.1.2/24", "eth0", ""},
		{"", "198.18.1.2/24", "eth0", ""},
		{"interface=eth1", "198.18.2.7/24", "eth1", ""},
		{"interface=eth.*", "198.18.1.2/24", "eth0", ""},
		{"interface=docker0", "172.17.0.1/16", "docker0", ""},
		{"interface=wlan0", "", "", "found no IPv4 address"},
		{"interface=(", "", "", "regular expression"},
		{"cidr=198.18.2.0/24", "198.18.2.7/24", "eth1", ""},
		{"cidr=10.0.0.0", "", "", "needs a CIDR"},
		{"can-reach=198.18.2.1", "198.18.2.7/24", "eth1", ""},
		{"can-reach=203.0.113.10", "", "", "no route to 203.0.113.10"},
		{"can-reach=x", "", "", "needs an IP"},
		{"magic", "", "", "use first-found"},
	}
	for _, tc := range tests {
		got, iface, err := ChooseAddress(tc.method, ifaces, reach)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%q: err %v, want %q", tc.method, err, tc.err)
			}
			continue
		}
		if err != nil || got.String() != tc.want || iface != tc.iface {
			t.Errorf("%q = %s on %s, %v; want %s on %s", tc.method, got, iface, err, tc.want, tc.iface)
		}
	}
	if _, _, err := ChooseAddress("first-found", ifaces[:3], reach); err == nil {
		t.Error("first-found picked a virtual interface")
	}
}
