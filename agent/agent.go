// Package agent is margay-node: it registers the node, mirrors the datastore,
// runs the embedded BGP speaker, and feeds both into felix's calculation and
// reconcilers, on every change and on a resync timer.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/bgp"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/felix"
	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/ipip"
	"github.com/margay-dev/margay/vxlan"
)

// Config is margay-node's configuration.
type Config struct {
	NodeName string
	// K8sNodeRef, when set, is the node's name in Kubernetes: the Node gets an
	// orchRef to it, which lets margay-kube-controllers delete the Node (and
	// release its blocks) once Kubernetes deletes that node.
	K8sNodeRef string
	Datastore  datastore.Config
	// IP is the node's address as a CIDR, or "" / "autodetect" to find it with
	// AutodetectMethod.
	IP               string
	AutodetectMethod string
	// IP6 is the node's IPv6 address as a CIDR, "autodetect" to find it with
	// Autodetect6Method, or "" / "none" for none.
	IP6               string
	Autodetect6Method string
	// AS overrides the node's AS number (0: inherit from BGPConfiguration).
	AS api.ASNumber
	// DefaultPool is created when the datastore has no pool at all ("" never).
	DefaultPool    string
	MTUFile        string
	HealthAddr     string // /livez and /readyz
	MetricsAddr    string // Prometheus
	GRPCAddr       string // GoBGP's API, loopback only
	ResyncInterval time.Duration
	Logger         *slog.Logger
}

// Defaults.
const (
	// DefaultHealthAddr is loopback, as Calico's: /readyz says why a node is
	// not ready, which is nobody else's business. Metrics stay on every
	// address for Prometheus.
	DefaultHealthAddr     = "127.0.0.1:9099"
	DefaultMetricsAddr    = ":9091"
	DefaultGRPCAddr       = "127.0.0.1:50051"
	DefaultPoolCIDR       = "10.244.0.0/16"
	DefaultResyncInterval = 10 * time.Second
	// peerGrace is how long readiness waits for every peer to be Established once.
	peerGrace = 30 * time.Second
)

// Agent is one running margay-node.
type Agent struct {
	cfg            Config
	log            *slog.Logger
	store          *datastore.Store
	addr           netip.Prefix
	addr6          netip.Prefix // invalid: the node has no IPv6 address
	iface, iface6  string       // the interfaces of addr and addr6
	view           *view
	kickC          chan struct{}
	routes         *felix.Routes
	ipsets         *felix.IPSets
	ipt            *felix.IPTables
	ipt6           *felix.IPTables // nil: the kernel has no IPv6
	policyCounters *policyCounters
	ipip           *ipip.Device
	vxlan, vxlan6  *vxlan.Device
	metrics        *metrics
	health         *health

	speaker    *bgp.Speaker
	speakerCfg bgp.Config
	mtu        int
	problems   string
	applied    calc.Output // the last data plane applied without error
	alloc      *ipam.Allocator
	ignored    map[ignoredKey]ignoredSince
}

// Run starts the agent and runs it until ctx ends. It returns an error when the
// node cannot start (datastore unreachable, name or address taken); after that
// it keeps running and reports trouble through logs, metrics and /readyz. On
// return it leaves routes, rules and BGP sessions' routes at peers in place, so
// traffic keeps flowing while it restarts.
func Run(ctx context.Context, cfg Config) error {
	a, err := start(ctx, cfg)
	if err != nil {
		return err
	}
	defer a.store.Close()
	a.loop(ctx)
	return nil
}

