package ipip

import (
	"errors"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"testing"

	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/test/nstest"
)

// tunl0 in a node namespace: up, MTU underlay-20, the tunnel address, nothing
// changed on a second pass, and released (address off, down) when no pool needs
// it. On a kernel without IPIP, Apply says exactly that.
func TestDeviceApply(t *testing.T) {
	ns := nstest.New(t, "node")
	d := New(slog.Default())
	want := &calc.TunnelDevice{Addr: netip.MustParseAddr("10.245.1.1"), MTU: 1480}
	apply := func(w *calc.TunnelDevice) (changed bool, err error) {
		err = ns.Do(func() (err error) { changed, err = d.Apply(w); return err })
		return changed, err
	}
	changed, err := apply(want)
	if _, statErr := os.Stat("/sys/module/ipip"); statErr != nil && err != nil {
		if !errors.Is(err, ErrNoKernelSupport) || !strings.Contains(err.Error(), "modprobe ipip") {
			t.Fatalf("no IPIP in this kernel: Apply = %v, want ErrNoKernelSupport", err)
		}
		t.Logf("this kernel has no IPIP, and Apply says so: %v", err)
		return
	}
	if err != nil || !changed {
		t.Fatalf("Apply = %v, %v", changed, err)
	}
	out := ns.MustRun(t, "ip", "-d", "addr", "show", "tunl0")
	for _, w := range []string{"mtu 1480", "inet 10.245.1.1/32", "ipip"} {
		if !strings.Contains(out, w) {
			t.Errorf("tunl0 lacks %q:\n%s", w, out)
		}
	}
	if !strings.Contains(out, ",UP") && !strings.Contains(out, "<UP") {
		t.Errorf("tunl0 is not up:\n%s", out)
	}
	if changed, err := apply(want); err != nil || changed {
		t.Errorf("second Apply = %v, %v", changed, err)
	}
	if changed, err := apply(nil); err != nil || !changed {
		t.Errorf("release = %v, %v", changed, err)
	}
	if out := ns.MustRun(t, "ip", "addr", "show", "tunl0"); strings.Contains(out, "10.245.1.1") {
		t.Errorf("address stayed on tunl0:\n%s", out)
	}
}
