package datastore

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/api"
)

// maxValidationRetries bounds the retries of a pool write whose overlap check raced
// with another pool write.
const maxValidationRetries = 10

// Backoff sleeps before retry attempt n (from 0) of a compare-and-swap: not
// at all for the first conflicts, then a jittered, growing pause so that
// writers which collided spread out instead of colliding again in step.
func Backoff(ctx context.Context, n int) error {
	if n < 2 {
		return ctx.Err()
	}
	d := time.Duration(rand.Int64N(int64(min(time.Millisecond<<min(n, 7), 100*time.Millisecond))))
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}

func describe(k api.KindInfo, name string) string { return fmt.Sprintf("%s %q", k.Kind, name) }

func encode(r api.Resource) ([]byte, error) {
	// The resourceVersion lives in etcd's ModRevision, not in the value.
	m := r.GetMetadata()
	rv := m.ResourceVersion
	m.ResourceVersion = ""
	defer func() { m.ResourceVersion = rv }()
	return json.Marshal(r)
}

func decodeKV(k api.KindInfo, value []byte, modRev int64) (api.Resource, error) {
	r := k.New()
	if err := json.Unmarshal(value, r); err != nil {
		return nil, fmt.Errorf("stored %s is corrupt: %w", k.Kind, err)
	}
	r.SetDefaults()
	r.GetMetadata().ResourceVersion = strconv.FormatInt(modRev, 10)
	return r, nil
}

// GetResource reads one resource.
func (s *Store) GetResource(ctx context.Context, k api.KindInfo, name string) (api.Resource, error) {
	resp, err := s.Get(ctx, ResourceKey(k, name))
	if err != nil {
		return nil, err
	}
	if len(resp.Kvs) == 0 {
		return nil, &NotFoundError{What: describe(k, name)}
	}
	return decodeKV(k, resp.Kvs[0].Value, resp.Kvs[0].ModRevision)
}

// ListResources reads every resource of a kind, sorted by name, and the revision of
// the read.
func (s *Store) ListResources(ctx context.Context, k api.KindInfo) ([]api.Resource, int64, error) {
	resp, err := s.Get(ctx, ResourcePrefix(k), clientv3.WithPrefix(), clientv3.WithSort(clientv3.SortByKey, clientv3.SortAscend))
	if err != nil {
		return nil, 0, err
	}
	out := make([]api.Resource, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		r, err := decodeKV(k, kv.Value, kv.ModRevision)
		if err != nil {
			return nil, 0, fmt.Errorf("%s: %w", kv.Key, err)
		}
		out = append(out, r)
	}
	return out, resp.Header.Revision, nil
}

// Create stores a new resource after validating it. It fails with ErrAlreadyExists
// if the name is taken. The returned copy carries its resourceVersion.
func (s *Store) Create(ctx context.Context, r api.Resource) (api.Resource, error) {
	return s.write(ctx, r, nil)
}

// Update replaces a stored resource. r must carry the resourceVersion it was read
// at; if the stored one differs the update fails with a ConflictError.
func (s *Store) Update(ctx context.Context, r api.Resource) (api.Resource, error) {
	k := api.KindOf(r)
	name := api.StorageName(r.GetMetadata())
	rv := r.GetMetadata().ResourceVersion
	if rv == "" {
		return nil, fmt.Errorf("%s: update needs metadata.resourceVersion; get the resource first", describe(k, name))
	}
	if _, err := strconv.ParseInt(rv, 10, 64); err != nil {
		return nil, fmt.Errorf("%s: metadata.resourceVersion %q is not a number", describe(k, name), rv)
	}
	old, err := s.GetResource(ctx, k, name)
	if err != nil {
		return nil, err
	}
	if old.GetMetadata().ResourceVersion != rv {
		return nil, &ConflictError{What: describe(k, name), Expected: rv, Actual: old.GetMetadata().ResourceVersion}
	}
	// Default before comparing with the stored (defaulted) object, so an omitted
	// blockSize is not taken for a change of it.
	r.SetDefaults()
	if err := api.ValidateUpdate(old, r); err != nil {
		return nil, err
	}
	return s.write(ctx, r, old)
}