func start(ctx context.Context, cfg Config) (*Agent, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.ResyncInterval <= 0 {
		cfg.ResyncInterval = DefaultResyncInterval
	}
	if cfg.NodeName == "" {
		h, err := os.Hostname()
		if err != nil {
			return nil, fmt.Errorf("node name: %w; give --nodename", err)
		}
		cfg.NodeName = h
	}
	log := cfg.Logger.With("node", cfg.NodeName)
	a := &Agent{cfg: cfg, log: log, kickC: make(chan struct{}, 1), metrics: newMetrics()}
	a.health = newHealth(a.metrics.registry)
	addr, iface, err := nodeAddress(cfg.IP, cfg.AutodetectMethod, ipam.IPv4)
	if err != nil {
		return nil, err
	}
	a.addr, a.iface = addr, iface
	log.Info("node address", "ip", addr.String(), "interface", iface)
	if cfg.IP6 != "" && cfg.IP6 != "none" {
		if a.addr6, a.iface6, err = nodeAddress(cfg.IP6, cfg.Autodetect6Method, ipam.IPv6); err != nil {
			return nil, err
		}
		log.Info("node IPv6 address", "ip", a.addr6.String(), "interface", a.iface6)
	}
	// Before registering: a second agent on this host must not touch the node.
	if err := a.health.serve(ctx, cfg.HealthAddr, cfg.MetricsAddr, log); err != nil {
		return nil, err
	}

	if a.store, err = datastore.New(cfg.Datastore); err != nil {
		return nil, err
	}
	if err := a.register(ctx); err != nil {
		a.store.Close()
		return nil, err
	}
	if err := writeSysctl("net/ipv4/ip_forward", "1"); err != nil {
		a.store.Close()
		return nil, err
	}
	if a.ipt, a.ipt6, err = newIPTables(log); err != nil {
		a.store.Close()
		return nil, err
	}
	a.policyCounters = newPolicyCounters(log, a.policyCounts)
	a.ipt.OnReset = a.policyCounters.reset
	if a.ipt6 != nil {
		a.ipt6.OnReset = a.policyCounters.reset
	}
	a.metrics.registry.MustRegister(a.policyCounters)
	a.routes, a.ipsets = felix.NewRoutes(log), felix.NewIPSets(log)
	a.ipip, a.vxlan, a.vxlan6 = ipip.New(log), vxlan.New(log, false), vxlan.New(log, true)
	a.view = newView(cfg.NodeName, a.kick, log)
	for _, h := range a.view.handlers() {
		go a.store.NewSyncer(h.prefix, h, log).Run(ctx)
	}
	go a.watchRoutes(ctx)
	go a.pingDatastore(ctx)
	return a, nil
}

// newIPTables finds the iptables and ip6tables binaries; ip6tables is left
// out, and nil, on a kernel without IPv6, where no pod can have an IPv6
// address.
func newIPTables(log *slog.Logger) (ipt, ipt6 *felix.IPTables, err error) {
	if ipt, err = felix.NewIPTables(log, false); err != nil {
		return nil, nil, err
	}
	if !felix.KernelHasIPv6() {
		log.Info("this kernel has no IPv6: margay programs iptables only")
		return ipt, nil, nil
	}
	ipt6, err = felix.NewIPTables(log, true)
	return ipt, ipt6, err
}

// policyCounts are the counters of the filter rules of both families: a
// policy's chains have the same rules in each, and its series sums them.
func (a *Agent) policyCounts() ([]felix.RuleCount, error) {
	counts, err := a.ipt.Counts("filter")
	if err != nil || a.ipt6 == nil {
		return counts, err
	}
	counts6, err := a.ipt6.Counts("filter")
	return append(counts, counts6...), err
}

// nodeAddress is the explicit address of family f, or the autodetected one.
func nodeAddress(ip, method string, f ipam.Family) (netip.Prefix, string, error) {
	ifaces, err := LocalIfaces()
	if err != nil {
		return netip.Prefix{}, "", fmt.Errorf("list interfaces: %w", err)
	}
	if ip != "" && ip != "autodetect" {
		p, err := netip.ParsePrefix(ip)
		if err != nil || ipam.FamilyOf(p.Addr()) != f || p.Addr().Is4In6() || !p.Addr().IsGlobalUnicast() {
			if f == ipam.IPv6 {
				return netip.Prefix{}, "", fmt.Errorf("--ip6 %q: give the node's global IPv6 address with its subnet's prefix length, such as fd00:18:1::2/64, autodetect or none", ip)
			}
			return netip.Prefix{}, "", fmt.Errorf("--ip %q: give the node's IPv4 address with its subnet's prefix length, such as 198.18.1.2/24, or autodetect", ip)
		}
		for _, i := range ifaces {
			for _, a := range i.Addrs {
				if a.Addr() == p.Addr() {
					return p, i.Name, nil
				}
			}
		}
		// Not local (a NAT address): the uplink is where the kernel would send
		// to it, so that the MTU and VXLAN still have an interface.
		iface, _ := RouteInterface(p.Addr())
		return p, iface, nil
	}
	return ChooseAddress(method, f, ifaces, RouteSource)
}

