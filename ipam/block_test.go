package ipam

import (
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/api"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

func TestBlockAssignFIFO(t *testing.T) {
	b := newBlock(netip.MustParsePrefix("10.0.0.0/30"), "n1")
	got := b.assign(2, "h1", "n1", nil, t0, time.Minute, false)
	want := []netip.Addr{netip.MustParseAddr("10.0.0.0"), netip.MustParseAddr("10.0.0.1")}
	if len(got) != 2 || got[0].IP != want[0] || got[1].IP != want[1] {
		t.Fatalf("assign = %v, want %v", got, want)
	}
	if got[0].Sequence != 1 || got[1].Sequence != 2 || b.Sequence != 2 {
		t.Errorf("sequences %d,%d (block %d), want 1,2 (2)", got[0].Sequence, got[1].Sequence, b.Sequence)
	}
	// Free .0, then assign: the never-used .2 and .3 come before the freed .0.
	if b.release(want[0], "h1", got[0].Sequence, t0) == nil {
		t.Fatal("release of a held address failed")
	}
	next := b.assign(3, "h2", "n1", nil, t0.Add(time.Second), time.Minute, false)
	if ips := addrs(next); !slices.Equal(ips, []string{"10.0.0.2", "10.0.0.3"}) {
		t.Errorf("after a release, assign = %v; want the never-used addresses and not the cooling .0", ips)
	}
	if b.Available(t0.Add(time.Second), time.Minute) != 0 || len(b.Free) != 1 {
		t.Errorf("available %d, free %d; want 0 and 1", b.Available(t0.Add(time.Second), time.Minute), len(b.Free))
	}
	// Past the cooldown the freed address is available again.
	if got := b.assign(1, "h3", "n1", nil, t0.Add(2*time.Minute), time.Minute, false); len(got) != 1 || got[0].IP != want[0] {
		t.Errorf("after the cooldown, assign = %v, want %s", got, want[0])
	}
}

func TestBlockCooldownLastResort(t *testing.T) {
	b := newBlock(netip.MustParsePrefix("10.0.0.0/31"), "n1")
	got := b.assign(2, "h", "n1", nil, t0, time.Minute, false)
	b.release(got[1].IP, "", 0, t0)
	b.release(got[0].IP, "", 0, t0.Add(time.Second))
	if n := len(b.assign(1, "h", "n1", nil, t0.Add(2*time.Second), time.Minute, false)); n != 0 {
		t.Fatalf("assigned %d cooling addresses without ignoreCooldown", n)
	}
	// The last resort takes the address freed longest ago first.
	got = b.assign(1, "h", "n1", nil, t0.Add(2*time.Second), time.Minute, true)
	if len(got) != 1 || got[0].IP.String() != "10.0.0.1" {
		t.Errorf("last-resort assign = %v, want 10.0.0.1 (freed first)", got)
	}
}

func TestBlockStaleRelease(t *testing.T) {
	b := newBlock(netip.MustParsePrefix("10.0.0.0/31"), "n1")
	ip := netip.MustParseAddr("10.0.0.0")
	first := b.assign(1, "h", "n1", nil, t0, 0, false)[0]
	b.release(ip, "h", first.Sequence, t0)
	b.assign(1, "h", "n1", nil, t0, 0, false) // .1
	second := b.assign(1, "h", "n1", nil, t0, 0, true)[0]
	if second.IP != ip {
		t.Fatalf("expected .0 to be reused, got %s", second.IP)
	}
	cases := []struct {
		name   string
		handle string
		seq    uint64
		frees  bool
	}{
		{"old sequence", "h", first.Sequence, false},
		{"other handle", "other", 0, false},
		{"current", "h", second.Sequence, true},
		{"already free", "h", second.Sequence, false},
	}
	for _, c := range cases {
		if got := b.release(ip, c.handle, c.seq, t0) != nil; got != c.frees {
			t.Errorf("%s: released=%v, want %v", c.name, got, c.frees)
		}
	}
	if b.release(netip.MustParseAddr("10.9.9.9"), "", 0, t0) != nil {
		t.Error("released an address outside the block")
	}
}

func TestBlockOrdinals(t *testing.T) {
	b := newBlock(netip.MustParsePrefix("10.1.255.192/26"), "")
	if n := len(b.Allocations); n != 64 {
		t.Fatalf("a /26 has %d ordinals", n)
	}
	for _, ord := range []int{0, 1, 63} {
		got, ok := b.ordinal(b.addr(ord))
		if !ok || got != ord {
			t.Errorf("ordinal(addr(%d)) = %d, %v", ord, got, ok)
		}
	}
	if b.addr(63).String() != "10.1.255.255" {
		t.Errorf("addr(63) = %s", b.addr(63))
	}
	if _, ok := b.ordinal(netip.MustParseAddr("10.2.0.0")); ok {
		t.Error("10.2.0.0 is not in 10.1.255.192/26")
	}
	if _, ok := b.ordinal(netip.MustParseAddr("::ffff:10.1.255.193")); ok {
		t.Error("an IPv4-mapped IPv6 address is not in an IPv4 block")
	}
}

func TestBlockOrdinalsV6(t *testing.T) {
	// A block that straddles a 64-bit word boundary carries into the high word.
	cases := []struct {
		cidr      string
		ord       int
		addr      string
		ordinals  int
		notInside string
	}{
		{"fd00:10::/122", 63, "fd00:10::3f", 64, "fd00:10::40"},
		{"fd00:10:0:1:ffff:ffff:ffff:ffc0/122", 63, "fd00:10:0:1:ffff:ffff:ffff:ffff", 64, "fd00:10:0:2::"},
		{"2001:db8::1000/116", 4095, "2001:db8::1fff", 4096, "2001:db8::fff"},
		{"2001:db8::7/128", 0, "2001:db8::7", 1, "2001:db8::8"},
	}
	for _, c := range cases {
		b := newBlock(netip.MustParsePrefix(c.cidr), "")
		if len(b.Allocations) != c.ordinals {
			t.Errorf("%s has %d ordinals, want %d", c.cidr, len(b.Allocations), c.ordinals)
		}
		if got := b.addr(c.ord).String(); got != c.addr {
			t.Errorf("%s: addr(%d) = %s, want %s", c.cidr, c.ord, got, c.addr)
		}
		if got, ok := b.ordinal(netip.MustParseAddr(c.addr)); !ok || got != c.ord {
			t.Errorf("%s: ordinal(%s) = %d, %v", c.cidr, c.addr, got, ok)
		}
		if _, ok := b.ordinal(netip.MustParseAddr(c.notInside)); ok {
			t.Errorf("%s holds %s", c.cidr, c.notInside)
		}
	}
	if _, ok := newBlock(netip.MustParsePrefix("fd00::/122"), "").ordinal(netip.MustParseAddr("0.0.0.1")); ok {
		t.Error("an IPv4 address is in an IPv6 block")
	}
}

func TestEligiblePools(t *testing.T) {
	mk := func(name, cidr, sel string, disabled bool) *api.IPPool {
		p := pool(name, cidr)
		p.Spec.NodeSelector, p.Spec.Disabled = sel, disabled
		p.SetDefaults()
		return p
	}
	a := mk("a", "10.0.0.0/16", "", false)
	b := mk("b", "10.1.0.0/16", "zone == 'east'", false)
	c := mk("c", "10.2.0.0/16", "", true)
	v6 := mk("v6", "fd00:10::/48", "", false)
	v6east := mk("v6-east", "fd00:11::/48", "zone == 'east'", false)
	all := []*api.IPPool{a, b, c, v6, v6east}
	east := map[string]string{"zone": "east"}
	cases := []struct {
		name    string
		family  Family
		names   []string
		labels  map[string]string
		want    []string
		wantErr string
	}{
		{name: "all eligible", labels: east, want: []string{"a", "b"}},
		{name: "v6 all eligible", family: IPv6, labels: east, want: []string{"v6", "v6-east"}},
		{name: "v6 selector excludes", family: IPv6, want: []string{"v6"}},
		{name: "v6 by CIDR", family: IPv6, names: []string{"fd00:11::/48"}, labels: east, want: []string{"v6-east"}},
		{name: "v6 pool for v4", names: []string{"v6"}, wantErr: `IP pool "v6" (fd00:10::/48) is IPv6 and cannot serve an IPv4 address`},
		{name: "v4 pool for v6", family: IPv6, names: []string{"a"}, wantErr: `IP pool "a" (10.0.0.0/16) is IPv4 and cannot serve an IPv6 address`},
		{name: "v6 only unselected", family: IPv6, names: []string{"v6-east"}, wantErr: "no usable IPv6 pool: v6-east's nodeSelector"},
		{name: "selector excludes", want: []string{"a"}},
		{name: "by name, in order", names: []string{"b", "a"}, labels: east, want: []string{"b", "a"}},
		{name: "by CIDR", names: []string{"10.1.0.0/16"}, labels: east, want: []string{"b"}},
		{name: "unknown pool", names: []string{"zz"}, wantErr: `IP pool "zz" does not exist`},
		{name: "only disabled", names: []string{"c"}, wantErr: "c is disabled"},
		{name: "only unselected", names: []string{"b"}, wantErr: "does not select this node"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			f := tc.family
			if f == 0 {
				f = IPv4
			}
			got, err := eligiblePools(all, f, tc.names, tc.labels)
			if tc.wantErr != "" {
				if err == nil || !contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want %q", err, tc.wantErr)
				}
				return
			}
			var names []string
			for _, p := range got {
				names = append(names, p.Metadata.Name)
			}
			if err != nil || !slices.Equal(names, tc.want) {
				t.Errorf("got %v, %v; want %v", names, err, tc.want)
			}
		})
	}
	if _, err := eligiblePools(nil, IPv4, nil, nil); err == nil || !contains(err.Error(), "no IPv4 pools exist") {
		t.Errorf("no pools: err = %v", err)
	}
	if _, err := eligiblePools([]*api.IPPool{a}, IPv6, nil, nil); err == nil || !contains(err.Error(), "no IPv6 pools exist; create one") {
		t.Errorf("no v6 pools: err = %v", err)
	}
}

