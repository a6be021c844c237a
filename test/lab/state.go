package lab

import (
	"cmp"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/margay-dev/margay/test/nstest"
)

// State is what a later process needs to find a detached lab again: its
// options, namespaces, processes and pods. margay-lab keeps it in a file.
type State struct {
	Options  Options     `json:"options"`
	Router   string      `json:"router"`
	Internet string      `json:"internet"`
	EtcdHost string      `json:"etcdHost"`
	Endpoint string      `json:"endpoint"`
	EtcdPID  int         `json:"etcdPID"`
	BirdPID  int         `json:"birdPID,omitempty"`
	Nodes    []NodeState `json:"nodes"`
}

// NodeState is one node of a State.
type NodeState struct {
	Name     string       `json:"name"`
	NS       string       `json:"netns"`
	IP       netip.Prefix `json:"ip"`
	IP6      netip.Prefix `json:"ip6,omitzero"`
	AgentPID int          `json:"agentPID"`
	Pods     []PodState   `json:"pods,omitempty"`
}

// PodState is one pod of a State.
type PodState struct {
	Name      string     `json:"name"`
	Namespace string     `json:"namespace,omitempty"`
	NS        string     `json:"netns"`
	IP        netip.Addr `json:"ip"`
	IP6       netip.Addr `json:"ip6,omitzero"`
}

// State describes the lab for Load.
func (l *Lab) State() State {
	st := State{Options: l.opts, Router: l.Router.Name, Internet: l.Internet.Name, EtcdHost: l.EtcdHost.Name,
		Endpoint: l.endpoint, EtcdPID: l.etcdPID()}
	if l.bird.running() {
		st.BirdPID = l.bird.pid
	}
	for _, n := range l.Nodes {
		ns := NodeState{Name: n.Name, NS: n.NS.Name, IP: n.IP, IP6: n.IP6, AgentPID: n.PID()}
		for _, p := range n.Pods {
			ns.Pods = append(ns.Pods, PodState{Name: p.Name, Namespace: p.Namespace, NS: p.NS.Name, IP: p.IP, IP6: p.IP6})
		}
		st.Nodes = append(st.Nodes, ns)
	}
	return st
}

func (l *Lab) etcdPID() int {
	if l.Etcd != nil {
		return l.Etcd.PID()
	}
	if l.etcd.running() {
		return l.etcd.pid
	}
	return 0
}

// Load adopts the lab a State describes. Its processes are known by PID only:
// Down kills them, and a node's Start starts a new agent.
func Load(st State) *Lab {
	l := &Lab{opts: st.Options, endpoint: st.Endpoint}
	l.opts.Log = nil
	adoptNS := func(name string) *nstest.NS {
		ns := &nstest.NS{Name: name, Path: "/var/run/netns/" + name}
		l.nss = append(l.nss, ns)
		return ns
	}
	l.Router, l.Internet, l.EtcdHost = adoptNS(st.Router), adoptNS(st.Internet), adoptNS(st.EtcdHost)
	l.etcd = adopt(st.EtcdPID, l.EtcdHost.Path)
	l.bird = adopt(st.BirdPID, l.Router.Path)
	for _, s := range st.Nodes {
		n := &Node{lab: l, Name: s.Name, NS: adoptNS(s.NS), IP: s.IP, IP6: s.IP6}
		n.agent = adopt(s.AgentPID, n.NS.Path)
		for _, ps := range s.Pods {
			ns := adoptNS(ps.NS)
			pns := cmp.Or(ps.Namespace, "lab")
			n.Pods = append(n.Pods, &Pod{Name: ps.Name, Namespace: pns, NS: ns, IP: ps.IP, IP6: ps.IP6, Node: n, rt: runtimeConf(n, pns, ps.Name, ns)})
		}
		l.Nodes = append(l.Nodes, n)
	}
	return l
}

// EtcdRunning reports whether the lab's etcd process is alive.
func (l *Lab) EtcdRunning() bool { return l.etcdPID() != 0 }

// Sweep removes every namespace whose name starts with prefix, after killing
// the processes inside: what a lab that crashed or was killed left behind.
// It returns the namespaces it removed.
func Sweep(prefix string) ([]string, error) {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return nil, fmt.Errorf("ip netns list: %w", err)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 && strings.HasPrefix(f[0], prefix) {
			names = append(names, f[0])
		}
	}
	slices.Sort(names)
	var errs []error
	for _, name := range names {
		killIn(name)
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("ip netns del %s: %v: %s", name, err, strings.TrimSpace(string(out))))
		}
	}
	return names, errors.Join(errs...)
}

// killIn kills every process in the named namespace, until none is left: a
// dying agent's children (CNI plugins, iptables) may appear late. Deleting a
// namespace's name would leave such processes running in it, out of sight.
func killIn(name string) {
	for range 50 {
		pids, _ := exec.Command("ip", "netns", "pids", name).Output()
		f := strings.Fields(string(pids))
		if len(f) == 0 {
			return
		}
		for _, p := range f {
			if pid, err := strconv.Atoi(p); err == nil {
				syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
}
