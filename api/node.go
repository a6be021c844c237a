package api

import (
	"fmt"
	"net"
	"net/netip"
)

// Kinds of the node-side resources.
const (
	KindNode              = "Node"
	KindWorkloadEndpoint  = "WorkloadEndpoint"
	KindIPAMConfiguration = "IPAMConfiguration"
)

// Node is a host running margay-node.
type Node struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta `json:"metadata"`
	Spec     NodeSpec   `json:"spec"`
}

// NodeSpec is a node's addresses and BGP identity.
type NodeSpec struct {
	BGP                 *NodeBGPSpec `json:"bgp,omitempty"`
	IPv4VXLANTunnelAddr string       `json:"ipv4VXLANTunnelAddr,omitempty"`
	VXLANTunnelMACAddr  string       `json:"vxlanTunnelMACAddr,omitempty"`
	// The IPv6 VXLAN device's address and MAC, as Calico's.
	IPv6VXLANTunnelAddr  string `json:"ipv6VXLANTunnelAddr,omitempty"`
	VXLANTunnelMACAddrV6 string `json:"vxlanTunnelMACAddrV6,omitempty"`
	// OrchRefs names the node in its orchestrator. margay-kube-controllers
	// deletes a Node whose k8s node is gone, and only such a Node.
	OrchRefs []OrchRef `json:"orchRefs,omitempty"`
}

// OrchRef is a node's name in an orchestrator, as Calico's.
type OrchRef struct {
	Orchestrator string `json:"orchestrator"` // "k8s"
	NodeName     string `json:"nodeName"`
}

// OrchestratorK8s is the orchestrator of Kubernetes nodes and pods.
const OrchestratorK8s = "k8s"

// K8sNodeName is the name of n's Kubernetes node, or "" if it names none.
func (n *Node) K8sNodeName() string {
	for _, r := range n.Spec.OrchRefs {
		if r.Orchestrator == OrchestratorK8s {
			return r.NodeName
		}
	}
	return ""
}

// NodeBGPSpec is a node's BGP identity. IPv4Address and IPv6Address are the
// node's addresses with the prefix length of their subnet (198.18.1.2/24,
// fd00:18:1::2/64): the mask decides CrossSubnet.
type NodeBGPSpec struct {
	IPv4Address             string    `json:"ipv4Address,omitempty"`
	IPv6Address             string    `json:"ipv6Address,omitempty"`
	ASNumber                *ASNumber `json:"asNumber,omitempty"`
	RouteReflectorClusterID string    `json:"routeReflectorClusterID,omitempty"`
	IPv4IPIPTunnelAddr      string    `json:"ipv4IPIPTunnelAddr,omitempty"`
}

// NewNode returns an empty Node with its type set.
func NewNode(name string) *Node {
	return &Node{TypeMeta: typeMeta(KindNode), Metadata: ObjectMeta{Name: name}}
}

// GetMetadata implements Resource.
func (n *Node) GetMetadata() *ObjectMeta { return &n.Metadata }

// SetDefaults implements Resource.
func (n *Node) SetDefaults() {}

// What spec.bgp.ipv4Address and ipv6Address must be.
const (
	errBGPAddress   = constError("must be the node's IPv4 address with its subnet's prefix length, such as 198.18.1.2/24")
	errBGPAddressV6 = constError("must be the node's global IPv6 address with its subnet's prefix length, such as fd00:18:1::2/64")
)

// BGPAddress is spec.bgp.ipv4Address parsed: the node's address with its
// subnet's prefix length. The zero Prefix with no error means none is set.
func (n *Node) BGPAddress() (netip.Prefix, error) {
	if n.Spec.BGP == nil || n.Spec.BGP.IPv4Address == "" {
		return netip.Prefix{}, nil
	}
	p, err := netip.ParsePrefix(n.Spec.BGP.IPv4Address)
	if err != nil || !p.Addr().Is4() {
		return netip.Prefix{}, errBGPAddress
	}
	return p, nil
}

// BGPAddressV6 is spec.bgp.ipv6Address parsed, as BGPAddress. A link-local
// address is refused: it cannot be a next hop for another subnet.
func (n *Node) BGPAddressV6() (netip.Prefix, error) {
	if n.Spec.BGP == nil || n.Spec.BGP.IPv6Address == "" {
		return netip.Prefix{}, nil
	}
	p, err := netip.ParsePrefix(n.Spec.BGP.IPv6Address)
	if err != nil || !p.Addr().Is6() || p.Addr().Is4In6() || !p.Addr().IsGlobalUnicast() {
		return netip.Prefix{}, errBGPAddressV6
	}
	return p, nil
}

