package vm

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// hostTool is a dynamically linked host binary the guest needs, copied with the
// libraries ldd lists. Busybox has applets of the same names, but Debian's lack
// what margay and its tests use: `ip netns`, iptables at all, `ping -M do`.
type hostTool struct {
	candidates []string // where the host may keep it
	pkg        string   // the Debian package, for the error
	guest      string
	links      []string // more guest names for it
}

var hostTools = []hostTool{
	{[]string{"/usr/bin/ip", "/bin/ip", "/usr/sbin/ip", "/sbin/ip"}, "iproute2", "/bin/ip",
		[]string{"/sbin/ip", "/usr/bin/ip", "/usr/sbin/ip"}},
	// iptables-nft, as on Debian 12: one binary that acts by the name it runs as.
	{[]string{"/usr/sbin/xtables-nft-multi", "/sbin/xtables-nft-multi"}, "iptables", "/usr/sbin/xtables-nft-multi",
		[]string{"/usr/sbin/iptables", "/usr/sbin/iptables-save", "/usr/sbin/iptables-restore",
			"/usr/sbin/iptables-nft", "/usr/sbin/iptables-nft-save", "/usr/sbin/iptables-nft-restore",
			"/usr/sbin/ip6tables", "/usr/sbin/ip6tables-save", "/usr/sbin/ip6tables-restore"}},
	{[]string{"/usr/bin/ping", "/bin/ping"}, "iputils-ping", "/bin/ping", []string{"/usr/bin/ping"}},
}

// xtablesDirs are where iptables may keep its extensions (XTABLES_LIBDIR).
var xtablesDirs = []string{"/usr/lib/x86_64-linux-gnu/xtables", "/usr/lib64/xtables", "/usr/lib/xtables"}

// Guest directories the init mounts over: a payload file there would be hidden.
var mountedDirs = []string{"/dev", "/proc", "/sys", "/run", "/var/run", "/tmp"}

var envName = regexp.MustCompile(`^[A-Za-z_][A-Za-z0-9_]*$`)

// checkPayload rejects payload options the guest could not honour, before
// anything is downloaded or built.
func checkPayload(o *Options) error {
	if len(o.Command) == 0 {
		return fmt.Errorf("vm: no command to run")
	}
	for g := range o.Files {
		if !path.IsAbs(g) || path.Clean(g) != g || g == "/" {
			return fmt.Errorf("vm: guest path %q is not a clean absolute file path", g)
		}
		if g == "/init" {
			return fmt.Errorf("vm: guest path /init is the VM's own init")
		}
		for _, d := range mountedDirs {
			if g == d || strings.HasPrefix(g, d+"/") {
				return fmt.Errorf("vm: guest path %s is under %s, which the guest mounts over at boot", g, d)
			}
		}
	}
	for _, t := range o.Tools {
		if !path.IsAbs(t) || path.Clean(t) != t {
			return fmt.Errorf("vm: tool %q is not a clean absolute path", t)
		}
	}
	for _, e := range o.Env {
		if k, _, ok := strings.Cut(e, "="); !ok || !envName.MatchString(k) {
			return fmt.Errorf("vm: environment entry %q is not NAME=value", e)
		}
	}
	if o.Dir != "" && !path.IsAbs(o.Dir) {
		return fmt.Errorf("vm: working directory %q is not absolute", o.Dir)
	}
	return nil
}

