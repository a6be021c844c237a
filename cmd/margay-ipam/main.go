// Command margay-ipam is margay's CNI IPAM plugin: it assigns pod addresses from
// margay's IP pools, for the margay plugin or any other main plugin.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/cni"
)

func main() {
	skel.PluginMainFuncs(cni.IPAMFuncs(), cni.SupportedVersions, "margay-ipam "+api.Version)
}
