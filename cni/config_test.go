package cni

import (
	"errors"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"

	"github.com/margay-dev/margay/ipam"
)

func hostname() (string, error) { return "node-a", nil }

func TestParseConf(t *testing.T) {
	c, err := ParseConf([]byte(`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"margay",
		"etcd_endpoints":"http://10.0.0.1:2379, http://10.0.0.2:2379","mtu":1440,"log_level":"debug",
		"ipam":{"type":"margay-ipam","ipv4_pools":["default-ipv4-ippool"]}}`), hostname)
	if err != nil {
		t.Fatal(err)
	}
	if c.Nodename != "node-a" || c.MTU != 1440 || c.IPAM.Type != "margay-ipam" || len(c.IPAM.IPv4Pools) != 1 {
		t.Errorf("parsed %+v", c)
	}
	ds := c.Datastore()
	if len(ds.Endpoints) != 2 || ds.Endpoints[1] != "http://10.0.0.2:2379" || ds.RequestTimeout != DefaultTimeout {
		t.Errorf("datastore config %+v", ds)
	}
	c, _ = ParseConf([]byte(`{"type":"margay","etcd_endpoints":"http://e:2379","nodename":"n1","timeout_seconds":3}`), hostname)
	if c.Nodename != "n1" || c.Timeout() != 3*time.Second {
		t.Errorf("explicit nodename and timeout: %+v", c)
	}
}

func TestIPAMFamilies(t *testing.T) {
	for _, tc := range []struct {
		ipam string
		want []ipam.FamilyPools
	}{
		{`{}`, []ipam.FamilyPools{{Family: ipam.IPv4}}},
		{`{"ipv4_pools":["a"]}`, []ipam.FamilyPools{{Family: ipam.IPv4, Pools: []string{"a"}}}},
		{`{"assign_ipv6":"true"}`, []ipam.FamilyPools{{Family: ipam.IPv4}, {Family: ipam.IPv6}}},
		{`{"assign_ipv4":"true","assign_ipv6":"true","ipv4_pools":["a"],"ipv6_pools":["fd00::/48","b6"]}`,
			[]ipam.FamilyPools{{Family: ipam.IPv4, Pools: []string{"a"}}, {Family: ipam.IPv6, Pools: []string{"fd00::/48", "b6"}}}},
		{`{"assign_ipv4":"false","assign_ipv6":"true"}`, []ipam.FamilyPools{{Family: ipam.IPv6}}},
		{`{"assign_ipv6":"false"}`, []ipam.FamilyPools{{Family: ipam.IPv4}}},
	} {
		c, err := ParseConf([]byte(`{"type":"margay","etcd_endpoints":"http://e","nodename":"n","ipam":`+tc.ipam+`}`), hostname)
		if err != nil {
			t.Errorf("%s: %v", tc.ipam, err)
			continue
		}
		if got := c.IPAM.Families(); !slices.EqualFunc(got, tc.want, func(x, y ipam.FamilyPools) bool { return x.Family == y.Family && slices.Equal(x.Pools, y.Pools) }) {
			t.Errorf("%s: families %+v, want %+v", tc.ipam, got, tc.want)
		}
	}
}

