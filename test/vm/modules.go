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
	"path/filepath"
	"strings"
)

// DefaultModules are loaded at boot, after their dependencies. The list covers
// what margay-node and the e2e lab use that this kernel builds as modules.
var DefaultModules = []string{
	// IPIP (tunl0), the pod veths, VXLAN, and the lab's and the bridge CNI
	// plugin's devices.
	"tunnel4", "ip_tunnel", "ipip", "veth", "vxlan", "bridge", "dummy",
	// iptables-nft: nf_tables with nft_compat running the xtables matches and
	// targets that margay's rules and the portmap plugin use.
	"nf_tables", "nft_compat", "nft_chain_nat", "nft_masq", "nft_ct",
	"nf_nat", "nf_conntrack", "x_tables", "xt_MASQUERADE", "xt_nat",
	"xt_comment", "xt_addrtype", "xt_tcpudp", "xt_set", "xt_conntrack",
	"xt_mark", "xt_multiport",
	// ip6tables' icmp6 match (neighbour discovery from pods) is ip6_tables'
	// own; the other IPv6 rules need nothing more.
	"ip6_tables",
	// ipsets, which margay-node programs through netlink.
	"ip_set", "ip_set_hash_ip", "ip_set_hash_net",
}

// module is one .ko to ship, in load order.
type module struct {
	name string
	rel  string // path under lib/modules/<release>, always ending in .ko
	data []byte // uncompressed
}

// moduleSet finds modules by name in an unpacked lib/modules/<release>. Debian
// leaves modules.dep to depmod at install time, and this package is unpacked,
// not installed, so the dependencies come from each module's .modinfo.
type moduleSet struct {
	dir     string
	release string
	files   map[string]string // name -> path under dir
	builtin map[string]bool
}

// compressed module suffixes and the tools that undo them. This kernel ships
// plain .ko files; newer Debian kernels compress them, and busybox's insmod
// takes only plain ones, so they are unpacked on the host.
var moduleSuffixes = []string{".ko", ".ko.xz", ".ko.zst", ".ko.gz"}

