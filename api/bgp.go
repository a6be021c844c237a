package api

import (
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Kinds of the BGP resources.
const (
	KindBGPConfiguration = "BGPConfiguration"
	KindBGPPeer          = "BGPPeer"
)

// BGP defaults, as in Calico.
const (
	DefaultASNumber       ASNumber = 64512
	DefaultBGPPort                 = 179
	DefaultMaxRestartTime          = 120 * time.Second
	// GlobalBGPConfigName is the BGPConfiguration every node reads;
	// "node.<name>" overrides it for one node.
	GlobalBGPConfigName = "default"
	nodeBGPConfigPrefix = "node."
)

// BGPConfiguration sets cluster-wide ("default") or per-node ("node.<name>") BGP options.
// Unset fields inherit: node override, then default, then the built-in default.
type BGPConfiguration struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta           `json:"metadata"`
	Spec     BGPConfigurationSpec `json:"spec"`
}

// BGPConfigurationSpec holds optional overrides; nil means inherit.
type BGPConfigurationSpec struct {
	ASNumber               *ASNumber `json:"asNumber,omitempty"`
	NodeToNodeMeshEnabled  *bool     `json:"nodeToNodeMeshEnabled,omitempty"`
	ListenPort             *int      `json:"listenPort,omitempty"`
	NodeMeshPassword       string    `json:"nodeMeshPassword,omitempty"`
	NodeMeshMaxRestartTime *Duration `json:"nodeMeshMaxRestartTime,omitempty"`
}

// NewBGPConfiguration returns an empty BGPConfiguration with its type set.
func NewBGPConfiguration(name string) *BGPConfiguration {
	return &BGPConfiguration{TypeMeta: typeMeta(KindBGPConfiguration), Metadata: ObjectMeta{Name: name}}
}

// GetMetadata implements Resource.
func (c *BGPConfiguration) GetMetadata() *ObjectMeta { return &c.Metadata }

// SetDefaults implements Resource. Fields stay unset so that they inherit; see ResolveBGP.
func (c *BGPConfiguration) SetDefaults() {}

// Validate implements Resource.
func (c *BGPConfiguration) Validate() error {
	var e errs
	e.checkMeta(KindBGPConfiguration, &c.TypeMeta, &c.Metadata)
	if n := c.Metadata.Name; n != GlobalBGPConfigName && !strings.HasPrefix(n, nodeBGPConfigPrefix) {
		e.add("metadata.name", n, "must be %q or %q followed by a node name", GlobalBGPConfigName, nodeBGPConfigPrefix)
	}
	s := &c.Spec
	if s.ASNumber != nil && *s.ASNumber == 0 {
		e.add("spec.asNumber", 0, "is out of range; use 1 to 4294967295")
	}
	// The others take both from "default": one node's differing would break
	// its every mesh session.
	if strings.HasPrefix(c.Metadata.Name, nodeBGPConfigPrefix) {
		if s.ASNumber != nil {
			e.add("spec.asNumber", uint32(*s.ASNumber), "is cluster-wide here; give one node its own AS in its Node's spec.bgp.asNumber")
		}
		if s.NodeToNodeMeshEnabled != nil {
			e.add("spec.nodeToNodeMeshEnabled", *s.NodeToNodeMeshEnabled, "is cluster-wide; set it in %q", GlobalBGPConfigName)
		}
	}
	if s.ListenPort != nil && (*s.ListenPort < 1 || *s.ListenPort > 65535) {
		e.add("spec.listenPort", *s.ListenPort, "is out of range; use 1 to 65535")
	}
	if len(s.NodeMeshPassword) > 80 {
		e.add("spec.nodeMeshPassword", nil, "is longer than the 80 bytes TCP MD5 allows")
	}
	if s.NodeMeshMaxRestartTime != nil && s.NodeMeshMaxRestartTime.Duration <= 0 {
		e.add("spec.nodeMeshMaxRestartTime", s.NodeMeshMaxRestartTime.String(), "must be positive")
	}
	return e.result(c)
}

// BGPConfigName returns the name of the per-node override for node.
func BGPConfigName(node string) string { return nodeBGPConfigPrefix + node }

