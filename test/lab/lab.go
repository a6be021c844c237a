// Package lab builds margay's multi-node test lab in network namespaces, on the
// address plan of DESIGN.md: nodes in subnets 198.18.<n>.0/24 joined by a router
// (.1 in each), an etcd host at 198.18.1.250, and an "internet" host at
// 203.0.113.10 behind the router; a dual-stack lab adds fd00:18:<n>::/64 to
// the subnets and 2001:db8:113::10 to the internet host. Every node runs the real margay-node binary as
// a process; pods are added through the real CNI plugin with libcni, as kubelet
// does. The e2e suites and margay-lab share it. Nothing touches the root
// namespace: the lab is a closed set of namespaces.
package lab

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/nstest"
)

// Addresses of the plan.
var (
	EtcdAddr     = netip.MustParseAddr("198.18.1.250")
	InternetAddr = netip.MustParseAddr("203.0.113.10")
	// InternetAddr6 is the internet host's IPv6 address in a dual-stack lab.
	InternetAddr6 = netip.MustParseAddr("2001:db8:113::10")
)

// Options shape a lab.
type Options struct {
	Nodes   int // default 3
	Subnets int // default 1
	// Bin holds margay-node, margay, margay-ipam and margayctl.
	Bin string
	// Dir holds the lab's files (etcd data, logs, CNI cache); default a new
	// temporary directory, removed by Down.
	Dir string
	// Pools are applied (as margayctl apply YAML) before the agents start.
	Pools string
	// DualStack gives the router and every node an IPv6 address beside the
	// IPv4 one (SubnetOf6), starts the agents with --ip6 and has pods get an
	// address of each family (assign_ipv6).
	DualStack bool
	// AgentArgs are extra margay-node flags for every node.
	AgentArgs []string
	// ToR "bird" runs BIRD in the router as every node's eBGP peer (AS ToRAS),
	// with a BGPPeer per node to the router's address on its subnet.
	ToR string
	// K8sNodeRefs registers each node's Node with a Kubernetes node of the
	// same name (margay-node --k8s-node-ref), for a lab with kubelets.
	K8sNodeRefs bool
	// Detach lets the lab's processes outlive this one (margay-lab); otherwise
	// they die with it.
	Detach bool
	// Log receives a line per step; nil for none.
	Log io.Writer `json:"-"`
}

// Lab is a running lab.
type Lab struct {
	opts     Options
	ownDir   bool
	Router   *nstest.NS
	Internet *nstest.NS
	EtcdHost *nstest.NS
	Etcd     *etcdtest.Server // nil in a lab Load adopted
	Nodes    []*Node
	endpoint string
	etcd     *proc // etcd in a lab Load adopted
	bird     *proc
	mu       sync.Mutex
	nss      []*nstest.NS
}

// Node is one lab node.
type Node struct {
	lab   *Lab
	Name  string
	NS    *nstest.NS
	IP    netip.Prefix
	IP6   netip.Prefix // invalid unless the lab is dual-stack
	agent *proc
	Pods  []*Pod
}

// Pod is a pod on a node.
type Pod struct {
	Name      string
	Namespace string // the Kubernetes namespace it claims (CNI_ARGS)
	NS        *nstest.NS
	IP        netip.Addr
	IP6       netip.Addr // invalid unless the lab is dual-stack
	Node      *Node
	rt        *libcni.RuntimeConf
}

