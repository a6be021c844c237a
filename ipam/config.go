package ipam

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// Configure changes the cluster's IPAMConfiguration with mutate, creating it from
// the defaults if it does not exist, and retrying on concurrent updates.
func Configure(ctx context.Context, store *datastore.Store, mutate func(*api.IPAMConfigurationSpec)) (*api.IPAMConfiguration, error) {
	for attempt := range DefaultMaxAttempts {
		if err := datastore.Backoff(ctx, attempt); err != nil {
			return nil, err
		}
		cur, err := datastore.Get[*api.IPAMConfiguration](ctx, store, api.IPAMConfigName)
		var res api.Resource
		switch {
		case errors.Is(err, datastore.ErrNotFound):
			cur = api.NewIPAMConfiguration()
			mutate(&cur.Spec)
			res, err = store.Create(ctx, cur)
		case err != nil:
			return nil, err
		default:
			mutate(&cur.Spec)
			res, err = store.Update(ctx, cur)
		}
		if errors.Is(err, datastore.ErrConflict) || errors.Is(err, datastore.ErrAlreadyExists) {
			continue
		}
		if err != nil {
			return nil, err
		}
		return res.(*api.IPAMConfiguration), nil
	}
	return nil, fmt.Errorf("%w: updating the IPAM configuration", ErrContention)
}

// EnsureTunnelAddr returns the node's tunnel address for kind, assigning one from
// pools (all eligible pools if empty) when it has none. Two callers at once get the
// same address.
func (a *Allocator) EnsureTunnelAddr(ctx context.Context, node string, kind TunnelKind, pools []string) (netip.Addr, error) {
	h := TunnelHandle(kind, node)
	for range 2 {
		ips, err := a.IPsByHandle(ctx, h)
		if err != nil {
			return netip.Addr{}, err
		}
		if len(ips) > 0 {
			return ips[0].IP, nil
		}
		got, err := a.AutoAssign(ctx, AssignArgs{Handle: h, Node: node, Family: kind.Family(), Pools: pools, NewHandle: true,
			Attrs: map[string]string{"type": string(kind) + "TunnelAddress"}})
		if errors.Is(err, ErrHandleExists) {
			continue // someone else assigned it meanwhile: use theirs
		}
		if err != nil {
			return netip.Addr{}, err
		}
		return got[0].IP, nil
	}
	return netip.Addr{}, fmt.Errorf("%w: tunnel address of %s", ErrContention, node)
}
