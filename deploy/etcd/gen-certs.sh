#!/usr/bin/env bash
# gen-certs.sh [OUTDIR]: the certificates of the example etcd cluster, in OUTDIR
# (default ./pki):
#   ca.crt, ca.key                    the CA; kept, and reused, if it exists
#   etcd-N/{ca,server,peer}.{crt,key} one directory per member, for /etc/etcd/pki
#   margay.crt, margay.key            margay's client certificate
# MEMBERS="name=ip ..." overrides the members; DAYS the leaf certificates' life.
set -euo pipefail

out=${1:-pki}
members=${MEMBERS:-"etcd-1=10.0.0.11 etcd-2=10.0.0.12 etcd-3=10.0.0.13"}
days=${DAYS:-825}

umask 077 # keys are readable by their owner only
mkdir -p "$out"
cd "$out"

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"; }

# sign NAME CN EXTENDED_KEY_USAGE [SUBJECT_ALT_NAMES]: NAME.key and NAME.crt,
# signed by the CA.
sign() {
	local name=$1 cn=$2 eku=$3 san=${4:-}
	key "$name.key"
	openssl req -new -key "$name.key" -subj "/CN=$cn" -out "$name.csr"
	{
		echo "basicConstraints=critical,CA:FALSE"
		echo "keyUsage=critical,digitalSignature,keyEncipherment"
		echo "extendedKeyUsage=$eku"
		if [[ -n $san ]]; then echo "subjectAltName=$san"; fi
	} >"$name.ext"
	openssl x509 -req -in "$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -sha256 \
		-days "$days" -extfile "$name.ext" -out "$name.crt" 2>/dev/null
	rm "$name.csr" "$name.ext"
	chmod 644 "$name.crt"
}

if [[ ! -f ca.key ]]; then
	key ca.key
	openssl req -x509 -new -key ca.key -subj "/CN=margay etcd CA" -sha256 -days 3650 \
		-addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
	chmod 644 ca.crt
fi

for m in $members; do
	name=${m%%=*} ip=${m#*=}
	mkdir -p "$name"
	install -m 644 ca.crt "$name/ca.crt"
	# Clients reach a member by its address, or on the member by localhost. The
	# server certificate is also a client one: etcd's gRPC gateway dials etcd
	# with it.
	sign "$name/server" "$name" serverAuth,clientAuth "DNS:$name,DNS:localhost,IP:$ip,IP:127.0.0.1"
	# Peers dial each other, so each side is server and client.
	sign "$name/peer" "$name" serverAuth,clientAuth "DNS:$name,IP:$ip"
done

# With etcd authentication enabled, the CN is margay's etcd user.
sign margay margay clientAuth
echo "certificates in $PWD"