// Up builds the topology, starts etcd, applies the pools and starts an agent on
// every node. On error it removes what it made.
func Up(ctx context.Context, opts Options) (l *Lab, err error) {
	if opts.Nodes <= 0 {
		opts.Nodes = 3
	}
	if opts.Subnets <= 0 {
		opts.Subnets = 1
	}
	if opts.Subnets > 200 || opts.Nodes > 200 {
		return nil, fmt.Errorf("at most 200 nodes in at most 200 subnets")
	}
	l = &Lab{opts: opts}
	built := l // the error returns below set l to nil before this runs
	defer func() {
		if err != nil {
			built.Down()
		}
	}()
	if l.opts.Dir == "" {
		if l.opts.Dir, err = os.MkdirTemp("", "margay-lab-"); err != nil {
			return nil, err
		}
		l.ownDir = true
	}
	if opts.ToR != "" && opts.ToR != "bird" {
		return nil, fmt.Errorf("ToR %q: the lab knows bird only", opts.ToR)
	}
	l.logf("building %d nodes in %d subnets", opts.Nodes, opts.Subnets)
	if err := l.topology(); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	l.logf("starting etcd at %s", EtcdAddr)
	if l.Etcd, err = etcdtest.Start(etcdtest.Options{Dir: filepath.Join(l.opts.Dir, "etcd"), NetNS: l.EtcdHost.Name, Host: EtcdAddr.String(), Detach: opts.Detach}); err != nil {
		return nil, err
	}
	l.endpoint = l.Etcd.Endpoints()[0]
	resources := opts.Pools
	if opts.ToR != "" {
		resources += "\n" + l.torPeers()
		if err := l.startBird(); err != nil {
			return nil, err
		}
	}
	if strings.TrimSpace(resources) != "" {
		f := filepath.Join(l.opts.Dir, "resources.yaml")
		if err := os.WriteFile(f, []byte(resources), 0o600); err != nil {
			return nil, err
		}
		if out, err := l.Ctl(l.Nodes[0], "apply", "-f", f); err != nil {
			return nil, fmt.Errorf("apply pools: %v: %s", err, out)
		}
	}
	for _, n := range l.Nodes {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		if err := n.Start(); err != nil {
			return nil, err
		}
	}
	return l, nil
}

func (l *Lab) logf(format string, args ...any) {
	if l.opts.Log != nil {
		fmt.Fprintf(l.opts.Log, format+"\n", args...)
	}
}

func (l *Lab) ns(role string) (*nstest.NS, error) {
	ns, err := nstest.Create(role)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	l.nss = append(l.nss, ns)
	l.mu.Unlock()
	return ns, nil
}

// SubnetOf is subnet s's prefix (s from 0): 198.18.<s+1>.0/24.
func SubnetOf(s int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{198, 18, byte(s + 1), 0}), 24)
}

// SubnetOf6 is subnet s's IPv6 prefix: fd00:18:<s+1>::/64, with the same host
// numbers as SubnetOf.
func SubnetOf6(s int) netip.Prefix {
	a := netip.MustParseAddr("fd00:18::").As16()
	a[5] = byte(s + 1)
	return netip.PrefixFrom(netip.AddrFrom16(a), 64)
}

// hostIn is host number h of prefix p.
func hostIn(p netip.Prefix, h int) netip.Addr {
	a := p.Addr()
	for range h {
		a = a.Next()
	}
	return a
}

