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

// Defaults of an IPPool.
const (
	DefaultBlockSize = 26
	MinBlockSize     = 20
	MaxBlockSize     = 32
	AllSelector      = "all()"
)

// linkLocal is reserved for the pod-side gateway 169.254.1.1.
var linkLocal = netip.MustParsePrefix("169.254.0.0/16")

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
	case !pfx.Addr().Is4():
		e.add("spec.cidr", s.CIDR, "only IPv4 pools are supported")
	case pfx.Masked() != pfx:
		e.add("spec.cidr", s.CIDR, "has host bits set; did you mean %s?", pfx.Masked())
	case pfx.Overlaps(linkLocal):
		e.add("spec.cidr", s.CIDR, "overlaps 169.254.0.0/16, which is reserved for link-local addresses and the pod gateway 169.254.1.1")
	}
	switch {
	case s.BlockSize < MinBlockSize || s.BlockSize > MaxBlockSize:
		e.add("spec.blockSize", s.BlockSize, "is out of range; use %d to %d", MinBlockSize, MaxBlockSize)
	case err == nil && pfx.Addr().Is4() && s.BlockSize < pfx.Bits():
		e.add("spec.blockSize", s.BlockSize, "a /%d block is larger than the pool /%d; use a blockSize of at least %d", s.BlockSize, pfx.Bits(), pfx.Bits())
	}
	if !s.IPIPMode.valid() {
		e.add("spec.ipipMode", string(s.IPIPMode), "must be Never, CrossSubnet or Always")
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
