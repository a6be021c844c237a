package cni

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
)

// SupportedVersions are the CNI spec versions margay's plugins speak.
var SupportedVersions = version.PluginSupports("0.3.1", "0.4.0", "1.0.0", "1.1.0")

// margay's own CNI error codes (the spec reserves 100 and up for plugins).
const (
	ErrNoAddresses     uint = 100 // the pools have no free address for this node
	ErrReservation     uint = 101 // CHECK: the reservation differs from prevResult
	ErrDatastoreFailed uint = 102 // etcd answered, but with an error
)

// k8sArgs are the pod identity kubelet passes in CNI_ARGS.
type k8sArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive // CNI_ARGS names
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive
}

// podAttrs records the pod with each allocation, for `margayctl ipam show --ip`.
func podAttrs(cniArgs string) map[string]string {
	var k k8sArgs
	if err := types.LoadArgs(cniArgs, &k); err != nil || k.K8S_POD_NAME == "" {
		return nil
	}
	return map[string]string{"namespace": string(k.K8S_POD_NAMESPACE), "pod": string(k.K8S_POD_NAME)}
}

// IPAMFuncs are margay-ipam's verbs, for skel.PluginMainFuncs.
func IPAMFuncs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: verb("ADD", ipamAdd), Del: verb("DEL", ipamDel), Check: verb("CHECK", ipamCheck),
		Status: verb("STATUS", cmdStatus), GC: verb("GC", ipamGC)}
}

// cniError maps a failure to the spec's codes: 11 (try again later) for an etcd
// that did not answer, too much contention, or a node margay-node has not
// registered yet; margay's own codes otherwise.
func cniError(ctx context.Context, what string, err error) error {
	var te *types.Error
	switch {
	case errors.As(err, &te):
		return te
	case errors.Is(err, datastore.ErrUnavailable), errors.Is(err, ipam.ErrContention), ctx.Err() != nil:
		return types.NewError(types.ErrTryAgainLater, what+": the datastore is unavailable or busy; try again", err.Error())
	case errors.Is(err, ipam.ErrNoSpace):
		return types.NewError(ErrNoAddresses, what+": no free addresses", err.Error())
	case errors.Is(err, ipam.ErrUnknownNode):
		return types.NewError(types.ErrTryAgainLater, what+": this node is not registered yet; is margay-node running?", err.Error())
	}
	return types.NewError(ErrDatastoreFailed, what, err.Error())
}

func ipamAdd(s *session, args *skel.CmdArgs) error {
	result, err := assign(s, args)
	if err != nil {
		return err
	}
	return types.PrintResult(result, s.conf.CNIVersion)
}

// assign gives the container its addresses, the work of margay-ipam ADD.
func assign(s *session, args *skel.CmdArgs) (*current.Result, error) {
	handle := ipam.PodHandle(args.ContainerID)
	// A repeated ADD for the same container (kubelet retrying after a timeout)
	// returns what the first one assigned instead of taking more addresses. The
	// assignment itself finds that out, so a first ADD pays no extra read.
	held, err := s.alloc.AssignPerFamily(s.ctx, ipam.AssignArgs{Handle: handle, Node: s.conf.Nodename,
		Attrs: podAttrs(args.Args)}, s.conf.IPAM.Families())
	if err != nil {
		return nil, cniError(s.ctx, "assigning an address", err)
	}
	result := &current.Result{CNIVersion: current.ImplementedSpecVersion}
	for _, h := range held {
		result.IPs = append(result.IPs, &current.IPConfig{Address: hostNet(h.IP)})
	}
	return result, nil
}

func hostNet(ip netip.Addr) net.IPNet {
	return net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(ip.BitLen(), ip.BitLen())}
}

// ipamDel releases the container's addresses. Releasing nothing is success: DEL
// must be idempotent.
func ipamDel(s *session, args *skel.CmdArgs) error {
	return release(s, args.ContainerID)
}

func release(s *session, containerID string) error {
	if _, err := s.alloc.ReleaseByHandle(s.ctx, ipam.PodHandle(containerID)); err != nil {
		return cniError(s.ctx, "releasing addresses", err)
	}
	return nil
}

// ipamCheck verifies that the container still holds exactly the addresses of
// prevResult.
func ipamCheck(s *session, args *skel.CmdArgs) error {
	if err := version.ParsePrevResult(&s.conf.PluginConf); err != nil {
		return types.NewError(types.ErrDecodingFailure, "cannot decode prevResult", err.Error())
	}
	if s.conf.PrevResult == nil {
		return invalid("prevResult", "CHECK needs the result of ADD")
	}
	prev, err := current.NewResultFromResult(s.conf.PrevResult)
	if err != nil {
		return types.NewError(types.ErrDecodingFailure, "cannot convert prevResult", err.Error())
	}
	return checkReservation(s, args.ContainerID, prev)
}

func checkReservation(s *session, containerID string, prev *current.Result) error {
	var want []string
	for _, ip := range prev.IPs {
		want = append(want, ip.Address.IP.String())
	}
	held, err := s.alloc.IPsByHandle(s.ctx, ipam.PodHandle(containerID))
	if err != nil {
		return cniError(s.ctx, "reading the reservation", err)
	}
	var got []string
	for _, h := range held {
		got = append(got, h.IP.String())
	}
	slices.Sort(want)
	slices.Sort(got)
	if !slices.Equal(want, got) {
		return types.NewError(ErrReservation, "the IPAM reservation differs from prevResult",
			fmt.Sprintf("handle %s holds %v, prevResult has %v", ipam.PodHandle(containerID), got, want))
	}
	return nil
}

// gcGrace spares allocations younger than this from GC: an ADD still in progress
// holds its address before the runtime lists the attachment as valid.
const gcGrace = time.Minute

// ipamGC releases this node's pod addresses whose container is not among the
// valid attachments.
func ipamGC(s *session, args *skel.CmdArgs) error {
	return collectAddresses(s)
}

func collectAddresses(s *session) error {
	valid := map[string]bool{}
	for _, a := range s.conf.ValidAttachments {
		valid[ipam.PodHandle(a.ContainerID)] = true
	}
	handles, err := s.alloc.PodHandles(s.ctx, s.conf.Nodename)
	if err != nil {
		return cniError(s.ctx, "listing pod addresses", err)
	}
	for h, newest := range handles {
		if valid[h] || time.Since(newest) < gcGrace {
			continue
		}
		ips, err := s.alloc.ReleaseByHandle(s.ctx, h)
		if err != nil {
			return cniError(s.ctx, "releasing "+h, err)
		}
		s.log.Info("GC: released a stale pod's addresses", "handle", h, "ips", ips)
	}
	return nil
}
