package cni

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/ns"
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
)

// session is what every verb sets up: the configuration, a bounded context and
// an allocator.
type session struct {
	conf  *NetConf
	ctx   context.Context
	store *datastore.Store
	alloc *ipam.Allocator
	log   *slog.Logger
	// delegate bounds calls to the IPAM plugin. It runs a little longer than ctx:
	// the IPAM plugin keeps to the same timeout itself, and its own error (such as
	// "etcd unavailable, try again") must arrive before we give up on it.
	delegate context.Context
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
	dctx, dcancel := context.WithTimeout(context.Background(), conf.Timeout()+delegateSlack)
	// Logs go to log_file_path as JSON with the container ID, or nowhere: stdout
	// carries the result and stderr goes to kubelet's log unlabelled.
	var out io.WriteCloser = nopCloser{io.Discard}
	if conf.LogFilePath != "" {
		os.MkdirAll(filepath.Dir(conf.LogFilePath), 0o755)
		if f, err := os.OpenFile(conf.LogFilePath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600); err == nil {
			out = f
		}
	}
	log := slog.New(slog.NewJSONHandler(out, &slog.HandlerOptions{Level: logLevel(conf.LogLevel)})).With("containerID", args.ContainerID)
	s := &session{conf: conf, ctx: ctx, store: store, alloc: ipam.New(store, ipam.Options{Logger: log}), log: log, delegate: dctx}
	return s, func() { cancel(); dcancel(); store.Close(); out.Close() }, nil
}

const delegateSlack = 2 * time.Second

// refuseOwnNetNS refuses a CNI_NETNS that is the plugin's own network
// namespace, as skel does (unless CNI_NETNS_OVERRIDE is set). skel checks only
// after ADD or DEL has run, when an address is assigned, and printed, or a
// pod's released; checked first, the verb changes nothing.
func refuseOwnNetNS(args *skel.CmdArgs) error {
	if o := strings.ToUpper(args.NetnsOverride); o == "TRUE" || o == "1" {
		return nil
	}
	own, terr := ns.CheckNetNS(args.Netns)
	if terr != nil {
		return terr
	}
	if own {
		return types.NewError(types.ErrInvalidNetNS, "CNI_NETNS "+args.Netns+" is the plugin's own network namespace; give the pod's", "")
	}
	return nil
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

// verb runs one plugin verb in a session, logging its outcome.
func verb(name string, f func(*session, *skel.CmdArgs) error) func(*skel.CmdArgs) error {
	return func(args *skel.CmdArgs) error {
		start := time.Now()
		if name == "ADD" || name == "DEL" {
			if err := refuseOwnNetNS(args); err != nil {
				return err
			}
		}
		s, done, err := open(args)
		if err != nil {
			return err
		}
		defer done()
		if err := f(s, args); err != nil {
			s.log.Error(name+" failed", "netns", args.Netns, "ifname", args.IfName,
				"duration", time.Since(start), "err", err)
			return err
		}
		s.log.Info(name, "netns", args.Netns, "ifname", args.IfName, "duration", time.Since(start))
		return nil
	}
}