func (a *Agent) kick() {
	select {
	case a.kickC <- struct{}{}:
	default:
	}
}

// loop reconciles after every change (batched for 50 ms) and on the resync timer.
func (a *Agent) loop(ctx context.Context) {
	t := time.NewTicker(a.cfg.ResyncInterval)
	defer t.Stop()
	var bgpChanges <-chan struct{}
	for {
		full := false
		select {
		case <-ctx.Done():
			return
		case <-a.kickC:
		case <-bgpChanges:
		case <-t.C:
			full = true
		}
		select { // let a burst of changes settle
		case <-ctx.Done():
			return
		case <-time.After(50 * time.Millisecond):
		}
		a.reconcile(ctx, full)
		if a.speaker != nil {
			bgpChanges = a.speaker.Changes()
		}
	}
}

// reconcile computes the desired state and applies it: BGP peers, the data plane,
// then the advertisements.
func (a *Agent) reconcile(ctx context.Context, full bool) {
	a.health.beat()
	s := a.view.snapshot()
	if !s.synced {
		return
	}
	if s.self == nil {
		a.log.Error("this node's Node resource is gone; registering it again")
		if err := a.register(ctx); err != nil {
			a.log.Error("cannot register the node", "err", err)
		}
		return
	}
	settings := api.ResolveBGP(s.configs[api.GlobalBGPConfigName], s.configs[api.BGPConfigName(a.cfg.NodeName)])
	if err := a.ensureSpeaker(ctx, s.self, settings); err != nil {
		a.log.Error("BGP speaker", "err", err)
		a.health.set("bgp", err.Error())
		return
	}
	a.health.set("bgp", "")
	paths, err := a.speaker.Paths(ctx)
	if err != nil {
		a.log.Error("BGP paths", "err", err)
	}
	in := calc.Input{Node: a.cfg.NodeName, NodeIP: a.addr, NodeIP6: a.addr6, Pools: s.pools, Nodes: s.nodes, Blocks: s.blocks,
		Endpoints: s.eps, Owners: s.owners, Paths: paths, RandomFully: a.ipt.RandomFully(), UnderlayMTU: a.underlayMTU(), Policy: s.policy}
	in.Gateways = a.gateways(in.Paths)
	out := calc.Compute(in)
	a.reportIgnored(out.Ignored, time.Now())
	// Advertise before adding peers: a session that comes up then sends our
	// routes before its End-of-RIB, so a restarting node's peers never drop them.
	if err := a.speaker.SetAdvertised(ctx, out.Advertise); err != nil {
		a.log.Error("BGP advertisements", "err", err)
	}
	peers, problems := bgp.DesiredPeers(a.cfg.NodeName, s.nodes, s.peers, settings)
	if err := a.speaker.SetPeers(ctx, peers); err != nil {
		a.log.Error("BGP peers", "err", err)
	}
	a.health.expectPeers(peers)
	a.reportProblems(append(problems, out.Problems...))
	// Until BGP has converged after a start, routes and VXLAN peers learned
	// before it are kept: dropping them while the sessions come up would cut
	// traffic on a restart.
	keep := !a.health.converged()
	a.routes.KeepRemote(keep)
	a.vxlan.KeepStale(keep)
	a.vxlan6.KeepStale(keep)
	a.apply(out, in.Endpoints, full)
	a.writeMTU(out.PodMTU)
	// Tunnel addresses after the data plane: they take etcd round trips, and
	// an address assigned now reaches the devices through the Node update it
	// makes, so routes need not wait for them when a pool's mode changes.
	if err := a.syncTunnelAddrs(ctx, s.self, s.pools, out, full); err != nil {
		a.log.Error("tunnel addresses", "err", err)
	}
	a.metrics.blocks.Set(float64(len(s.blocks)))
	a.updatePeerMetrics(ctx)
}

