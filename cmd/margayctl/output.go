package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"sigs.k8s.io/yaml"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/felix/calc"
)

func validOutput(o string) bool { return o == "table" || o == "wide" || o == "yaml" || o == "json" }

// list is the shape of several resources in yaml or json output; apply reads it back.
type list struct {
	api.TypeMeta `json:",inline"`
	Items        []api.Resource `json:"items"`
}

// table is what some columns need beyond the resource itself.
type tableContext struct {
	policy *calc.Policy // for the policies that apply to a workload endpoint
}

func printResources(w io.Writer, k api.KindInfo, rs []api.Resource, format string, single bool, t tableContext) error {
	var v any = list{TypeMeta: api.TypeMeta{APIVersion: api.APIVersion, Kind: api.KindList}, Items: rs}
	if single {
		v = rs[0]
	}
	switch format {
	case "json":
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	case "yaml":
		b, err := yaml.Marshal(v)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	}
	cols := t.columnsFor(k)
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	var head []string
	for _, c := range cols {
		if !c.wide || format == "wide" {
			head = append(head, c.name)
		}
	}
	fmt.Fprintln(tw, strings.Join(head, "\t"))
	for _, r := range rs {
		var row []string
		for _, c := range cols {
			if !c.wide || format == "wide" {
				row = append(row, orDash(c.value(r)))
			}
		}
		fmt.Fprintln(tw, strings.Join(row, "\t"))
	}
	return tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

// column is one column of `get` output; wide columns show only with -o wide.
type column struct {
	name  string
	wide  bool
	value func(api.Resource) string
}

func asn(a *api.ASNumber) string {
	if a == nil {
		return ""
	}
	return strconv.FormatUint(uint64(*a), 10)
}

func dur(d *api.Duration) string {
	if d == nil {
		return ""
	}
	return d.String()
}

// policyName is how a policy is named in a list: ns/name for a
// NetworkPolicy, gnp:name for a GlobalNetworkPolicy.
func policyName(r calc.PolicyRef) string {
	if r.Kind == api.KindGlobalNetworkPolicy {
		return "gnp:" + r.Name
	}
	return r.Namespace + "/" + r.Name
}

func order(o *float64) string {
	if o == nil {
		return ""
	}
	return strconv.FormatFloat(*o, 'g', -1, 64)
}

func types(s *api.PolicySpec) string {
	var ts []string
	for _, t := range s.Types {
		ts = append(ts, string(t))
	}
	return strings.Join(ts, ",")
}

func policyColumns(s func(api.Resource) *api.PolicySpec) []column {
	return []column{
		{name: "TIER", value: func(r api.Resource) string { return cmp.Or(s(r).Tier, api.DefaultTier) }},
		{name: "ORDER", value: func(r api.Resource) string { return order(s(r).Order) }},
		{name: "SELECTOR", value: func(r api.Resource) string { return s(r).Selector }},
		{name: "TYPES", value: func(r api.Resource) string { return types(s(r)) }},
		{name: "INGRESS", wide: true, value: func(r api.Resource) string { return strconv.Itoa(len(s(r).Ingress)) }},
		{name: "EGRESS", wide: true, value: func(r api.Resource) string { return strconv.Itoa(len(s(r).Egress)) }},
	}
}

func (t tableContext) columnsFor(k api.KindInfo) []column {
	name := column{name: "NAME", value: func(r api.Resource) string { return r.GetMetadata().Name }}
	switch k.Kind {
	case api.KindNetworkPolicy:
		ns := column{name: "NAMESPACE", value: func(r api.Resource) string { return r.GetMetadata().Namespace }}
		return append([]column{ns, name}, policyColumns(func(r api.Resource) *api.PolicySpec { return &r.(*api.NetworkPolicy).Spec })...)
	case api.KindGlobalNetworkPolicy:
		cols := append([]column{name}, policyColumns(func(r api.Resource) *api.PolicySpec { return &r.(*api.GlobalNetworkPolicy).Spec })...)
		return append(cols, column{name: "NAMESPACESELECTOR", wide: true, value: func(r api.Resource) string { return r.(*api.GlobalNetworkPolicy).Spec.NamespaceSelector }})
	case api.KindTier:
		return []column{name, {name: "ORDER", value: func(r api.Resource) string { return order(r.(*api.Tier).Spec.Order) }}}
	case api.KindIPPool:
		p := func(r api.Resource) *api.IPPoolSpec { return &r.(*api.IPPool).Spec }
		return []column{name,
			{name: "CIDR", value: func(r api.Resource) string { return p(r).CIDR }},
			{name: "SELECTOR", value: func(r api.Resource) string { return p(r).NodeSelector }},
			{name: "BLOCKSIZE", wide: true, value: func(r api.Resource) string { return strconv.Itoa(p(r).BlockSize) }},
			{name: "IPIPMODE", wide: true, value: func(r api.Resource) string { return string(p(r).IPIPMode) }},
			{name: "VXLANMODE", wide: true, value: func(r api.Resource) string { return string(p(r).VXLANMode) }},
			{name: "NAT", wide: true, value: func(r api.Resource) string { return strconv.FormatBool(p(r).NATOutgoing) }},
			{name: "DISABLED", wide: true, value: func(r api.Resource) string { return strconv.FormatBool(p(r).Disabled) }},
		}
	case api.KindBGPPeer:
		p := func(r api.Resource) *api.BGPPeerSpec { return &r.(*api.BGPPeer).Spec }
		return []column{name,
			{name: "PEERIP", value: func(r api.Resource) string { return p(r).PeerIP }},
			{name: "NODE", value: func(r api.Resource) string {
				if p(r).Node == "" && p(r).NodeSelector == "" {
					return "(global)"
				}
				return p(r).Node + p(r).NodeSelector
			}},
			{name: "ASN", value: func(r api.Resource) string { return asn(p(r).ASNumber) }},
			{name: "PEERSELECTOR", wide: true, value: func(r api.Resource) string { return p(r).PeerSelector }},
			{name: "KEEPALIVE", wide: true, value: func(r api.Resource) string { return dur(p(r).KeepaliveTime) }},
			{name: "HOLD", wide: true, value: func(r api.Resource) string { return dur(p(r).HoldTime) }},
			{name: "MAXPREFIXES", wide: true, value: func(r api.Resource) string {
				if m := p(r).MaxPrefixes; m != nil {
					return strconv.Itoa(*m)
				}
				return ""
			}},
		}
	case api.KindNode:
		b := func(r api.Resource) *api.NodeBGPSpec {
			if b := r.(*api.Node).Spec.BGP; b != nil {
				return b
			}
			return &api.NodeBGPSpec{}
		}
		return []column{name,
			{name: "ASN", value: func(r api.Resource) string { return asn(b(r).ASNumber) }},
			{name: "IPV4", value: func(r api.Resource) string { return b(r).IPv4Address }},
			{name: "IPV6", value: func(r api.Resource) string { return b(r).IPv6Address }},
			{name: "IPIPADDR", wide: true, value: func(r api.Resource) string { return b(r).IPv4IPIPTunnelAddr }},
			{name: "VXLANADDR", wide: true, value: func(r api.Resource) string { return r.(*api.Node).Spec.IPv4VXLANTunnelAddr }},
			{name: "VXLANV6ADDR", wide: true, value: func(r api.Resource) string { return r.(*api.Node).Spec.IPv6VXLANTunnelAddr }},
			{name: "RRCLUSTERID", wide: true, value: func(r api.Resource) string { return b(r).RouteReflectorClusterID }},
		}
	case api.KindWorkloadEndpoint:
		w := func(r api.Resource) *api.WorkloadEndpointSpec { return &r.(*api.WorkloadEndpoint).Spec }
		return []column{name,
			{name: "NODE", value: func(r api.Resource) string { return w(r).Node }},
			{name: "NETWORKS", value: func(r api.Resource) string { return strings.Join(w(r).IPNetworks, ",") }},
			{name: "INTERFACE", value: func(r api.Resource) string { return w(r).InterfaceName }},
			{name: "NAMESPACE", wide: true, value: func(r api.Resource) string { return w(r).Namespace }},
			{name: "POD", wide: true, value: func(r api.Resource) string { return w(r).Pod }},
			{name: "CONTAINER", wide: true, value: func(r api.Resource) string { return w(r).ContainerID }},
			{name: "MAC", wide: true, value: func(r api.Resource) string { return w(r).MAC }},
			{name: "POLICIES", wide: true, value: func(r api.Resource) string {
				if t.policy == nil {
					return ""
				}
				var names []string
				for _, p := range calc.AppliedTo(*t.policy, r.(*api.WorkloadEndpoint)) {
					names = append(names, policyName(p))
				}
				return strings.Join(names, ",")
			}},
		}
	case api.KindBGPConfiguration:
		c := func(r api.Resource) *api.BGPConfigurationSpec { return &r.(*api.BGPConfiguration).Spec }
		return []column{name,
			{name: "ASN", value: func(r api.Resource) string { return asn(c(r).ASNumber) }},
			{name: "MESH", value: func(r api.Resource) string {
				if m := c(r).NodeToNodeMeshEnabled; m != nil {
					return strconv.FormatBool(*m)
				}
				return ""
			}},
			{name: "PORT", wide: true, value: func(r api.Resource) string {
				if p := c(r).ListenPort; p != nil {
					return strconv.Itoa(*p)
				}
				return ""
			}},
			{name: "MAXRESTART", wide: true, value: func(r api.Resource) string { return dur(c(r).NodeMeshMaxRestartTime) }},
		}
	case api.KindIPAMConfiguration:
		c := func(r api.Resource) *api.IPAMConfiguration { return r.(*api.IPAMConfiguration) }
		return []column{name,
			{name: "STRICTAFFINITY", value: func(r api.Resource) string { return strconv.FormatBool(c(r).Spec.StrictAffinity) }},
			{name: "MAXBLOCKSPERHOST", value: func(r api.Resource) string { return strconv.Itoa(c(r).MaxBlocks()) }},
		}
	}
	return []column{name}
}
