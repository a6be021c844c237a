package cni

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strconv"
	"strings"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/kube/endpoint"
)

// DefaultMTUFile is where margay-node writes the pod MTU it detected, unless
// told otherwise (its --mtu-file, the configuration's mtu_file).
const DefaultMTUFile = "/var/lib/margay/mtu"

// More of margay's own CNI error codes.
const (
	ErrWiring   uint = 103 // creating or configuring the pod's interfaces failed
	ErrEndpoint uint = 104 // CHECK: the pod's interfaces or endpoint differ
)

// Funcs are the margay plugin's verbs, for skel.PluginMainFuncs.
func Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: verb("ADD", cmdAdd), Del: verb("DEL", cmdDel), Check: verb("CHECK", cmdCheck),
		Status: verb("STATUS", cmdStatus), GC: verb("GC", cmdGC)}
}

func (c *NetConf) ipamType() string {
	if c.IPAM.Type == "" {
		return "margay-ipam"
	}
	return c.IPAM.Type
}

// With ipam type margay-ipam, margay runs margay-ipam's code in its own process
// instead of executing the binary: the outcome is the same, and an ADD costs one
// process and one etcd connection instead of two. Any other IPAM plugin is
// executed, as the spec says.
func (ss *session) inProcessIPAM() bool { return ss.conf.ipamType() == "margay-ipam" }

func (ss *session) ipamAssign(args *skel.CmdArgs) (types.Result, error) {
	if ss.inProcessIPAM() {
		return assign(ss, args)
	}
	return invoke.DelegateAdd(ss.delegate, ss.conf.ipamType(), args.StdinData, nil)
}

// ipamRelease releases a container's addresses. The IPAM plugin reads the
// container from the environment, which for GC is not the verb's own.
func (ss *session) ipamRelease(args *skel.CmdArgs, containerID, ifName string) error {
	if ss.inProcessIPAM() {
		return release(ss, containerID)
	}
	if containerID != args.ContainerID || ifName != args.IfName {
		os.Setenv("CNI_CONTAINERID", containerID)
		os.Setenv("CNI_IFNAME", ifName)
		defer os.Setenv("CNI_CONTAINERID", args.ContainerID)
		defer os.Setenv("CNI_IFNAME", args.IfName)
	}
	return invoke.DelegateDel(ss.delegate, ss.conf.ipamType(), args.StdinData, nil)
}

func (ss *session) ipamVerify(args *skel.CmdArgs, prev *current.Result) error {
	if ss.inProcessIPAM() {
		return checkReservation(ss, args.ContainerID, prev)
	}
	return invoke.DelegateCheck(ss.delegate, ss.conf.ipamType(), args.StdinData, nil)
}

func (ss *session) ipamCollect(args *skel.CmdArgs) error {
	if ss.inProcessIPAM() {
		return collectAddresses(ss)
	}
	return invoke.DelegateGC(ss.delegate, ss.conf.ipamType(), args.StdinData, nil)
}

// podMTU is the mtu field, else the MTU margay-node detected. Without either,
// ADD fails (kubelet retries it) rather than guess: a node is Ready as soon as
// the conflist exists, which can be before its agent has written the file, and
// a pod made then with 1500 would lose large packets to the tunnels for good.
func podMTU(c *NetConf, readFile func(string) ([]byte, error)) (int, error) {
	if c.MTU != 0 {
		return c.MTU, nil
	}
	path := cmp.Or(c.MTUFile, DefaultMTUFile)
	b, err := readFile(path)
	if err != nil {
		return 0, fmt.Errorf("the pod MTU is not known yet: margay-node writes it to %s once it runs (%v); or set mtu in the network configuration (or mtu_file, if margay-node has another --mtu-file)", path, err)
	}
	m, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || m < 576 || m > 65535 {
		return 0, fmt.Errorf("%s holds %q, not an MTU from 576 to 65535", path, strings.TrimSpace(string(b)))
	}
	return m, nil
}

// pod is a container's identity: its Kubernetes pod if kubelet gave one.
type pod struct{ namespace, name string }

