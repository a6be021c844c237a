// Package vm runs a payload, typically a statically built Go test binary, in a
// throwaway VM with a pinned Debian kernel, for the kernel features the host
// lacks (IPIP on the development and CI machines). The VM is qemu with TCG, so
// it needs no KVM, and has no network card: nothing in it can reach the host's
// network. Its root file system is an initramfs with busybox, the host's ip,
// iptables and ping, the kernel modules margay uses, and the payload.
package vm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Options describe one run.
type Options struct {
	// Files are put into the guest: guest path -> host path. The file mode is
	// kept. Binaries must be static (CGO_ENABLED=0) or need only the libraries
	// the host tools bring.
	Files map[string]string
	// Tools are more dynamically linked host binaries, such as tcpdump or
	// bird, put at the same path in the guest with the libraries they need.
	Tools []string
	// Command is run in the guest, as root, with Env added to its environment
	// and Dir (default /) as its working directory.
	Command []string
	Env     []string
	Dir     string
	// Timeout bounds the guest from /init's start, module loading included
	// (default 5 minutes). qemu itself is killed a bootSlack later.
	Timeout time.Duration
	// Output receives the serial console, which carries the payload's stdout
	// and stderr, and the runner's progress lines (default os.Stdout).
	Output io.Writer
	// MemoryMB is the guest's memory (default 1024). The initramfs lives in it.
	MemoryMB int
	// Modules are loaded at boot in addition to DefaultModules.
	Modules []string
}

// ErrTimeout is wrapped by the error of a run whose payload did not finish in time.
var ErrTimeout = errors.New("vm: timed out")

// ErrUnavailable is wrapped by the error of a run on a host that lacks a tool
// the runner needs: qemu, or apt and dpkg to fetch the kernel.
var ErrUnavailable = errors.New("vm: unavailable on this host")

// FailError is the error of a run whose payload failed.
type FailError struct {
	ExitCode int    // the payload's exit status, or -1 if the guest failed before it ran
	Reason   string // what failed, when ExitCode is -1
}

func (e *FailError) Error() string {
	if e.ExitCode >= 0 {
		return fmt.Sprintf("vm: FAIL: the payload exited with status %d", e.ExitCode)
	}
	return "vm: FAIL: " + e.Reason
}

// bootSlack is how long qemu may take beyond Timeout: for the kernel to boot to
// /init (about 3 s under TCG), and for poweroff.
const bootSlack = 90 * time.Second

// fetchTimeout bounds the first download of the kernel (27 MB) and busybox.
const fetchTimeout = 5 * time.Minute

// Run boots the VM and runs the payload. It returns nil if the payload exited
// 0; a *FailError if it failed; an error wrapping ErrTimeout if it did not end
// in time; an error wrapping ErrUnavailable if this host cannot run the VM.
func Run(ctx context.Context, o Options) error {
	if o.Timeout <= 0 {
		o.Timeout = 5 * time.Minute
	}
	if o.Output == nil {
		o.Output = os.Stdout
	}
	if o.MemoryMB <= 0 {
		o.MemoryMB = 1024
	}
	if err := checkPayload(&o); err != nil {
		return err
	}
	qemu, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		return fmt.Errorf("%w: qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)", ErrUnavailable)
	}
	for _, t := range []string{"apt-get", "apt-cache", "dpkg-deb", "ldd"} {
		if _, err := exec.LookPath(t); err != nil {
			return fmt.Errorf("%w: %s is not installed: the runner fetches a Debian kernel with apt", ErrUnavailable, t)
		}
	}
	cache, err := CacheDir()
	if err != nil {
		return err
	}
	fctx, cancel := context.WithTimeout(ctx, fetchTimeout)
	a, err := fetch(fctx, cache)
	cancel()
	if err != nil {
		return err
	}

	tmp, err := os.MkdirTemp("", "margay-vm-")
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	defer os.RemoveAll(tmp)
	initrd := filepath.Join(tmp, "initrd.gz")
	start := time.Now()
	size, err := buildInitramfs(ctx, a, &o, initrd)
	if err != nil {
		return err
	}
	fmt.Fprintf(o.Output, "vm: initramfs %.1f MB built in %.1fs; booting %s\n",
		float64(size)/1e6, time.Since(start).Seconds(), filepath.Base(a.kernel))
	return boot(ctx, qemu, a.kernel, initrd, filepath.Join(tmp, "result"), &o)
}