// Validate implements Resource.
func (n *Node) Validate() error {
	var e errs
	e.checkMeta(KindNode, &n.TypeMeta, &n.Metadata)
	if b := n.Spec.BGP; b != nil {
		if _, err := n.BGPAddress(); err != nil {
			e.add("spec.bgp.ipv4Address", b.IPv4Address, "%v", err)
		}
		if _, err := n.BGPAddressV6(); err != nil {
			e.add("spec.bgp.ipv6Address", b.IPv6Address, "%v", err)
		}
		if b.ASNumber != nil && *b.ASNumber == 0 {
			e.add("spec.bgp.asNumber", 0, "is out of range; use 1 to 4294967295")
		}
		if id := b.RouteReflectorClusterID; id != "" {
			if a, err := netip.ParseAddr(id); err != nil || !a.Is4() {
				e.add("spec.bgp.routeReflectorClusterID", id, "must be written as an IPv4 address, such as 224.0.0.1")
			}
		}
		e.checkAddr("spec.bgp.ipv4IPIPTunnelAddr", b.IPv4IPIPTunnelAddr, false)
	}
	e.checkAddr("spec.ipv4VXLANTunnelAddr", n.Spec.IPv4VXLANTunnelAddr, false)
	e.checkAddr("spec.ipv6VXLANTunnelAddr", n.Spec.IPv6VXLANTunnelAddr, true)
	for _, m := range [][2]string{{"spec.vxlanTunnelMACAddr", n.Spec.VXLANTunnelMACAddr}, {"spec.vxlanTunnelMACAddrV6", n.Spec.VXLANTunnelMACAddrV6}} {
		if _, err := net.ParseMAC(m[1]); m[1] != "" && err != nil {
			e.add(m[0], m[1], "is not a MAC address such as 66:1f:3a:00:00:01")
		}
	}
	for i, r := range n.Spec.OrchRefs {
		if r.Orchestrator == "" || r.NodeName == "" {
			e.add(fmt.Sprintf("spec.orchRefs[%d]", i), r, "needs both orchestrator (such as k8s) and nodeName")
		}
	}
	return e.result(n)
}

func (e *errs) checkAddr(field, s string, v6 bool) {
	if s == "" {
		return
	}
	a, err := netip.ParseAddr(s)
	switch {
	case v6 && (err != nil || !a.Is6() || a.Is4In6() || a.Zone() != ""):
		e.add(field, s, "must be an IPv6 address")
	case !v6 && (err != nil || !a.Is4()):
		e.add(field, s, "must be an IPv4 address")
	}
}

// WorkloadEndpoint is one pod interface on one node.
type WorkloadEndpoint struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta           `json:"metadata"`
	Spec     WorkloadEndpointSpec `json:"spec"`
}

// WorkloadEndpointSpec records what the CNI plugin wired for a pod.
type WorkloadEndpointSpec struct {
	Node          string   `json:"node"`
	Orchestrator  string   `json:"orchestrator,omitempty"`
	Namespace     string   `json:"namespace,omitempty"`
	Pod           string   `json:"pod,omitempty"`
	ContainerID   string   `json:"containerID"`
	Endpoint      string   `json:"endpoint,omitempty"`
	InterfaceName string   `json:"interfaceName"`
	IPNetworks    []string `json:"ipNetworks"`
	MAC           string   `json:"mac,omitempty"`
	// Ports are the pod's named ports, which policy rules can name.
	Ports []EndpointPort `json:"ports,omitempty"`
}

// EndpointPort is a named port of a workload, as a container port in
// Kubernetes.
type EndpointPort struct {
	Name     string   `json:"name"`
	Protocol Protocol `json:"protocol"`
	Port     uint16   `json:"port"`
}

// NewWorkloadEndpoint returns an empty WorkloadEndpoint with its type set.
func NewWorkloadEndpoint(name string) *WorkloadEndpoint {
	return &WorkloadEndpoint{TypeMeta: typeMeta(KindWorkloadEndpoint), Metadata: ObjectMeta{Name: name}}
}

// GetMetadata implements Resource.
func (w *WorkloadEndpoint) GetMetadata() *ObjectMeta { return &w.Metadata }

