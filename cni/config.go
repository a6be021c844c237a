// Package cni holds margay's CNI plugins: the configuration they read, and the
// logic of the margay-ipam plugin.
package cni

import (
	"encoding/json"
	"fmt"
	"net/url"
	"path/filepath"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
)

// DefaultTimeout bounds a whole plugin invocation, so an unreachable etcd fails the
// call instead of hanging kubelet.
const DefaultTimeout = 10 * time.Second

// NetConf is the network configuration on stdin, with Calico's field names so that
// configurations port over.
type NetConf struct {
	types.PluginConf
	EtcdEndpoints  string `json:"etcd_endpoints"`
	EtcdKeyFile    string `json:"etcd_key_file,omitempty"`
	EtcdCertFile   string `json:"etcd_cert_file,omitempty"`
	EtcdCACertFile string `json:"etcd_ca_cert_file,omitempty"`
	Nodename       string `json:"nodename,omitempty"`
	MTU            int    `json:"mtu,omitempty"`
	// MTUFile is where margay-node writes the pod MTU (its --mtu-file);
	// default DefaultMTUFile.
	MTUFile     string `json:"mtu_file,omitempty"`
	LogLevel    string `json:"log_level,omitempty"`
	LogFilePath string `json:"log_file_path,omitempty"`
	// TimeoutSeconds bounds each invocation (default 10).
	TimeoutSeconds int      `json:"timeout_seconds,omitempty"`
	IPAM           IPAMConf `json:"ipam"`
	// Kubernetes, with a kubeconfig, lets ADD label the pod's endpoint from
	// the API server, so that policy selects the pod from its first packet.
	Kubernetes KubernetesConf `json:"kubernetes,omitzero"`
}

// KubernetesConf is the "kubernetes" section, as Calico's.
type KubernetesConf struct {
	Kubeconfig string `json:"kubeconfig,omitempty"`
}

// IPAMConf is the "ipam" section, with Calico's keys.
type IPAMConf struct {
	Type string `json:"type"`
	// AssignIPv4 and AssignIPv6 are "true" or "false" (strings, as in Calico):
	// whether the pod gets an address of the family. Default: IPv4 only.
	AssignIPv4 string `json:"assign_ipv4,omitempty"`
	AssignIPv6 string `json:"assign_ipv6,omitempty"`
	// IPv4Pools and IPv6Pools restrict assignment to these pools (names or
	// CIDRs), in order.
	IPv4Pools []string `json:"ipv4_pools,omitempty"`
	IPv6Pools []string `json:"ipv6_pools,omitempty"`
}

// Families is what the pod is to get: one address of each family, from its pools.
// Only meaningful on a parsed configuration.
func (c *IPAMConf) Families() []ipam.FamilyPools {
	var out []ipam.FamilyPools
	if c.AssignIPv4 != "false" {
		out = append(out, ipam.FamilyPools{Family: ipam.IPv4, Pools: c.IPv4Pools})
	}
	if c.AssignIPv6 == "true" {
		out = append(out, ipam.FamilyPools{Family: ipam.IPv6, Pools: c.IPv6Pools})
	}
	return out
}

// check refuses flags other than "true" and "false", no family at all, and pools
// of a family that is not assigned, which would otherwise be ignored silently.
func (c *IPAMConf) check() *types.Error {
	for _, f := range []struct{ key, v string }{{"assign_ipv4", c.AssignIPv4}, {"assign_ipv6", c.AssignIPv6}} {
		if f.v != "" && f.v != "true" && f.v != "false" {
			return invalid("ipam."+f.key, "%q: use \"true\" or \"false\"", f.v)
		}
	}
	switch {
	case c.AssignIPv4 == "false" && c.AssignIPv6 != "true":
		return invalid("ipam.assign_ipv4", "is \"false\" and assign_ipv6 is not \"true\": the pod would get no address")
	case c.AssignIPv4 == "false" && len(c.IPv4Pools) > 0:
		return invalid("ipam.ipv4_pools", "is set but assign_ipv4 is \"false\"; remove one of them")
	case c.AssignIPv6 != "true" && len(c.IPv6Pools) > 0:
		return invalid("ipam.ipv6_pools", "is set but assign_ipv6 is not \"true\"; set \"assign_ipv6\": \"true\" for dual-stack pods")
	}
	return nil
}

// Timeout is the bound on one invocation.
func (c *NetConf) Timeout() time.Duration {
	if c.TimeoutSeconds == 0 {
		return DefaultTimeout
	}
	return time.Duration(c.TimeoutSeconds) * time.Second
}

// Datastore returns how to reach etcd. Each request may take the whole invocation's
// timeout: the invocation's context bounds the total.
func (c *NetConf) Datastore() datastore.Config {
	var eps []string
	for _, e := range strings.Split(c.EtcdEndpoints, ",") {
		if e = strings.TrimSpace(e); e != "" {
			eps = append(eps, e)
		}
	}
	return datastore.Config{Endpoints: eps, CAFile: c.EtcdCACertFile, CertFile: c.EtcdCertFile,
		KeyFile: c.EtcdKeyFile, RequestTimeout: c.Timeout()}
}

// invalid is the CNI error for a bad configuration (code 7), naming the field.
func invalid(field, format string, args ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("invalid network configuration: %s: %s", field, fmt.Sprintf(format, args...)), "")
}

// ParseConf decodes and checks the configuration. hostname supplies the default
// node name.
func ParseConf(stdin []byte, hostname func() (string, error)) (*NetConf, error) {
	c := &NetConf{}
	if err := json.Unmarshal(stdin, c); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "cannot decode the network configuration", err.Error())
	}
	if c.Nodename == "" {
		h, err := hostname()
		if err != nil || h == "" {
			return nil, invalid("nodename", "not set, and the hostname is unknown (%v)", err)
		}
		c.Nodename = h
	}
	for _, e := range c.Datastore().Endpoints {
		if u, err := url.Parse(e); err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return nil, invalid("etcd_endpoints", "%q is not an http:// or https:// URL", e)
		}
	}
	switch {
	case c.Type == "":
		return nil, invalid("type", "required")
	case c.Datastore().Endpoints == nil:
		return nil, invalid("etcd_endpoints", "required, for example \"https://10.0.0.1:2379\"")
	case strings.Contains(c.Nodename, "/"):
		return nil, invalid("nodename", "%q must not contain '/'", c.Nodename)
	case c.MTU != 0 && (c.MTU < 576 || c.MTU > 65535):
		return nil, invalid("mtu", "%d is out of range; use 0 (detect) or 576 to 65535", c.MTU)
	case c.MTUFile != "" && !filepath.IsAbs(c.MTUFile):
		return nil, invalid("mtu_file", "%q is not an absolute path", c.MTUFile)
	case c.TimeoutSeconds < 0:
		return nil, invalid("timeout_seconds", "%d must be positive", c.TimeoutSeconds)
	case (c.EtcdCertFile == "") != (c.EtcdKeyFile == ""):
		return nil, invalid("etcd_cert_file", "give both etcd_cert_file and etcd_key_file, or neither")
	case c.Kubernetes.Kubeconfig != "" && !filepath.IsAbs(c.Kubernetes.Kubeconfig):
		return nil, invalid("kubernetes.kubeconfig", "%q is not an absolute path", c.Kubernetes.Kubeconfig)
	}
	if err := c.IPAM.check(); err != nil {
		return nil, err
	}
	switch strings.ToLower(c.LogLevel) {
	case "", "debug", "info", "warn", "error":
	default:
		return nil, invalid("log_level", "%q: use debug, info, warn or error", c.LogLevel)
	}
	return c, nil
}
