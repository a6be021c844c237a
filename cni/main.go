package cni

import (
	goruntime "runtime"
	"runtime/debug"

	"github.com/containernetworking/cni/pkg/skel"

	"github.com/margay-dev/margay/api"
)

// Main runs a plugin's verbs as a CNI plugin process named name.
//
// A plugin lives for tens of milliseconds, and kubelet may start dozens at once
// on a small node, where their CPU time decides how long pods wait. So the
// process skips garbage collection unless its heap nears 128 MiB, and runs on
// one P, so that idle Go threads do not spin looking for work. Together they cut
// the CPU of a 30-pod burst by about a tenth (docs/benchmarks.md).
func Main(funcs skel.CNIFuncs, name string) {
	goruntime.GOMAXPROCS(1)
	debug.SetGCPercent(-1)
	debug.SetMemoryLimit(128 << 20)
	skel.PluginMainFuncs(funcs, SupportedVersions, name+" "+api.Version)
}