// topology makes the router with one bridge per subnet, the internet and etcd
// hosts, and the nodes, round robin over the subnets (node i gets host number
// 2 + i/subnets).
//
// The router's address on a subnet is on a veth (r<N>) whose peer is a port of
// the subnet's bridge, not on the bridge itself: a bridge device cannot send
// tunnelled GSO packets whole (it has no encapsulation features), so routing
// out of it would cut every VXLAN or IPIP super-packet into wire-sized ones,
// a cost plain TCP would not pay and a real router does not add.
func (l *Lab) topology() error {
	var err error
	if l.Router, err = l.ns("router"); err != nil {
		return err
	}
	r := l.Router
	steps := [][]string{{"sysctl", "-qw", "net.ipv4.ip_forward=1"}}
	for s := range l.opts.Subnets {
		br, rt := fmt.Sprintf("br%d", s), fmt.Sprintf("r%d", s)
		gw := SubnetOf(s).Addr().Next()
		steps = append(steps,
			[]string{"ip", "link", "add", br, "type", "bridge"},
			[]string{"ip", "link", "set", br, "up"},
			[]string{"ip", "link", "add", rt, "type", "veth", "peer", "name", rt + "-port"},
			[]string{"ip", "link", "set", rt + "-port", "master", br},
			[]string{"ip", "link", "set", rt + "-port", "up"},
			[]string{"ip", "addr", "add", netip.PrefixFrom(gw, 24).String(), "dev", rt},
			[]string{"ip", "link", "set", rt, "up"})
		if l.opts.DualStack {
			steps = append(steps, []string{"ip", "-6", "addr", "add", netip.PrefixFrom(hostIn(SubnetOf6(s), 1), 64).String(), "dev", rt, "nodad"})
		}
	}
	if l.opts.DualStack {
		steps = append(steps, []string{"sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"})
	}
	if err := runAll(r, steps); err != nil {
		return err
	}
	if l.Internet, err = l.ns("internet"); err != nil {
		return err
	}
	if err := l.link(l.Internet, "inet", "", "203.0.113.1/24", netip.PrefixFrom(InternetAddr, 24), "203.0.113.1"); err != nil {
		return err
	}
	if l.opts.DualStack {
		if err := runAll(r, [][]string{{"ip", "-6", "addr", "add", "2001:db8:113::1/64", "dev", "inet", "nodad"}}); err != nil {
			return err
		}
		if err := runAll(l.Internet, [][]string{
			{"ip", "-6", "addr", "add", netip.PrefixFrom(InternetAddr6, 64).String(), "dev", "eth0", "nodad"},
			{"ip", "-6", "route", "add", "default", "via", "2001:db8:113::1"},
		}); err != nil {
			return err
		}
	}
	if l.EtcdHost, err = l.ns("etcd"); err != nil {
		return err
	}
	if err := l.link(l.EtcdHost, "etcd", "br0", "", netip.PrefixFrom(EtcdAddr, 24), "198.18.1.1"); err != nil {
		return err
	}
	for i := range l.opts.Nodes {
		s := i % l.opts.Subnets
		ip := SubnetOf(s).Addr()
		for range 2 + i/l.opts.Subnets {
			ip = ip.Next()
		}
		ns, err := l.ns("node")
		if err != nil {
			return err
		}
		n := &Node{lab: l, Name: fmt.Sprintf("node%d", i+1), NS: ns, IP: netip.PrefixFrom(ip, 24)}
		if err := l.link(ns, fmt.Sprintf("n%d", i+1), fmt.Sprintf("br%d", s), "", n.IP, SubnetOf(s).Addr().Next().String()); err != nil {
			return err
		}
		if l.opts.DualStack {
			n.IP6 = netip.PrefixFrom(hostIn(SubnetOf6(s), 2+i/l.opts.Subnets), 64)
			if err := runAll(ns, [][]string{
				{"ip", "-6", "addr", "add", n.IP6.String(), "dev", "eth0", "nodad"},
				{"ip", "-6", "route", "add", "default", "via", hostIn(SubnetOf6(s), 1).String()},
			}); err != nil {
				return err
			}
		}
		l.Nodes = append(l.Nodes, n)
	}
	return nil
}

// link connects host to the router with a veth: eth0 in host with addr and a
// default route via gw, and routerEnd in the router, on bridge br or with
// routerAddr.
func (l *Lab) link(host *nstest.NS, routerEnd, br, routerAddr string, addr netip.Prefix, gw string) error {
	if out, err := l.Router.Run("ip", "link", "add", routerEnd, "type", "veth", "peer", "name", "eth0", "netns", host.Name); err != nil {
		return fmt.Errorf("veth %s to %s: %v: %s", routerEnd, host.Name, err, out)
	}
	rsteps := [][]string{{"ip", "link", "set", routerEnd, "up"}}
	if br != "" {
		rsteps = append(rsteps, []string{"ip", "link", "set", routerEnd, "master", br})
	}
	if routerAddr != "" {
		rsteps = append(rsteps, []string{"ip", "addr", "add", routerAddr, "dev", routerEnd})
	}
	if err := runAll(l.Router, rsteps); err != nil {
		return err
	}
	return runAll(host, [][]string{
		{"ip", "addr", "add", addr.String(), "dev", "eth0"},
		{"ip", "link", "set", "eth0", "up"},
		{"ip", "route", "add", "default", "via", gw},
	})
}

func runAll(ns *nstest.NS, steps [][]string) error {
	for _, s := range steps {
		if out, err := ns.Run(s...); err != nil {
			return fmt.Errorf("in %s: %s: %v: %s", ns.Name, strings.Join(s, " "), err, out)
		}
	}
	return nil
}

// Endpoint is the etcd URL agents and plugins use.
func (l *Lab) Endpoint() string { return l.endpoint }

// Ctl runs margayctl in node n.
func (l *Lab) Ctl(n *Node, args ...string) (string, error) {
	return n.NS.Run(append([]string{filepath.Join(l.opts.Bin, "margayctl"), "--etcd-endpoints", l.Endpoint()}, args...)...)
}