func podOf(cniArgs string) pod {
	var k k8sArgs
	if err := types.LoadArgs(cniArgs, &k); err != nil {
		return pod{}
	}
	return pod{string(k.K8S_POD_NAMESPACE), string(k.K8S_POD_NAME)}
}

// endpointName names a pod interface's WorkloadEndpoint: node.namespace.pod.ifname,
// or node.cni.<containerID>.ifname for a container without a pod.
func endpointName(node string, p pod, containerID, ifName string) string {
	if p.name != "" {
		return strings.ToLower(strings.Join([]string{node, p.namespace, p.name, ifName}, "."))
	}
	return strings.ToLower(strings.Join([]string{node, "cni", containerID, ifName}, "."))
}

func cmdAdd(ss *session, args *skel.CmdArgs) error {
	conf, ctx, store := ss.conf, ss.ctx, ss.store
	mtu, err := podMTU(conf, os.ReadFile)
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, "no pod MTU", err.Error())
	}
	p := podOf(args.Args)
	labels, ports, err := podLabels(ctx, conf, p)
	if err != nil {
		return types.NewError(types.ErrTryAgainLater, "cannot read the pod's labels from the Kubernetes API", err.Error())
	}
	ipamResult, err := ss.ipamAssign(args)
	if err != nil {
		return err
	}
	ok := false
	defer func() {
		if !ok { // a failed ADD must not leak its address, even if ADD ran out of time
			rs := *ss
			var cancel context.CancelFunc
			rs.ctx, cancel = context.WithTimeout(context.Background(), conf.Timeout())
			defer cancel()
			rs.delegate, cancel = context.WithTimeout(context.Background(), conf.Timeout()+delegateSlack)
			defer cancel()
			rs.ipamRelease(args, args.ContainerID, args.IfName)
		}
	}()
	result, err := current.NewResultFromResult(ipamResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "cannot read the IPAM result", err.Error())
	}
	if len(result.IPs) == 0 {
		return types.NewError(ErrNoAddresses, "IPAM plugin "+conf.ipamType()+" returned no address", "")
	}
	var ips []*net.IPNet
	var networks []string
	for _, ip := range result.IPs {
		n := &net.IPNet{IP: ip.Address.IP, Mask: net.CIDRMask(len(ip.Address.IP)*8, len(ip.Address.IP)*8)}
		if v4 := ip.Address.IP.To4(); v4 != nil {
			n = &net.IPNet{IP: v4, Mask: net.CIDRMask(32, 32)}
		}
		ips = append(ips, n)
		networks = append(networks, n.String())
	}

	hostName := HostVethName(p.namespace, p.name, args.ContainerID)
	w, err := wire(args.Netns, hostName, args.IfName, mtu, ips)
	if err != nil {
		return types.NewError(ErrWiring, "wiring the pod", err.Error())
	}
	defer func() {
		if !ok {
			unwire(hostName)
		}
	}()

	wep := api.NewWorkloadEndpoint(endpointName(conf.Nodename, p, args.ContainerID, args.IfName))
	wep.Metadata.Labels = labels
	wep.Spec = api.WorkloadEndpointSpec{Node: conf.Nodename, Namespace: p.namespace, Pod: p.name,
		ContainerID: args.ContainerID, Endpoint: args.IfName, InterfaceName: hostName,
		IPNetworks: networks, MAC: w.PodMAC.String(), Ports: ports}
	if err := putEndpoint(ctx, store, wep); err != nil {
		return cniError(ctx, "writing the WorkloadEndpoint", err)
	}

	result.Interfaces = []*current.Interface{
		{Name: hostName, Mac: HostMAC.String()},
		{Name: args.IfName, Mac: w.PodMAC.String(), Sandbox: args.Netns},
	}
	for i, ip := range result.IPs {
		ip.Interface = current.Int(1) // the pod's interface
		ip.Address = *ips[i]
		ip.Gateway = nil // the default route below says how to leave
	}
	result.Routes = defaultRoutes(ips)
	ok = true
	return types.PrintResult(result, conf.CNIVersion)
}

