package cni

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"slices"

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
	return skel.CNIFuncs{Add: ipamAdd, Del: ipamDel, Check: ipamCheck, Status: cmdStatus}
}

// session is what every verb sets up: the configuration, a bounded context and
// an allocator.
type session struct {
	conf  *NetConf
	ctx   context.Context
	store *datastore.Store
	alloc *ipam.Allocator
}

func open(args *skel.CmdArgs) (*session, func(), error) {
	conf, err := ParseConf(args.StdinData, os.Hostname)
	if err != nil {
		return nil, nil, err
	}
	store, err := datastore.New(conf.Datastore())
	if err != nil {
		return nil, nil, invalid("etcd_endpoints", "%v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), conf.Timeout())
	// Logs go to log_file_path as JSON with the container ID, or nowhere: stdout
	// carries the result and stderr goes to kubelet's log unlabelled.
	var out io.WriteCloser = nopCloser{io.Discard}
	if conf.LogFilePath != "" {
		if f, err := os.OpenFile(conf.LogFilePath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600); err == nil {
			out = f
		}
	}
	log := slog.New(slog.NewJSONHandler(out, &slog.HandlerOptions{Level: logLevel(conf.LogLevel)})).With("containerID", args.ContainerID)
	s := &session{conf: conf, ctx: ctx, store: store, alloc: ipam.New(store, ipam.Options{Logger: log})}
	return s, func() { cancel(); store.Close(); out.Close() }, nil
}

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

func logLevel(s string) slog.Level {
	var l slog.Level
	if l.UnmarshalText([]byte(s)) != nil {
		return slog.LevelInfo
	}
	return l
}

// cniError maps a failure to the spec's codes: 11 (try again later) for an etcd
// that did not answer or too much contention, margay's own codes otherwise.
func cniError(ctx context.Context, what string, err error) error {
	var te *types.Error
	switch {
	case errors.As(err, &te):
		return te
	case errors.Is(err, datastore.ErrUnavailable), errors.Is(err, ipam.ErrContention), ctx.Err() != nil:
		return types.NewError(types.ErrTryAgainLater, what+": the datastore is unavailable or busy; try again", err.Error())
	case errors.Is(err, ipam.ErrNoSpace):
		return types.NewError(ErrNoAddresses, what+": no free addresses", err.Error())
	}
	return types.NewError(ErrDatastoreFailed, what, err.Error())
}

func ipamAdd(args *skel.CmdArgs) error {
	s, done, err := open(args)
	if err != nil {
		return err
	}
	defer done()
	handle := ipam.PodHandle(args.ContainerID)
	// A repeated ADD for the same container (kubelet retrying after a timeout)
	// returns what the first one assigned instead of taking another address.
	held, err := s.alloc.IPsByHandle(s.ctx, handle)
	if err == nil && len(held) == 0 {
		held, err = s.alloc.AutoAssign(s.ctx, ipam.AssignArgs{Handle: handle, Node: s.conf.Nodename,
			Pools: s.conf.IPAM.IPv4Pools, Attrs: podAttrs(args.Args), NewHandle: true})
		if errors.Is(err, ipam.ErrHandleExists) {
			held, err = s.alloc.IPsByHandle(s.ctx, handle)
		}
	}
	if err != nil {
		return cniError(s.ctx, "assigning an address", err)
	}
	result := &current.Result{CNIVersion: current.ImplementedSpecVersion}
	for _, h := range held {
		result.IPs = append(result.IPs, &current.IPConfig{Address: hostNet(h.IP)})
	}
	return types.PrintResult(result, s.conf.CNIVersion)
}

func hostNet(ip netip.Addr) net.IPNet {
	return net.IPNet{IP: ip.AsSlice(), Mask: net.CIDRMask(ip.BitLen(), ip.BitLen())}
}

// ipamDel releases the container's addresses. Releasing nothing is success: DEL
// must be idempotent.
func ipamDel(args *skel.CmdArgs) error {
	s, done, err := open(args)
	if err != nil {
		return err
	}
	defer done()
	if _, err := s.alloc.ReleaseByHandle(s.ctx, ipam.PodHandle(args.ContainerID)); err != nil {
		return cniError(s.ctx, "releasing addresses", err)
	}
	return nil
}

// ipamCheck verifies that the container still holds exactly the addresses of
// prevResult.
func ipamCheck(args *skel.CmdArgs) error {
	s, done, err := open(args)
	if err != nil {
		return err
	}
	defer done()
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
	var want []string
	for _, ip := range prev.IPs {
		want = append(want, ip.Address.IP.String())
	}
	held, err := s.alloc.IPsByHandle(s.ctx, ipam.PodHandle(args.ContainerID))
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
			fmt.Sprintf("handle %s holds %v, prevResult has %v", ipam.PodHandle(args.ContainerID), got, want))
	}
	return nil
}