// Bin is the directory of the margay binaries the lab runs.
func (l *Lab) Bin() string { return l.opts.Bin }

// Dir is the lab's directory.
func (l *Lab) Dir() string { return l.opts.Dir }

// Start starts the node's agent (again).
func (n *Node) Start() error {
	l := n.lab
	if n.Running() {
		return fmt.Errorf("%s: agent already running", n.Name)
	}
	args := append([]string{"ip", "netns", "exec", n.NS.Name, filepath.Join(l.opts.Bin, "margay-node"),
		"--nodename", n.Name, "--etcd-endpoints", l.Endpoint(), "--default-ipv4-pool", "",
		"--mtu-file", n.MTUFile()}, l.opts.AgentArgs...)
	if l.opts.K8sNodeRefs {
		args = append(args, "--k8s-node-ref", n.Name)
	}
	if n.IP6.IsValid() {
		args = append(args, "--ip6", n.IP6.String())
	}
	// ip execs the agent in place, so the process is margay-node itself.
	p, err := startProc(args, n.LogPath(), l.opts.Detach)
	if err != nil {
		return fmt.Errorf("start margay-node on %s: %w", n.Name, err)
	}
	n.agent = p
	l.logf("started margay-node on %s (%s)", n.Name, n.IP)
	return nil
}

// Stop signals the node's agent and waits for it to exit (at most 10 s, then it
// is killed).
func (n *Node) Stop(sig syscall.Signal) {
	n.agent.stop(sig)
	n.agent = nil
}

// Running reports whether the agent process is alive.
func (n *Node) Running() bool { return n.agent.running() }

// PID is the agent's process ID, 0 when it is not running.
func (n *Node) PID() int {
	if !n.Running() {
		return 0
	}
	return n.agent.pid
}

// MTUFile is where the node's agent writes the pod MTU.
func (n *Node) MTUFile() string { return filepath.Join(n.lab.opts.Dir, n.Name, "mtu") }

// LogPath is the agent's log file.
func (n *Node) LogPath() string {
	os.MkdirAll(filepath.Join(n.lab.opts.Dir, n.Name), 0o755)
	return filepath.Join(n.lab.opts.Dir, n.Name, "margay-node.log")
}

func (l *Lab) cniConf(n *Node) (*libcni.NetworkConfigList, error) {
	mtu := 1500
	if b, err := os.ReadFile(n.MTUFile()); err == nil {
		fmt.Sscan(string(b), &mtu)
	}
	v6 := "false"
	if l.opts.DualStack {
		v6 = "true"
	}
	return libcni.ConfListFromBytes(fmt.Appendf(nil, `{"cniVersion": "1.1.0", "name": "k8s-pod-network", "plugins": [
		{"type": "margay", "etcd_endpoints": %q, "nodename": %q, "mtu": %d, "ipam": {"type": "margay-ipam", "assign_ipv6": %q}}]}`,
		l.Endpoint(), n.Name, mtu, v6))
}

// AddPod creates a pod in namespace "lab" on node n through the CNI plugin.
func (l *Lab) AddPod(ctx context.Context, n *Node, name string) (*Pod, error) {
	return l.AddPodIn(ctx, n, "lab", name)
}

// AddPodIn creates a pod in a namespace on node n through the CNI plugin.
// Pod names must be unique across namespaces: they name the containers.
func (l *Lab) AddPodIn(ctx context.Context, n *Node, namespace, name string) (*Pod, error) {
	ns, err := l.ns("pod")
	if err != nil {
		return nil, err
	}
	list, err := l.cniConf(n)
	if err != nil {
		return nil, err
	}
	p := &Pod{Name: name, Namespace: namespace, NS: ns, Node: n, rt: runtimeConf(n, namespace, name, ns)}
	var res types.Result
	err = n.NS.Do(func() (err error) {
		res, err = l.cni().AddNetworkList(ctx, list, p.rt)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("ADD %s on %s: %w", name, n.Name, err)
	}
	r, err := current.NewResultFromResult(res)
	if err != nil || len(r.IPs) == 0 {
		return nil, fmt.Errorf("ADD %s on %s: result %v: %v", name, n.Name, res, err)
	}
	for _, ip := range r.IPs {
		a, _ := netip.AddrFromSlice(ip.Address.IP)
		if a = a.Unmap(); a.Is4() {
			p.IP = a
		} else {
			p.IP6 = a
		}
	}
	n.Pods = append(n.Pods, p)
	l.logf("pod %s on %s: %s %s", name, n.Name, p.IP, p.IP6)
	return p, nil
}

// runtimeConf is what kubelet would pass for a pod: pod name and namespace
// included, so that the endpoint is named as Kubernetes' would be.
func runtimeConf(n *Node, namespace, name string, ns *nstest.NS) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: n.Name + "-" + name, NetNS: ns.Path, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", namespace}, {"K8S_POD_NAME", name}}}
}