// defaultRoutes are the pod's default routes, one per family it has an address
// of, as wire installs them.
func defaultRoutes(ips []*net.IPNet) []*types.Route {
	v4, v6 := families(ips)
	var out []*types.Route
	if v4 {
		out = append(out, &types.Route{Dst: net.IPNet{IP: net.IPv4zero, Mask: net.CIDRMask(0, 32)}, GW: PodGateway})
	}
	if v6 {
		out = append(out, &types.Route{Dst: net.IPNet{IP: net.IPv6zero, Mask: net.CIDRMask(0, 128)}, GW: PodGatewayV6})
	}
	return out
}

// podLabels are the labels and named ports of a pod's endpoint, read from
// the API server with the conflist's kubeconfig. margay-kube-controllers
// keeps them up to date after ADD. The ports are there at ADD so that a
// policy's named port admits the pod's first connections. Without a
// kubeconfig the endpoint has its namespace's label only (from CNI_ARGS),
// as Calico's plugin gives, so that selectors on it work; a container that
// is not a pod has none.
func podLabels(ctx context.Context, conf *NetConf, p pod) (map[string]string, []api.EndpointPort, error) {
	if p.name == "" {
		return nil, nil, nil
	}
	if conf.Kubernetes.Kubeconfig == "" {
		if p.namespace == "" {
			return nil, nil, nil
		}
		return map[string]string{api.LabelNamespace: p.namespace}, nil, nil
	}
	return endpoint.Read(ctx, conf.Kubernetes.Kubeconfig, "margay-cni/"+api.Version, p.namespace, p.name)
}

// putEndpoint creates the endpoint, or replaces one left by an earlier ADD of the
// same interface.
func putEndpoint(ctx context.Context, s *datastore.Store, w *api.WorkloadEndpoint) error {
	_, err := s.Create(ctx, w)
	if !errors.Is(err, datastore.ErrAlreadyExists) {
		return err
	}
	cur, err := datastore.Get[*api.WorkloadEndpoint](ctx, s, w.Metadata.Name)
	if err != nil {
		return err
	}
	w.Metadata.ResourceVersion = cur.Metadata.ResourceVersion
	_, err = s.Update(ctx, w)
	return err
}

// cmdDel releases the address, removes the veth and the endpoint. Each step
// tolerates what is already gone, so DEL may be repeated and works after the pod's
// namespace has disappeared.
func cmdDel(ss *session, args *skel.CmdArgs) error {
	conf, ctx, store := ss.conf, ss.ctx, ss.store
	if err := ss.ipamRelease(args, args.ContainerID, args.IfName); err != nil {
		return err
	}
	p := podOf(args.Args)
	if err := unwire(HostVethName(p.namespace, p.name, args.ContainerID)); err != nil {
		return types.NewError(ErrWiring, "removing the pod's veth", err.Error())
	}
	name := endpointName(conf.Nodename, p, args.ContainerID, args.IfName)
	if _, err := store.Delete(ctx, api.KindOf((*api.WorkloadEndpoint)(nil)), name, ""); err != nil && !errors.Is(err, datastore.ErrNotFound) {
		return cniError(ctx, "deleting the WorkloadEndpoint", err)
	}
	return nil
}

