package vm

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// The pinned guest kernel. A pin, not "whatever the metapackage names today", so
// that every run tests against the same kernel and a Debian kernel update cannot
// change a result unnoticed. To move it: apt-get update; `apt-cache depends
// linux-image-cloud-amd64` names the package, and `apt-cache show <package>`
// gives its Version and SHA256.
const (
	KernelMetaPackage = "linux-image-cloud-amd64"
	KernelPackage     = "linux-image-6.1.0-56-cloud-amd64"
	KernelVersion     = "6.1.192-2"
	KernelSHA256      = "e7d02b943971edcb8790e256c02cfab3bca6c3d37c1bf25392a57c71300615ee"
)

// busyboxPackage is not pinned: busybox only runs /init and a few shell tools,
// and Debian drops superseded versions from the mirror. The first run fetches
// the version apt offers then.
const busyboxPackage = "busybox-static"

// CacheEnv names the directory to cache the kernel and busybox in, instead of
// $XDG_CACHE_HOME/margay-vm or ~/.cache/margay-vm.
const CacheEnv = "MARGAY_VM_CACHE"

// CacheDir is where the downloaded and unpacked packages are kept.
func CacheDir() (string, error) {
	if d := os.Getenv(CacheEnv); d != "" {
		return d, nil
	}
	d, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("vm: no cache directory (%v): set %s", err, CacheEnv)
	}
	return filepath.Join(d, "margay-vm"), nil
}

// assets are the unpacked packages the guest is made of.
type assets struct {
	kernel  string // the bzImage
	release string // uname -r of the kernel
	modDir  string // lib/modules/<release> on the host
	busybox string // the static busybox binary
}

