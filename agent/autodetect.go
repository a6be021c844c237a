package agent

import (
	"fmt"
	"net"
	"net/netip"
	"regexp"
	"strings"

	"github.com/vishvananda/netlink"

	"github.com/margay-dev/margay/ipam"
)

// Iface is an interface and its addresses, as autodetection sees it.
type Iface struct {
	Name  string
	Addrs []netip.Prefix
}

// skipFirstFound are interfaces first-found never picks: loopback, container and
// pod plumbing, tunnels and bridges of other software.
var skipFirstFound = regexp.MustCompile(`^(lo|docker.*|veth.*|mgy.*|cali.*|tunl.*|vxlan.*|flannel.*|cni.*|kube-ipvs.*|virbr.*|br-.*|dummy.*|cilium.*|weave.*|nodelocaldns.*|wg.*)$`)

// ChooseAddress picks the node's address of family f by an autodetection method:
//   - first-found: the first global address of the first real interface;
//   - interface=REGEX: the first address of the first interface whose name
//     matches;
//   - cidr=CIDR: the first address inside CIDR;
//   - can-reach=IP: the address the kernel uses to reach IP, which reach gives.
//
// The result keeps the interface's prefix length: it decides the node's subnet.
func ChooseAddress(method string, f ipam.Family, ifaces []Iface, reach func(netip.Addr) (netip.Addr, error)) (netip.Prefix, string, error) {
	flag, ipFlag, example := "--ip-autodetection-method", "--ip", "198.18.0.0/16"
	if f == ipam.IPv6 {
		flag, ipFlag, example = "--ip6-autodetection-method", "--ip6", "fd00:18::/48"
	}
	kind, arg, _ := strings.Cut(method, "=")
	var match func(Iface, netip.Prefix) bool
	switch kind {
	case "first-found", "":
		match = func(i Iface, _ netip.Prefix) bool { return !skipFirstFound.MatchString(i.Name) }
	case "interface":
		re, err := regexp.Compile("^(" + arg + ")$")
		if err != nil || arg == "" {
			return netip.Prefix{}, "", fmt.Errorf("%s %q: interface= needs a regular expression: %v", flag, method, err)
		}
		match = func(i Iface, _ netip.Prefix) bool { return re.MatchString(i.Name) }
	case "cidr":
		c, err := netip.ParsePrefix(arg)
		if err != nil || ipam.FamilyOf(c.Addr()) != f {
			return netip.Prefix{}, "", fmt.Errorf("%s %q: cidr= needs an %s CIDR such as %s", flag, method, f, example)
		}
		match = func(_ Iface, a netip.Prefix) bool { return c.Contains(a.Addr()) }
	case "can-reach":
		dst, err := netip.ParseAddr(arg)
		if err != nil || ipam.FamilyOf(dst) != f {
			return netip.Prefix{}, "", fmt.Errorf("%s %q: can-reach= needs an %s address", flag, method, f)
		}
		src, err := reach(dst)
		if err != nil {
			return netip.Prefix{}, "", fmt.Errorf("%s %q: no route to %s: %w", flag, method, dst, err)
		}
		match = func(_ Iface, a netip.Prefix) bool { return a.Addr() == src }
	default:
		return netip.Prefix{}, "", fmt.Errorf("%s %q: use first-found, interface=REGEX, cidr=CIDR or can-reach=IP", flag, method)
	}
	for _, i := range ifaces {
		for _, a := range i.Addrs {
			// IsGlobalUnicast excludes link-local addresses of both families:
			// they cannot be a next hop beyond their link.
			ip := a.Addr()
			if ipam.FamilyOf(ip) == f && !ip.Is4In6() && ip.IsGlobalUnicast() && match(i, a) {
				return a, i.Name, nil
			}
		}
	}
	return netip.Prefix{}, "", fmt.Errorf("%s %q found no %s address; give the node's address with %s CIDR", flag, method, f, ipFlag)
}

// LocalIfaces lists this namespace's interfaces that are up, with their
// addresses of both families, in index order.
func LocalIfaces() ([]Iface, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, err
	}
	var out []Iface
	for _, l := range links {
		if l.Attrs().Flags&net.FlagUp == 0 {
			continue
		}
		addrs, err := netlink.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			return nil, err
		}
		i := Iface{Name: l.Attrs().Name}
		for _, a := range addrs {
			if ip, ok := netip.AddrFromSlice(a.IP); ok {
				bits, _ := a.Mask.Size()
				i.Addrs = append(i.Addrs, netip.PrefixFrom(ip.Unmap(), bits))
			}
		}
		out = append(out, i)
	}
	return out, nil
}

// route is the kernel's route towards dst (a lookup only: nothing is sent).
func route(dst netip.Addr) (netlink.Route, error) {
	rs, err := netlink.RouteGet(dst.AsSlice())
	if err != nil {
		return netlink.Route{}, err
	}
	if len(rs) == 0 {
		return netlink.Route{}, fmt.Errorf("no route to %s", dst)
	}
	return rs[0], nil
}

// RouteSource is the source address the kernel would use toward dst.
func RouteSource(dst netip.Addr) (netip.Addr, error) {
	r, err := route(dst)
	if err != nil {
		return netip.Addr{}, err
	}
	a, ok := netip.AddrFromSlice(r.Src)
	if !ok {
		return netip.Addr{}, fmt.Errorf("the route to %s has no source address", dst)
	}
	return a.Unmap(), nil
}

// RouteGateway is the address through which the kernel reaches dst: its
// route's gateway, or dst itself when it is on a link.
func RouteGateway(dst netip.Addr) (netip.Addr, error) {
	r, err := route(dst)
	if err != nil {
		return netip.Addr{}, err
	}
	if a, ok := netip.AddrFromSlice(r.Gw); ok {
		return a.Unmap(), nil
	}
	return dst, nil
}

// RouteInterface is the interface the kernel would send to dst through.
func RouteInterface(dst netip.Addr) (string, error) {
	r, err := route(dst)
	if err != nil {
		return "", err
	}
	l, err := netlink.LinkByIndex(r.LinkIndex)
	if err != nil {
		return "", fmt.Errorf("the route to %s: %w", dst, err)
	}
	return l.Attrs().Name, nil
}

// InterfaceMTU is the MTU of the named interface.
func InterfaceMTU(name string) (int, error) {
	l, err := netlink.LinkByName(name)
	if err != nil {
		return 0, err
	}
	return l.Attrs().MTU, nil
}
