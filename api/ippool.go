package api

import (
	"net/netip"
)

// KindIPPool is the kind of an IPPool.
const KindIPPool = "IPPool"

// EncapMode says when traffic to a pool's addresses is encapsulated.
type EncapMode string

// Encapsulation modes, as in Calico.
const (
	EncapNever       EncapMode = "Never"
	EncapCrossSubnet EncapMode = "CrossSubnet"
	EncapAlways      EncapMode = "Always"
)

func (m EncapMode) valid() bool {
	return m == EncapNever || m == EncapCrossSubnet || m == EncapAlways
}

// Enabled reports whether the mode ever encapsulates.
func (m EncapMode) Enabled() bool { return m == EncapCrossSubnet || m == EncapAlways }

// Defaults and limits of an IPPool's blockSize, per family (Calico's).
const (
	DefaultBlockSize   = 26
	MinBlockSize       = 20
	MaxBlockSize       = 32
	DefaultBlockSizeV6 = 122
	MinBlockSizeV6     = 116
	MaxBlockSizeV6     = 128
	AllSelector        = "all()"
)

// BlockSizeRange is the smallest and largest blockSize (prefix length) of an
// IPv4 or (v6) IPv6 pool.
func BlockSizeRange(v6 bool) (minBits, maxBits int) {
	if v6 {
		return MinBlockSizeV6, MaxBlockSizeV6
	}
	return MinBlockSize, MaxBlockSize
}

// Ranges a pool must not overlap: 169.254.0.0/16 holds the pod gateway
// 169.254.1.1 and fe80::/10 the v6 gateway fe80::ecee:eeff:feee:eeee; the
// others are not unicast, or are IPv4 written as IPv6.
var reserved = []struct {
	pfx netip.Prefix
	why string
}{
	{netip.MustParsePrefix("169.254.0.0/16"), "which is reserved for link-local addresses and the pod gateway 169.254.1.1"},
	{netip.MustParsePrefix("fe80::/10"), "which is reserved for link-local addresses and the pod gateway fe80::ecee:eeff:feee:eeee"},
	{netip.MustParsePrefix("ff00::/8"), "which is multicast"},
	{netip.MustParsePrefix("::ffff:0:0/96"), "which holds IPv4-mapped addresses; write an IPv4 pool as IPv4"},
}

// IPPool is a range of pod addresses, cut into blocks that nodes claim.
type IPPool struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta `json:"metadata"`
	Spec     IPPoolSpec `json:"spec"`
}

// IPPoolSpec is the desired state of an IPPool.
type IPPoolSpec struct {
	CIDR         string    `json:"cidr"`
	BlockSize    int       `json:"blockSize,omitempty"`
	IPIPMode     EncapMode `json:"ipipMode,omitempty"`
	VXLANMode    EncapMode `json:"vxlanMode,omitempty"`
	NATOutgoing  bool      `json:"natOutgoing,omitempty"`
	Disabled     bool      `json:"disabled,omitempty"`
	NodeSelector string    `json:"nodeSelector,omitempty"`
}

// NewIPPool returns an empty IPPool with its type set.
func NewIPPool(name string) *IPPool {
	return &IPPool{TypeMeta: typeMeta(KindIPPool), Metadata: ObjectMeta{Name: name}}
}

// GetMetadata implements Resource.
func (p *IPPool) GetMetadata() *ObjectMeta { return &p.Metadata }

// SetDefaults implements Resource.
func (p *IPPool) SetDefaults() {
	if p.Spec.BlockSize == 0 {
		p.Spec.BlockSize = DefaultBlockSize
		if pfx, err := netip.ParsePrefix(p.Spec.CIDR); err == nil && pfx.Addr().Is6() {
			p.Spec.BlockSize = DefaultBlockSizeV6
		}
	}
	if p.Spec.IPIPMode == "" {
		p.Spec.IPIPMode = EncapNever
	}
	if p.Spec.VXLANMode == "" {
		p.Spec.VXLANMode = EncapNever
	}
	if p.Spec.NodeSelector == "" {
		p.Spec.NodeSelector = AllSelector
	}
}

// Prefix returns the parsed CIDR; it is only meaningful on a valid pool.
func (p *IPPool) Prefix() netip.Prefix {
	pfx, _ := netip.ParsePrefix(p.Spec.CIDR)
	return pfx
}

// IsIPv6 reports whether the pool holds IPv6 addresses; it is only meaningful
// on a valid pool.
func (p *IPPool) IsIPv6() bool { return p.Prefix().Addr().Is6() }

// Validate implements Resource.
func (p *IPPool) Validate() error {
	var e errs
	e.checkMeta(KindIPPool, &p.TypeMeta, &p.Metadata)
	s := &p.Spec
	pfx, err := netip.ParsePrefix(s.CIDR)
	switch {
	case s.CIDR == "":
		e.add("spec.cidr", nil, "is required, for example 10.244.0.0/16")
	case err != nil:
		e.add("spec.cidr", s.CIDR, "is not a CIDR; write it as 10.244.0.0/16")
	case pfx.Masked() != pfx:
		e.add("spec.cidr", s.CIDR, "has host bits set; did you mean %s?", pfx.Masked())
	default:
		for _, r := range reserved {
			if pfx.Overlaps(r.pfx) {
				e.add("spec.cidr", s.CIDR, "overlaps %s, %s", r.pfx, r.why)
				break
			}
		}
	}
	family, v6 := "IPv4", err == nil && pfx.Addr().Is6()
	if v6 {
		family = "IPv6"
	}
	minBits, maxBits := BlockSizeRange(v6)
	switch {
	case s.BlockSize < minBits || s.BlockSize > maxBits:
		e.add("spec.blockSize", s.BlockSize, "is out of range for an %s pool; use %d to %d", family, minBits, maxBits)
	case err == nil && s.BlockSize < pfx.Bits():
		e.add("spec.blockSize", s.BlockSize, "a /%d block is larger than the pool /%d; use a blockSize of at least %d", s.BlockSize, pfx.Bits(), pfx.Bits())
	}
	switch {
	case !s.IPIPMode.valid():
		e.add("spec.ipipMode", string(s.IPIPMode), "must be Never, CrossSubnet or Always")
	case v6 && s.IPIPMode.Enabled():
		e.add("spec.ipipMode", string(s.IPIPMode), "IPIP carries IPv4 only; set ipipMode: Never and use vxlanMode for an IPv6 pool")
	}
	if !s.VXLANMode.valid() {
		e.add("spec.vxlanMode", string(s.VXLANMode), "must be Never, CrossSubnet or Always")
	}
	if s.IPIPMode.Enabled() && s.VXLANMode.Enabled() {
		e.add("spec.vxlanMode", string(s.VXLANMode), "ipipMode is %s; enable at most one of ipipMode and vxlanMode", s.IPIPMode)
	}
	e.checkSelector("spec.nodeSelector", s.NodeSelector)
	return e.result(p)
}

// Selects reports whether the pool serves a node with the given labels.
func (p *IPPool) Selects(nodeLabels map[string]string) bool {
	sel, err := ParseSelector(p.Spec.NodeSelector)
	return err == nil && sel.Matches(nodeLabels)
}
