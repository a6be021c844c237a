package lab

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"syscall"
	"time"
)

// proc is a process the lab runs in one of its namespaces: an agent, BIRD. The
// lab either started it (and reaps it) or adopted it from a saved State, when
// it knows only the PID and the namespace.
type proc struct {
	pid  int
	ns   string        // the namespace's path, to recognise an adopted PID
	done chan struct{} // closed when a started process exits; nil if adopted
}

// startProc runs args with their output appended to logPath. A detached
// process gets its own session and outlives this one; any other dies with it.
func startProc(args []string, logPath string, detach bool) (*proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return nil, err
	}
	defer logf.Close() // the child has its own descriptor
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if detach {
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	p := &proc{pid: cmd.Process.Pid, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	return p, nil
}

// adopt takes over a process a saved State names, if it still runs in nsPath.
func adopt(pid int, nsPath string) *proc {
	if pid <= 0 {
		return nil
	}
	return &proc{pid: pid, ns: nsPath}
}

func (p *proc) running() bool {
	if p == nil {
		return false
	}
	if p.done != nil {
		select {
		case <-p.done:
			return false
		default:
			return true
		}
	}
	return alive(p.pid) && inNetNS(p.pid, p.ns)
}

// stop signals the process and waits up to 10 s for it to exit, then kills it.
func (p *proc) stop(sig syscall.Signal) {
	if !p.running() {
		return
	}
	syscall.Kill(p.pid, sig)
	for _, wait := range []time.Duration{10 * time.Second, 5 * time.Second} {
		deadline := time.Now().Add(wait)
		for p.running() && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if !p.running() {
			return
		}
		syscall.Kill(p.pid, syscall.SIGKILL)
	}
}

// alive reports whether pid exists and is not a zombie.
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the command name, which is in parentheses.
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && i+2 < len(b) && b[i+2] != 'Z'
}

// inNetNS reports whether pid lives in the network namespace at nsPath: after
// a reboot or a long while, a saved PID may name someone else's process.
func inNetNS(pid int, nsPath string) bool {
	var a, b syscall.Stat_t
	if syscall.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &a) != nil || syscall.Stat(nsPath, &b) != nil {
		return false
	}
	return a.Dev == b.Dev && a.Ino == b.Ino
}