// apply runs the reconcilers: ipsets before the rules that match on them.
// Routes go through netlink and are cheap to compare every time; ipsets and
// iptables are checked only when their desired content changed, or on a full
// (timer) pass that repairs drift: listing iptables runs the iptables binary,
// and with dozens of agents on a small machine every pass adds up.
func (a *Agent) apply(out calc.Output, local []calc.Endpoint, full bool) {
	ok := true
	step := func(name string, f func() (bool, error)) {
		start := time.Now()
		_, err := f()
		a.metrics.reconcileSeconds.WithLabelValues(name).Observe(time.Since(start).Seconds())
		if err != nil {
			ok = false
			a.metrics.reconcileErrors.WithLabelValues(name).Inc()
			a.log.Error("data plane", "reconciler", name, "err", err)
		}
	}
	// Tunnels first: routes through them need the devices.
	tunnels := ""
	step("ipip", func() (bool, error) {
		c, err := a.ipip.Apply(out.IPIP)
		if errors.Is(err, ipip.ErrNoKernelSupport) {
			tunnels = "a pool uses IPIP, but " + err.Error()
		}
		return c, err
	})
	step("vxlan", func() (bool, error) {
		if out.VXLAN != nil && (!out.VXLAN.Addr.IsValid() || out.VXLAN.MAC == "") {
			return false, nil // the address is being assigned; the next pass makes the device
		}
		return a.vxlan.Apply(out.VXLAN, a.addr.Addr(), a.iface, out.VXLANPeers)
	})
	step("vxlan-v6", func() (bool, error) {
		if out.VXLAN6 != nil && (!out.VXLAN6.Addr.IsValid() || out.VXLAN6.MAC == "") {
			return false, nil // as for IPv4
		}
		return a.vxlan6.Apply(out.VXLAN6, a.addr6.Addr(), a.iface6, out.VXLANPeers6)
	})
	a.health.set("tunnels", tunnels)
	step("routes", func() (bool, error) { return a.routes.Apply(out.Routes) })
	if full {
		a.ipsets.Resync()
		a.ipt.Resync()
		if a.ipt6 != nil {
			a.ipt6.Resync()
		}
	}
	if full || !reflect.DeepEqual(out.IPSets, a.applied.IPSets) {
		step("ipsets", func() (bool, error) { return a.ipsets.Apply(out.IPSets) })
	}
	rulesChanged := !reflect.DeepEqual(out.Chains, a.applied.Chains) || !reflect.DeepEqual(out.Chains6, a.applied.Chains6) ||
		!reflect.DeepEqual(out.IPSets, a.applied.IPSets)
	if full || rulesChanged || !reflect.DeepEqual(out.Jumps, a.applied.Jumps) {
		// Both families under one lock: the counters' chains are those of both.
		a.policyCounters.io.Lock()
		step("iptables", func() (bool, error) { return a.ipt.Apply(out.Chains, out.Jumps) })
		if a.ipt6 != nil {
			step("ip6tables", func() (bool, error) { return a.ipt6.Apply(out.Chains6, out.Jumps) })
		}
		a.policyCounters.setChains(out.PolicyChains)
		a.policyCounters.io.Unlock()
	}
	// Flows the new rules would not let start are cut once the rules are in
	// place, so that one cannot start again under the old ones. A full pass
	// also catches those that slipped through a restart.
	// A failure here is reported but leaves the rules applied: they are.
	if ok && (full || rulesChanged) {
		start := time.Now()
		n, err := felix.CutDenied(out, local)
		a.metrics.reconcileSeconds.WithLabelValues("conntrack").Observe(time.Since(start).Seconds())
		if err != nil {
			a.metrics.reconcileErrors.WithLabelValues("conntrack").Inc()
			a.log.Error("data plane", "reconciler", "conntrack", "err", err)
		}
		if n > 0 {
			a.metrics.flowsCut.Add(float64(n))
			a.log.Info("cut established flows that policy now denies", "flows", n)
		}
	}
	step("sysctls", func() (bool, error) {
		var errs []error
		for k, v := range out.Sysctls {
			errs = append(errs, writeSysctl(k, v))
		}
		return false, errors.Join(errs...)
	})
	if n, err := a.routes.Count(); err == nil {
		a.metrics.routes.Set(float64(n))
	}
	if ok {
		a.applied = out
		a.health.dataplaneSynced()
	} else {
		a.applied = calc.Output{} // retry everything next pass
	}
}

