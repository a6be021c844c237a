# margay — see README.md. `sudo make test` passes every test on a fresh Debian or Ubuntu machine.
GO      ?= go
BIN     := $(CURDIR)/bin
VERSION ?= $(shell git describe --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/margay-dev/margay/api.Version=$(VERSION)
# A count, not a duration: Go 1.26's fuzz coordinator can fail a duration run
# with a spurious "context deadline exceeded" (golang/go#75804, fixed in 1.27).
FUZZTIME ?= 40000x

.PHONY: all build lab lab-deps lab-down test deps vet unit integration test-k8s test-vm fuzz bench clean

all: build

# The binaries, and beside them for margay-lab the embedded etcd server and the
# gobgp CLI (both pinned in go.mod).
build:
	$(GO) build -ldflags '$(LDFLAGS)' -o $(BIN)/ ./cmd/... ./test/etcdtest/etcdserver github.com/osrg/gobgp/v3/cmd/gobgp

# A 4-node lab in two subnets on this machine, left running: see README.md.
lab: lab-deps build
	bin/margay-lab up

lab-deps:
	test/deps.sh lab

lab-down:
	bin/margay-lab down

test: deps vet unit integration test-k8s test-vm fuzz

# deps also starts building Kubernetes and containerd in the background, at low
# priority, for test-k8s: the first build takes minutes, which the other tests
# overlap.
deps:
	test/deps.sh
	test/k8s/build.sh --background

vet:
	$(GO) vet ./...
	@unformatted=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	if [ -n "$$unformatted" ]; then echo "gofmt needed: $$unformatted"; exit 1; fi

# Unit tests and the smaller integration tests, under the race detector.
unit:
	$(GO) test -race -short -count=1 ./...

# What -short leaves out: the full-size IPAM concurrency suite (the race detector
# slows the etcd client twentyfold, so it runs without; -short runs it at a tenth
# of the size under -race) and the tests that build and run real binaries.
integration:
	$(GO) test -count=1 -run 'TestConcurrentAllocation|TestBinary|TestLab' ./ipam ./cmd/margayctl ./cmd/margay-lab
	$(GO) test -count=1 ./test/e2e

# margay-kube-controllers and the CNI plugin against a real kube-apiserver
# (test/k8stest), then margay under real kubelets and containerd in the lab
# (test/k8s). MARGAY_K8S_REQUIRE turns a missing binary into a failure.
test-k8s:
	test/k8s/build.sh
	MARGAY_K8S_REQUIRE=1 $(GO) test -count=1 -run 'TestController|TestPluginPodLabelsFromKubernetes' ./kube ./cni
	MARGAY_K8S_REQUIRE=1 $(GO) test -count=1 ./test/k8s

# The kernel VM runner (test/vm) and its tests: a pinned Debian kernel under
# qemu TCG, for IPIP, which the hosts' kernel lacks. MARGAY_VM_REQUIRE turns
# the tests' skip on a host without qemu or the apt mirror into a failure.
test-vm:
	MARGAY_VM_REQUIRE=1 $(GO) test -count=1 ./test/vm

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzDecode$$' -fuzztime $(FUZZTIME) ./api
	$(GO) test -run '^$$' -fuzz '^FuzzParseSelector$$' -fuzztime $(FUZZTIME) ./api
	$(GO) test -run '^$$' -fuzz '^FuzzParseConf$$' -fuzztime $(FUZZTIME) ./cni

# cnibench, nodebench and the pod startup benchmark need root: they make network
# namespaces.
bench: deps
	$(GO) run ./test/bench/ipambench
	$(GO) run ./test/bench/cnibench
	$(GO) run ./test/bench/nodebench
	$(GO) run ./test/bench/policybench
	test/k8s/build.sh
	MARGAY_K8S_REQUIRE=1 $(GO) test -count=1 -run '^$$' -bench PodStartup -benchtime 3x ./test/k8s

clean:
	rm -rf $(BIN)