// BGPSettings is the effective BGP configuration of one node.
type BGPSettings struct {
	ASNumber               ASNumber
	NodeToNodeMeshEnabled  bool
	ListenPort             int
	NodeMeshPassword       string
	NodeMeshMaxRestartTime time.Duration
}

// ResolveBGP merges the built-in defaults, the global configuration and the node's
// override (either may be nil), later ones winning field by field.
func ResolveBGP(global, node *BGPConfiguration) BGPSettings {
	out := BGPSettings{
		ASNumber:               DefaultASNumber,
		NodeToNodeMeshEnabled:  true,
		ListenPort:             DefaultBGPPort,
		NodeMeshMaxRestartTime: DefaultMaxRestartTime,
	}
	for _, c := range []*BGPConfiguration{global, node} {
		if c == nil {
			continue
		}
		s := c.Spec
		if s.ASNumber != nil {
			out.ASNumber = *s.ASNumber
		}
		if s.NodeToNodeMeshEnabled != nil {
			out.NodeToNodeMeshEnabled = *s.NodeToNodeMeshEnabled
		}
		if s.ListenPort != nil {
			out.ListenPort = *s.ListenPort
		}
		if s.NodeMeshPassword != "" {
			out.NodeMeshPassword = s.NodeMeshPassword
		}
		if s.NodeMeshMaxRestartTime != nil {
			out.NodeMeshMaxRestartTime = s.NodeMeshMaxRestartTime.Duration
		}
	}
	return out
}

// BGPPeer is an explicit BGP peering: to an external router (peerIP) or between
// nodes chosen by peerSelector, for the nodes chosen by node or nodeSelector.
type BGPPeer struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta  `json:"metadata"`
	Spec     BGPPeerSpec `json:"spec"`
}

// BGPPeerSpec is the desired state of a BGPPeer.
type BGPPeerSpec struct {
	// Node limits the peering to one node; NodeSelector to matching nodes. With
	// neither, every node peers.
	Node         string `json:"node,omitempty"`
	NodeSelector string `json:"nodeSelector,omitempty"`
	// PeerIP is "a.b.c.d", "a.b.c.d:port", an IPv6 address or "[IPv6]:port".
	// An IPv6 peer's session carries IPv6 unicast only.
	PeerIP         string    `json:"peerIP,omitempty"`
	PeerSelector   string    `json:"peerSelector,omitempty"`
	ASNumber       *ASNumber `json:"asNumber,omitempty"`
	Password       string    `json:"password,omitempty"`
	KeepaliveTime  *Duration `json:"keepaliveTime,omitempty"`
	HoldTime       *Duration `json:"holdTime,omitempty"`
	MaxRestartTime *Duration `json:"maxRestartTime,omitempty"`
	// MaxPrefixes is the most prefixes this peer may send: one more closes
	// the session, which stays down until the BGPPeer changes. Unset means
	// no limit.
	MaxPrefixes *int `json:"maxPrefixes,omitempty"`
}

// MaxMaxPrefixes is the largest maxPrefixes: GoBGP counts in 32 bits.
const MaxMaxPrefixes = 1<<32 - 1

// BGPPath is a route learned from a BGP peer, as the speaker reports it and
// the data plane's calculation (felix/calc) reads it.
type BGPPath struct {
	Prefix  netip.Prefix
	NextHop netip.Addr
	Peer    netip.Addr // the neighbour that sent it
	Best    bool       // BGP's best path to Prefix
}

// NewBGPPeer returns an empty BGPPeer with its type set.
func NewBGPPeer(name string) *BGPPeer {
	return &BGPPeer{TypeMeta: typeMeta(KindBGPPeer), Metadata: ObjectMeta{Name: name}}
}

// GetMetadata implements Resource.
func (p *BGPPeer) GetMetadata() *ObjectMeta { return &p.Metadata }

// SetDefaults implements Resource.
func (p *BGPPeer) SetDefaults() {}

// PeerAddr parses PeerIP into an address and a port (179 when absent).
func (p *BGPPeer) PeerAddr() (netip.Addr, int, error) {
	return parsePeerIP(p.Spec.PeerIP)
}

