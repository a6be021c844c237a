// Command margay is margay's CNI plugin: it wires a pod into the node with a veth
// pair and records the pod's WorkloadEndpoint, taking its address from the IPAM
// plugin the configuration names (margay-ipam by default).
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/cni"
)

func main() {
	skel.PluginMainFuncs(cni.Funcs(), cni.SupportedVersions, "margay "+api.Version)
}
