package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// DefaultPoolName is the pool margay-node creates in an empty datastore.
const DefaultPoolName = "default-ipv4-ippool"

// register claims the node name, checks that no other node uses this address,
// writes the Node resource and, in an empty datastore, the default pool.
func (a *Agent) register(ctx context.Context) error {
	name, ip := a.cfg.NodeName, a.addr.Addr().String()
	// A live agent holds its name under an etcd lease with its address as the
	// value: the same host restarting takes it back at once, another host is
	// refused while the first one lives.
	if err := a.store.Hold(ctx, datastore.AgentsPrefix+name, ip, datastore.AgentTTL, a.log); err != nil {
		var held *datastore.HeldError
		if errors.As(err, &held) {
			return fmt.Errorf("node name %q is in use by a running margay-node at %s; give this node another --nodename, or stop that agent (a stopped agent frees the name at once, a killed one after %s)", name, held.Holder, datastore.AgentTTL)
		}
		return fmt.Errorf("register node %q: %w", name, err)
	}
	nodes, err := datastore.List[*api.Node](ctx, a.store)
	if err != nil {
		return fmt.Errorf("register node %q: %w", name, err)
	}
	if other := nodeWithIP(nodes, name, a.addr.Addr()); other != "" {
		return fmt.Errorf("node IP %s is already used by node %q; if that node is gone, delete it (margayctl delete node %s), otherwise give this node its own address with --ip", ip, other, other)
	}
	if a.addr6.IsValid() {
		if other := nodeWithIP(nodes, name, a.addr6.Addr()); other != "" {
			return fmt.Errorf("node IPv6 address %s is already used by node %q; if that node is gone, delete it (margayctl delete node %s), otherwise give this node its own address with --ip6", a.addr6.Addr(), other, other)
		}
	}
	for attempt := 0; ; attempt++ {
		err = a.putNode(ctx)
		if err == nil || !errors.Is(err, datastore.ErrConflict) && !errors.Is(err, datastore.ErrAlreadyExists) || attempt == 5 {
			break
		}
		time.Sleep(time.Duration(attempt+1) * 50 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("register node %q: %w", name, err)
	}
	return a.ensureDefaultPool(ctx)
}

// nodeWithIP names another node whose BGP address (of ip's family) is ip, or "".
func nodeWithIP(nodes []*api.Node, self string, ip netip.Addr) string {
	for _, n := range nodes {
		if n.Metadata.Name == self {
			continue
		}
		addr := n.BGPAddress
		if ip.Is6() {
			addr = n.BGPAddressV6
		}
		if p, err := addr(); err == nil && p.IsValid() && p.Addr() == ip {
			return n.Metadata.Name
		}
	}
	return ""
}

// putNode creates the Node or updates its address and AS, keeping the rest.
func (a *Agent) putNode(ctx context.Context) error {
	n, err := datastore.Get[*api.Node](ctx, a.store, a.cfg.NodeName)
	create := errors.Is(err, datastore.ErrNotFound)
	if err != nil && !create {
		return err
	}
	if create {
		n = api.NewNode(a.cfg.NodeName)
	}
	if n.Spec.BGP == nil {
		n.Spec.BGP = &api.NodeBGPSpec{}
	}
	before := *n.Spec.BGP
	n.Spec.BGP.IPv4Address = a.addr.String()
	n.Spec.BGP.IPv6Address = ""
	if a.addr6.IsValid() {
		n.Spec.BGP.IPv6Address = a.addr6.String()
	}
	if a.cfg.AS != 0 {
		as := a.cfg.AS
		n.Spec.BGP.ASNumber = &as
	}
	refChanged := a.cfg.K8sNodeRef != "" && n.K8sNodeName() != a.cfg.K8sNodeRef
	if refChanged {
		n.Spec.OrchRefs = slices.DeleteFunc(n.Spec.OrchRefs, func(r api.OrchRef) bool { return r.Orchestrator == api.OrchestratorK8s })
		n.Spec.OrchRefs = append(n.Spec.OrchRefs, api.OrchRef{Orchestrator: api.OrchestratorK8s, NodeName: a.cfg.K8sNodeRef})
	}
	if create {
		_, err = a.store.Create(ctx, n)
		return err
	}
	if !refChanged && before.IPv4Address == n.Spec.BGP.IPv4Address && before.IPv6Address == n.Spec.BGP.IPv6Address && (a.cfg.AS == 0 || before.ASNumber != nil && *before.ASNumber == a.cfg.AS) {
		return nil
	}
	_, err = a.store.Update(ctx, n)
	return err
}

// ensureDefaultPool creates the default pool when there is no pool at all. Two
// nodes starting at once may both try; the loser's create fails harmlessly.
func (a *Agent) ensureDefaultPool(ctx context.Context) error {
	if a.cfg.DefaultPool == "" {
		return nil
	}
	pools, err := datastore.List[*api.IPPool](ctx, a.store)
	if err != nil || len(pools) > 0 {
		return err
	}
	p := api.NewIPPool(DefaultPoolName)
	p.Spec = api.IPPoolSpec{CIDR: a.cfg.DefaultPool, NATOutgoing: true, IPIPMode: api.EncapCrossSubnet}
	if _, err := a.store.Create(ctx, p); err != nil {
		if errors.Is(err, datastore.ErrAlreadyExists) {
			return nil
		}
		var ve *api.ValidationError
		if errors.As(err, &ve) {
			return fmt.Errorf("--default-ipv4-pool %s: %w", a.cfg.DefaultPool, err)
		}
		return err
	}
	a.log.Info("created the default pool", "pool", DefaultPoolName, "cidr", a.cfg.DefaultPool)
	return nil
}
