package main

import (
	"encoding/json"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"sigs.k8s.io/yaml"

	"github.com/margay-dev/margay/api"
)

func validOutput(o string) bool { return o == "table" || o == "wide" || o == "yaml" || o == "json" }

// list is the shape of several resources in yaml or json output; apply reads it back.
type list struct {
	api.TypeMeta `json:",inline"`
	Items        []api.Resource `json:"items"`
}

func printResources(w io.Writer, k api.KindInfo, rs []api.Resource, format string, single bool) error {
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
	cols := columnsFor(k.Kind)
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

func columnsFor(kind string) []column {
	name := column{name: "NAME", value: func(r api.Resource) string { return r.GetMetadata().Name }}
	switch kind {
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
			{name: "IPIPADDR", wide: true, value: func(r api.Resource) string { return b(r).IPv4IPIPTunnelAddr }},
			{name: "VXLANADDR", wide: true, value: func(r api.Resource) string { return r.(*api.Node).Spec.IPv4VXLANTunnelAddr }},
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
