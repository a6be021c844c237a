package k8stest

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// StartScheduler runs a real kube-scheduler against s, as its own user, where
// s runs, until t ends: pods without a node are then placed as a cluster
// places them.
func (s *APIServer) StartScheduler(t testing.TB) {
	t.Helper()
	s.startComponent(t, "kube-scheduler", "system:kube-scheduler", "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10259")
}

// StartControllerManager runs a real kube-controller-manager against s with
// the controllers a node's life needs: node lifecycle (which lifts the
// not-ready taint a kubelet registers with, and taints nodes that stop
// reporting) and pod GC (which deletes the pods of deleted nodes). It runs as
// admin: a cluster gives each controller a service account of its own
// (--use-service-account-credentials), which needs the token controllers
// the lab does not run; its own user's role does not cover them.
func (s *APIServer) StartControllerManager(t testing.TB) {
	t.Helper()
	s.startComponent(t, "kube-controller-manager", "admin", "--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=10257",
		"--controllers=nodelifecycle,podgc")
}

// startComponent runs a control plane command as user, with a kubeconfig,
// where s runs, until t ends. Its health and metrics port is on loopback there.
func (s *APIServer) startComponent(t testing.TB, name, user string, args ...string) {
	t.Helper()
	bin := NeedBinary(t, name)
	args = append([]string{"--kubeconfig", s.Kubeconfig(t, user)}, args...)
	cmd := exec.Command(bin, args...)
	if s.NS != nil {
		cmd = exec.Command("ip", append([]string{"netns", "exec", s.NS.Name, bin}, args...)...)
	}
	log := filepath.Join(s.Dir, name+".log")
	f, err := os.Create(log)
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		t.Fatalf("start %s: %v", name, err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
		f.Close()
		if t.Failed() {
			t.Logf("%s's log:\n%s", name, tailFile(log, 20))
		}
	})
}
