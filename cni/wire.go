package cni

import (
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Pod-side gateways and host-side MAC, as in Calico. IPv4 pods route through
// 169.254.1.1, which the host end of their veth answers for by proxy ARP. IPv6
// pods route through fe80::ecee:eeff:feee:eeee, the link-local address the kernel
// derives (EUI-64) from HostMAC on the host end: no proxy is needed.
var (
	PodGateway   = net.IPv4(169, 254, 1, 1)
	PodGatewayV6 = net.ParseIP("fe80::ecee:eeff:feee:eeee")
	HostMAC      = net.HardwareAddr{0xee, 0xee, 0xee, 0xee, 0xee, 0xee}
)

// HostVethName is the host end of a pod's veth: "mgy" and the first 11 hex
// characters of sha1("<namespace>.<pod>"), or of the container ID for a container
// without Kubernetes identity. 14 characters fit IFNAMSIZ.
func HostVethName(namespace, pod, containerID string) string {
	key := containerID
	if pod != "" {
		key = namespace + "." + pod
	}
	sum := sha1.Sum([]byte(key))
	return "mgy" + hex.EncodeToString(sum[:])[:11]
}

// Wiring is what wire built, for the CNI result.
type Wiring struct {
	HostIndex, PodIndex int
	PodMAC              net.HardwareAddr
}

// wire creates a veth pair whose peer is born inside the pod's namespace (no move
// afterwards), configures both ends and routes the pod's addresses to it. It runs
// in the node's namespace and undoes what it did if a step fails.
func wire(podNSPath, hostName, podIf string, mtu int, ips []*net.IPNet) (w Wiring, err error) {
	podNS, err := netns.GetFromPath(podNSPath)
	if err != nil {
		return w, fmt.Errorf("open pod netns %s: %w", podNSPath, err)
	}
	defer podNS.Close()
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return w, err
	}
	defer host.Close()
	// Only the route family: a handle in another namespace would also open an XFRM
	// socket, which minimal kernels refuse.
	pod, err := netlink.NewHandleAt(podNS, unix.NETLINK_ROUTE)
	if err != nil {
		return w, fmt.Errorf("netlink in pod netns: %w", err)
	}
	defer pod.Close()

	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: hostName, MTU: mtu, HardwareAddr: HostMAC},
		PeerName:      podIf,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(int(podNS)),
	}
	if err := host.LinkAdd(veth); err != nil {
		return w, fmt.Errorf("create veth %s: %w", hostName, err)
	}
	defer func() {
		if err != nil {
			host.LinkDel(veth)
		}
	}()
	hostLink, err := host.LinkByName(hostName)
	if err != nil {
		return w, err
	}
	v4, v6 := families(ips)
	if err := hostSysctls(hostName, v6); err != nil {
		return w, err
	}
	if err := host.LinkSetUp(hostLink); err != nil {
		return w, fmt.Errorf("set %s up: %w", hostName, err)
	}
	podLink, err := pod.LinkByName(podIf)
	if err != nil {
		return w, fmt.Errorf("find %s in the pod: %w", podIf, err)
	}
	for _, ip := range ips {
		// No duplicate address detection: IPAM made the address unique, and DAD
		// would hold it unusable for a second.
		if err := pod.AddrAdd(podLink, &netlink.Addr{IPNet: ip, Flags: unix.IFA_F_NODAD}); err != nil {
			return w, fmt.Errorf("add %s to %s: %w", ip, podIf, err)
		}
	}
	if err := pod.LinkSetUp(podLink); err != nil {
		return w, fmt.Errorf("set %s up: %w", podIf, err)
	}
	if v4 {
		gw := &net.IPNet{IP: PodGateway, Mask: net.CIDRMask(32, 32)}
		if err := pod.RouteAdd(&netlink.Route{LinkIndex: podLink.Attrs().Index, Dst: gw, Scope: netlink.SCOPE_LINK}); err != nil {
			return w, fmt.Errorf("route to %s in the pod: %w", PodGateway, err)
		}
		if err := pod.RouteAdd(&netlink.Route{LinkIndex: podLink.Attrs().Index, Gw: PodGateway}); err != nil {
			return w, fmt.Errorf("default route in the pod: %w", err)
		}
	}
	if v6 {
		dflt := &net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}
		if err := pod.RouteAdd(&netlink.Route{LinkIndex: podLink.Attrs().Index, Dst: dflt, Gw: PodGatewayV6}); err != nil {
			return w, fmt.Errorf("IPv6 default route in the pod: %w", err)
		}
	}
	for _, ip := range ips {
		r := &netlink.Route{LinkIndex: hostLink.Attrs().Index, Dst: ip, Scope: netlink.SCOPE_LINK}
		if err := host.RouteReplace(r); err != nil {
			return w, fmt.Errorf("host route to %s: %w", ip, err)
		}
	}
	return Wiring{HostIndex: hostLink.Attrs().Index, PodIndex: podLink.Attrs().Index, PodMAC: podLink.Attrs().HardwareAddr}, nil
}

// families says which families ips hold.
func families(ips []*net.IPNet) (v4, v6 bool) {
	for _, ip := range ips {
		v4, v6 = v4 || ip.IP.To4() != nil, v6 || ip.IP.To4() == nil
	}
	return v4, v6
}