// ignoredGrace is how long a path must have been ignored before it is logged
// and counted: a pod's /32 or a block is withdrawn a moment after its
// WorkloadEndpoint or affinity goes, and that is no hijack.
const ignoredGrace = 5 * time.Second

type ignoredKey struct {
	prefix        netip.Prefix
	peer, nextHop netip.Addr
}

type ignoredSince struct {
	since    time.Time
	reported bool
}

// reportIgnored logs and counts, once each, the paths calc ignored for not
// leading to their prefix's owner, once they have been ignored for
// ignoredGrace. A path that goes and comes back is reported again.
func (a *Agent) reportIgnored(ps []calc.IgnoredPath, now time.Time) {
	next := make(map[ignoredKey]ignoredSince, len(ps))
	current := map[string]int{}
	fresh := false
	for _, p := range ps {
		k := ignoredKey{p.Path.Prefix, p.Path.Peer, p.Path.NextHop}
		st, seen := a.ignored[k]
		if !seen {
			st.since, fresh = now, true
		}
		if !st.reported && now.Sub(st.since) >= ignoredGrace {
			st.reported = true
			a.metrics.ignoredPaths.WithLabelValues(k.peer.String()).Inc()
			a.log.Warn("ignoring a BGP path that does not lead to its prefix's owner",
				"prefix", k.prefix, "peer", k.peer, "nextHop", k.nextHop, "claimant", p.Claimant, "owner", p.Owner, "reason", p.Reason)
		}
		if st.reported {
			current[k.peer.String()]++
		}
		next[k] = st
	}
	a.ignored = next
	a.metrics.ignoredNow.Reset()
	for peer, n := range current {
		a.metrics.ignoredNow.WithLabelValues(peer).Set(float64(n))
	}
	if fresh {
		// Look again once the new paths' grace is over, changes or not.
		time.AfterFunc(ignoredGrace, a.kick)
	}
}

func (a *Agent) reportProblems(ps []string) {
	joined := strings.Join(ps, "\n")
	if joined == a.problems {
		return
	}
	a.problems = joined
	for _, p := range ps {
		a.log.Warn("not routed", "problem", p)
	}
}

// ensureSpeaker starts the BGP speaker, or restarts it when the node's AS,
// listen port or route reflector cluster changed.
func (a *Agent) ensureSpeaker(ctx context.Context, self *api.Node, s api.BGPSettings) error {
	as := s.ASNumber
	var cluster string
	if b := self.Spec.BGP; b != nil {
		if b.ASNumber != nil {
			as = *b.ASNumber
		}
		cluster = b.RouteReflectorClusterID
	}
	// Sessions leave from the node's address: the passive side of a mesh pair
	// accepts its peer only from there.
	want := bgp.Config{RouterID: a.addr.Addr(), LocalAddress: a.addr.Addr(), NextHopV6: a.addr6.Addr(), ASNumber: uint32(as), ListenPort: s.ListenPort,
		ClusterID: cluster, GRPCAddress: a.cfg.GRPCAddr, Logger: a.log}
	if a.speaker != nil && a.speakerCfg.RouterID == want.RouterID && a.speakerCfg.ASNumber == want.ASNumber &&
		a.speakerCfg.ListenPort == want.ListenPort && a.speakerCfg.ClusterID == want.ClusterID {
		return nil
	}
	if a.speaker != nil {
		a.log.Warn("BGP identity changed; restarting the speaker", "as", want.ASNumber, "port", want.ListenPort, "clusterID", cluster)
		a.speaker.Close()
		a.speaker = nil
	}
	sp, err := bgp.Start(ctx, want)
	if err != nil {
		return err
	}
	a.speaker, a.speakerCfg = sp, want
	a.health.bgpStarted()
	return nil
}