func boot(ctx context.Context, qemu, kernel, initrd, resultPath string, o *Options) error {
	qctx, cancel := context.WithTimeout(ctx, o.Timeout+bootSlack)
	defer cancel()
	cmd := exec.CommandContext(qctx, qemu,
		"-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
		"-m", strconv.Itoa(o.MemoryMB),
		"-nic", "none", // no network: the guest cannot reach the host's
		// Not -nographic: it also turns on SeaBIOS's serial output, which
		// resets the terminal the console is shown on.
		"-display", "none", "-monitor", "none",
		"-serial", "stdio", // ttyS0, the console
		"-chardev", "file,id=result,path="+strings.ReplaceAll(resultPath, ",", ",,"),
		"-serial", "chardev:result", // ttyS1, the result
		"-no-reboot", // a guest panic (panic=-1 reboots) ends qemu
		"-kernel", kernel, "-initrd", initrd,
		"-append", "console=ttyS0 panic=-1 quiet")
	console := &crlf{w: o.Output}
	var stderr capped
	cmd.Stdout = console
	cmd.Stderr = io.MultiWriter(console, &stderr)
	// qemu must not outlive a runner that is killed: its guest would run on to
	// the watchdog.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	cmd.WaitDelay = 5 * time.Second
	start := time.Now()
	runErr := cmd.Run()
	fmt.Fprintf(o.Output, "vm: qemu ran for %.1fs\n", time.Since(start).Seconds())

	res, err := os.ReadFile(resultPath)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("vm: reading the result: %w", err)
	}
	line, _, _ := strings.Cut(strings.TrimSpace(string(res)), "\n")
	line = strings.TrimSpace(line)
	switch {
	case line == "PASS":
		return nil
	case line == "TIMEOUT":
		return fmt.Errorf("%w: the payload did not finish within %v (the guest's watchdog)", ErrTimeout, o.Timeout)
	case strings.HasPrefix(line, "FAIL exit "):
		code, err := strconv.Atoi(strings.TrimPrefix(line, "FAIL exit "))
		if err != nil {
			return fmt.Errorf("vm: unreadable result %q", line)
		}
		return &FailError{ExitCode: code}
	case strings.HasPrefix(line, "FAIL "):
		return &FailError{ExitCode: -1, Reason: strings.TrimPrefix(line, "FAIL ")}
	case line != "":
		return fmt.Errorf("vm: unreadable result %q", line)
	}
	switch {
	case ctx.Err() != nil:
		return fmt.Errorf("vm: interrupted: %w", ctx.Err())
	case qctx.Err() != nil:
		return fmt.Errorf("%w: qemu was killed after %v without a result", ErrTimeout, o.Timeout+bootSlack)
	case runErr != nil:
		return fmt.Errorf("vm: qemu: %v: %s", runErr, bytes.TrimSpace(stderr.Bytes()))
	}
	return fmt.Errorf("vm: the guest stopped without a result (a kernel panic, or /init died): see the console output")
}

// crlf drops the carriage returns the guest's tty puts before each newline.
type crlf struct {
	mu sync.Mutex
	w  io.Writer
}

func (c *crlf) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, err := c.w.Write(bytes.ReplaceAll(p, []byte("\r"), nil)); err != nil {
		return 0, err
	}
	return len(p), nil
}

// capped keeps the first 8 KB written to it: enough for qemu's error message.
type capped struct{ bytes.Buffer }

func (c *capped) Write(p []byte) (int, error) {
	if room := 8<<10 - c.Len(); room > 0 {
		c.Buffer.Write(p[:min(room, len(p))])
	}
	return len(p), nil
}