// hostSysctls lets the host end answer ARP for the pod gateway at once and
// forward. For an IPv6 pod it also keeps IPv6 on, skips DAD so the gateway
// address is usable the moment the link is up, and turns on IPv6 forwarding,
// which Linux only has per host.
func hostSysctls(name string, v6 bool) error {
	settings := []struct{ path, value string }{
		{"ipv4/conf/" + name + "/proxy_arp", "1"},
		{"ipv4/neigh/" + name + "/proxy_delay", "0"},
		{"ipv4/conf/" + name + "/forwarding", "1"},
	}
	if v6 {
		settings = append(settings, []struct{ path, value string }{
			{"ipv6/conf/" + name + "/disable_ipv6", "0"},
			{"ipv6/conf/" + name + "/accept_dad", "0"},
			{"ipv6/conf/all/forwarding", "1"},
		}...)
	}
	if _, err := os.Stat("/proc/sys/net/ipv6"); err == nil {
		settings = append(settings, struct{ path, value string }{"ipv6/conf/" + name + "/accept_ra", "0"})
	} else if v6 {
		return fmt.Errorf("the pod has an IPv6 address, but this kernel has no IPv6 (%w)", err)
	}
	for _, s := range settings {
		p := filepath.Join("/proc/sys/net", s.path)
		if err := os.WriteFile(p, []byte(s.value), 0o644); err != nil {
			return fmt.Errorf("sysctl %s: %w", p, err)
		}
	}
	return nil
}

// unwire deletes the host end of a pod's veth (the kernel removes the peer and the
// routes through it). A veth that is already gone is not an error.
func unwire(hostName string) error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return err
	}
	defer h.Close()
	l, err := h.LinkByName(hostName)
	var nf netlink.LinkNotFoundError
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return err
	}
	return h.LinkDel(l)
}

// checkWiring lists how a pod's interfaces differ from what wire builds for ips.
func checkWiring(podNSPath, hostName, podIf string, ips []*net.IPNet) []string {
	var diffs []string
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return []string{err.Error()}
	}
	defer host.Close()
	hostLink, err := host.LinkByName(hostName)
	if err != nil {
		diffs = append(diffs, fmt.Sprintf("host veth %s is missing", hostName))
	} else {
		a := hostLink.Attrs()
		if a.HardwareAddr.String() != HostMAC.String() {
			diffs = append(diffs, fmt.Sprintf("host veth %s has MAC %s, want %s", hostName, a.HardwareAddr, HostMAC))
		}
		if a.Flags&net.FlagUp == 0 {
			diffs = append(diffs, fmt.Sprintf("host veth %s is down", hostName))
		}
		if b, err := os.ReadFile("/proc/sys/net/ipv4/conf/" + hostName + "/proxy_arp"); err != nil || strings.TrimSpace(string(b)) != "1" {
			diffs = append(diffs, fmt.Sprintf("proxy_arp is off on %s", hostName))
		}
		for _, ip := range ips {
			routes, err := host.RouteListFiltered(family(ip), &netlink.Route{Dst: ip}, netlink.RT_FILTER_DST)
			if err != nil || len(routes) == 0 || routes[0].LinkIndex != a.Index {
				diffs = append(diffs, fmt.Sprintf("no host route to %s through %s", ip, hostName))
			}
		}
	}
	podNS, err := netns.GetFromPath(podNSPath)
	if err != nil {
		return append(diffs, fmt.Sprintf("pod netns %s: %v", podNSPath, err))
	}
	defer podNS.Close()
	pod, err := netlink.NewHandleAt(podNS, unix.NETLINK_ROUTE)
	if err != nil {
		return append(diffs, err.Error())
	}
	defer pod.Close()
	podLink, err := pod.LinkByName(podIf)
	if err != nil {
		return append(diffs, fmt.Sprintf("pod interface %s is missing", podIf))
	}
	addrs, _ := pod.AddrList(podLink, netlink.FAMILY_ALL)
	for _, ip := range ips {
		found := false
		for _, a := range addrs {
			found = found || a.IPNet.String() == ip.String()
		}
		if !found {
			diffs = append(diffs, fmt.Sprintf("%s lacks address %s", podIf, ip))
		}
	}
	v4, v6 := families(ips)
	for _, gw := range []struct {
		want   bool
		family int
		gw     net.IP
	}{{v4, netlink.FAMILY_V4, PodGateway}, {v6, netlink.FAMILY_V6, PodGatewayV6}} {
		if !gw.want {
			continue
		}
		routes, _ := pod.RouteList(podLink, gw.family)
		hasDefault := false
		for _, r := range routes {
			hasDefault = hasDefault || ((r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask)) && r.Gw.Equal(gw.gw))
		}
		if !hasDefault {
			diffs = append(diffs, fmt.Sprintf("the pod has no default route via %s", gw.gw))
		}
	}
	return diffs
}

func isZeroMask(m net.IPMask) bool {
	ones, _ := m.Size()
	return ones == 0
}

// family is the netlink family of ip.
func family(ip *net.IPNet) int {
	if ip.IP.To4() != nil {
		return netlink.FAMILY_V4
	}
	return netlink.FAMILY_V6
}
