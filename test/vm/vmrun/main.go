// Command vmrun runs a Go test binary inside the kernel VM (package test/vm), for
// the kernel features the host lacks:
//
//	CGO_ENABLED=0 go test -c -o /tmp/e2e.test ./test/e2e
//	go run ./test/vm/vmrun -timeout 10m -file /vm/bin/margay-node=bin/margay-node \
//	    -env MARGAY_E2E_BIN=/vm/bin -- /tmp/e2e.test -test.v -test.run IPIP
//
// The binary runs as /vm/<its name>, in /vm. vmrun exits 0 if it passed, with
// its exit status if it failed, and 1 for anything else (a timeout included).
package main

import (
	"context"
	"debug/elf"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/margay-dev/margay/test/vm"
)

// list is a repeatable string flag.
type list []string

func (l *list) String() string     { return strings.Join(*l, ",") }
func (l *list) Set(v string) error { *l = append(*l, v); return nil }

func main() {
	var env, files, modules list
	timeout := flag.Duration("timeout", 10*time.Minute, "how long the guest may run, boot and module loading included")
	mem := flag.Int("memory", 1024, "guest memory in MB; the initramfs, payload included, lives in it")
	flag.Var(&env, "env", "NAME=value for the guest command's environment (repeatable)")
	flag.Var(&files, "file", "GUEST=HOST: put the host file HOST into the guest at GUEST (repeatable)")
	flag.Var(&modules, "module", "a kernel module to load besides the default set (repeatable)")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: vmrun [flags] -- HOST-TEST-BINARY [ARGS...]\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		os.Exit(2)
	}
	bin := flag.Arg(0)
	guest := "/vm/" + filepath.Base(bin)
	o := vm.Options{
		Files:    map[string]string{guest: bin},
		Command:  append([]string{guest}, flag.Args()[1:]...),
		Env:      env,
		Dir:      "/vm",
		Timeout:  *timeout,
		MemoryMB: *mem,
		Modules:  modules,
	}
	for _, f := range files {
		g, h, ok := strings.Cut(f, "=")
		if !ok {
			fmt.Fprintf(os.Stderr, "vmrun: -file %q is not GUEST=HOST\n", f)
			os.Exit(2)
		}
		o.Files[g] = h
	}
	warnDynamic(bin)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := vm.Run(ctx, o)
	stop()
	var fail *vm.FailError
	switch {
	case err == nil:
	case errors.As(err, &fail) && fail.ExitCode > 0:
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		os.Exit(fail.ExitCode)
	default:
		fmt.Fprintln(os.Stderr, "vmrun:", err)
		os.Exit(1)
	}
}

// warnDynamic warns if the payload is dynamically linked: the guest has only
// the libraries its own tools need, so such a binary may not start there.
func warnDynamic(path string) {
	f, err := elf.Open(path)
	if err != nil {
		return // vm.Run reports a missing file; a script is fine
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			fmt.Fprintf(os.Stderr, "vmrun: warning: %s is dynamically linked; build it with CGO_ENABLED=0\n", path)
			return
		}
	}
}
