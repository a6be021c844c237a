#!/usr/bin/env bash
# Installs the Debian packages the tests need, if any is missing. Run as root.
set -euo pipefail

packages=(ca-certificates iproute2 iputils-ping iptables)

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
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
go mod download
