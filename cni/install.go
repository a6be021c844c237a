package cni

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
)

// InstallOptions say what to install where.
type InstallOptions struct {
	SrcDir   string   // where the margay and margay-ipam binaries are
	BinDir   string   // the CNI bin dir, /opt/cni/bin
	ConfDir  string   // the CNI conf dir, /etc/cni/net.d
	ConfName string   // default 10-margay.conflist
	Plugins  []string // binaries to copy; default margay and margay-ipam
	// TLSDir, if set, receives copies of the etcd TLS files that Conf names (as
	// etcd-ca, etcd-cert and etcd-key), and the configuration names the copies: the
	// plugin runs on the host, which cannot see a Secret mounted into an installer's
	// container.
	TLSDir string
	// Template, if set, is the configuration list to write, with the placeholders
	// of RenderTemplate filled in from Conf; otherwise ConfList(Conf) is written.
	Template []byte
	// Kubeconfig, if set, gives the plugin on the host the installer's API
	// access: Install writes a kubeconfig with it to ConfDir/margay-kubeconfig,
	// which the configuration names (kubernetes.kubeconfig).
	Kubeconfig *KubeconfigSource
	// Conf is the margay plugin's configuration; Type and CNIVersion are filled in.
	Conf NetConf
}

// KubeconfigSource is what the plugin's kubeconfig is made of: the API
// server's URL, and a directory with a service account's token and the
// cluster's CA (token and ca.crt, as in a service-account-token Secret or a
// pod's /var/run/secrets/kubernetes.io/serviceaccount).
type KubeconfigSource struct {
	Server   string
	TokenDir string
}

// KubeconfigName is the file Install writes a KubeconfigSource to, in ConfDir.
const KubeconfigName = "margay-kubeconfig"

