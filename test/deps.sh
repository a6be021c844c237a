#!/usr/bin/env bash
# Installs the Debian packages the tests need, if any is missing. Run as root.
set -euo pipefail

# iptables for the data plane and the portmap plugin; bird2 and frr are the ToRs
# of the interop tests, run only inside lab namespaces; iperf3 for make bench;
# qemu-system-x86 for the kernel VM runner (test/vm), whose kernel has IPIP;
# tcpdump to see what crosses the lab router; openssl for the example etcd
# cluster's certificate script; runc for containerd in the kubelet lab
# (test/k8s). `deps.sh lab` installs only what margay-lab needs.
packages=(ca-certificates iproute2 iputils-ping iptables bird2 frr iperf3 qemu-system-x86 tcpdump openssl runc)
if [ "${1:-}" = lab ]; then
	packages=(ca-certificates iproute2 iputils-ping iptables)
fi

if ! command -v go >/dev/null; then
	echo "deps: Go is not on PATH; install Go 1.26 or later (https://go.dev/doc/install)" >&2
	exit 1
fi
missing=()
for p in "${packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
	if [ "$(id -u)" -ne 0 ]; then
		echo "deps: missing Debian packages: ${missing[*]}; run as root (sudo make test) or install them" >&2
		exit 1
	fi
	echo "deps: installing ${missing[*]}"
	# The routing daemons must not start as services in the host's namespace:
	# policy-rc.d tells the packages' scripts not to start anything.
	policy=/usr/sbin/policy-rc.d
	own_policy=
	if [ ! -e "$policy" ]; then
		printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && own_policy=1
		trap '[ -n "$own_policy" ] && rm -f "$policy"' EXIT
	fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
go mod download
# The tools modules that build Kubernetes and containerd for the Kubernetes
# tests.
if [ "${1:-}" != lab ]; then
	for m in tools containerd; do
		(cd "$(dirname "$0")/k8s/$m" && go mod download)
	done
fi