// buildInitramfs writes the guest's root file system to out as a gzipped newc
// cpio archive and returns its size.
func buildInitramfs(ctx context.Context, a *assets, o *Options, out string) (int64, error) {
	stage, err := os.MkdirTemp(filepath.Dir(out), "root-")
	if err != nil {
		return 0, fmt.Errorf("vm: %w", err)
	}
	defer os.RemoveAll(stage)
	modRoot := "/lib/modules/" + a.release
	for _, d := range []string{"/bin", "/sbin", "/usr/bin", "/usr/sbin", "/dev", "/proc", "/sys",
		"/run", "/tmp", "/root", "/etc", "/var", modRoot} {
		if err := os.MkdirAll(filepath.Join(stage, d), 0o755); err != nil {
			return 0, fmt.Errorf("vm: %w", err)
		}
	}
	if err := os.Symlink("../run", filepath.Join(stage, "var/run")); err != nil {
		return 0, fmt.Errorf("vm: %w", err)
	}
	// The kernel opens /dev/console for /init before anything is mounted. Only
	// root can make the node; without it /init opens the console only once it
	// has mounted devtmpfs.
	if os.Geteuid() == 0 {
		_ = unix.Mknod(filepath.Join(stage, "dev/console"), unix.S_IFCHR|0o600, int(unix.Mkdev(5, 1)))
	}

	// The host tools and their libraries.
	provided := map[string]bool{}
	var elfs []string
	tools := slices.Clone(hostTools)
	for _, p := range o.Tools {
		tools = append(tools, hostTool{candidates: []string{p}, guest: p})
	}
	for _, t := range tools {
		src := ""
		for _, c := range t.candidates {
			if _, err := os.Stat(c); err == nil {
				src = c
				break
			}
		}
		if src == "" && t.pkg == "" {
			return 0, fmt.Errorf("vm: tool %s: no such file on the host", t.guest)
		}
		if src == "" {
			return 0, fmt.Errorf("vm: the guest needs the host's %s (package %s), found at none of %s",
				path.Base(t.guest), t.pkg, strings.Join(t.candidates, ", "))
		}
		if err := copyFile(src, filepath.Join(stage, t.guest), 0o755); err != nil {
			return 0, err
		}
		elfs = append(elfs, src)
		provided[path.Base(t.guest)] = true
		for _, l := range t.links {
			if err := os.Symlink(t.guest, filepath.Join(stage, l)); err != nil {
				return 0, fmt.Errorf("vm: %w", err)
			}
			provided[path.Base(l)] = true
		}
	}
	xtDir := ""
	for _, d := range xtablesDirs {
		if so, _ := filepath.Glob(filepath.Join(d, "*.so")); len(so) > 0 {
			xtDir = d
			for _, s := range so {
				if err := copyFile(s, filepath.Join(stage, s), 0o644); err != nil {
					return 0, err
				}
			}
			elfs = append(elfs, so...)
			break
		}
	}
	if xtDir == "" {
		return 0, fmt.Errorf("vm: no iptables extensions in %s (package iptables)", strings.Join(xtablesDirs, ", "))
	}
	libs, err := sharedLibs(ctx, elfs)
	if err != nil {
		return 0, err
	}
	for _, l := range libs {
		if err := copyFile(l, filepath.Join(stage, l), 0o755); err != nil {
			return 0, err
		}
	}

	// busybox, with an applet link for every name the host tools do not take.
	if err := copyFile(a.busybox, filepath.Join(stage, "bin/busybox"), 0o755); err != nil {
		return 0, err
	}
	list, err := exec.CommandContext(ctx, a.busybox, "--list-full").Output()
	if err != nil {
		return 0, fmt.Errorf("vm: %s --list-full: %w", a.busybox, err)
	}
	for _, p := range strings.Fields(string(list)) {
		if provided[path.Base(p)] || p == "bin/busybox" {
			continue
		}
		if err := os.Symlink("/bin/busybox", filepath.Join(stage, p)); err != nil {
			return 0, fmt.Errorf("vm: busybox applet %s: %w", p, err)
		}
	}

	// The modules, in load order.
	ms, err := loadModuleSet(a.modDir, a.release)
	if err != nil {
		return 0, err
	}
	mods, err := ms.closure(ctx, append(append([]string{}, DefaultModules...), o.Modules...))
	if err != nil {
		return 0, err
	}
	var modPaths []string
	for _, m := range mods {
		if err := writeFile(filepath.Join(stage, modRoot, m.rel), m.data, 0o644); err != nil {
			return 0, err
		}
		modPaths = append(modPaths, modRoot+"/"+filepath.ToSlash(m.rel))
	}

	etc := map[string]string{
		"passwd":   "root:x:0:0:root:/root:/bin/sh\n",
		"group":    "root:x:0:\n",
		"hosts":    "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
		"hostname": "margay-vm\n",
	}
	if p, err := os.ReadFile("/etc/protocols"); err == nil {
		// iptables reads and iptables-save prints protocol names as on the host.
		etc["protocols"] = string(p)
	}
	for name, content := range etc {
		if err := writeFile(filepath.Join(stage, "etc", name), []byte(content), 0o644); err != nil {
			return 0, err
		}
	}
	if err := writeFile(filepath.Join(stage, "init"), []byte(initScript(o, modPaths, xtDir)), 0o755); err != nil {
		return 0, err
	}

	// The payload last, so that it may replace anything above but /init.
	for g, h := range o.Files {
		st, err := os.Stat(h)
		if err != nil {
			return 0, fmt.Errorf("vm: payload file for %s: %w", g, err)
		}
		if !st.Mode().IsRegular() {
			return 0, fmt.Errorf("vm: payload file %s for %s is not a regular file", h, g)
		}
		dst := filepath.Join(stage, g)
		os.Remove(dst) // a link placed above would redirect the copy
		if err := copyFile(h, dst, st.Mode().Perm()); err != nil {
			return 0, err
		}
	}
	return writeCpio(ctx, a.busybox, stage, out)
}

