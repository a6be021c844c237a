#!/usr/bin/env bash
# Builds the commands of the Kubernetes tests from the Go module proxy, or finds
# them in the go command's build cache: kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and kubectl (the tools module beside this script pins
# Kubernetes v1.37.2), and containerd, its runc shim and ctr (the containerd
# module pins v2.4.2). Only the first run on a machine compiles them:
# kube-apiserver took 13 minutes of CPU time here, and the others reuse most of
# its packages.
#   build.sh               build, waiting for a background build if one runs
#   build.sh --background  start the build at low priority and return: make test
#                          does this first, so that it overlaps the other tests
set -euo pipefail
cd "$(dirname "$0")"
lock=${TMPDIR:-/tmp}/margay-k8s-build.lock
log=${TMPDIR:-/tmp}/margay-k8s-build.log
build() {
	(cd tools && go tool -n kube-apiserver && go tool -n kube-controller-manager && go tool -n kube-scheduler && go tool -n kubelet && go tool -n kubectl) &&
		(cd containerd && go tool -n containerd && go tool -n containerd-shim-runc-v2 && go tool -n ctr)
}
if [ "${1:-}" = --background ]; then
	export -f build
	nohup nice -n 19 flock "$lock" bash -c build >"$log" 2>&1 &
	exit 0
fi
if ! flock "$lock" bash -c "$(declare -f build); build" >/dev/null; then
	echo "k8s build: a build failed; see above (and $log for a background build)" >&2
	exit 1
fi