func TestBlockCandidates(t *testing.T) {
	p := pool("p", "10.0.0.0/24")
	p.SetDefaults()
	taken := map[netip.Prefix]bool{netip.MustParsePrefix("10.0.0.64/26"): true}
	var got []netip.Prefix
	notTaken := func(c netip.Prefix) bool { return !taken[c] }
	for c := range blockCandidates(p, notTaken, "node-a") {
		got = append(got, c)
	}
	if len(got) != 3 || slices.Contains(got, netip.MustParsePrefix("10.0.0.64/26")) {
		t.Fatalf("candidates %v: want the 3 untaken /26s", got)
	}
	// Different nodes start at different offsets (for these names), so simultaneous
	// claims rarely collide; the same node always starts at the same place.
	first := func(node string) netip.Prefix {
		for c := range blockCandidates(p, func(netip.Prefix) bool { return true }, node) {
			return c
		}
		return netip.Prefix{}
	}
	if first("node-a") != first("node-a") {
		t.Error("the start offset is not stable")
	}
	starts := map[netip.Prefix]bool{}
	for _, n := range []string{"node-a", "node-b", "node-c", "node-d", "node-e"} {
		starts[first(n)] = true
	}
	if len(starts) < 2 {
		t.Errorf("5 nodes all start at the same block")
	}
	// Laziness: a /8 of /32s must not be enumerated.
	big := pool("big", "10.0.0.0/8")
	big.Spec.BlockSize = 32
	n := 0
	for range blockCandidates(big, func(netip.Prefix) bool { return true }, "x") {
		if n++; n == 3 {
			break
		}
	}
}

