package datastore

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/margay-dev/margay/api"
)

func TestBlockKeyRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		cidr string
		key  string
	}{
		{"10.244.0.0/26", "/margay/v1/ipam/blocks/10.244.0.0-26"},
		{"10.244.255.192/26", "/margay/v1/ipam/blocks/10.244.255.192-26"},
		{"192.168.0.0/20", "/margay/v1/ipam/blocks/192.168.0.0-20"},
		{"10.0.0.7/32", "/margay/v1/ipam/blocks/10.0.0.7-32"},
	} {
		t.Run(tc.cidr, func(t *testing.T) {
			cidr := netip.MustParsePrefix(tc.cidr)
			key := BlockKey(cidr)
			if key != tc.key {
				t.Fatalf("BlockKey(%s) = %q, want %q", cidr, key, tc.key)
			}
			if !strings.HasPrefix(key, BlocksPrefix) {
				t.Errorf("BlockKey(%s) = %q does not start with BlocksPrefix %q", cidr, key, BlocksPrefix)
			}
			if strings.Count(strings.TrimPrefix(key, BlocksPrefix), "/") != 0 {
				t.Errorf("block key %q: the CIDR segment must not contain '/'", key)
			}
			got, err := ParseBlockKey(key)
			if err != nil {
				t.Fatalf("ParseBlockKey(%q): %v", key, err)
			}
			if got != cidr {
				t.Errorf("ParseBlockKey(%q) = %s, want %s", key, got, cidr)
			}
		})
	}
}

func TestAffinityKeyRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		node string
		cidr string
		key  string
	}{
		{"node1", "10.244.0.0/26", "/margay/v1/ipam/affinity/node1/10.244.0.0-26"},
		{"worker-2.example.com", "10.244.1.64/26", "/margay/v1/ipam/affinity/worker-2.example.com/10.244.1.64-26"},
		{"n", "172.16.0.0/24", "/margay/v1/ipam/affinity/n/172.16.0.0-24"},
	} {
		t.Run(tc.node+"/"+tc.cidr, func(t *testing.T) {
			cidr := netip.MustParsePrefix(tc.cidr)
			key := AffinityKey(tc.node, cidr)
			if key != tc.key {
				t.Fatalf("AffinityKey(%q, %s) = %q, want %q", tc.node, cidr, key, tc.key)
			}
			if !strings.HasPrefix(key, AffinityPrefix(tc.node)) || !strings.HasPrefix(key, AffinitiesPrefix) {
				t.Errorf("affinity key %q does not start with AffinityPrefix(%q) = %q", key, tc.node, AffinityPrefix(tc.node))
			}
			node, got, err := ParseAffinityKey(key)
			if err != nil {
				t.Fatalf("ParseAffinityKey(%q): %v", key, err)
			}
			if node != tc.node || got != cidr {
				t.Errorf("ParseAffinityKey(%q) = (%q, %s), want (%q, %s)", key, node, got, tc.node, cidr)
			}
		})
	}
}

// A node's affinity prefix must not also match a node whose name extends it.
func TestAffinityPrefixIsExact(t *testing.T) {
	k := AffinityKey("node10", netip.MustParsePrefix("10.0.0.0/26"))
	if strings.HasPrefix(k, AffinityPrefix("node1")) {
		t.Errorf("key %q of node10 is under AffinityPrefix(node1) = %q", k, AffinityPrefix("node1"))
	}
}

func TestParseKeyErrors(t *testing.T) {
	for _, key := range []string{
		BlocksPrefix + "garbage",
		BlocksPrefix + "10.0.0.0",
		BlocksPrefix + "10.0.0.0-x",
		BlocksPrefix + "10.0.0.0-33",
		BlocksPrefix,
	} {
		if p, err := ParseBlockKey(key); err == nil {
			t.Errorf("ParseBlockKey(%q) = %s, want an error", key, p)
		}
	}
	for _, key := range []string{
		AffinitiesPrefix + "nodeonly",
		AffinitiesPrefix + "node1/garbage",
		AffinitiesPrefix + "node1/10.0.0.0",
	} {
		if n, p, err := ParseAffinityKey(key); err == nil {
			t.Errorf("ParseAffinityKey(%q) = (%q, %s), want an error", key, n, p)
		}
	}
}

func TestResourceKeys(t *testing.T) {
	pools := api.KindOf(api.NewIPPool(""))
	if got, want := ResourcePrefix(pools), "/margay/v1/resources/ippools/"; got != want {
		t.Errorf("ResourcePrefix(IPPool) = %q, want %q", got, want)
	}
	if got, want := ResourceKey(pools, "p1"), "/margay/v1/resources/ippools/p1"; got != want {
		t.Errorf("ResourceKey(IPPool, p1) = %q, want %q", got, want)
	}
	if got, want := HandleKey("k8s-pod-network.abc123"), "/margay/v1/ipam/handles/k8s-pod-network.abc123"; got != want {
		t.Errorf("HandleKey = %q, want %q", got, want)
	}
	// Every kind has its own prefix under resources/, and none is a prefix of
	// another (a List of one kind must never return another kind).
	seen := map[string]string{}
	for _, k := range api.Kinds() {
		p := ResourcePrefix(k)
		if !strings.HasPrefix(p, Prefix+"resources/") || !strings.HasSuffix(p, "/") {
			t.Errorf("ResourcePrefix(%s) = %q, want %sresources/<plural>/", k.Kind, p, Prefix)
		}
		for other, op := range seen {
			if strings.HasPrefix(p, op) || strings.HasPrefix(op, p) {
				t.Errorf("prefixes of %s (%q) and %s (%q) nest", k.Kind, p, other, op)
			}
		}
		seen[k.Kind] = p
	}
	// The IPAM prefixes live outside resources/ and outside each other.
	for _, p := range []string{BlocksPrefix, AffinitiesPrefix, HandlesPrefix} {
		if !strings.HasPrefix(p, Prefix+"ipam/") || strings.HasPrefix(p, Prefix+"resources/") {
			t.Errorf("IPAM prefix %q is not under %sipam/", p, Prefix)
		}
	}
}
