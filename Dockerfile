# margay's image: margay-node (agent and install-cni), the CNI plugins margay and
# margay-ipam, and margayctl, all in /usr/local/bin. install-cni's --src-dir
# defaults to margay-node's own directory, so it finds the plugins there.
#
#   docker build --build-arg VERSION=$(git describe --always --dirty) -t margay .

FROM golang:1.26-bookworm AS build
WORKDIR /src
# Modules first, so a source change does not download them again.
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
# Static binaries (the CNI plugins run on the host, whatever its libc), with the
# Makefile's LDFLAGS.
RUN CGO_ENABLED=0 go build -trimpath \
        -ldflags "-X github.com/margay-dev/margay/api.Version=${VERSION}" \
        -o /out/ ./cmd/...

FROM debian:bookworm-slim
# iptables and ipset for the agent's rules, iproute2 for debugging from the pod,
# kmod for the modprobe iptables runs when a module is missing. Debian's iptables
# is the nft backend; on hosts whose rules are in iptables-legacy, select it
# with update-alternatives in a derived image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables ipset iproute2 kmod ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
ENTRYPOINT ["/usr/local/bin/margay-node"]