func TestBlockCandidatesV6(t *testing.T) {
	// A /120 of /122s: every block, each once, all inside the pool.
	p := pool("p", "fd00:10::100/120")
	p.SetDefaults()
	seen := map[netip.Prefix]bool{}
	for c := range blockCandidates(p, func(netip.Prefix) bool { return true }, "node-a") {
		if c.Bits() != 122 || !p.Prefix().Contains(c.Addr()) || c.Masked() != c || seen[c] {
			t.Errorf("candidate %s: want a distinct /122 inside %s", c, p.Spec.CIDR)
		}
		seen[c] = true
	}
	if len(seen) != 4 {
		t.Errorf("%d candidates, want 4", len(seen))
	}
	// A /48 holds 2^74 /122s: the index is capped, and still inside the pool.
	wide := pool("wide", "fd00:10::/48")
	wide.SetDefaults()
	starts := map[netip.Prefix]bool{}
	for _, node := range []string{"node-a", "node-b", "node-c"} {
		n := 0
		for c := range blockCandidates(wide, func(netip.Prefix) bool { return true }, node) {
			if !wide.Prefix().Contains(c.Addr()) || c.Bits() != 122 {
				t.Errorf("candidate %s is not a /122 of %s", c, wide.Spec.CIDR)
			}
			if n == 0 {
				starts[c] = true
			}
			if n++; n == 100 {
				break
			}
		}
	}
	if len(starts) != 3 {
		t.Errorf("3 nodes start at %d distinct blocks of a /48, want 3", len(starts))
	}
}

