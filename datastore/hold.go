package datastore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// AgentsPrefix holds one key per running agent, kept alive by the agent's lease.
const AgentsPrefix = Prefix + "agents/"

// AgentTTL is the TTL of an agent's lease: how long a killed agent's key
// outlives it.
const AgentTTL = 15 * time.Second

// HeldError says another holder has the key.
type HeldError struct {
	Key, Holder string
}

func (e *HeldError) Error() string { return fmt.Sprintf("%s is held by %s", e.Key, e.Holder) }

// Hold puts key = value under a lease of ttl if the key is absent or already
// holds value (the same holder, restarted), and keeps it alive until ctx ends or
// the Store is closed (which revokes it). If etcd forgets the lease (an outage
// longer than ttl), Hold takes the key again when etcd is back. It returns a
// HeldError naming the other holder if the key holds another value.
func (s *Store) Hold(ctx context.Context, key, value string, ttl time.Duration, log *slog.Logger) error {
	s.mu.Lock()
	select {
	case <-s.closing:
		s.mu.Unlock()
		return errors.New("hold: the datastore client is closed")
	default:
		s.keepers.Add(1) // under mu, so that Close's Wait sees it
	}
	s.mu.Unlock()
	ctx, cancel := context.WithCancel(ctx)
	lease, err := s.take(ctx, key, value, ttl)
	if err != nil {
		cancel()
		s.keepers.Done()
		return err
	}
	go func() {
		defer s.keepers.Done()
		defer cancel()
		go func() { // Close stops the keeper
			select {
			case <-s.closing:
				cancel()
			case <-ctx.Done():
			}
		}()
		for {
			s.keepAlive(ctx, lease)
			if ctx.Err() != nil {
				return
			}
			log.Warn("lost the etcd lease on a held key; taking it again", "key", key)
			for {
				select {
				case <-ctx.Done():
					return
				case <-time.After(ttl / 3):
				}
				if lease, err = s.take(ctx, key, value, ttl); err == nil {
					break
				}
				log.Error("cannot take the held key again", "key", key, "err", err)
			}
		}
	}()
	return nil
}

// take puts key under a new lease, if it is free or already ours.
func (s *Store) take(ctx context.Context, key, value string, ttl time.Duration) (clientv3.LeaseID, error) {
	var grant *clientv3.LeaseGrantResponse
	err := s.do(ctx, func(ctx context.Context) (err error) {
		grant, err = s.client.Grant(ctx, int64(max(ttl/time.Second, 2)))
		return err
	})
	if err != nil {
		return 0, err
	}
	put := clientv3.OpPut(key, value, clientv3.WithLease(grant.ID))
	resp, err := s.Txn(ctx,
		[]clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)},
		[]clientv3.Op{put},
		[]clientv3.Op{clientv3.OpTxn([]clientv3.Cmp{clientv3.Compare(clientv3.Value(key), "=", value)},
			[]clientv3.Op{put}, []clientv3.Op{clientv3.OpGet(key)})})
	if err == nil && !resp.Succeeded {
		inner := resp.Responses[0].GetResponseTxn()
		if !inner.Succeeded {
			holder := "someone else"
			if kvs := inner.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
				holder = string(kvs[0].Value)
			}
			err = &HeldError{Key: key, Holder: holder}
		}
	}
	if err != nil {
		s.revoke(grant.ID)
		return 0, err
	}
	s.mu.Lock()
	if s.held == nil {
		s.held = map[string]clientv3.LeaseID{}
	}
	s.held[key] = grant.ID
	s.mu.Unlock()
	return grant.ID, nil
}

// keepAlive renews the lease until ctx ends or etcd drops the lease.
func (s *Store) keepAlive(ctx context.Context, lease clientv3.LeaseID) {
	ch, err := s.client.KeepAlive(ctx, lease)
	if err != nil {
		return
	}
	for range ch {
	}
}

func (s *Store) revoke(lease clientv3.LeaseID) {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.RequestTimeout)
	defer cancel()
	s.client.Revoke(ctx, lease)
}

// IsHeld reports whether err is a HeldError.
func IsHeld(err error) bool {
	var h *HeldError
	return errors.As(err, &h)
}
