// Command margayctl manages margay's resources and IPAM in etcd, the way calicoctl
// does for Calico.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// Exit codes.
const (
	exitOK       = 0
	exitError    = 1
	exitUsage    = 2
	exitProblems = 3 // ipam check found problems and left them
)

func main() { os.Exit(run(os.Args[1:], os.Stdin, os.Stdout, os.Stderr)) }

// usageError marks a mistake in how margayctl was called (exit code 2).
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// problemsError is a check that ran and found something to fix (exit code 3),
// so that scripts can tell it from a check that could not run.
type problemsError struct{ error }

// app carries what every command shares.
type app struct {
	in       io.Reader
	out, err io.Writer
	ds       datastore.Config
	store    *datastore.Store
}

// Store connects on first use, so commands that need no datastore never dial.
func (a *app) Store() (*datastore.Store, error) {
	if a.store == nil {
		s, err := datastore.New(a.ds)
		if err != nil {
			return nil, err
		}
		a.store = s
	}
	return a.store, nil
}

// run is margayctl, minus the process: it returns the exit code.
func run(args []string, in io.Reader, out, errOut io.Writer) int {
	a := &app{in: in, out: out, err: errOut}
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetIn(in)
	root.SetOut(out)
	root.SetErr(errOut)
	err := root.ExecuteContext(context.Background())
	if a.store != nil {
		a.store.Close()
	}
	if err == nil {
		return exitOK
	}
	var ue usageError
	if errors.As(err, &ue) || isCobraUsage(err) {
		fmt.Fprintf(errOut, "margayctl: %s (margayctl --help shows usage)\n", oneLine(err.Error()))
		return exitUsage
	}
	fmt.Fprintf(errOut, "margayctl: %s\n", oneLine(err.Error()))
	if errors.As(err, new(problemsError)) {
		return exitProblems
	}
	return exitError
}

func oneLine(s string) string {
	return strings.Join(strings.Fields(strings.ReplaceAll(s, "\n", "; ")), " ")
}

// isCobraUsage recognises cobra's own errors for unknown commands and bad arguments.
func isCobraUsage(err error) bool {
	for _, p := range []string{"unknown command", "unknown flag", "unknown shorthand", "required flag", "invalid argument", "flag needs an argument", "accepts ", "requires at least"} {
		if strings.HasPrefix(err.Error(), p) {
			return true
		}
	}
	return false
}

func env(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "margayctl",
		Short:         "Manage margay pod networking: pools, BGP peers, nodes and IPAM",
		SilenceErrors: true,
		SilenceUsage:  true,
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	f := root.PersistentFlags()
	endpoints := f.String("etcd-endpoints", env("MARGAY_ETCD_ENDPOINTS", datastore.DefaultEndpoint), "comma-separated etcd URLs (env MARGAY_ETCD_ENDPOINTS)")
	f.StringVar(&a.ds.CAFile, "etcd-ca-cert-file", env("MARGAY_ETCD_CA_CERT_FILE", ""), "CA certificate that signed etcd's certificate (env MARGAY_ETCD_CA_CERT_FILE)")
	f.StringVar(&a.ds.CertFile, "etcd-cert-file", env("MARGAY_ETCD_CERT_FILE", ""), "client certificate for etcd (env MARGAY_ETCD_CERT_FILE)")
	f.StringVar(&a.ds.KeyFile, "etcd-key-file", env("MARGAY_ETCD_KEY_FILE", ""), "client key for etcd (env MARGAY_ETCD_KEY_FILE)")
	timeout := f.String("timeout", env("MARGAY_ETCD_TIMEOUT", datastore.DefaultRequestTimeout.String()), "how long to wait for each etcd request (env MARGAY_ETCD_TIMEOUT)")
	root.PersistentPreRunE = func(cmd *cobra.Command, _ []string) error {
		a.ds.Endpoints = nil
		for _, e := range strings.Split(*endpoints, ",") {
			if e = strings.TrimSpace(e); e != "" {
				a.ds.Endpoints = append(a.ds.Endpoints, e)
			}
		}
		if len(a.ds.Endpoints) == 0 {
			return usagef("--etcd-endpoints: no endpoint given")
		}
		d, err := time.ParseDuration(*timeout)
		if err != nil || d <= 0 {
			return usagef("--timeout: %q is not a positive duration such as 5s", *timeout)
		}
		a.ds.RequestTimeout = d
		return nil
	}
	group(root)
	root.AddCommand(a.applyCmd("apply"), a.applyCmd("create"), a.applyCmd("replace"),
		a.deleteCmd(), a.getCmd(), a.ipamCmd(), a.nodeCmd(), a.versionCmd())
	return root
}

func (a *app) versionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print margayctl's version",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			fmt.Fprintf(a.out, "margayctl %s (%s, API %s)\n", api.Version, runtime.Version(), api.APIVersion)
			return nil
		},
	}
}

// group makes a command that only holds subcommands fail as a usage error when
// called bare or with an unknown subcommand, instead of printing help and exiting 0.
func group(cmd *cobra.Command) {
	cmd.Args = cobra.NoArgs
	cmd.RunE = func(cmd *cobra.Command, _ []string) error {
		return usagef("%s needs a subcommand; see %s --help", cmd.CommandPath(), cmd.CommandPath())
	}
}

// noArgs and friends turn cobra's argument checks into usage errors.
func noArgs(cmd *cobra.Command, args []string) error {
	if len(args) > 0 {
		return usagef("%s takes no arguments, got %q", cmd.CommandPath(), args)
	}
	return nil
}

func rangeArgs(lo, hi int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) < lo || len(args) > hi {
			return usagef("%s: expected %s, got %d arguments", cmd.CommandPath(), cmd.Use, len(args))
		}
		return nil
	}
}