func addrs(as []Assigned) []string {
	var out []string
	for _, a := range as {
		out = append(out, a.IP.String())
	}
	return out
}

func contains(s, sub string) bool { return strings.Contains(s, sub) }

func TestOverlapsAny(t *testing.T) {
	taken := map[netip.Prefix]bool{
		netip.MustParsePrefix("10.0.0.0/26"):  true, // a /26 of a deleted pool
		netip.MustParsePrefix("10.0.8.0/24"):  true,
		netip.MustParsePrefix("10.0.16.4/30"): true,
	}
	finest := finestBits(taken, IPv4)
	cases := map[string]bool{
		"10.0.0.0/24":  true,  // contains a taken /26
		"10.0.0.0/26":  true,  // equal
		"10.0.0.64/26": false, // beside it
		"10.0.8.64/26": true,  // inside a taken /24
		"10.0.16.0/24": true,  // contains a taken /30
		"10.0.17.0/24": false,
	}
	for c, want := range cases {
		if got := overlapsAny(netip.MustParsePrefix(c), taken, finest); got != want {
			t.Errorf("overlapsAny(%s) = %v, want %v", c, got, want)
		}
	}

	// IPv6 blocks beside the IPv4 ones: each family's finest is its own.
	taken[netip.MustParsePrefix("fd00::/116")] = true
	taken[netip.MustParsePrefix("fd00::1:40/122")] = true
	taken[netip.MustParsePrefix("fd00::2:7/128")] = true
	if f := finestBits(taken, IPv4); f != 30 {
		t.Errorf("IPv4 finest = %d, want 30", f)
	}
	finest6 := finestBits(taken, IPv6)
	cases6 := map[string]bool{
		"fd00::40/122":   true,  // inside the taken /116
		"fd00::1:0/116":  true,  // contains the taken /122
		"fd00::1:0/122":  false, // beside it
		"fd00::2:0/122":  true,  // contains the taken /128
		"fd00::3:0/122":  false,
		"::ffff:0:0/122": false,
	}
	for c, want := range cases6 {
		if got := overlapsAny(netip.MustParsePrefix(c), taken, finest6); got != want {
			t.Errorf("overlapsAny(%s) = %v, want %v", c, got, want)
		}
	}
}
