package cni

import (
	"net"
	"strings"
	"testing"

	"github.com/margay-dev/margay/test/nstest"
)

func TestHostVethName(t *testing.T) {
	cases := []struct{ ns, pod, cid, want string }{
		{"default", "nginx", "abc123", "mgyc440f455693"}, // sha1("default.nginx")
		{"", "", "abc123", "mgy6367c48dd19"},             // sha1("abc123"): no pod identity
	}
	for _, c := range cases {
		if got := HostVethName(c.ns, c.pod, c.cid); got != c.want || len(got) > 15 {
			t.Errorf("HostVethName(%q, %q, %q) = %q, want %q", c.ns, c.pod, c.cid, got, c.want)
		}
	}
}

// node makes a node namespace that looks like a real host (see nstest.MakeHost).
func node(t *testing.T) *nstest.NS {
	n := nstest.New(t, "node")
	if err := n.MakeHost("198.18.1.2/24"); err != nil {
		t.Fatal(err)
	}
	return n
}

func hostNet32(s string) *net.IPNet {
	return &net.IPNet{IP: net.ParseIP(s).To4(), Mask: net.CIDRMask(32, 32)}
}

func TestWireTwoPods(t *testing.T) {
	n := node(t)
	podA, podB := nstest.New(t, "pod"), nstest.New(t, "pod")
	for _, p := range []struct {
		ns   *nstest.NS
		host string
		ip   string
	}{{podA, "mgytesta", "10.244.0.2"}, {podB, "mgytestb", "10.244.0.3"}} {
		err := n.Do(func() error {
			w, err := wire(p.ns.Path, p.host, "eth0", 1440, []*net.IPNet{hostNet32(p.ip)})
			if err == nil && (w.HostIndex == 0 || w.PodIndex == 0 || len(w.PodMAC) != 6) {
				t.Errorf("wiring %+v is incomplete", w)
			}
			return err
		})
		if err != nil {
			t.Fatalf("wire %s: %v", p.ip, err)
		}
	}
	link := n.MustRun(t, "ip", "-o", "link", "show", "mgytesta")
	for _, want := range []string{"ee:ee:ee:ee:ee:ee", "mtu 1440", "UP"} {
		if !strings.Contains(link, want) {
			t.Errorf("host veth %q lacks %q", link, want)
		}
	}
	for path, want := range map[string]string{
		"/proc/sys/net/ipv4/conf/mgytesta/proxy_arp":    "1",
		"/proc/sys/net/ipv4/neigh/mgytesta/proxy_delay": "0",
		"/proc/sys/net/ipv4/conf/mgytesta/forwarding":   "1",
	} {
		if got := n.MustRun(t, "cat", path); got != want {
			t.Errorf("%s = %s, want %s", path, got, want)
		}
	}
	if r := n.MustRun(t, "ip", "route", "show", "10.244.0.2"); !strings.Contains(r, "dev mgytesta scope link") {
		t.Errorf("host route to the pod: %q", r)
	}
	if a := podA.MustRun(t, "ip", "-o", "addr", "show", "eth0"); !strings.Contains(a, "10.244.0.2/32") {
		t.Errorf("pod address: %q", a)
	}
	routes := podA.MustRun(t, "ip", "route")
	for _, want := range []string{"default via 169.254.1.1 dev eth0", "169.254.1.1 dev eth0 scope link"} {
		if !strings.Contains(routes, want) {
			t.Errorf("pod routes %q lack %q", routes, want)
		}
	}
	// Bounded pings: pod to pod through the node, and pod to the node.
	for _, dst := range []string{"10.244.0.3", "198.18.1.2"} {
		if out, err := podA.Run("ping", "-c", "2", "-W", "2", "-i", "0.2", dst); err != nil {
			t.Errorf("ping %s from pod A: %v\n%s", dst, err, out)
		}
	}

	if err := n.Do(func() error { return unwire("mgytesta") }); err != nil {
		t.Fatalf("unwire: %v", err)
	}
	if out, err := n.Run("ip", "link", "show", "mgytesta"); err == nil {
		t.Errorf("host veth still there after unwire: %s", out)
	}
	if r := n.MustRun(t, "ip", "route", "show", "10.244.0.2"); r != "" {
		t.Errorf("host route left after unwire: %q", r)
	}
	if out, err := podA.Run("ip", "link", "show", "eth0"); err == nil {
		t.Errorf("pod eth0 still there after unwire: %s", out)
	}
	if err := n.Do(func() error { return unwire("mgytesta") }); err != nil {
		t.Errorf("second unwire: %v, want success", err)
	}
}

func TestWireFailureLeavesNothing(t *testing.T) {
	n := node(t)
	pod := nstest.New(t, "pod")
	// The pod already has an eth0: creating the peer fails, and the first veth
	// must survive the failed second attempt.
	if err := n.Do(func() error {
		_, err := wire(pod.Path, "mgyfirst", "eth0", 1500, []*net.IPNet{hostNet32("10.244.0.9")})
		return err
	}); err != nil {
		t.Fatal(err)
	}
	err := n.Do(func() error {
		_, err := wire(pod.Path, "mgysecond", "eth0", 1500, []*net.IPNet{hostNet32("10.244.0.10")})
		return err
	})
	if err == nil {
		t.Fatal("a second eth0 in the same pod was accepted")
	}
	if out, err := n.Run("ip", "link", "show", "mgysecond"); err == nil {
		t.Errorf("the failed attempt left %s", out)
	}
	if _, err := n.Run("ip", "link", "show", "mgyfirst"); err != nil {
		t.Errorf("the failed attempt removed the first pod's veth")
	}
	if err := n.Do(func() error {
		_, err := wire("/var/run/netns/does-not-exist", "mgythird", "eth0", 1500, nil)
		return err
	}); err == nil {
		t.Error("a missing pod netns was accepted")
	}
}
