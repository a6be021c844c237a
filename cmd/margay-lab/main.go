// Command margay-lab runs margay on one Linux machine: nodes in subnets behind
// a router, etcd and pods, all in network namespaces (test/lab), with the real
// margay-node per node and pods added through the real CNI plugin. The lab
// stays up between commands until `margay-lab down`.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/lab"
	"github.com/margay-dev/margay/test/nstest"
)

const (
	// DefaultStateDir holds the lab's state file, etcd's data, logs and the CNI cache.
	DefaultStateDir = "/run/margay-lab"
	// NSPrefix starts the name of every namespace of the lab.
	NSPrefix = "mgylab-"
)

var labPrefix = regexp.MustCompile(`^[a-z][a-z0-9-]{2,}-$`)

// usageError marks a mistake in how margay-lab was called (exit code 2).
type usageError struct{ error }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

// exitError carries a command's exit status through (exec).
type exitError struct{ code int }

func (e exitError) Error() string { return "exit status " + strconv.Itoa(e.code) }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, out, errOut io.Writer) int {
	a := &app{out: out}
	root := a.rootCmd()
	root.SetArgs(args)
	root.SetOut(out)
	root.SetErr(errOut)
	err := root.Execute()
	var ee exitError
	var ue usageError
	switch {
	case err == nil:
		return 0
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &ue):
		fmt.Fprintln(errOut, "margay-lab:", err)
		fmt.Fprintln(errOut, "Run 'margay-lab --help' for usage.")
		return 2
	}
	fmt.Fprintln(errOut, "margay-lab:", err)
	return 1
}

type app struct {
	out      io.Writer
	stateDir string
	prefix   string // of the lab's namespaces
}

func (a *app) rootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:   "margay-lab",
		Short: "Run margay on this machine: nodes, a router, etcd and pods in network namespaces",
		Long: `margay-lab builds a margay cluster in network namespaces on this machine and
keeps it up between commands. Nothing touches the root namespace. It needs root.`,
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			// down removes every namespace with the prefix: never a short or empty one.
			if !labPrefix.MatchString(a.prefix) {
				return usagef("--netns-prefix %q: give letters, digits and dashes ending in a dash, at least 4 long", a.prefix)
			}
			if os.Geteuid() != 0 {
				return fmt.Errorf("margay-lab needs root to make network namespaces: sudo %s", cmd.CommandPath())
			}
			// This process's namespaces: unique, and found by the common prefix.
			nstest.Prefix = fmt.Sprintf("%s%d-", a.prefix, os.Getpid())
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return usagef("unknown command %q", args[0])
			}
			return usagef("margay-lab needs a command: up, status, exec, pod or down")
		},
	}
	root.PersistentFlags().StringVar(&a.stateDir, "state-dir", DefaultStateDir, "where the lab keeps its state, etcd's data and logs")
	// Tests keep their labs apart from a person's with both of these.
	root.PersistentFlags().StringVar(&a.prefix, "netns-prefix", NSPrefix, "prefix of the lab's namespace names")
	root.PersistentFlags().MarkHidden("netns-prefix")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{err} })
	root.AddCommand(a.upCmd(), a.statusCmd(), a.execCmd(), a.podCmd(), a.downCmd(), &cobra.Command{
		Use:   "version",
		Short: "print the version",
		Args:  nArgs(0),
		Run:   func(cmd *cobra.Command, _ []string) { fmt.Fprintln(a.out, "margay-lab", api.Version) },
	})
	return root
}

// nArgs turns cobra's argument check into a usage error.
func nArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != n {
			return usagef("%s takes %d arguments, got %d (%q)", cmd.CommandPath(), n, len(args), args)
		}
		return nil
	}
}

func (a *app) statePath() string { return filepath.Join(a.stateDir, "state.json") }

// donePath exists once up has finished: a lab without it is what a crashed or
// killed up left, and the next up removes it.
func (a *app) donePath() string { return filepath.Join(a.stateDir, "up.done") }

