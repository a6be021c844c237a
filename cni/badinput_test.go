package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/nstest"
)

// Bad input to ADD gets the spec's error code and a message naming the problem,
// and changes nothing.
func TestPluginBadInput(t *testing.T) {
	r := newRuntime(t, "1.0.0")
	p := nstest.New(t, "pod")
	good := fmt.Sprintf(`{"cniVersion":"1.0.0","name":"k8s-pod-network","type":"margay","etcd_endpoints":%q,"nodename":"node-a","mtu":1500,"ipam":{"type":"margay-ipam"}}`, r.etcd)
	cases := []struct {
		name, conf, netns, ifname string
		code                      uint
		frag                      string
	}{
		{"malformed JSON", `{"cniVersion": "1.0.0", "type": "margay"`, p.Path, "eth0", types.ErrDecodingFailure, "unexpected end of JSON input"},
		{"missing type", strings.Replace(good, `"type":"margay",`, "", 1), p.Path, "eth0", types.ErrInvalidNetworkConfig, "type: required"},
		{"unknown cniVersion", strings.Replace(good, `"cniVersion":"1.0.0"`, `"cniVersion":"9.9.9"`, 1), p.Path, "eth0", types.ErrIncompatibleCNIVersion, "9.9.9"},
		{"bad etcd_endpoints", strings.Replace(good, r.etcd, "etcd.example:2379", 1), p.Path, "eth0", types.ErrInvalidNetworkConfig, "etcd_endpoints"},
		{"missing CNI_NETNS", good, "", "eth0", types.ErrInvalidEnvironmentVariables, "CNI_NETNS"},
		{"interface name too long", good, p.Path, "eth0-far-too-long", types.ErrInvalidEnvironmentVariables, "too long"},
		// Refused before any address is assigned: skel itself checks only after ADD.
		{"CNI_NETNS is the plugin's own", good, r.node.Path, "eth0", types.ErrInvalidNetNS, "is the plugin's own network namespace"},
	}
	// Before margay-node has written the pod MTU, ADD asks to be retried.
	if _, err := os.Stat(DefaultMTUFile); errors.Is(err, os.ErrNotExist) {
		cases = append(cases, struct {
			name, conf, netns, ifname string
			code                      uint
			frag                      string
		}{"no pod MTU yet", strings.Replace(good, `"mtu":1500,`, "", 1), p.Path, "eth0", types.ErrTryAgainLater, "the pod MTU is not known yet"})
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			args := &invoke.Args{Command: "ADD", ContainerID: "cid-bad", NetNS: tc.netns, IfName: tc.ifname, Path: binDir}
			err := r.node.Do(func() error {
				_, err := invoke.ExecPluginWithResult(context.Background(), filepath.Join(binDir, "margay"), []byte(tc.conf), args, nil)
				return err
			})
			if cniCode(err) != tc.code || !strings.Contains(err.Error(), tc.frag) {
				t.Errorf("err = %v (code %d), want code %d mentioning %q", err, cniCode(err), tc.code, tc.frag)
			}
		})
	}
	if out := r.node.MustRun(t, "ip", "-o", "link", "show"); strings.Contains(out, ": mgy") {
		t.Errorf("bad input left a veth: %s", out)
	}
	var pools []ipam.PoolUsage
	if out, err := r.ctl("ipam", "show", "-o", "json"); err != nil || json.Unmarshal([]byte(out), &pools) != nil || pools[0].InUse != 0 {
		t.Errorf("bad input left addresses in use: %v: %s", err, out)
	}
	if out, err := r.ctl("ipam", "check", "--grace", "0s"); err != nil {
		t.Errorf("ipam check after bad input: %v: %s", err, out)
	}
}
