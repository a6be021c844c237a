package datastore

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/margay-dev/margay/api"
)

// Prefix is the root of every margay key in etcd.
const Prefix = "/margay/v1/"

// Key prefixes of the IPAM state.
const (
	BlocksPrefix     = Prefix + "ipam/blocks/"
	AffinitiesPrefix = Prefix + "ipam/affinity/"
	HandlesPrefix    = Prefix + "ipam/handles/"
)

// ResourcePrefix is the prefix under which every resource of a kind is stored.
func ResourcePrefix(k api.KindInfo) string { return Prefix + "resources/" + k.Plural + "/" }

// ResourceKey is the key of one resource.
func ResourceKey(k api.KindInfo, name string) string { return ResourcePrefix(k) + name }

// cidrSegment writes a prefix without '/', so it is one key segment: 10.244.0.0-26.
func cidrSegment(p netip.Prefix) string {
	return fmt.Sprintf("%s-%d", p.Addr(), p.Bits())
}

func parseCIDRSegment(s string) (netip.Prefix, error) {
	i := strings.LastIndexByte(s, '-')
	if i < 0 {
		return netip.Prefix{}, fmt.Errorf("bad CIDR key segment %q", s)
	}
	return netip.ParsePrefix(s[:i] + "/" + s[i+1:])
}

// BlockKey is the key of the block with the given CIDR.
func BlockKey(cidr netip.Prefix) string { return BlocksPrefix + cidrSegment(cidr) }

// ParseBlockKey returns the CIDR of a block key.
func ParseBlockKey(key string) (netip.Prefix, error) {
	return parseCIDRSegment(strings.TrimPrefix(key, BlocksPrefix))
}

// AffinityPrefix is the prefix of one node's block affinities.
func AffinityPrefix(node string) string { return AffinitiesPrefix + node + "/" }

// AffinityKey is the key of a node's affinity to a block.
func AffinityKey(node string, cidr netip.Prefix) string {
	return AffinityPrefix(node) + cidrSegment(cidr)
}

// ParseAffinityKey returns the node and block CIDR of an affinity key.
func ParseAffinityKey(key string) (node string, cidr netip.Prefix, err error) {
	node, seg, ok := strings.Cut(strings.TrimPrefix(key, AffinitiesPrefix), "/")
	if !ok {
		return "", netip.Prefix{}, fmt.Errorf("bad affinity key %q", key)
	}
	cidr, err = parseCIDRSegment(seg)
	return node, cidr, err
}

// HandleKey is the key of an IPAM handle.
func HandleKey(id string) string { return HandlesPrefix + id }