// initScript is the guest's /init. The payload's output reaches the host on
// ttyS0; the result is also written to ttyS1, a port only /init opens, so that
// nothing the payload prints can pass for a result.
func initScript(o *Options, modules []string, xtDir string) string {
	var b strings.Builder
	b.WriteString(`#!/bin/sh
# The margay test VM's init, written by test/vm.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sys /sys
# ip netns keeps its namespaces in /run/netns.
mount -t tmpfs -o mode=0755 run /run
mount -t tmpfs -o mode=1777 tmp /tmp
mkdir -p /run/netns /dev/shm
mount -t tmpfs -o mode=1777 shm /dev/shm
read up _ </proc/uptime
echo "vm: /init started at ${up}s"

result() {
	echo "$1" >/dev/ttyS1
	echo "VM-RESULT: $2"
	# stty sets the mode with TCSADRAIN: it returns once the console has sent
	# everything, which poweroff would otherwise cut short.
	stty -F /dev/console onlcr
	poweroff -f
	exit 1
}
`)
	fmt.Fprintf(&b, "( sleep %d; result TIMEOUT TIMEOUT ) &\n", int((o.Timeout+time.Second-1)/time.Second))
	b.WriteString("hostname margay-vm\n/bin/ip link set lo up\nfor m in")
	for _, m := range modules {
		b.WriteString(" \\\n\t" + shquote(m))
	}
	b.WriteString(`; do
	insmod "$m" || result "FAIL insmod $m" "FAIL (insmod $m)"
done
read up _ </proc/uptime
echo "vm: modules loaded at ${up}s"
`)
	fmt.Fprintf(&b, "export HOME=/root TMPDIR=/tmp XTABLES_LIBDIR=%s\n", shquote(xtDir))
	for _, e := range o.Env {
		fmt.Fprintf(&b, "export %s\n", shquote(e))
	}
	dir := o.Dir
	if dir == "" {
		dir = "/"
	}
	fmt.Fprintf(&b, "cd %s || result \"FAIL cd\" \"FAIL (no working directory)\"\n", shquote(dir))
	for i, a := range o.Command {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(shquote(a))
	}
	b.WriteString(` </dev/null
rc=$?
if [ $rc -eq 0 ]; then
	result PASS PASS
fi
result "FAIL exit $rc" "FAIL (exit $rc)"
`)
	return b.String()
}