// SetDefaults implements Resource.
func (w *WorkloadEndpoint) SetDefaults() {
	if w.Spec.Orchestrator == "" {
		w.Spec.Orchestrator = "k8s"
	}
	if w.Spec.Endpoint == "" {
		w.Spec.Endpoint = "eth0"
	}
	for i := range w.Spec.Ports {
		if p := &w.Spec.Ports[i].Protocol; *p == (Protocol{}) {
			*p = Protocol{Name: "TCP"} // as Kubernetes defaults a container port's
		}
	}
}

// Validate implements Resource.
func (w *WorkloadEndpoint) Validate() error {
	var e errs
	e.checkMeta(KindWorkloadEndpoint, &w.TypeMeta, &w.Metadata)
	s := &w.Spec
	if s.Node == "" {
		e.add("spec.node", nil, "is required")
	}
	if s.ContainerID == "" {
		e.add("spec.containerID", nil, "is required")
	}
	if s.InterfaceName == "" {
		e.add("spec.interfaceName", nil, "is required")
	}
	for _, n := range s.IPNetworks {
		if p, err := netip.ParsePrefix(n); err != nil || p.Bits() != p.Addr().BitLen() {
			e.add("spec.ipNetworks", n, "must be a host CIDR such as 10.244.1.5/32")
		}
	}
	if s.MAC != "" {
		if _, err := net.ParseMAC(s.MAC); err != nil {
			e.add("spec.mac", s.MAC, "is not a MAC address")
		}
	}
	for i, p := range s.Ports {
		f := fmt.Sprintf("spec.ports[%d]", i)
		if !ValidPortName(p.Name) {
			e.add(f+".name", p.Name, "must be a port name: at most 15 lower-case letters, digits and '-', with a letter")
		}
		if !p.Protocol.HasPorts() {
			e.add(f+".protocol", p.Protocol, "must be TCP, UDP, SCTP or UDPLite")
		}
		if p.Port == 0 {
			e.add(f+".port", p.Port, "must be from 1 to 65535")
		}
	}
	return e.result(w)
}

// IPAMConfigName is the only allowed name of the IPAMConfiguration.
const IPAMConfigName = "default"

// DefaultMaxBlocksPerHost bounds how many blocks one node may claim.
const DefaultMaxBlocksPerHost = 20

// IPAMConfiguration holds cluster-wide IPAM settings.
type IPAMConfiguration struct {
	TypeMeta `json:",inline"`
	Metadata ObjectMeta            `json:"metadata"`
	Spec     IPAMConfigurationSpec `json:"spec"`
}

// IPAMConfigurationSpec is the IPAM policy.
type IPAMConfigurationSpec struct {
	// StrictAffinity forbids borrowing addresses from other nodes' blocks.
	StrictAffinity bool `json:"strictAffinity"`
	// MaxBlocksPerHost caps the blocks one node may claim; 0 means no limit.
	// Unset means DefaultMaxBlocksPerHost.
	MaxBlocksPerHost *int `json:"maxBlocksPerHost,omitempty"`
}

// NewIPAMConfiguration returns the default IPAMConfiguration.
func NewIPAMConfiguration() *IPAMConfiguration {
	c := &IPAMConfiguration{TypeMeta: typeMeta(KindIPAMConfiguration), Metadata: ObjectMeta{Name: IPAMConfigName}}
	c.SetDefaults()
	return c
}

// GetMetadata implements Resource.
func (c *IPAMConfiguration) GetMetadata() *ObjectMeta { return &c.Metadata }

// SetDefaults implements Resource.
func (c *IPAMConfiguration) SetDefaults() {
	if c.Spec.MaxBlocksPerHost == nil {
		c.Spec.MaxBlocksPerHost = ptr(DefaultMaxBlocksPerHost)
	}
}

// MaxBlocks returns the effective per-node block cap; 0 means no limit.
func (c *IPAMConfiguration) MaxBlocks() int {
	if c.Spec.MaxBlocksPerHost == nil {
		return DefaultMaxBlocksPerHost
	}
	return *c.Spec.MaxBlocksPerHost
}

// Validate implements Resource.
func (c *IPAMConfiguration) Validate() error {
	var e errs
	e.checkMeta(KindIPAMConfiguration, &c.TypeMeta, &c.Metadata)
	if c.Metadata.Name != IPAMConfigName {
		e.add("metadata.name", c.Metadata.Name, "must be %q: there is one IPAM configuration per cluster", IPAMConfigName)
	}
	if m := c.Spec.MaxBlocksPerHost; m != nil && *m < 0 {
		e.add("spec.maxBlocksPerHost", *m, "must be 0 (no limit) or more")
	}
	return e.result(c)
}