// parsePeerIP is the one parser of a peerIP, for validation and for the peer
// computation alike: a peer must be a global unicast address without a zone.
func parsePeerIP(s string) (netip.Addr, int, error) {
	if a, err := netip.ParseAddr(s); err == nil {
		return peerScope(a.Unmap(), DefaultBGPPort)
	}
	i := strings.LastIndexByte(s, ':')
	if i < 0 {
		return netip.Addr{}, 0, errPeerIP
	}
	a, err := netip.ParseAddr(strings.TrimSuffix(strings.TrimPrefix(s[:i], "["), "]"))
	if err != nil {
		return netip.Addr{}, 0, errPeerIP
	}
	p, err := strconv.Atoi(s[i+1:])
	if err != nil || p < 1 || p > 65535 {
		return netip.Addr{}, 0, errPort
	}
	return peerScope(a.Unmap(), p)
}

func peerScope(a netip.Addr, port int) (netip.Addr, int, error) {
	if a.Zone() != "" || !a.IsGlobalUnicast() {
		return netip.Addr{}, 0, errPeerScope
	}
	return a, port, nil
}

type constError string

func (e constError) Error() string { return string(e) }

const (
	errPeerIP    = constError("is not an IP address; use a.b.c.d, a.b.c.d:port, an IPv6 address or [IPv6]:port")
	errPort      = constError("has a bad port; use 1 to 65535")
	errPeerScope = constError("must be a global unicast address; link-local and loopback peers are not supported")
)

// Validate implements Resource.
func (p *BGPPeer) Validate() error {
	var e errs
	e.checkMeta(KindBGPPeer, &p.TypeMeta, &p.Metadata)
	s := &p.Spec
	if s.Node != "" && s.NodeSelector != "" {
		e.add("spec.nodeSelector", s.NodeSelector, "set either node or nodeSelector, not both")
	}
	if s.NodeSelector != "" {
		e.checkSelector("spec.nodeSelector", s.NodeSelector)
	}
	switch {
	case s.PeerIP == "" && s.PeerSelector == "":
		e.add("spec.peerIP", nil, "set peerIP (an external router) or peerSelector (other nodes)")
	case s.PeerIP != "" && s.PeerSelector != "":
		e.add("spec.peerSelector", s.PeerSelector, "set either peerIP or peerSelector, not both")
	case s.PeerIP != "":
		if _, _, err := parsePeerIP(s.PeerIP); err != nil {
			e.add("spec.peerIP", s.PeerIP, "%v", err)
		}
		if s.ASNumber == nil {
			e.add("spec.asNumber", nil, "is required with peerIP")
		}
	default:
		e.checkSelector("spec.peerSelector", s.PeerSelector)
	}
	if s.ASNumber != nil && *s.ASNumber == 0 {
		e.add("spec.asNumber", 0, "is out of range; use 1 to 4294967295")
	}
	if len(s.Password) > 80 {
		e.add("spec.password", nil, "is longer than the 80 bytes TCP MD5 allows")
	}
	if s.HoldTime != nil && s.HoldTime.Duration != 0 && s.HoldTime.Duration < 3*time.Second {
		e.add("spec.holdTime", s.HoldTime.String(), "must be 0 (no keepalives) or at least 3s (RFC 4271)")
	}
	if s.KeepaliveTime != nil && s.KeepaliveTime.Duration < 0 {
		e.add("spec.keepaliveTime", s.KeepaliveTime.String(), "must not be negative")
	}
	if s.KeepaliveTime != nil && s.HoldTime != nil && s.HoldTime.Duration != 0 && s.KeepaliveTime.Duration >= s.HoldTime.Duration {
		e.add("spec.keepaliveTime", s.KeepaliveTime.String(), "must be shorter than holdTime %s", s.HoldTime)
	}
	if s.MaxRestartTime != nil && s.MaxRestartTime.Duration <= 0 {
		e.add("spec.maxRestartTime", s.MaxRestartTime.String(), "must be positive")
	}
	if m := s.MaxPrefixes; m != nil && (*m < 1 || *m > MaxMaxPrefixes) {
		e.add("spec.maxPrefixes", *m, "is out of range; use 1 to %d, or leave it out for no limit", MaxMaxPrefixes)
	}
	return e.result(p)
}
