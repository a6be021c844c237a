// Command margay-ipam is margay's CNI IPAM plugin: it assigns pod addresses from
// margay's IP pools, for the margay plugin or any other main plugin.
package main

import "github.com/margay-dev/margay/cni"

func main() { cni.Main(cni.IPAMFuncs(), "margay-ipam") }