// write validates r and stores it: as a create when old is nil, otherwise as an
// update guarded by r's resourceVersion.
func (s *Store) write(ctx context.Context, r api.Resource, old api.Resource) (api.Resource, error) {
	k := api.KindOf(r)
	name := api.StorageName(r.GetMetadata())
	r.SetDefaults()
	if err := r.Validate(); err != nil {
		return nil, err
	}
	val, err := encode(r)
	if err != nil {
		return nil, err
	}
	key := ResourceKey(k, name)
	for attempt := range maxValidationRetries {
		if err := Backoff(ctx, attempt); err != nil {
			return nil, err
		}
		cmps := []clientv3.Cmp{}
		if old == nil {
			cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(key), "=", 0))
		} else {
			rv, err := strconv.ParseInt(r.GetMetadata().ResourceVersion, 10, 64)
			if err != nil {
				return nil, fmt.Errorf("%s: metadata.resourceVersion %q is not a number", describe(k, name), r.GetMetadata().ResourceVersion)
			}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", rv))
		}
		if k.Kind == api.KindIPPool {
			// Check overlap against the pools as of one revision, and make the write
			// conditional on no pool having changed since.
			others, rev, err := s.ListResources(ctx, k)
			if err != nil {
				return nil, err
			}
			if err := api.ValidateAgainst(r, others); err != nil {
				return nil, err
			}
			cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(ResourcePrefix(k)), "<", rev+1).WithPrefix())
		}
		resp, err := s.Txn(ctx, cmps, []clientv3.Op{clientv3.OpPut(key, string(val))}, []clientv3.Op{clientv3.OpGet(key)})
		if err != nil {
			return nil, err
		}
		if resp.Succeeded {
			out, err := decodeKV(k, val, resp.Header.Revision)
			return out, err
		}
		cur := resp.Responses[0].GetResponseRange().Kvs
		switch {
		case old == nil && len(cur) > 0:
			return nil, &AlreadyExistsError{What: describe(k, name)}
		case old != nil && len(cur) == 0:
			return nil, &ConflictError{What: describe(k, name), Expected: r.GetMetadata().ResourceVersion}
		case old != nil && strconv.FormatInt(cur[0].ModRevision, 10) != r.GetMetadata().ResourceVersion:
			return nil, &ConflictError{What: describe(k, name), Expected: r.GetMetadata().ResourceVersion, Actual: strconv.FormatInt(cur[0].ModRevision, 10)}
		}
		// Another pool changed while we validated: validate again.
	}
	return nil, fmt.Errorf("%s: pools kept changing while validating; try again", describe(k, name))
}

// Delete removes a resource. With a non-empty resourceVersion it deletes only that
// version. It returns the deleted resource.
func (s *Store) Delete(ctx context.Context, k api.KindInfo, name, resourceVersion string) (api.Resource, error) {
	return s.deleteUnless(ctx, k, name, resourceVersion, "")
}

// DeleteUnlessHeld is Delete, refused with a HeldError while held is held
// (see Hold), in the same transaction.
func (s *Store) DeleteUnlessHeld(ctx context.Context, k api.KindInfo, name, resourceVersion, held string) (api.Resource, error) {
	return s.deleteUnless(ctx, k, name, resourceVersion, held)
}

func (s *Store) deleteUnless(ctx context.Context, k api.KindInfo, name, resourceVersion, held string) (api.Resource, error) {
	key := ResourceKey(k, name)
	var cmps []clientv3.Cmp
	if resourceVersion != "" {
		rv, err := strconv.ParseInt(resourceVersion, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: metadata.resourceVersion %q is not a number", describe(k, name), resourceVersion)
		}
		cmps = append(cmps, clientv3.Compare(clientv3.ModRevision(key), "=", rv))
	}
	orElse := []clientv3.Op{clientv3.OpGet(key)}
	if held != "" {
		cmps = append(cmps, clientv3.Compare(clientv3.CreateRevision(held), "=", 0))
		orElse = append(orElse, clientv3.OpGet(held))
	}
	resp, err := s.Txn(ctx, cmps, []clientv3.Op{clientv3.OpDelete(key, clientv3.WithPrevKV())}, orElse)
	if err != nil {
		return nil, err
	}
	if !resp.Succeeded {
		if held != "" {
			if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
				return nil, &HeldError{Key: held, Holder: string(kvs[0].Value)}
			}
		}
		cur := resp.Responses[0].GetResponseRange().Kvs
		if len(cur) == 0 {
			return nil, &NotFoundError{What: describe(k, name)}
		}
		return nil, &ConflictError{What: describe(k, name), Expected: resourceVersion, Actual: strconv.FormatInt(cur[0].ModRevision, 10)}
	}
	prev := resp.Responses[0].GetResponseDeleteRange().PrevKvs
	if len(prev) == 0 {
		return nil, &NotFoundError{What: describe(k, name)}
	}
	return decodeKV(k, prev[0].Value, prev[0].ModRevision)
}

// Get reads one resource of type R by name.
func Get[R api.Resource](ctx context.Context, s *Store, name string) (R, error) {
	var zero R
	r, err := s.GetResource(ctx, api.KindOf(zero), name)
	if err != nil {
		return zero, err
	}
	return r.(R), nil
}

// List reads every resource of type R, sorted by name.
func List[R api.Resource](ctx context.Context, s *Store) ([]R, error) {
	var zero R
	rs, _, err := s.ListResources(ctx, api.KindOf(zero))
	if err != nil {
		return nil, err
	}
	out := make([]R, len(rs))
	for i, r := range rs {
		out[i] = r.(R)
	}
	return out, nil
}