// cmdCheck verifies the IPAM reservation (through the IPAM plugin), the host veth
// and its route, and the WorkloadEndpoint against prevResult.
func cmdCheck(ss *session, args *skel.CmdArgs) error {
	conf, ctx, store := ss.conf, ss.ctx, ss.store
	if err := version.ParsePrevResult(&conf.PluginConf); err != nil || conf.PrevResult == nil {
		return invalid("prevResult", "CHECK needs the result of ADD")
	}
	prev, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "cannot convert prevResult", err.Error())
	}
	if err := ss.ipamVerify(args, prev); err != nil {
		return err
	}
	p := podOf(args.Args)
	hostName := HostVethName(p.namespace, p.name, args.ContainerID)
	var want []*net.IPNet
	for _, ip := range prev.IPs {
		a := ip.Address
		want = append(want, &a)
	}
	if diffs := checkWiring(args.Netns, hostName, args.IfName, want); len(diffs) > 0 {
		return types.NewError(ErrEndpoint, "the pod's network differs from prevResult", strings.Join(diffs, "; "))
	}
	name := endpointName(conf.Nodename, p, args.ContainerID, args.IfName)
	wep, err := datastore.Get[*api.WorkloadEndpoint](ctx, store, name)
	if err != nil {
		if errors.Is(err, datastore.ErrNotFound) {
			return types.NewError(ErrEndpoint, "the pod's WorkloadEndpoint is missing", name)
		}
		return cniError(ctx, "reading the WorkloadEndpoint", err)
	}
	if wep.Spec.InterfaceName != hostName || wep.Spec.ContainerID != args.ContainerID {
		return types.NewError(ErrEndpoint, "the WorkloadEndpoint differs",
			fmt.Sprintf("it names interface %s and container %s", wep.Spec.InterfaceName, wep.Spec.ContainerID))
	}
	return nil
}

// cmdStatus says whether pods can be added now (CNI 1.1 STATUS): etcd answers and,
// when margay assigns the addresses, some pool serves this node. Error 50
// otherwise, with the reason.
func cmdStatus(ss *session, args *skel.CmdArgs) error {
	ctx, store, conf := ss.ctx, ss.store, ss.conf
	if err := store.Ping(ctx); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, "margay cannot add pods: the datastore is unreachable", err.Error())
	}
	if conf.ipamType() != "margay-ipam" {
		return nil
	}
	for _, f := range conf.IPAM.Families() {
		_, err := ipam.UsablePools(ctx, store, conf.Nodename, f.Family, f.Pools)
		if errors.Is(err, ipam.ErrUnknownNode) {
			return types.NewError(types.ErrPluginNotAvailable, "margay cannot add pods: node "+conf.Nodename+" is not registered", err.Error())
		}
		if err != nil {
			return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("margay cannot add pods: no %s pool serves node %s", f.Family, conf.Nodename), err.Error())
		}
	}
	return nil
}

// cmdGC (CNI 1.1) removes this node's pods of this network that the runtime no
// longer knows (not in cni.dev/valid-attachments): their address, veth and
// endpoint, as DEL would. libcni first DELs what its cache knows; this catches what
// the cache lost, such as after a reboot. The IPAM plugin then gets its own GC.
func cmdGC(ss *session, args *skel.CmdArgs) error {
	conf, ctx, store := ss.conf, ss.ctx, ss.store
	valid := map[string]bool{}
	for _, a := range conf.ValidAttachments {
		valid[a.ContainerID+"/"+a.IfName] = true
	}
	weps, err := datastore.List[*api.WorkloadEndpoint](ctx, store)
	if err != nil {
		return cniError(ctx, "listing WorkloadEndpoints", err)
	}
	var errs []error
	for _, w := range weps {
		if w.Spec.Node != conf.Nodename || valid[w.Spec.ContainerID+"/"+w.Spec.Endpoint] {
			continue
		}
		ss.log.Info("GC: removing a stale pod", "containerID", w.Spec.ContainerID, "endpoint", w.Metadata.Name)
		if err := ss.ipamRelease(args, w.Spec.ContainerID, w.Spec.Endpoint); err != nil {
			errs = append(errs, fmt.Errorf("release %s: %w", w.Spec.ContainerID, err))
			continue
		}
		if err := unwire(w.Spec.InterfaceName); err != nil {
			errs = append(errs, fmt.Errorf("remove %s: %w", w.Spec.InterfaceName, err))
			continue
		}
		if _, err := store.Delete(ctx, api.KindOf(w), w.Metadata.Name, w.Metadata.ResourceVersion); err != nil && !errors.Is(err, datastore.ErrNotFound) {
			errs = append(errs, err)
		}
	}
	if err := ss.ipamCollect(args); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return cniError(ctx, "garbage collection", errors.Join(errs...))
	}
	return nil
}
