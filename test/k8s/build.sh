#!/usr/bin/env bash
# Builds kube-apiserver from the Go module proxy (the tools module beside this
# script pins Kubernetes v1.37.2), or finds it in the go command's build cache:
# only the first run on a machine compiles it (13 minutes of CPU time here).
#   build.sh               build, waiting for a background build if one runs
#   build.sh --background  start the build at low priority and return: make test
#                          does this first, so that it overlaps the other tests
set -euo pipefail
cd "$(dirname "$0")/tools"
lock=${TMPDIR:-/tmp}/margay-k8s-build.lock
log=${TMPDIR:-/tmp}/margay-k8s-build.log
if [ "${1:-}" = --background ]; then
	nohup nice -n 19 flock "$lock" go tool -n kube-apiserver >"$log" 2>&1 &
	exit 0
fi
if ! flock "$lock" go tool -n kube-apiserver >/dev/null; then
	echo "k8s build: building kube-apiserver failed; see above (and $log for a background build)" >&2
	exit 1
fi
