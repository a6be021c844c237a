// Package datastore keeps margay's state in etcd v3: the key layout, typed resource
// operations with resourceVersion compare-and-swap, raw transactions for IPAM, and a
// list+watch syncer that survives etcd restarts and compaction.
package datastore

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	"go.etcd.io/etcd/client/pkg/v3/transport"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Defaults of Config.
const (
	DefaultEndpoint       = "http://127.0.0.1:2379"
	DefaultDialTimeout    = 5 * time.Second
	DefaultRequestTimeout = 5 * time.Second
)

// Config says how to reach etcd.
type Config struct {
	Endpoints []string
	// TLS files; all empty means plain HTTP.
	CAFile, CertFile, KeyFile string
	DialTimeout               time.Duration
	// RequestTimeout bounds every single request, so an unreachable etcd is an
	// error within seconds rather than a hang.
	RequestTimeout time.Duration
}

func (c *Config) setDefaults() {
	if len(c.Endpoints) == 0 {
		c.Endpoints = []string{DefaultEndpoint}
	}
	if c.DialTimeout == 0 {
		c.DialTimeout = DefaultDialTimeout
	}
	if c.RequestTimeout == 0 {
		c.RequestTimeout = DefaultRequestTimeout
	}
}

// Store is a handle on the datastore. It is safe for concurrent use.
type Store struct {
	cfg        Config
	client     *clientv3.Client
	roundTrips atomic.Int64

	mu      sync.Mutex
	held    map[string]clientv3.LeaseID // by key: the leases Hold keeps alive
	closing chan struct{}               // closed by Close: Hold's keepers stop
	keepers sync.WaitGroup
}

// New connects to etcd. It does not wait for etcd to answer: the first request does.
func New(cfg Config) (*Store, error) {
	cfg.setDefaults()
	var tlsCfg *tls.Config
	if cfg.CAFile != "" || cfg.CertFile != "" || cfg.KeyFile != "" {
		if (cfg.CertFile == "") != (cfg.KeyFile == "") {
			return nil, fmt.Errorf("etcd TLS: give both a client certificate and its key, or neither: --etcd-cert-file (MARGAY_ETCD_CERT_FILE) is %q, --etcd-key-file (MARGAY_ETCD_KEY_FILE) is %q", cfg.CertFile, cfg.KeyFile)
		}
		info := transport.TLSInfo{CertFile: cfg.CertFile, KeyFile: cfg.KeyFile, TrustedCAFile: cfg.CAFile}
		var err error
		if tlsCfg, err = info.ClientConfig(); err != nil {
			return nil, fmt.Errorf("etcd TLS: %w", err)
		}
	}
	c, err := clientv3.New(clientv3.Config{
		Endpoints:            cfg.Endpoints,
		DialTimeout:          cfg.DialTimeout,
		DialKeepAliveTime:    10 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		TLS:                  tlsCfg,
		Logger:               zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("etcd client for %v: %w", cfg.Endpoints, err)
	}
	return &Store{cfg: cfg, client: c, closing: make(chan struct{})}, nil
}

// Close revokes the leases of the keys Hold holds, so that a holder that stops
// cleanly frees them at once instead of after their TTL, then releases the
// connection.
func (s *Store) Close() error {
	// The keepers first: one taking its key again must not do so after the
	// revocation, or on a closed client.
	s.mu.Lock()
	select {
	case <-s.closing:
	default:
		close(s.closing)
	}
	s.mu.Unlock()
	s.keepers.Wait()
	s.mu.Lock()
	held := s.held
	s.held = nil
	s.mu.Unlock()
	for _, lease := range held {
		s.revoke(lease)
	}
	return s.client.Close()
}

// RoundTrips counts the requests this Store has sent to etcd, for benchmarks.
func (s *Store) RoundTrips() int64 { return s.roundTrips.Load() }

// Endpoints returns the configured etcd endpoints.
func (s *Store) Endpoints() []string { return s.cfg.Endpoints }

// do runs one request under the request timeout and turns transport failures into
// an UnavailableError that says what to check.
func (s *Store) do(ctx context.Context, f func(ctx context.Context) error) error {
	tctx, cancel := context.WithTimeout(ctx, s.cfg.RequestTimeout)
	defer cancel()
	s.roundTrips.Add(1)
	err := f(tctx)
	switch {
	case err == nil:
		return nil
	case ctx.Err() != nil: // the caller gave up; that is not etcd's fault
		return ctx.Err()
	case tctx.Err() != nil || errors.Is(err, context.DeadlineExceeded):
		return &UnavailableError{Endpoints: s.cfg.Endpoints, Err: fmt.Errorf("no answer within %s", s.cfg.RequestTimeout)}
	}
	// etcd's own "no leader", "leader changed" and "request timed out" arrive as
	// rpctypes.EtcdError, which grpc's status package does not recognise.
	var ee rpctypes.EtcdError
	if st, ok := status.FromError(err); (ok && st.Code() == codes.Unavailable) || (errors.As(err, &ee) && ee.Code() == codes.Unavailable) {
		return &UnavailableError{Endpoints: s.cfg.Endpoints, Err: err}
	}
	return err
}

// Get reads a key or, with clientv3.WithPrefix, a range.
func (s *Store) Get(ctx context.Context, key string, opts ...clientv3.OpOption) (*clientv3.GetResponse, error) {
	var resp *clientv3.GetResponse
	err := s.do(ctx, func(ctx context.Context) (err error) {
		resp, err = s.client.Get(ctx, key, opts...)
		return err
	})
	return resp, err
}

// Txn runs one transaction: if every comparison holds, the then ops, else the else ops.
func (s *Store) Txn(ctx context.Context, cmps []clientv3.Cmp, then, els []clientv3.Op) (*clientv3.TxnResponse, error) {
	var resp *clientv3.TxnResponse
	err := s.do(ctx, func(ctx context.Context) (err error) {
		resp, err = s.client.Txn(ctx).If(cmps...).Then(then...).Else(els...).Commit()
		return err
	})
	return resp, err
}

// Compact compacts etcd's history up to rev; tests use it to force watch recovery.
func (s *Store) Compact(ctx context.Context, rev int64) error {
	return s.do(ctx, func(ctx context.Context) error {
		_, err := s.client.Compact(ctx, rev, clientv3.WithCompactPhysical())
		return err
	})
}

// Ping checks that etcd answers within the request timeout.
func (s *Store) Ping(ctx context.Context) error {
	_, err := s.Get(ctx, Prefix, clientv3.WithCountOnly())
	return err
}