func (a *Agent) updatePeerMetrics(ctx context.Context) {
	ps, err := a.speaker.Peers(ctx)
	if err != nil {
		return
	}
	counts := map[string]int{}
	for _, p := range ps {
		counts[p.State]++
		if p.State == "Established" {
			a.health.established(p.Address)
		}
	}
	a.metrics.peers.Reset()
	for st, n := range counts {
		a.metrics.peers.WithLabelValues(st).Set(float64(n))
	}
}

// underlayMTU is the MTU of the node's uplink, 0 when unknown.
// gateways resolves the next hops outside this node's subnet through the
// kernel's routes (calc.Input.Gateways). One without a route is left out, and
// calc reports it.
func (a *Agent) gateways(paths []api.BGPPath) map[netip.Addr]netip.Addr {
	gws := map[netip.Addr]netip.Addr{}
	for _, p := range paths {
		nh := p.NextHop
		if _, done := gws[nh]; done || a.addr.Contains(nh) || a.addr6.Contains(nh) {
			continue
		}
		gw, err := RouteGateway(nh)
		if err != nil {
			a.log.Debug("no route to a BGP next hop", "nextHop", nh, "err", err)
			continue
		}
		gws[nh] = gw
	}
	return gws
}

func (a *Agent) underlayMTU() int {
	if a.iface == "" {
		return 0
	}
	m, err := InterfaceMTU(a.iface)
	if err != nil {
		a.log.Error("underlay MTU", "interface", a.iface, "err", err)
		return 0
	}
	return m
}

// writeMTU writes the pod MTU for the CNI plugin when it changes. Without a
// known uplink (an --ip that is not local and has no route) there is no MTU to
// derive it from, and the plugin asks to be retried unless its conflist has one.
func (a *Agent) writeMTU(m int) {
	if a.cfg.MTUFile == "" || a.iface == "" || m == a.mtu {
		return
	}
	if err := writeAtomic(a.cfg.MTUFile, []byte(strconv.Itoa(m)+"\n")); err != nil {
		a.log.Error("writing the MTU file", "path", a.cfg.MTUFile, "err", err)
		return
	}
	a.mtu = m
	a.log.Info("pod MTU", "mtu", m, "file", a.cfg.MTUFile)
}

func writeAtomic(path string, data []byte) error {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// writeSysctl sets a sysctl under /proc/sys/net of this namespace, if it differs.
func writeSysctl(name, value string) error {
	p := filepath.Join("/proc/sys", name)
	if cur, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(cur)) == value {
		return nil
	}
	if err := os.WriteFile(p, []byte(value), 0o644); err != nil {
		return fmt.Errorf("sysctl %s=%s: %w", name, value, err)
	}
	return nil
}

// pingDatastore tracks whether etcd answers, for readiness: the syncers retry
// quietly on their own.
func (a *Agent) pingDatastore(ctx context.Context) {
	for {
		err := a.store.Ping(ctx)
		if ctx.Err() != nil {
			return
		}
		msg := ""
		if err != nil {
			msg = err.Error()
		}
		a.health.set("datastore", msg)
		select {
		case <-ctx.Done():
			return
		case <-time.After(2 * time.Second):
		}
	}
}