func TestParseConfErrors(t *testing.T) {
	cases := []struct {
		name, conf string
		code       uint
		frag       string
	}{
		{"not json", `{`, types.ErrDecodingFailure, "cannot decode"},
		{"no etcd", `{"type":"margay","nodename":"n"}`, types.ErrInvalidNetworkConfig, "etcd_endpoints: required"},
		{"blank etcd", `{"type":"margay","etcd_endpoints":" , ","nodename":"n"}`, types.ErrInvalidNetworkConfig, "etcd_endpoints"},
		{"slash in node", `{"type":"margay","etcd_endpoints":"http://e","nodename":"a/b"}`, types.ErrInvalidNetworkConfig, "nodename"},
		{"mtu", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","mtu":100}`, types.ErrInvalidNetworkConfig, "mtu: 100 is out of range"},
		{"mtu_file", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","mtu_file":"mtu"}`, types.ErrInvalidNetworkConfig, `mtu_file: "mtu" is not an absolute path`},
		{"timeout", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","timeout_seconds":-1}`, types.ErrInvalidNetworkConfig, "timeout_seconds"},
		{"cert without key", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","etcd_cert_file":"/c"}`, types.ErrInvalidNetworkConfig, "etcd_key_file"},
		{"log level", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","log_level":"loud"}`, types.ErrInvalidNetworkConfig, "log_level"},
		{"no type", `{"etcd_endpoints":"http://e","nodename":"n"}`, types.ErrInvalidNetworkConfig, "type: required"},
		{"endpoint not a URL", `{"type":"margay","etcd_endpoints":"10.0.0.1:2379","nodename":"n"}`, types.ErrInvalidNetworkConfig, "is not an http:// or https:// URL"},
		{"wrong type", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","mtu":"big"}`, types.ErrDecodingFailure, "cannot decode"},
		{"assign_ipv6 not a flag", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","ipam":{"assign_ipv6":"yes"}}`, types.ErrInvalidNetworkConfig, `ipam.assign_ipv6: "yes": use "true" or "false"`},
		{"assign_ipv4 bool", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","ipam":{"assign_ipv4":false}}`, types.ErrDecodingFailure, "cannot decode"},
		{"no family", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","ipam":{"assign_ipv4":"false"}}`, types.ErrInvalidNetworkConfig, "the pod would get no address"},
		{"v6 pools without v6", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","ipam":{"ipv6_pools":["p6"]}}`, types.ErrInvalidNetworkConfig, `ipam.ipv6_pools: is set but assign_ipv6 is not "true"`},
		{"v4 pools without v4", `{"type":"margay","etcd_endpoints":"http://e","nodename":"n","ipam":{"assign_ipv4":"false","assign_ipv6":"true","ipv4_pools":["p"]}}`, types.ErrInvalidNetworkConfig, `ipam.ipv4_pools: is set but assign_ipv4 is "false"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConf([]byte(tc.conf), hostname)
			var te *types.Error
			if !errors.As(err, &te) || te.Code != tc.code || !strings.Contains(te.Msg, tc.frag) {
				t.Errorf("err = %#v, want code %d with %q", err, tc.code, tc.frag)
			}
		})
	}
	_, err := ParseConf([]byte(`{"type":"margay","etcd_endpoints":"http://e"}`), func() (string, error) { return "", errors.New("no uts") })
	var te *types.Error
	if !errors.As(err, &te) || te.Code != types.ErrInvalidNetworkConfig || !strings.Contains(te.Msg, "nodename") {
		t.Errorf("no hostname: err = %v", err)
	}
}

func FuzzParseConf(f *testing.F) {
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"margay","etcd_endpoints":"http://127.0.0.1:2379","nodename":"n","ipam":{"type":"margay-ipam","ipv4_pools":["p"]}}`))
	f.Add([]byte(`{"type":"margay","etcd_endpoints":"http://a,https://b","mtu":1500,"prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.0.0.1/32"}]}}`))
	f.Add([]byte(`{"type":"margay","etcd_endpoints":"http://a","ipam":{"type":"margay-ipam","assign_ipv4":"false","assign_ipv6":"true","ipv6_pools":["fd00::/48"]}}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConf(data, hostname)
		if err != nil {
			var te *types.Error
			if !errors.As(err, &te) || te.Code == 0 {
				t.Fatalf("error %v is not a CNI error with a code", err)
			}
			return
		}
		if len(c.Datastore().Endpoints) == 0 || c.Nodename == "" || c.Timeout() <= 0 || len(c.IPAM.Families()) == 0 {
			t.Fatalf("accepted an unusable configuration: %+v", c)
		}
	})
}

func TestPodMTU(t *testing.T) {
	file := func(want, content string, err error) func(string) ([]byte, error) {
		return func(p string) ([]byte, error) {
			if p != want {
				t.Errorf("read %s, want %s", p, want)
			}
			return []byte(content), err
		}
	}
	for _, tc := range []struct {
		name    string
		mtu     int
		mtuFile string
		read    func(string) ([]byte, error)
		want    int
		err     string
	}{
		{"the configuration wins", 1400, "", file(DefaultMTUFile, "1450\n", nil), 1400, ""},
		{"the agent's file", 0, "", file(DefaultMTUFile, "1450\n", nil), 1450, ""},
		{"the agent's file elsewhere", 0, "/run/margay/mtu", file("/run/margay/mtu", "1430\n", nil), 1430, ""},
		{"no file yet: try again later", 0, "", file(DefaultMTUFile, "", os.ErrNotExist), 0, "the pod MTU is not known yet: margay-node writes it to " + DefaultMTUFile},
		{"no file yet elsewhere", 0, "/run/margay/mtu", file("/run/margay/mtu", "", os.ErrNotExist), 0, "writes it to /run/margay/mtu"},
		{"garbage", 0, "", file(DefaultMTUFile, "big", nil), 0, `holds "big"`},
		{"too small", 0, "", file(DefaultMTUFile, "100", nil), 0, "not an MTU from 576"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := podMTU(&NetConf{MTU: tc.mtu, MTUFile: tc.mtuFile}, tc.read)
			if got != tc.want || (err == nil) != (tc.err == "") || err != nil && !strings.Contains(err.Error(), tc.err) {
				t.Errorf("podMTU = %d, %v; want %d, %q", got, err, tc.want, tc.err)
			}
		})
	}
}
