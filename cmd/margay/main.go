// Command margay is margay's CNI plugin: it wires a pod into the node with a veth
// pair and records the pod's WorkloadEndpoint, taking its address from the IPAM
// plugin the configuration names (margay-ipam by default, run in process).
package main

import "github.com/margay-dev/margay/cni"

func main() { cni.Main(cni.Funcs(), "margay") }
