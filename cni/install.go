package cni

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
)

// InstallOptions say what to install where.
type InstallOptions struct {
	SrcDir   string   // where the margay and margay-ipam binaries are
	BinDir   string   // the CNI bin dir, /opt/cni/bin
	ConfDir  string   // the CNI conf dir, /etc/cni/net.d
	ConfName string   // default 10-margay.conflist
	Plugins  []string // binaries to copy; default margay and margay-ipam
	// Conf is the margay plugin's configuration; Type and CNIVersion are filled in.
	Conf NetConf
}

// Install copies the plugins into the CNI bin dir and writes the network
// configuration list into the CNI conf dir. Each file is written to a temporary
// name and renamed, so kubelet never sees half a file, and a file whose content is
// already right is left alone. It returns the paths it changed.
func Install(o InstallOptions) ([]string, error) {
	if o.ConfName == "" {
		o.ConfName = "10-margay.conflist"
	}
	if len(o.Plugins) == 0 {
		o.Plugins = []string{"margay", "margay-ipam"}
	}
	var changed []string
	for _, p := range o.Plugins {
		data, err := os.ReadFile(filepath.Join(o.SrcDir, p))
		if err != nil {
			return changed, fmt.Errorf("read plugin %s: %w", p, err)
		}
		dst := filepath.Join(o.BinDir, p)
		did, err := writeAtomic(dst, data, 0o755)
		if err != nil {
			return changed, err
		}
		if did {
			changed = append(changed, dst)
		}
	}
	conflist, err := ConfList(o.Conf)
	if err != nil {
		return changed, err
	}
	dst := filepath.Join(o.ConfDir, o.ConfName)
	did, err := writeAtomic(dst, conflist, 0o644)
	if did {
		changed = append(changed, dst)
	}
	return changed, err
}

// ConfList renders the network configuration list for the margay plugin.
func ConfList(c NetConf) ([]byte, error) {
	c.Type = "margay"
	if c.CNIVersion == "" {
		c.CNIVersion = "1.0.0"
	}
	if c.Name == "" {
		c.Name = "k8s-pod-network"
	}
	if c.IPAM.Type == "" {
		c.IPAM.Type = "margay-ipam"
	}
	name, version := c.Name, c.CNIVersion
	c.Name, c.CNIVersion = "", "" // they belong to the list
	list := map[string]any{"cniVersion": version, "name": name, "plugins": []any{c}}
	b, err := json.MarshalIndent(list, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// writeAtomic writes data to path through a temporary file in the same directory
// and a rename, unless path already holds exactly data. It reports whether it wrote.
func writeAtomic(path string, data []byte, mode os.FileMode) (bool, error) {
	if cur, err := os.ReadFile(path); err == nil && bytes.Equal(cur, data) {
		if st, err := os.Stat(path); err == nil && st.Mode().Perm() == mode {
			return false, nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return false, err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp.Name()) // a no-op after the rename
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Close(); err != nil {
		return false, err
	}
	if err := os.Rename(tmp.Name(), path); err != nil {
		return false, fmt.Errorf("install %s: %w", path, err)
	}
	return true, nil
}

// CheckConfList checks the margay plugin's configuration in a rendered list the way
// the plugin will.
func CheckConfList(list []byte) error {
	var l struct {
		Plugins []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(list, &l); err != nil || len(l.Plugins) == 0 {
		return fmt.Errorf("the configuration list has no plugin: %v", err)
	}
	// The node name may be left to the plugin's host.
	_, err := ParseConf(l.Plugins[0], func() (string, error) { return "node", nil })
	return err
}
