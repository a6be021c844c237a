package ipam

import (
	"context"
	"encoding/json"
	"net/netip"
	"sort"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// state is the whole IPAM picture at one etcd revision, for check and show.
type state struct {
	rev        int64
	pools      []*api.IPPool
	blocks     []*versioned[Block] // sorted by address
	handles    map[string]*versioned[Handle]
	affinities []affinityEntry
	weps       map[string]wepRef // by container ID
	nodes      map[string]bool
}

// wepRef is where a pod's WorkloadEndpoint is stored, and its node.
type wepRef struct {
	key  string
	rev  int64
	node string
}

// gone reports whether node names a node that has no Node resource.
func (s *state) gone(node string) bool { return node != "" && !s.nodes[node] }

type affinityEntry struct {
	node string
	cidr netip.Prefix
	af   versioned[affinity]
}

// loadState reads everything in one transaction, so the picture is consistent.
func (a *Allocator) loadState(ctx context.Context) (*state, error) {
	resp, err := a.store.Txn(ctx, nil, []clientv3.Op{
		clientv3.OpGet(datastore.ResourcePrefix(poolKind), clientv3.WithPrefix()),
		clientv3.OpGet(datastore.BlocksPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(datastore.HandlesPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(datastore.AffinitiesPrefix, clientv3.WithPrefix()),
		clientv3.OpGet(datastore.ResourcePrefix(wepKind), clientv3.WithPrefix()),
		clientv3.OpGet(datastore.ResourcePrefix(nodeKind), clientv3.WithPrefix(), clientv3.WithKeysOnly()),
	}, nil)
	if err != nil {
		return nil, err
	}
	s := &state{rev: resp.Header.Revision, handles: map[string]*versioned[Handle]{}, weps: map[string]wepRef{}, nodes: map[string]bool{}}
	for _, kv := range resp.Responses[0].GetResponseRange().Kvs {
		p, err := decodePool(kv)
		if err != nil {
			return nil, err
		}
		s.pools = append(s.pools, p.v)
	}
	for _, kv := range resp.Responses[1].GetResponseRange().Kvs {
		b, err := decode[Block](kv)
		if err != nil {
			return nil, err
		}
		s.blocks = append(s.blocks, b)
	}
	sort.Slice(s.blocks, func(i, j int) bool { return s.blocks[i].v.CIDR.Addr().Less(s.blocks[j].v.CIDR.Addr()) })
	for _, kv := range resp.Responses[2].GetResponseRange().Kvs {
		h, err := decode[Handle](kv)
		if err != nil {
			return nil, err
		}
		s.handles[h.v.ID] = h
	}
	for _, kv := range resp.Responses[3].GetResponseRange().Kvs {
		node, cidr, af, err := decodeAffinity(kv)
		if err != nil {
			return nil, err
		}
		s.affinities = append(s.affinities, affinityEntry{node, cidr, *af})
	}
	for _, kv := range resp.Responses[4].GetResponseRange().Kvs {
		var w api.WorkloadEndpoint
		if err := json.Unmarshal(kv.Value, &w); err == nil {
			s.weps[w.Spec.ContainerID] = wepRef{key: string(kv.Key), rev: kv.ModRevision, node: w.Spec.Node}
		}
	}
	for _, kv := range resp.Responses[5].GetResponseRange().Kvs {
		s.nodes[string(kv.Key[len(datastore.ResourcePrefix(nodeKind)):])] = true
	}
	return s, nil
}