// DelPod deletes a pod through the CNI plugin and removes its namespace.
func (l *Lab) DelPod(ctx context.Context, p *Pod) error {
	list, err := l.cniConf(p.Node)
	if err != nil {
		return err
	}
	err = p.Node.NS.Do(func() error { return l.cni().DelNetworkList(ctx, list, p.rt) })
	p.NS.Delete()
	for i, q := range p.Node.Pods {
		if q == p {
			p.Node.Pods = append(p.Node.Pods[:i], p.Node.Pods[i+1:]...)
			break
		}
	}
	return err
}

// cni is libcni for one call (it is not safe for concurrent use).
func (l *Lab) cni() *libcni.CNIConfig {
	return libcni.NewCNIConfigWithCacheDir([]string{l.opts.Bin}, filepath.Join(l.opts.Dir, "cni-cache"), nil)
}

// Pods lists every pod of the lab.
func (l *Lab) Pods() []*Pod {
	var out []*Pod
	for _, n := range l.Nodes {
		out = append(out, n.Pods...)
	}
	return out
}

// Down stops the agents and etcd and removes every namespace and, if Up made
// it, the lab's directory.
func (l *Lab) Down() {
	for _, n := range l.Nodes {
		n.Stop(syscall.SIGKILL)
	}
	l.bird.stop(syscall.SIGKILL)
	if l.Etcd != nil {
		l.Etcd.Close()
	}
	l.etcd.stop(syscall.SIGKILL)
	l.mu.Lock()
	for _, ns := range l.nss {
		killIn(ns.Name) // what else runs there: restarted agents, margay-lab exec
		ns.Delete()
	}
	l.nss = nil
	l.mu.Unlock()
	if l.ownDir {
		os.RemoveAll(l.opts.Dir)
	}
}

// Ping sends count pings from a namespace to addr, bounded by -W 2 per reply.
func Ping(ns *nstest.NS, addr netip.Addr, count int) error {
	out, err := ns.Run("ping", "-c", fmt.Sprint(count), "-i", "0.2", "-W", "2", "-q", addr.String())
	if err != nil {
		return fmt.Errorf("ping %s from %s: %v: %s", addr, ns.Name, err, out)
	}
	return nil
}

// WaitFor polls cond every 100 ms until it returns nil or timeout passes, and
// then returns its last error.
func WaitFor(timeout time.Duration, cond func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := cond()
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("after %s: %w", timeout, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

var errNotRunning = errors.New("agent not running")

// Ready asks a node's agent for /readyz on its health port.
func (n *Node) Ready() error {
	if !n.Running() {
		return errNotRunning
	}
	body, err := n.HTTPGet("127.0.0.1:9099", "/readyz")
	if err != nil {
		return fmt.Errorf("%s not ready: %w", n.Name, err)
	}
	if !strings.HasPrefix(body, "HTTP/1.0 200") && !strings.HasPrefix(body, "HTTP/1.1 200") {
		return fmt.Errorf("%s not ready: %s", n.Name, body)
	}
	return nil
}

// HTTPGet fetches path from addr inside the node's namespace and returns the
// whole response, status line included.
func (n *Node) HTTPGet(addr, path string) (string, error) {
	var out []byte
	err := n.NS.Do(func() error {
		// The socket is made on this thread, so it lives in the node's namespace.
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		fmt.Fprintf(c, "GET %s HTTP/1.0\r\n\r\n", path)
		out, err = io.ReadAll(c)
		return err
	})
	return string(out), err
}
