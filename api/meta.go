// Package api defines margay's resources: their wire shape, their defaults and their
// validation. It is pure: nothing here does I/O.
package api

import (
	"fmt"
	"reflect"
	"sort"
	"strings"
)

// APIVersion is the apiVersion of every margay resource.
const APIVersion = "margay.dev/v1"

// TypeMeta names the kind of a resource on the wire.
type TypeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// ObjectMeta is the metadata every resource carries.
type ObjectMeta struct {
	Name string `json:"name"`
	// Namespace is set on namespaced kinds (NetworkPolicy) only.
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	// ResourceVersion is the etcd ModRevision of the stored object. It is set by the
	// datastore on read and checked on update and delete.
	ResourceVersion string `json:"resourceVersion,omitempty"`
}

// Resource is implemented by every kind.
type Resource interface {
	GetTypeMeta() *TypeMeta
	GetMetadata() *ObjectMeta
	// SetDefaults fills unset fields with their defaults.
	SetDefaults()
	// Validate checks the resource on its own. Checks that need other resources
	// (pool overlap, immutable fields) are in ValidateAgainst and ValidateUpdate.
	Validate() error
}

// GetTypeMeta implements Resource.
func (t *TypeMeta) GetTypeMeta() *TypeMeta { return t }

// KindInfo describes a kind: its names and how to make an empty one.
type KindInfo struct {
	Kind    string
	Plural  string   // the etcd key segment and the canonical CLI name
	Aliases []string // other names accepted on the command line
	// Namespaced kinds are stored, and named on the command line, by
	// namespace and name.
	Namespaced bool
	New        func() Resource
	goType     reflect.Type
}

var kinds = []KindInfo{
	{Kind: KindIPPool, Plural: "ippools", Aliases: []string{"ippool", "pool", "pools"}, New: func() Resource { return NewIPPool("") }},
	{Kind: KindBGPConfiguration, Plural: "bgpconfigurations", Aliases: []string{"bgpconfiguration", "bgpconfig", "bgpconfigs"}, New: func() Resource { return NewBGPConfiguration("") }},
	{Kind: KindBGPPeer, Plural: "bgppeers", Aliases: []string{"bgppeer", "peer", "peers"}, New: func() Resource { return NewBGPPeer("") }},
	{Kind: KindNode, Plural: "nodes", Aliases: []string{"node", "no"}, New: func() Resource { return NewNode("") }},
	{Kind: KindWorkloadEndpoint, Plural: "workloadendpoints", Aliases: []string{"workloadendpoint", "wep", "weps"}, New: func() Resource { return NewWorkloadEndpoint("") }},
	{Kind: KindNetworkPolicy, Plural: "networkpolicies", Aliases: []string{"networkpolicy", "netpol", "np", "policy", "policies"}, Namespaced: true, New: func() Resource { return NewNetworkPolicy("", "") }},
	{Kind: KindGlobalNetworkPolicy, Plural: "globalnetworkpolicies", Aliases: []string{"globalnetworkpolicy", "gnp", "gnps"}, New: func() Resource { return NewGlobalNetworkPolicy("") }},
	{Kind: KindTier, Plural: "tiers", Aliases: []string{"tier"}, New: func() Resource { return NewTier("") }},
	{Kind: KindIPAMConfiguration, Plural: "ipamconfigurations", Aliases: []string{"ipamconfiguration", "ipamconfig"}, New: func() Resource { return NewIPAMConfiguration() }},
}

func init() {
	for i := range kinds {
		kinds[i].goType = reflect.TypeOf(kinds[i].New())
	}
}

// Kinds lists every kind in a stable order.
func Kinds() []KindInfo { return append([]KindInfo(nil), kinds...) }

// LookupKind finds a kind by its Kind, plural or alias, case-insensitively.
func LookupKind(name string) (KindInfo, error) {
	n := strings.ToLower(name)
	for _, k := range kinds {
		if n == strings.ToLower(k.Kind) || n == k.Plural {
			return k, nil
		}
		for _, a := range k.Aliases {
			if n == a {
				return k, nil
			}
		}
	}
	var names []string
	for _, k := range kinds {
		names = append(names, k.Plural)
	}
	sort.Strings(names)
	return KindInfo{}, fmt.Errorf("unknown resource kind %q; known kinds: %s", name, strings.Join(names, ", "))
}

// KindOf returns the KindInfo of a resource's Go type, so a caller holding a typed
// pointer (even a nil one) can find its kind.
func KindOf(r Resource) KindInfo {
	t := reflect.TypeOf(r)
	for _, k := range kinds {
		if k.goType == t {
			return k
		}
	}
	panic(fmt.Sprintf("api: %T is not a registered kind", r))
}

// DefaultNamespace is the namespace of a namespaced resource that names none.
const DefaultNamespace = "default"

// StorageName is the name a resource is stored and looked up by: its name,
// after "namespace/" for a namespaced kind.
func StorageName(m *ObjectMeta) string {
	if m.Namespace != "" {
		return m.Namespace + "/" + m.Name
	}
	return m.Name
}

// Ref names a resource in messages: `IPPool "default"`, `NetworkPolicy "ns/name"`.
func Ref(r Resource) string {
	return fmt.Sprintf("%s %q", r.GetTypeMeta().Kind, StorageName(r.GetMetadata()))
}

func typeMeta(kind string) TypeMeta { return TypeMeta{APIVersion: APIVersion, Kind: kind} }