// fetch downloads and unpacks the kernel and busybox into the cache, unless an
// earlier run did. Runs in parallel processes serialize on a lock file.
func fetch(ctx context.Context, cache string) (*assets, error) {
	if err := os.MkdirAll(cache, 0o755); err != nil {
		return nil, fmt.Errorf("vm: cache: %w", err)
	}
	unlock, err := lockFile(ctx, filepath.Join(cache, "lock"))
	if err != nil {
		return nil, err
	}
	defer unlock()
	// Whoever holds the lock is the only writer, so a tmp- directory left now is
	// from a run that died half way.
	stale, _ := filepath.Glob(filepath.Join(cache, "tmp-*"))
	for _, s := range stale {
		os.RemoveAll(s)
	}

	kdir := filepath.Join(cache, KernelPackage+"_"+KernelVersion)
	if _, err := os.Stat(kdir); errors.Is(err, os.ErrNotExist) {
		if err := verifyPin(ctx, KernelPackage, KernelVersion); err != nil {
			return nil, err
		}
		if err := download(ctx, cache, KernelPackage+"="+KernelVersion, KernelSHA256, kdir); err != nil {
			return nil, err
		}
	} else if err != nil {
		return nil, fmt.Errorf("vm: cache: %w", err)
	}
	a := &assets{}
	kernels, _ := filepath.Glob(filepath.Join(kdir, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		return nil, fmt.Errorf("vm: %s holds %d kernels, want 1: remove it to download again", kdir, len(kernels))
	}
	a.kernel = kernels[0]
	a.release = strings.TrimPrefix(filepath.Base(a.kernel), "vmlinuz-")
	a.modDir = filepath.Join(kdir, "lib", "modules", a.release)
	if _, err := os.Stat(filepath.Join(a.modDir, "kernel")); err != nil {
		return nil, fmt.Errorf("vm: the cached kernel has no modules (%v): remove %s to download again", err, kdir)
	}

	// A cached busybox is kept until the cache is removed: asking apt for its
	// candidate costs a second a run, and any version does.
	bdirs, _ := filepath.Glob(filepath.Join(cache, busyboxPackage+"_*"))
	if len(bdirs) == 0 {
		bbver, err := candidate(ctx, busyboxPackage)
		if err != nil {
			return nil, err
		}
		bdir := filepath.Join(cache, busyboxPackage+"_"+strings.ReplaceAll(bbver, ":", "_"))
		if err := download(ctx, cache, busyboxPackage+"="+bbver, "", bdir); err != nil {
			return nil, err
		}
		bdirs = []string{bdir}
	}
	bdir := bdirs[len(bdirs)-1]
	a.busybox = filepath.Join(bdir, "bin", "busybox")
	if _, err := os.Stat(a.busybox); err != nil {
		return nil, fmt.Errorf("vm: %s has no bin/busybox (%v): remove it to download again", bdir, err)
	}
	return a, nil
}

// lockFile takes an exclusive flock, polling so that ctx can end the wait.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("vm: cache lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil // closing releases the lock
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("vm: cache lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("vm: waiting for the cache lock %s: %w", path, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// verifyPin checks that apt still offers exactly the pinned kernel, and says how
// to move the pin if not.
func verifyPin(ctx context.Context, pkg, version string) error {
	// apt-cache show pkg=version prints nothing, and succeeds, for a version
	// apt does not have.
	out, err := aptCmd(ctx, "apt-cache", "show", "--no-all-versions", pkg+"="+version)
	if err == nil && bytes.Contains(out, []byte("\nVersion: "+version+"\n")) {
		return nil
	}
	now := "nothing (is apt-get update needed?)"
	if dep, err := aptCmd(ctx, "apt-cache", "depends", KernelMetaPackage); err == nil {
		for _, l := range strings.Split(string(dep), "\n") {
			if p, ok := strings.CutPrefix(strings.TrimSpace(l), "Depends: "); ok && strings.HasPrefix(p, "linux-image-") {
				now = p
				if v, err := candidate(ctx, p); err == nil {
					now += " " + v
				}
				break
			}
		}
	}
	return fmt.Errorf("vm: apt does not offer the pinned kernel %s=%s (%s now depends on %s). "+
		"Run apt-get update; if the pinned version is still missing, Debian has superseded it: "+
		"set KernelPackage, KernelVersion and KernelSHA256 in test/vm/fetch.go from `apt-cache depends %s` "+
		"and `apt-cache show <package>`, then rerun the VM tests",
		pkg, version, KernelMetaPackage, now, KernelMetaPackage)
}

// candidate is the version apt would install of a package.
func candidate(ctx context.Context, pkg string) (string, error) {
	out, err := aptCmd(ctx, "apt-cache", "policy", pkg)
	if err != nil {
		return "", err
	}
	sc := bufio.NewScanner(bytes.NewReader(out))
	for sc.Scan() {
		if v, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "Candidate: "); ok && v != "(none)" {
			return v, nil
		}
	}
	return "", fmt.Errorf("vm: apt offers no %s: run apt-get update", pkg)
}

// download fetches pkg=version with apt-get download, checks its SHA-256 if one
// is given, and unpacks it into dest; nothing is installed.
func download(ctx context.Context, cache, pkgver, sum, dest string) error {
	tmp, err := os.MkdirTemp(cache, "tmp-")
	if err != nil {
		return fmt.Errorf("vm: cache: %w", err)
	}
	defer os.RemoveAll(tmp)
	args := []string{"download"}
	if os.Geteuid() == 0 {
		// apt drops root to _apt for downloads, and _apt may not write into
		// root's home; the download is checked against the signed index either way.
		args = append(args, "-o", "APT::Sandbox::User=root")
	}
	cmd := exec.CommandContext(ctx, "apt-get", append(args, pkgver)...)
	cmd.Dir = tmp
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	if out, err := cmd.CombinedOutput(); err != nil {
		// Mostly no route to the mirror: the host cannot run the VM, but
		// nothing in margay is wrong.
		return fmt.Errorf("%w: apt-get download %s: %v\n%s", ErrUnavailable, pkgver, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, "*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("vm: apt-get download %s left %d .deb files, want 1", pkgver, len(debs))
	}
	if sum != "" {
		got, err := fileSHA256(debs[0])
		if err != nil {
			return err
		}
		if got != sum {
			return fmt.Errorf("vm: %s has SHA-256 %s, the pin says %s", filepath.Base(debs[0]), got, sum)
		}
	}
	unpacked := filepath.Join(tmp, "root")
	if out, err := exec.CommandContext(ctx, "dpkg-deb", "-x", debs[0], unpacked).CombinedOutput(); err != nil {
		return fmt.Errorf("vm: dpkg-deb -x %s: %v\n%s", filepath.Base(debs[0]), err, out)
	}
	// The rename publishes the unpacked tree whole: a run that dies before it
	// leaves only a tmp- directory.
	if err := os.Rename(unpacked, dest); err != nil {
		return fmt.Errorf("vm: cache: %w", err)
	}
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("vm: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("vm: reading %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func aptCmd(ctx context.Context, name string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Env = append(os.Environ(), "LC_ALL=C")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("vm: %s %s: %v: %s", name, strings.Join(args, " "), err, bytes.TrimSpace(stderr.Bytes()))
	}
	return out, nil
}
