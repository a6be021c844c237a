package agent

import (
	"context"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/test/etcdtest"
)

func newTestAgent(t *testing.T, store *datastore.Store, name, addr string) *Agent {
	return &Agent{cfg: Config{NodeName: name, DefaultPool: DefaultPoolCIDR}, store: store,
		addr: netip.MustParsePrefix(addr), log: slog.Default()}
}

// Registration: the Node is written with the address and keeps what others set
// on it; the default pool appears only in an empty datastore; another node's
// address and a live agent's name are refused with the reason.
func TestRegister(t *testing.T) {
	srv := etcdtest.StartT(t)
	store, err := datastore.New(datastore.Config{Endpoints: srv.Endpoints()})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	a := newTestAgent(t, store, "node1", "198.18.1.2/24")
	if err := a.register(ctx); err != nil {
		t.Fatal(err)
	}
	pools, err := datastore.List[*api.IPPool](ctx, store)
	if err != nil || len(pools) != 1 || pools[0].Spec.CIDR != DefaultPoolCIDR || !pools[0].Spec.NATOutgoing || pools[0].Spec.IPIPMode != api.EncapCrossSubnet {
		t.Fatalf("default pool: %v %+v", err, pools)
	}
	// Someone labels the node and makes it a reflector; a restart keeps that.
	n, _ := datastore.Get[*api.Node](ctx, store, "node1")
	n.Metadata.Labels = map[string]string{"rack": "r1"}
	n.Spec.BGP.RouteReflectorClusterID = "224.0.0.1"
	if _, err := store.Update(ctx, n); err != nil {
		t.Fatal(err)
	}
	a.cfg.AS = 65001
	if err := a.register(ctx); err != nil {
		t.Fatal(err)
	}
	n, _ = datastore.Get[*api.Node](ctx, store, "node1")
	if n.Metadata.Labels["rack"] != "r1" || n.Spec.BGP.RouteReflectorClusterID != "224.0.0.1" || n.Spec.BGP.ASNumber == nil || *n.Spec.BGP.ASNumber != 65001 ||
		n.Spec.BGP.IPv4Address != "198.18.1.2/24" {
		t.Errorf("node after re-registering: %+v %+v", n.Metadata, n.Spec.BGP)
	}
	// Under Kubernetes the Node names its k8s node; another orchestrator's
	// ref stays.
	n.Spec.OrchRefs = []api.OrchRef{{Orchestrator: "other", NodeName: "x"}}
	if _, err := store.Update(ctx, n); err != nil {
		t.Fatal(err)
	}
	a.cfg.K8sNodeRef = "node1.example"
	for range 2 { // the second pass finds it right
		if err := a.register(ctx); err != nil {
			t.Fatal(err)
		}
	}
	n, _ = datastore.Get[*api.Node](ctx, store, "node1")
	if want := []api.OrchRef{{Orchestrator: "other", NodeName: "x"}, {Orchestrator: api.OrchestratorK8s, NodeName: "node1.example"}}; !slices.Equal(n.Spec.OrchRefs, want) {
		t.Errorf("orchRefs %+v, want %+v", n.Spec.OrchRefs, want)
	}
	if pools, _ := datastore.List[*api.IPPool](ctx, store); len(pools) != 1 {
		t.Errorf("a second default pool: %d pools", len(pools))
	}
	if err := newTestAgent(t, store, "node2", "198.18.1.2/24").register(ctx); err == nil ||
		!strings.Contains(err.Error(), `node IP 198.18.1.2 is already used by node "node1"`) {
		t.Errorf("same address, another name: %v", err)
	}
	if err := newTestAgent(t, store, "node1", "198.18.1.7/24").register(ctx); err == nil ||
		!strings.Contains(err.Error(), `node name "node1" is in use by a running margay-node at 198.18.1.2`) {
		t.Errorf("same name, another host: %v", err)
	}

	// An IPv6 address is registered beside the IPv4 one, refused if another
	// node has it, and cleared when the agent runs without one.
	a.addr6 = netip.MustParsePrefix("fd00:18:1::2/64")
	if err := a.register(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ = datastore.Get[*api.Node](ctx, store, "node1"); n.Spec.BGP.IPv6Address != "fd00:18:1::2/64" || n.Spec.BGP.IPv4Address != "198.18.1.2/24" {
		t.Errorf("dual-stack node: %+v", n.Spec.BGP)
	}
	b := newTestAgent(t, store, "node3", "198.18.1.3/24")
	b.addr6 = netip.MustParsePrefix("fd00:18:1::2/64")
	if err := b.register(ctx); err == nil || !strings.Contains(err.Error(), `node IPv6 address fd00:18:1::2 is already used by node "node1"`) || !strings.Contains(err.Error(), "--ip6") {
		t.Errorf("same IPv6 address, another name: %v", err)
	}
	a.addr6 = netip.Prefix{}
	if err := a.register(ctx); err != nil {
		t.Fatal(err)
	}
	if n, _ = datastore.Get[*api.Node](ctx, store, "node1"); n.Spec.BGP.IPv6Address != "" {
		t.Errorf("node without --ip6 kept %q", n.Spec.BGP.IPv6Address)
	}
}
