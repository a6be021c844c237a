// Command mkipset makes an IPv4 ipset and adds members to it through netlink,
// the way margay-node does. The VM test runs it in the guest, which has no ipset
// binary, to give iptables' set match something to match.
//
//	mkipset NAME hash:ip|hash:net [MEMBER...]
package main

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "mkipset:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	if len(args) < 2 {
		return errors.New("usage: mkipset NAME hash:ip|hash:net [MEMBER...]")
	}
	name, typ := args[0], args[1]
	if typ != "hash:ip" && typ != "hash:net" {
		return fmt.Errorf("type %q is not hash:ip or hash:net", typ)
	}
	err := netlink.IpsetCreate(name, typ, netlink.IpsetCreateOptions{Family: unix.AF_INET})
	if err != nil && !errors.Is(err, unix.EEXIST) {
		return fmt.Errorf("create %s %s: %w", name, typ, err)
	}
	for _, m := range args[2:] {
		p, err := netip.ParsePrefix(m)
		if err != nil {
			a, aerr := netip.ParseAddr(m)
			if aerr != nil {
				return fmt.Errorf("member %q is not an address or a prefix", m)
			}
			p = netip.PrefixFrom(a, a.BitLen())
		}
		if !p.Addr().Is4() {
			return fmt.Errorf("member %s is not IPv4", m)
		}
		e := &netlink.IPSetEntry{IP: net.IP(p.Addr().AsSlice())}
		if typ == "hash:net" {
			e.CIDR = uint8(p.Bits())
		} else if p.Bits() != 32 {
			return fmt.Errorf("hash:ip member %s is not a single address", m)
		}
		if err := netlink.IpsetAdd(name, e); err != nil {
			return fmt.Errorf("add %s to %s: %w", m, name, err)
		}
	}
	return nil
}
