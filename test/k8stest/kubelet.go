package k8stest

import (
	"bufio"
	"context"
	"fmt"
	"hash/fnv"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/margay-dev/margay/test/nstest"
)

// KubeletOptions place a Kubernetes node.
type KubeletOptions struct {
	// Name is the Kubernetes node name the kubelet registers.
	Name string
	// NS is the node's network namespace, which containerd, the kubelet and
	// every CNI plugin containerd runs live in.
	NS *nstest.NS
	// IP is the node's address, the kubelet's --node-ip.
	IP string
	// CNIBinDir and CNIConfDir are containerd's CNI directories, where the
	// network's installer has put (or will put) its plugins and conflist.
	CNIBinDir, CNIConfDir string
	// Dir holds the node's state and logs; empty means a new temporary
	// directory.
	Dir string
}

// Kubelet is a Kubernetes node: a real containerd (with runc) and a
// real kubelet, run in the node's network namespace under nsenter, never in
// the host's. They share a mount namespace of their own, so the pods' network
// namespaces and rootfs mounts stay out of the host's mount table and go with
// it; in it, the kernel settings the kubelet insists on (kernel.panic,
// vm.overcommit_memory, ...) are files over /proc/sys, so it cannot change the
// host's. Each node has a cgroup subtree of its own (the kubelet's cgroupRoot),
// in which the two daemons, the shims and the containers run, so that Stop can
// kill all of them.
type Kubelet struct {
	KubeletOptions
	api                 *APIServer
	mntDir              string   // a private mount holding the mount namespace file
	cgroups             []string // the subtree's root in each cgroup hierarchy
	containerd, kubelet *daemon
}

// daemon is a process started under the kubelet node.
type daemon struct {
	cmd    *exec.Cmd
	exited chan struct{}
	log    *os.File
}

func (d *daemon) stop(sig syscall.Signal, wait time.Duration) {
	if d == nil {
		return
	}
	d.cmd.Process.Signal(sig)
	select {
	case <-d.exited:
	case <-time.After(wait):
		d.cmd.Process.Kill()
		<-d.exited
	}
	d.log.Close()
}

// The kernel settings kubelet's container manager sets unless they hold.
var kubeletSysctls = []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"}