// kubeconfig renders the kubeconfig, with the token and CA inline.
func (k *KubeconfigSource) kubeconfig() ([]byte, error) {
	if k.Server == "" {
		return nil, errors.New("no API server URL for the plugin's kubeconfig: set KUBERNETES_SERVICE_HOST and KUBERNETES_SERVICE_PORT or --kubernetes-server")
	}
	token, err := os.ReadFile(filepath.Join(k.TokenDir, "token"))
	if err != nil {
		return nil, fmt.Errorf("the plugin's kubeconfig: %w", err)
	}
	ca, err := os.ReadFile(filepath.Join(k.TokenDir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("the plugin's kubeconfig: %w", err)
	}
	// An unfilled Secret mounts as empty files (see Install).
	if len(bytes.TrimSpace(token)) == 0 || len(ca) == 0 {
		return nil, fmt.Errorf("the plugin's kubeconfig: %s has an empty token or ca.crt", k.TokenDir)
	}
	c := clientcmdapi.NewConfig()
	c.Clusters["kubernetes"] = &clientcmdapi.Cluster{Server: k.Server, CertificateAuthorityData: ca}
	c.AuthInfos["margay-cni"] = &clientcmdapi.AuthInfo{Token: string(bytes.TrimSpace(token))}
	c.Contexts["margay-cni"] = &clientcmdapi.Context{Cluster: "kubernetes", AuthInfo: "margay-cni"}
	c.CurrentContext = "margay-cni"
	return clientcmd.Write(*c)
}

// fileCopy is one file Install copies: a plugin, or an etcd TLS file.
type fileCopy struct {
	src, dst string
	mode     os.FileMode
}

// plan returns the configuration as the plugin will see it on the host, and the
// TLS files to copy for that.
func (o InstallOptions) plan() (NetConf, []fileCopy) {
	c := o.Conf
	if o.Kubeconfig != nil {
		c.Kubernetes.Kubeconfig = filepath.Join(o.ConfDir, KubeconfigName)
	}
	if o.TLSDir == "" {
		return c, nil
	}
	var copies []fileCopy
	for _, f := range []struct {
		path *string
		name string
		mode os.FileMode
	}{{&c.EtcdCACertFile, "etcd-ca", 0o644}, {&c.EtcdCertFile, "etcd-cert", 0o644}, {&c.EtcdKeyFile, "etcd-key", 0o600}} {
		if *f.path != "" {
			dst := filepath.Join(o.TLSDir, f.name)
			copies = append(copies, fileCopy{*f.path, dst, f.mode})
			*f.path = dst
		}
	}
	return c, copies
}

// Render returns the configuration list Install would write, checked as the
// plugin will check it. It touches nothing, so an installer can refuse a bad
// configuration before it changes the node.
func (o InstallOptions) Render() ([]byte, error) {
	c, _ := o.plan()
	var list []byte
	var err error
	if o.Template != nil {
		list, err = RenderTemplate(o.Template, c)
	} else {
		list, err = ConfList(c)
	}
	if err != nil {
		return nil, err
	}
	if err := CheckConfList(list); err != nil {
		return nil, err
	}
	return list, nil
}

// Install copies the plugins (and, with TLSDir, the etcd TLS files) into place and
// then writes the network configuration list into the CNI conf dir. Each file is
// written to a temporary name and renamed, so kubelet never sees half a file, and
// a file whose content is already right is left alone. It returns the paths it
// changed. Nothing is written if the configuration is one the plugin would refuse.
func Install(o InstallOptions) ([]string, error) {
	if o.ConfName == "" {
		o.ConfName = "10-margay.conflist"
	}
	if len(o.Plugins) == 0 {
		o.Plugins = []string{"margay", "margay-ipam"}
	}
	conflist, err := o.Render()
	if err != nil {
		return nil, err
	}
	copies := make([]fileCopy, 0, len(o.Plugins))
	for _, p := range o.Plugins {
		copies = append(copies, fileCopy{filepath.Join(o.SrcDir, p), filepath.Join(o.BinDir, p), 0o755})
	}
	_, tls := o.plan()
	var changed []string
	for _, c := range append(copies, tls...) {
		data, err := os.ReadFile(c.src)
		if err != nil {
			return changed, fmt.Errorf("install %s: %w", c.dst, err)
		}
		// An unfilled Secret mounts as empty files: stop here, while the node
		// is still not ready, rather than let every pod's ADD fail.
		if len(data) == 0 {
			return changed, fmt.Errorf("install %s: %s is empty", c.dst, c.src)
		}
		did, err := writeAtomic(c.dst, data, c.mode)
		if err != nil {
			return changed, err
		}
		if did {
			changed = append(changed, c.dst)
		}
	}
	if o.Kubeconfig != nil {
		data, err := o.Kubeconfig.kubeconfig()
		if err != nil {
			return changed, err
		}
		dst := filepath.Join(o.ConfDir, KubeconfigName)
		did, err := writeAtomic(dst, data, 0o600)
		if err != nil {
			return changed, err
		}
		if did {
			changed = append(changed, dst)
		}
	}
	// The configuration goes last: the container runtime reports the node's
	// network ready as soon as a configuration exists, and kubelet then starts
	// pods, so the plugin and its files must already be there.
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

// CheckConfList checks a configuration list the way libcni and the margay plugin
// will: a name, a cniVersion margay speaks, and margay first with a configuration
// it accepts.
func CheckConfList(list []byte) error {
	var l struct {
		Name       string            `json:"name"`
		CNIVersion string            `json:"cniVersion"`
		Plugins    []json.RawMessage `json:"plugins"`
	}
	if err := json.Unmarshal(list, &l); err != nil {
		return fmt.Errorf("not a configuration list: %w", atLine(list, err))
	}
	switch {
	case l.Name == "":
		return errors.New("the configuration list has no name")
	case !slices.Contains(SupportedVersions.SupportedVersions(), l.CNIVersion):
		return fmt.Errorf("cniVersion %q: margay speaks %s", l.CNIVersion, strings.Join(SupportedVersions.SupportedVersions(), ", "))
	case len(l.Plugins) == 0:
		return errors.New("the configuration list has no plugins")
	}
	// margay must come first: it makes the pod's interface, and chained plugins
	// such as portmap work on its result.
	var first struct {
		Type string `json:"type"`
	}
	if err := json.Unmarshal(l.Plugins[0], &first); err != nil || first.Type != "margay" {
		return fmt.Errorf("the first plugin's type is %q, not margay", first.Type)
	}
	// The node name may be left to the plugin's host.
	_, err := ParseConf(l.Plugins[0], func() (string, error) { return "node", nil })
	return err
}

// atLine adds the line of a JSON decoding error, which encoding/json gives only as
// a byte offset.
func atLine(data []byte, err error) error {
	var syntax *json.SyntaxError
	var typ *json.UnmarshalTypeError
	off := int64(-1)
	switch {
	case errors.As(err, &syntax):
		off = syntax.Offset
	case errors.As(err, &typ):
		off = typ.Offset
	}
	if off < 0 || off > int64(len(data)) {
		return err
	}
	return fmt.Errorf("line %d: %w", 1+bytes.Count(data[:off], []byte("\n")), err)
}

// placeholder matches what RenderTemplate substitutes, and anything else that
// looks like a placeholder, so that a misspelt or foreign one (such as Calico's
// __KUBERNETES_NODE_NAME__) is reported instead of reaching the plugin.
var placeholder = regexp.MustCompile(`__[A-Z0-9]+(?:_[A-Z0-9]+)*__`)

// RenderTemplate fills the placeholders of a configuration list template, as
// Calico's install-cni does with CNI_NETWORK_CONFIG, from c: __ETCD_ENDPOINTS__,
// __ETCD_CA_CERT_FILE__, __ETCD_CERT_FILE__, __ETCD_KEY_FILE__, __NODENAME__,
// __MTU_FILE__, __LOG_LEVEL__, __LOG_FILE_PATH__ and __KUBECONFIG_FILEPATH__ (as
// Calico's) go inside JSON strings and are escaped for
// them; __MTU__ is a bare number ("mtu": __MTU__). Any other __WORD__ is an error.
// The result is not checked: see CheckConfList.
func RenderTemplate(tmpl []byte, c NetConf) ([]byte, error) {
	str := func(s string) []byte {
		b, _ := json.Marshal(s) // a string always marshals
		return b[1 : len(b)-1]
	}
	values := map[string][]byte{
		"__ETCD_ENDPOINTS__":      str(c.EtcdEndpoints),
		"__ETCD_CA_CERT_FILE__":   str(c.EtcdCACertFile),
		"__ETCD_CERT_FILE__":      str(c.EtcdCertFile),
		"__ETCD_KEY_FILE__":       str(c.EtcdKeyFile),
		"__NODENAME__":            str(c.Nodename),
		"__MTU__":                 []byte(strconv.Itoa(c.MTU)),
		"__MTU_FILE__":            str(c.MTUFile),
		"__LOG_LEVEL__":           str(c.LogLevel),
		"__LOG_FILE_PATH__":       str(c.LogFilePath),
		"__KUBECONFIG_FILEPATH__": str(c.Kubernetes.Kubeconfig),
	}
	var unknown []string
	out := placeholder.ReplaceAllFunc(tmpl, func(m []byte) []byte {
		v, ok := values[string(m)]
		if !ok {
			unknown = append(unknown, string(m))
			return m
		}
		return v
	})
	if unknown != nil {
		slices.Sort(unknown)
		return nil, fmt.Errorf("unknown placeholder %s; known: %s", strings.Join(slices.Compact(unknown), ", "),
			strings.Join(slices.Sorted(maps.Keys(values)), ", "))
	}
	return out, nil
}
