package felix

import (
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/nstest"
)

// The route reconciler in a node namespace: it programs blackhole, local and via
// routes with margay's protocol, changes nothing on a second pass, repairs a
// deleted or altered route, removes what is no longer desired, and never
// touches a route it does not own.
func TestRoutesApply(t *testing.T) {
	ns := nstest.New(t, "node")
	if err := ns.MakeHost("198.18.1.2/24"); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "ip", "link", "add", "mgytest0", "type", "veth", "peer", "name", "mgytest0p")
	ns.MustRun(t, "ip", "link", "set", "mgytest0", "up")
	ns.MustRun(t, "ip", "link", "set", "mgytest0p", "up")
	ns.MustRun(t, "ip", "route", "add", "10.99.0.0/24", "via", "198.18.1.1") // someone else's
	r := NewRoutes(slog.Default())
	apply := func(want []calc.Route) bool {
		t.Helper()
		var changed bool
		if err := ns.Do(func() (err error) { changed, err = r.Apply(want); return err }); err != nil {
			t.Fatal(err)
		}
		return changed
	}
	show := func() string { return ns.MustRun(t, "ip", "-4", "route", "show", "proto", "77") }
	p := netip.MustParsePrefix
	desired := []calc.Route{
		{Dst: p("10.244.1.0/26"), Kind: calc.Blackhole},
		{Dst: p("10.244.1.5/32"), Kind: calc.Local, Dev: "mgytest0"},
		{Dst: p("10.244.2.0/26"), Kind: calc.Via, Gw: netip.MustParseAddr("198.18.1.3")},
		{Dst: p("10.244.3.0/32"), Kind: calc.Local, Dev: "mgy-missing"}, // pod gone: skipped
	}
	if !apply(desired) {
		t.Error("first Apply reported no change")
	}
	want := "blackhole 10.244.1.0/26 \n10.244.1.5 dev mgytest0 scope link \n10.244.2.0/26 via 198.18.1.3 dev uplink0"
	if got := show(); got != strings.ReplaceAll(want, " \n", "\n") && got != want {
		t.Errorf("routes:\n%s\nwant:\n%s", got, want)
	}
	if apply(desired) {
		t.Error("second Apply changed something")
	}
	ns.MustRun(t, "ip", "route", "del", "10.244.2.0/26")
	ns.MustRun(t, "ip", "route", "replace", "10.244.1.5/32", "via", "198.18.1.4", "proto", "77")
	if !apply(desired) || show() != want && show() != strings.ReplaceAll(want, " \n", "\n") {
		t.Errorf("drift not repaired:\n%s", show())
	}
	if !apply(desired[:1]) {
		t.Error("removing routes reported no change")
	}
	if got := show(); !strings.HasPrefix(got, "blackhole 10.244.1.0/26") || strings.Contains(got, "10.244.2.0") {
		t.Errorf("after shrinking the desired set:\n%s", got)
	}
	if err := ns.Do(r.Cleanup); err != nil {
		t.Fatal(err)
	}
	if got := show(); got != "" {
		t.Errorf("after Cleanup:\n%s", got)
	}
	if out := ns.MustRun(t, "ip", "route", "show", "10.99.0.0/24"); !strings.Contains(out, "via 198.18.1.1") {
		t.Errorf("a route margay does not own was touched: %q", out)
	}
}

// IPv6 routes beside IPv4 ones: a v6 blackhole block and a pod's /128 are
// programmed, left alone on a second pass, repaired and removed like v4 ones.
func TestRoutesApplyIPv6(t *testing.T) {
	ns := nstest.New(t, "node")
	if err := ns.MakeHost("198.18.1.2/24"); err != nil {
		t.Fatal(err)
	}
	ns.MustRun(t, "ip", "link", "add", "mgytest0", "type", "veth", "peer", "name", "mgytest0p")
	ns.MustRun(t, "ip", "link", "set", "mgytest0", "up")
	r := NewRoutes(slog.Default())
	apply := func(want []calc.Route) bool {
		t.Helper()
		var changed bool
		if err := ns.Do(func() (err error) { changed, err = r.Apply(want); return err }); err != nil {
			t.Fatal(err)
		}
		return changed
	}
	p := netip.MustParsePrefix
	desired := []calc.Route{
		{Dst: p("10.244.1.0/26"), Kind: calc.Blackhole},
		{Dst: p("fd00:244::/122"), Kind: calc.Blackhole},
		{Dst: p("fd00:244::5/128"), Kind: calc.Local, Dev: "mgytest0"},
	}
	show6 := func() string { return ns.MustRun(t, "ip", "-6", "route", "show", "proto", "77") }
	if !apply(desired) {
		t.Error("first Apply reported no change")
	}
	got := show6()
	if !strings.Contains(got, "blackhole fd00:244::/122") || !strings.Contains(got, "fd00:244::5 dev mgytest0") {
		t.Errorf("v6 routes:\n%s", got)
	}
	if apply(desired) {
		t.Error("second Apply changed something")
	}
	ns.MustRun(t, "ip", "-6", "route", "del", "fd00:244::5/128")
	if !apply(desired) || !strings.Contains(show6(), "fd00:244::5 dev mgytest0") {
		t.Errorf("a deleted v6 route was not repaired:\n%s", show6())
	}
	if !apply(desired[:1]) || show6() != "" {
		t.Errorf("v6 routes left after they were no longer desired:\n%s", show6())
	}
	if err := ns.Do(r.Cleanup); err != nil {
		t.Fatal(err)
	}
}