// load reads the saved state; nil when no lab is up.
func (a *app) load() (*lab.State, error) {
	b, err := os.ReadFile(a.statePath())
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var st lab.State
	if err := json.Unmarshal(b, &st); err != nil {
		return nil, fmt.Errorf("%s: %w; margay-lab down removes what is left", a.statePath(), err)
	}
	return &st, nil
}

// mustLoad is the running lab, or an error that says how to start one.
func (a *app) mustLoad() (*lab.Lab, error) {
	st, err := a.load()
	if err != nil {
		return nil, err
	}
	if st == nil {
		return nil, errors.New("no lab is up: margay-lab up starts one")
	}
	return lab.Load(*st), nil
}

func (a *app) save(l *lab.Lab) error {
	b, err := json.MarshalIndent(l.State(), "", "  ")
	if err != nil {
		return err
	}
	tmp := a.statePath() + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, a.statePath())
}

// lock serialises the commands that change the lab. It is released when the
// process exits, however it exits.
func (a *app) lock() error {
	if err := os.MkdirAll(filepath.Dir(a.stateDir), 0o755); err != nil {
		return err
	}
	f, err := os.OpenFile(a.stateDir+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return err
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		return fmt.Errorf("another margay-lab command is changing the lab (%s is locked)", f.Name())
	}
	return nil // f stays open, and locked, until exit
}

// remove deletes every trace of a lab: its processes, its namespaces (those a
// crashed command left too) and its state. It says what it removed.
func (a *app) remove(l *lab.Lab) error {
	if l != nil {
		l.Down()
	}
	names, err := lab.Sweep(a.prefix)
	if len(names) > 0 {
		fmt.Fprintf(a.out, "removed %d leftover namespaces\n", len(names))
	}
	if rmErr := os.RemoveAll(a.stateDir); rmErr != nil {
		err = errors.Join(err, rmErr)
	}
	return err
}

// signalContext is cancelled by SIGINT or SIGTERM.
func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
}

// binDir is where margay-lab's sibling binaries are: margay-node, the CNI
// plugins, margayctl, etcdserver and gobgp, as make build leaves them.
func binDir() (string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	dir := filepath.Dir(self)
	for _, b := range []string{"margay-node", "margay", "margay-ipam", "margayctl"} {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return "", fmt.Errorf("%s is not beside margay-lab in %s: make build puts them together", b, dir)
		}
	}
	// The embedded etcd server: no etcd to install.
	if p := filepath.Join(dir, "etcdserver"); os.Getenv(etcdtest.ServerEnv) == "" {
		if _, err := os.Stat(p); err == nil {
			os.Setenv(etcdtest.ServerEnv, p)
		}
	}
	return dir, nil
}

func (a *app) downCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "down",
		Short: "Remove the lab: processes, namespaces, etcd's data; also after a crashed up",
		Args:  nArgs(0),
		RunE: func(*cobra.Command, []string) error {
			if err := a.lock(); err != nil {
				return err
			}
			st, err := a.load()
			var l *lab.Lab
			if err == nil && st != nil {
				l = lab.Load(*st)
			}
			if err := a.remove(l); err != nil {
				return err
			}
			fmt.Fprintln(a.out, "the lab is down")
			return nil
		},
	}
}

func (a *app) execCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "exec NODE -- COMMAND [ARG...]",
		Short: "Run a command inside a node (or the router, etcd, internet, or a pod)",
		Long: `Run a command inside a node's network namespace, with margayctl, gobgp and
margay-node on the PATH and margayctl pointed at the lab's etcd. Examples:

  margay-lab exec node1 -- margayctl node status
  margay-lab exec node1 -- gobgp global rib
  margay-lab exec router -- ip route`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 2 || cmd.ArgsLenAtDash() != 1 {
				return usagef("usage: margay-lab exec NODE -- COMMAND [ARG...]")
			}
			return nil
		},
		RunE: func(_ *cobra.Command, args []string) error {
			l, err := a.mustLoad()
			if err != nil {
				return err
			}
			ns, env, err := place(l, args[0])
			if err != nil {
				return err
			}
			cmd := exec.Command("ip", append([]string{"netns", "exec", ns}, args[1:]...)...)
			cmd.Env = append(os.Environ(), env...)
			cmd.Stdin, cmd.Stdout, cmd.Stderr = os.Stdin, os.Stdout, os.Stderr
			err = cmd.Run()
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				return exitError{ee.ExitCode()}
			}
			return err
		},
	}
}