// StartKubelet starts containerd and a kubelet for node o.Name, registered with
// api as the node's user, imports the pause image, waits until the node is
// Ready (which needs the CNI conflist in o.CNIConfDir) and stops everything
// when t ends.
func StartKubelet(t testing.TB, api *APIServer, o KubeletOptions) *Kubelet {
	t.Helper()
	bins := map[string]string{}
	for _, name := range []string{"kubelet", "containerd", "containerd-shim-runc-v2", "ctr"} {
		bins[name] = NeedBinary(t, name)
	}
	// Debian's runc, built with seccomp, which containerd's default sandbox
	// profile needs (runc from the module proxy builds without it).
	runc, err := exec.LookPath("runc")
	if err != nil {
		t.Fatalf("containerd needs runc: apt-get install runc (test/deps.sh does): %v", err)
	}
	bins["runc"] = runc
	k := &Kubelet{KubeletOptions: o, api: api}
	if k.Dir == "" {
		k.Dir = t.TempDir()
	} else if err := os.MkdirAll(k.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(k.Stop)
	if err := k.start(bins); err != nil {
		t.Fatalf("kubelet node %s: %v", o.Name, err)
	}
	return k
}

func (k *Kubelet) path(p ...string) string { return filepath.Join(append([]string{k.Dir}, p...)...) }

// Socket is containerd's CRI and API socket.
func (k *Kubelet) Socket() string { return k.path("containerd.sock") }

// LogTail is the end of the kubelet's (or "containerd"'s) log.
func (k *Kubelet) LogTail(daemon string, lines int) string {
	return tailFile(k.path(daemon+".log"), lines)
}

func (k *Kubelet) start(bins map[string]string) error {
	binDir := k.path("bin")
	if err := os.MkdirAll(binDir, 0o755); err != nil {
		return err
	}
	// containerd finds its shim on PATH, and the shim runc.
	for _, name := range []string{"containerd-shim-runc-v2", "runc"} {
		if err := os.Symlink(bins[name], filepath.Join(binDir, name)); err != nil {
			return err
		}
	}
	if err := k.makeCgroups(); err != nil {
		return err
	}
	if err := k.makeMountNS(); err != nil {
		return err
	}
	if err := os.WriteFile(k.path("containerd.toml"), []byte(k.containerdConfig()), 0o644); err != nil {
		return err
	}
	var err error
	if k.containerd, err = k.run("containerd", "runtime", bins["containerd"], "--config", k.path("containerd.toml")); err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := waitFor(ctx, k.containerd, func() error { _, err := k.Ctr(bins["ctr"], "version"); return err }); err != nil {
		return fmt.Errorf("containerd did not answer: %v; its log: %s", err, k.LogTail("containerd", 20))
	}
	tar, err := PauseImageTar(k.Dir)
	if err != nil {
		return err
	}
	if out, err := k.Ctr(bins["ctr"], "-n", "k8s.io", "images", "import", "--platform", "linux/amd64", tar); err != nil {
		return fmt.Errorf("import %s: %v: %s", PauseImage, err, out)
	}
	if err := k.writeKubeletFiles(); err != nil {
		return err
	}
	if k.kubelet, err = k.run("kubelet", "kubelet", bins["kubelet"], "--config", k.path("kubelet.yaml"),
		"--kubeconfig", k.path("kubelet.kubeconfig"), "--root-dir", k.path("kubelet"), "--cert-dir", k.path("kubelet-pki"),
		"--hostname-override", k.Name, "--node-ip", k.IP, "--v", "2",
		// Not the default -999: the lab machines' root cannot lower its OOM score.
		"--oom-score-adj", "0"); err != nil {
		return err
	}
	ctx, cancel = context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	admin, err := k.api.clientset("admin")
	if err != nil {
		return err
	}
	if err := waitFor(ctx, k.kubelet, func() error {
		n, err := admin.CoreV1().Nodes().Get(ctx, k.Name, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, c := range n.Status.Conditions {
			if c.Type == corev1.NodeReady {
				if c.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("not ready: %s", c.Message)
			}
		}
		return fmt.Errorf("no Ready condition yet")
	}); err != nil {
		return fmt.Errorf("node %s: %v; the kubelet's log: %s", k.Name, err, k.LogTail("kubelet", 30))
	}
	return nil
}

// waitFor polls cond until it holds, d exits or ctx ends.
func waitFor(ctx context.Context, d *daemon, cond func() error) error {
	for {
		err := cond()
		if err == nil {
			return nil
		}
		select {
		case <-d.exited:
			return fmt.Errorf("exited (%v)", err)
		case <-ctx.Done():
			return err
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// Ctr runs ctr against the node's containerd. ctr is only a client of its
// socket, so it runs where the test does.
func (k *Kubelet) Ctr(ctr string, args ...string) (string, error) {
	out, err := exec.Command(ctr, append([]string{"--address", k.Socket()}, args...)...).CombinedOutput()
	return string(out), err
}

// run starts a daemon of the node: put into cgroup child of the node's
// subtree first, then into the node's network and mount namespaces by
// nsenter, which execs it in place, so the process is the daemon's.
func (k *Kubelet) run(name, cgroup string, args ...string) (*daemon, error) {
	var procs []string
	for _, c := range k.cgroups {
		procs = append(procs, filepath.Join(c, cgroup, "cgroup.procs"))
	}
	script := `for f in ` + strings.Join(procs, " ") + `; do echo $$ > "$f" || exit 1; done; exec "$@"`
	cmd := exec.Command("sh", append([]string{"-c", script, "sh", "nsenter", "--mount=" + k.mntNS(), "--net=" + k.NS.Path, "--"}, args...)...)
	cmd.Env = append(os.Environ(), "PATH="+k.path("bin")+":/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	f, err := os.OpenFile(k.path(name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	cmd.Stdout, cmd.Stderr = f, f
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		f.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	d := &daemon{cmd: cmd, exited: make(chan struct{}), log: f}
	go func() { cmd.Wait(); close(d.exited) }()
	return d, nil
}

// cgroupName is the node's subtree, the kubelet's cgroupRoot: unique to the
// node's directory, as two labs may have nodes of the same name.
func (k *Kubelet) cgroupName() string {
	h := fnv.New32a()
	h.Write([]byte(k.Dir))
	return fmt.Sprintf("margay-k8s-%s-%08x", k.Name, h.Sum32())
}

// makeCgroups creates the node's subtree, with children for the two daemons
// (the kubelet creates kubepods beside them), in every cgroup hierarchy.
func (k *Kubelet) makeCgroups() error {
	mounts, err := cgroupMounts()
	if err != nil {
		return err
	}
	for _, m := range mounts {
		root := filepath.Join(m, k.cgroupName())
		for _, d := range []string{root, filepath.Join(root, "runtime"), filepath.Join(root, "kubelet")} {
			if err := os.Mkdir(d, 0o755); err != nil {
				return err
			}
			if d == root {
				k.cgroups = append(k.cgroups, root)
			}
			// A new cpuset cgroup has no CPUs or memory nodes: give it its parent's.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				if b, err := os.ReadFile(filepath.Join(filepath.Dir(d), f)); err == nil {
					if err := os.WriteFile(filepath.Join(d, f), b, 0o644); err != nil {
						return err
					}
				}
			}
		}
		// cgroup v2: the kubelet's cgroups under the root need its controllers.
		if b, err := os.ReadFile(filepath.Join(m, "cgroup.subtree_control")); err == nil {
			var enable []string
			for _, c := range strings.Fields(string(b)) {
				enable = append(enable, "+"+c)
			}
			os.WriteFile(filepath.Join(root, "cgroup.subtree_control"), []byte(strings.Join(enable, " ")), 0o644)
		}
	}
	return nil
}

// cgroupMounts are the mount points of the host's cgroup hierarchies, one per
// hierarchy.
func cgroupMounts() ([]string, error) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var mounts []string
	seen := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// ID parent major:minor root mountpoint options... - fstype source superoptions
		pre, post, ok := strings.Cut(sc.Text(), " - ")
		fields, postFields := strings.Fields(pre), strings.Fields(post)
		if !ok || len(fields) < 5 || len(postFields) < 3 || fields[3] != "/" {
			continue
		}
		if t := postFields[0]; t != "cgroup" && t != "cgroup2" {
			continue
		}
		// Hierarchies mounted twice have the same superblock options.
		key := postFields[0] + " " + postFields[2]
		if !seen[key] {
			seen[key] = true
			mounts = append(mounts, fields[4])
		}
	}
	if len(mounts) == 0 {
		return nil, fmt.Errorf("no cgroup hierarchy in /proc/self/mountinfo")
	}
	return mounts, sc.Err()
}

func (k *Kubelet) mntNS() string { return filepath.Join(k.mntDir, "mnt") }

// makeMountNS makes the node's mount namespace, kept by a bind mount of its
// file on a private mount (as ip netns keeps network namespaces), and puts the
// kernel settings' files in it.
func (k *Kubelet) makeMountNS() error {
	k.mntDir = k.path("ns")
	steps := [][]string{
		{"mkdir", "-p", k.mntDir},
		{"mount", "--bind", k.mntDir, k.mntDir},
		{"mount", "--make-private", k.mntDir},
		{"touch", k.mntNS()},
		{"unshare", "--mount=" + k.mntNS(), "--propagation", "slave", "true"},
	}
	if err := os.MkdirAll(k.path("sysctl"), 0o755); err != nil {
		return err
	}
	for _, s := range kubeletSysctls {
		b, err := os.ReadFile("/proc/sys/" + s)
		if err != nil {
			return err
		}
		f := k.path("sysctl", strings.ReplaceAll(s, "/", "."))
		if err := os.WriteFile(f, b, 0o644); err != nil {
			return err
		}
		steps = append(steps, []string{"nsenter", "--mount=" + k.mntNS(), "mount", "--bind", f, "/proc/sys/" + s})
	}
	for _, s := range steps {
		if out, err := exec.Command(s[0], s[1:]...).CombinedOutput(); err != nil {
			return fmt.Errorf("%s: %v: %s", strings.Join(s, " "), err, out)
		}
	}
	return nil
}

func (k *Kubelet) containerdConfig() string {
	return fmt.Sprintf(`version = 3
root = %[1]q
state = %[2]q
# Nothing here is used; NRI would listen on the host's /var/run/nri.
disabled_plugins = ["io.containerd.nri.v1.nri", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.blockfile", "io.containerd.snapshotter.v1.erofs"]

[grpc]
  address = %[3]q
[ttrpc]
  address = %[4]q

[plugins.'io.containerd.cri.v1.images']
  snapshotter = "overlayfs"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = %[5]q

[plugins.'io.containerd.cri.v1.runtime']
  # Lowering an OOM score needs CAP_SYS_RESOURCE, which the lab machines' root
  # lacks: keep containers' scores at or above containerd's own (0), instead
  # of the sandbox's -998, which runc could not set.
  restrict_oom_score_adj = true
  # Pin pod network namespaces in the node's state directory: under the host's
  # /var/run/netns their bind mounts would go with the mount namespace, but the
  # files would stay.
  netns_mounts_under_state_dir = true
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = [%[6]q]
    conf_dir = %[7]q
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
    Root = %[8]q
`, k.path("containerd", "root"), k.path("containerd", "state"), k.Socket(), k.Socket()+".ttrpc",
		PauseImage, k.CNIBinDir, k.CNIConfDir, k.path("runc"))
}

func (k *Kubelet) writeKubeletFiles() error {
	conf := fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
# The lab machines use cgroup v1.
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /%[1]s
containerRuntimeEndpoint: unix://%[2]s
address: %[3]s
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
# Nothing but the API server calls the kubelet, inside the lab.
authentication:
  anonymous: {enabled: true}
  webhook: {enabled: false}
authorization: {mode: AlwaysAllow}
failSwapOn: false
# The machine's disk is shared: do not evict the lab's pods for what others use.
evictionHard: {memory.available: 50Mi, nodefs.available: 1%%, imagefs.available: 1%%, nodefs.inodesFree: 1%%}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
# Everything the kubelet writes stays in the node's directory.
resolvConf: ""
podLogsDir: %[4]s
volumePluginDir: %[5]s
staticPodPath: ""
serializeImagePulls: false
`, k.cgroupName(), k.Socket(), k.IP, k.path("pod-logs"), k.path("volume-plugins"))
	if err := os.WriteFile(k.path("kubelet.yaml"), []byte(conf), 0o644); err != nil {
		return err
	}
	return k.api.writeKubeconfig(k.path("kubelet.kubeconfig"), NodeUser(k.Name))
}

// PodNetNS is the network namespace of a running container (from a pod's
// status: "containerd://<id>"), as a /proc path the test can enter.
func (k *Kubelet) PodNetNS(containerID string) (string, error) {
	id := strings.TrimPrefix(containerID, "containerd://")
	ctr, err := Binary("ctr")
	if err != nil {
		return "", err
	}
	out, err := k.Ctr(ctr, "-n", "k8s.io", "tasks", "ls")
	if err != nil {
		return "", fmt.Errorf("ctr tasks ls: %v: %s", err, out)
	}
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) >= 3 && f[0] == id && f[2] == "RUNNING" {
			return "/proc/" + f[1] + "/ns/net", nil
		}
	}
	return "", fmt.Errorf("container %s is not running on %s", id, k.Name)
}

// Stop stops the kubelet and containerd, kills whatever still runs in the
// node's cgroups (shims, containers), and removes the cgroups and the mount
// namespace, which takes the pods' network namespaces and mounts with it.
func (k *Kubelet) Stop() {
	k.kubelet.stop(syscall.SIGTERM, 10*time.Second)
	k.containerd.stop(syscall.SIGTERM, 10*time.Second)
	k.kubelet, k.containerd = nil, nil
	k.killCgroups()
	if k.mntDir != "" {
		syscall.Unmount(k.mntNS(), syscall.MNT_DETACH)
		syscall.Unmount(k.mntDir, syscall.MNT_DETACH)
		k.mntDir = ""
	}
}

// killCgroups kills every process in the node's subtree until none is left
// (at most 10 s), then removes the subtree's cgroups, deepest first.
func (k *Kubelet) killCgroups() {
	if len(k.cgroups) == 0 {
		return
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids := map[int]bool{}
		for _, root := range k.cgroups {
			filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
				if err == nil && d.Name() == "cgroup.procs" {
					b, _ := os.ReadFile(p)
					for _, f := range strings.Fields(string(b)) {
						if pid, err := strconv.Atoi(f); err == nil {
							pids[pid] = true
						}
					}
				}
				return nil
			})
		}
		if len(pids) == 0 || time.Now().After(deadline) {
			break
		}
		for pid := range pids {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		time.Sleep(50 * time.Millisecond)
	}
	for _, root := range k.cgroups {
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		slices.SortFunc(dirs, func(a, b string) int { return strings.Count(b, "/") - strings.Count(a, "/") })
		for _, d := range dirs {
			syscall.Rmdir(d)
		}
	}
	k.cgroups = nil
}