func loadModuleSet(dir, release string) (*moduleSet, error) {
	m := &moduleSet{dir: dir, release: release, files: map[string]string{}, builtin: map[string]bool{}}
	err := filepath.WalkDir(filepath.Join(dir, "kernel"), func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if name, ok := moduleName(d.Name()); ok {
			rel, _ := filepath.Rel(dir, path)
			m.files[name] = rel
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("vm: listing modules: %w", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "modules.builtin"))
	if err != nil {
		return nil, fmt.Errorf("vm: %w", err)
	}
	for _, l := range strings.Fields(string(b)) {
		if name, ok := moduleName(filepath.Base(l)); ok {
			m.builtin[name] = true
		}
	}
	return m, nil
}

// moduleName is the kernel's name for a module file: the base name without its
// suffix, with dashes as underscores.
func moduleName(file string) (string, bool) {
	for _, s := range moduleSuffixes {
		if base, ok := strings.CutSuffix(file, s); ok {
			return strings.ReplaceAll(base, "-", "_"), true
		}
	}
	return "", false
}

// closure returns the named modules and everything they depend on, each after
// its dependencies. A module built into the kernel needs no loading and is
// left out.
func (m *moduleSet) closure(ctx context.Context, names []string) ([]module, error) {
	var order []module
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name, from string) error
	visit = func(name, from string) error {
		name = strings.ReplaceAll(name, "-", "_")
		switch state[name] {
		case 1:
			return fmt.Errorf("vm: module dependency cycle through %s", name)
		case 2:
			return nil
		}
		if m.builtin[name] {
			state[name] = 2
			return nil
		}
		rel, ok := m.files[name]
		if !ok {
			if from != "" {
				return fmt.Errorf("vm: module %s, needed by %s, is not in kernel %s", name, from, m.release)
			}
			return fmt.Errorf("vm: kernel %s has no module %s (see its config in boot/config-%s)", m.release, name, m.release)
		}
		state[name] = 1
		data, err := readModule(ctx, filepath.Join(m.dir, rel))
		if err != nil {
			return err
		}
		info, err := modinfo(data)
		if err != nil {
			return fmt.Errorf("vm: module %s: %w", rel, err)
		}
		// Modules from another build fail to load with a terse "Invalid module
		// format"; say which.
		if magic := strings.Fields(info["vermagic"]); len(magic) == 0 || magic[0] != m.release {
			return fmt.Errorf("vm: module %s was built for %q, not %s", rel, info["vermagic"], m.release)
		}
		var deps, pre, post []string
		if d := info["depends"]; d != "" {
			deps = strings.Split(d, ",")
		}
		// softdep "pre: a b post: c" asks modprobe to load a and b first and c
		// after; insmod does not read it, so the order here does.
		var cur *[]string
		for _, f := range strings.Fields(info["softdep"]) {
			switch f {
			case "pre:":
				cur = &pre
			case "post:":
				cur = &post
			default:
				if cur != nil {
					*cur = append(*cur, f)
				}
			}
		}
		for _, d := range append(deps, m.soft(pre)...) {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		for _, z := range []string{".xz", ".zst", ".gz"} {
			rel = strings.TrimSuffix(rel, z) // shipped unpacked
		}
		order = append(order, module{name: name, rel: rel, data: data})
		for _, d := range m.soft(post) {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		return nil
	}
	for _, n := range names {
		if err := visit(n, ""); err != nil {
			return nil, err
		}
	}
	return order, nil
}

// soft keeps the soft dependencies that name module files. The others name
// aliases, like libcrc32c's "crc32c", which here is crc32c_generic, built in;
// modprobe too goes on without a soft dependency it cannot find.
func (m *moduleSet) soft(names []string) []string {
	var found []string
	for _, n := range names {
		if _, ok := m.files[strings.ReplaceAll(n, "-", "_")]; ok {
			found = append(found, n)
		}
	}
	return found
}

// readModule returns a module file's contents, uncompressed.
func readModule(ctx context.Context, path string) ([]byte, error) {
	var tool string
	switch {
	case strings.HasSuffix(path, ".ko"):
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("vm: %w", err)
		}
		return b, nil
	case strings.HasSuffix(path, ".gz"):
		f, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("vm: %w", err)
		}
		defer f.Close()
		zr, err := gzip.NewReader(f)
		if err != nil {
			return nil, fmt.Errorf("vm: %s: %w", path, err)
		}
		b, err := io.ReadAll(zr)
		if err != nil {
			return nil, fmt.Errorf("vm: %s: %w", path, err)
		}
		return b, nil
	case strings.HasSuffix(path, ".xz"):
		tool = "xz"
	case strings.HasSuffix(path, ".zst"):
		tool = "zstd"
	default:
		return nil, fmt.Errorf("vm: %s is not a kernel module", path)
	}
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, tool, "-dc", path)
	cmd.Stderr = &stderr
	b, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("vm: unpacking %s with %s (package xz-utils or zstd): %v: %s", path, tool, err, bytes.TrimSpace(stderr.Bytes()))
	}
	return b, nil
}

// modinfo parses a module's .modinfo section: NUL-separated key=value pairs.
// Repeated keys (alias, firmware) keep the last value; only unique keys are used.
func modinfo(ko []byte) (map[string]string, error) {
	f, err := elf.NewFile(bytes.NewReader(ko))
	if err != nil {
		return nil, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, fmt.Errorf("no .modinfo section")
	}
	data, err := sec.Data()
	if err != nil {
		return nil, err
	}
	info := map[string]string{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Split(func(data []byte, atEOF bool) (int, []byte, error) {
		if i := bytes.IndexByte(data, 0); i >= 0 {
			return i + 1, data[:i], nil
		}
		if atEOF && len(data) > 0 {
			return len(data), data, nil
		}
		return 0, nil, nil
	})
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok {
			info[k] = v
		}
	}
	return info, sc.Err()
}