// place is the namespace called name and the environment commands get there.
func place(l *lab.Lab, name string) (string, []string, error) {
	env := []string{"PATH=" + l.Bin() + ":" + os.Getenv("PATH"), "MARGAY_ETCD_ENDPOINTS=" + l.Endpoint()}
	switch name {
	case "router":
		return l.Router.Name, env, nil
	case "etcd":
		return l.EtcdHost.Name, env, nil
	case "internet":
		return l.Internet.Name, env, nil
	}
	var known []string
	for _, n := range l.Nodes {
		if n.Name == name {
			return n.NS.Name, append(env, "MARGAY_MTU_FILE="+n.MTUFile()), nil
		}
		known = append(known, n.Name)
	}
	for _, p := range l.Pods() {
		if p.Name == name {
			return p.NS.Name, env, nil
		}
	}
	return "", nil, fmt.Errorf("no node or pod %q in the lab: nodes are %s; also router, etcd, internet and pod names", name, strings.Join(known, ", "))
}

func (a *app) podCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "pod",
		Short: "Add or delete a pod, through the CNI plugin as kubelet would",
		Args:  nArgs(0),
		RunE:  func(cmd *cobra.Command, _ []string) error { return usagef("usage: margay-lab pod add|del NODE NAME") },
	}
	podOp := func(use, short string, op func(ctx context.Context, l *lab.Lab, n *lab.Node, name string) error) *cobra.Command {
		return &cobra.Command{
			Use:   use + " NODE NAME",
			Short: short,
			Args:  nArgs(2),
			RunE: func(_ *cobra.Command, args []string) error {
				if err := a.lock(); err != nil {
					return err
				}
				l, err := a.mustLoad()
				if err != nil {
					return err
				}
				n := findNode(l, args[0])
				if n == nil {
					return fmt.Errorf("no node %q in the lab", args[0])
				}
				ctx, cancel := signalContext()
				defer cancel()
				ctx, cancelT := context.WithTimeout(ctx, time.Minute)
				defer cancelT()
				if err := op(ctx, l, n, args[1]); err != nil {
					return err
				}
				return a.save(l)
			},
		}
	}
	cmd.AddCommand(
		podOp("add", "Add a pod to a node", func(ctx context.Context, l *lab.Lab, n *lab.Node, name string) error {
			if findPod(l, name) != nil || findNode(l, name) != nil || !podName.MatchString(name) {
				return fmt.Errorf("pod name %q is taken or not a DNS label (lower-case letters, digits and '-')", name)
			}
			p, err := l.AddPod(ctx, n, name)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "pod %s on %s: %s\n", p.Name, n.Name, p.IP)
			return nil
		}),
		podOp("del", "Delete a pod", func(ctx context.Context, l *lab.Lab, n *lab.Node, name string) error {
			p := findPod(l, name)
			if p == nil || p.Node != n {
				return fmt.Errorf("no pod %q on %s", name, n.Name)
			}
			if err := l.DelPod(ctx, p); err != nil {
				return err
			}
			fmt.Fprintf(a.out, "pod %s on %s deleted\n", name, n.Name)
			return nil
		}))
	return cmd
}

func findNode(l *lab.Lab, name string) *lab.Node {
	for _, n := range l.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

func findPod(l *lab.Lab, name string) *lab.Pod {
	for _, p := range l.Pods() {
		if p.Name == name {
			return p
		}
	}
	return nil
}