// shquote quotes s as one word for sh.
func shquote(s string) string {
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}

// sharedLibs lists the libraries, the dynamic loader included, that ldd says
// the files need. ldd costs 20 ms a file and the iptables extensions are 120
// files that need the same few libraries, so it runs on one file for each
// distinct list of needs.
func sharedLibs(ctx context.Context, files []string) ([]string, error) {
	reps := map[string]string{}
	for _, f := range files {
		key := f
		if e, err := elf.Open(f); err == nil {
			var k []string
			for _, tag := range []elf.DynTag{elf.DT_NEEDED, elf.DT_RPATH, elf.DT_RUNPATH} {
				v, _ := e.DynString(tag)
				k = append(k, strings.Join(v, ","))
			}
			e.Close()
			key = strings.Join(k, ";")
		}
		if _, ok := reps[key]; !ok {
			reps[key] = f
		}
	}
	var args []string
	for _, f := range reps {
		args = append(args, f)
	}
	sort.Strings(args)
	cmd := exec.CommandContext(ctx, "ldd", args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	out, err := cmd.Output()
	// ldd fails if any one file is static; what it printed for the others holds.
	if len(out) == 0 && err != nil {
		return nil, fmt.Errorf("vm: ldd: %w", err)
	}
	seen := map[string]bool{}
	var libs []string
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if strings.Contains(l, "not found") {
			return nil, fmt.Errorf("vm: ldd: a library of a host tool is missing: %s", l)
		}
		f := strings.Fields(l)
		if len(f) == 0 {
			continue
		}
		p := f[0]
		if len(f) >= 3 && f[1] == "=>" {
			p = f[2]
		}
		if strings.HasPrefix(p, "/") && !strings.HasSuffix(p, ":") && !seen[p] {
			seen[p] = true
			libs = append(libs, p)
		}
	}
	sort.Strings(libs)
	return libs, nil
}

// writeCpio archives the stage with busybox cpio (the host need not have cpio)
// and gzips it at speed 1: the guest unpacks it with a TCG-emulated CPU.
func writeCpio(ctx context.Context, busybox, stage, out string) (int64, error) {
	var names bytes.Buffer
	err := filepath.WalkDir(stage, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if p != stage {
			rel, _ := filepath.Rel(stage, p)
			names.WriteString(rel + "\n")
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("vm: %w", err)
	}
	f, err := os.Create(out)
	if err != nil {
		return 0, fmt.Errorf("vm: %w", err)
	}
	defer f.Close()
	zw, _ := gzip.NewWriterLevel(f, gzip.BestSpeed)
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, busybox, "cpio", "-o", "-H", "newc")
	cmd.Dir = stage
	cmd.Stdin = &names
	cmd.Stdout = zw
	cmd.Stderr = &stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("vm: busybox cpio: %v: %s", err, bytes.TrimSpace(stderr.Bytes()))
	}
	if err := zw.Close(); err != nil {
		return 0, fmt.Errorf("vm: writing %s: %w", out, err)
	}
	st, err := f.Stat()
	if err != nil {
		return 0, fmt.Errorf("vm: %w", err)
	}
	if err := f.Close(); err != nil {
		return 0, fmt.Errorf("vm: writing %s: %w", out, err)
	}
	return st.Size(), nil
}

func copyFile(src, dst string, perm os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	defer in.Close()
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	out, err := os.OpenFile(dst, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, perm)
	if err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return fmt.Errorf("vm: copying %s: %w", src, err)
	}
	if err := out.Close(); err != nil {
		return fmt.Errorf("vm: copying %s: %w", src, err)
	}
	// Exactly perm, whatever the umask: the payload's modes are kept.
	if err := os.Chmod(dst, perm); err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	return nil
}

func writeFile(dst string, data []byte, perm os.FileMode) error {
	if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	if err := os.WriteFile(dst, data, perm); err != nil {
		return fmt.Errorf("vm: %w", err)
	}
	return nil
}
