package datastore

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/test/etcdtest"
)

// checkUnavailable asserts err is an ErrUnavailable that names the endpoints and
// says where to fix them.
func checkUnavailable(t *testing.T, op string, err error, endpoints []string) {
	t.Helper()
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("%s: err = %v (%T), want ErrUnavailable", op, err, err)
	}
	var ue *UnavailableError
	if !errors.As(err, &ue) {
		t.Errorf("%s: err %T is not an *UnavailableError", op, err)
	}
	for _, want := range append([]string{"MARGAY_ETCD_ENDPOINTS"}, endpoints...) {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("%s: message %q does not mention %q", op, err, want)
		}
	}
}

func TestUnreachable(t *testing.T) {
	t.Parallel()
	const ep = "http://127.0.0.1:1" // nothing listens on port 1
	s := newStore(t, Config{Endpoints: []string{ep}, RequestTimeout: 2 * time.Second})

	start := time.Now()
	_, err := s.GetResource(context.Background(), poolKind, "p1")
	elapsed := time.Since(start)
	checkUnavailable(t, "GetResource", err, []string{ep})
	if elapsed > 3*time.Second {
		t.Errorf("GetResource took %s to fail, want about the 2s request timeout", elapsed)
	}

	// Every operation fails the same way, within its timeout.
	fast := newStore(t, Config{Endpoints: []string{ep}, RequestTimeout: 300 * time.Millisecond})
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		op   func() error
	}{
		{"Ping", func() error { return fast.Ping(ctx) }},
		{"List", func() error { _, err := List[*api.IPPool](ctx, fast); return err }},
		{"Create", func() error { _, err := fast.Create(ctx, newPool("p1", "10.244.0.0/16")); return err }},
		{"Update", func() error {
			p := newPool("p1", "10.244.0.0/16")
			p.Metadata.ResourceVersion = "3"
			_, err := fast.Update(ctx, p)
			return err
		}},
		{"Delete", func() error { _, err := fast.Delete(ctx, poolKind, "p1", ""); return err }},
		{"Compact", func() error { return fast.Compact(ctx, 1) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			err := tc.op()
			checkUnavailable(t, tc.name, err, []string{ep})
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("%s took %s to fail with a 300ms request timeout", tc.name, d)
			}
		})
	}

	// A caller that gives up gets its own context error, not a blame on etcd.
	cctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	_, err = s.GetResource(cctx, poolKind, "p1")
	if !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrUnavailable) {
		t.Errorf("with the caller's context expiring first: err = %v, want context.DeadlineExceeded", err)
	}
}

func TestStoppedServer(t *testing.T) {
	t.Parallel()
	srv := etcdtest.StartT(t)
	s := newStore(t, Config{Endpoints: srv.Endpoints(), RequestTimeout: 2 * time.Second})
	ctx := testCtx(t)
	if _, err := s.Create(ctx, newPool("p1", "10.244.0.0/16")); err != nil {
		t.Fatal(err)
	}

	srv.Stop()
	start := time.Now()
	_, err := s.GetResource(ctx, poolKind, "p1")
	elapsed := time.Since(start)
	checkUnavailable(t, "GetResource on a stopped etcd", err, srv.Endpoints())
	if elapsed > 3*time.Second {
		t.Errorf("GetResource on a stopped etcd took %s, want about the 2s request timeout", elapsed)
	}
	if _, err := s.Create(ctx, newPool("p2", "10.245.0.0/16")); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Create on a stopped etcd: err = %v, want ErrUnavailable", err)
	}

	// After a restart the same Store works again and the data survived.
	if err := srv.Restart(); err != nil {
		t.Fatal(err)
	}
	var p *api.IPPool
	waitFor(t, 15*time.Second, "the Store to reach the restarted etcd", func() (bool, string) {
		p, err = Get[*api.IPPool](ctx, s, "p1")
		return err == nil, errString(err)
	})
	if p.Spec.CIDR != "10.244.0.0/16" {
		t.Errorf("after restart p1 = %+v", p)
	}
	if _, err := s.Create(ctx, newPool("p2", "10.245.0.0/16")); err != nil {
		t.Errorf("Create after restart: %v", err)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

func TestTLS(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	pki := etcdtest.NewPKI(t, dir, "good")
	other := etcdtest.NewPKI(t, dir, "other") // a CA etcd does not trust

	srv, err := etcdtest.Start(etcdtest.Options{TLS: &transport.TLSInfo{
		CertFile:       pki.ServerCert,
		KeyFile:        pki.ServerKey,
		TrustedCAFile:  pki.CA,
		ClientCertAuth: true,
	}})
	if err != nil {
		t.Fatalf("start etcd with TLS: %v", err)
	}
	t.Cleanup(srv.Close)
	eps := srv.Endpoints()
	if !strings.HasPrefix(eps[0], "https://") {
		t.Fatalf("TLS etcd endpoint %q is not https", eps[0])
	}
	ctx := testCtx(t)

	t.Run("client certificate", func(t *testing.T) {
		s := newStore(t, Config{Endpoints: eps, CAFile: pki.CA, CertFile: pki.ClientCert, KeyFile: pki.ClientKey})
		if _, err := s.Create(ctx, newPool("tls-pool", "10.244.0.0/16")); err != nil {
			t.Fatalf("create over TLS: %v", err)
		}
		p, err := Get[*api.IPPool](ctx, s, "tls-pool")
		if err != nil || p.Spec.CIDR != "10.244.0.0/16" {
			t.Fatalf("get over TLS = %+v, %v", p, err)
		}
	})

	// Connections etcd must refuse, or that must refuse etcd. New succeeds (it
	// does not dial); the first request fails within the request timeout.
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"no client certificate", Config{CAFile: pki.CA}},
		{"client certificate from an untrusted CA", Config{CAFile: pki.CA, CertFile: other.ClientCert, KeyFile: other.ClientKey}},
		{"server not trusted", Config{CAFile: other.CA, CertFile: pki.ClientCert, KeyFile: pki.ClientKey}},
		{"plain HTTP to a TLS port", Config{Endpoints: []string{strings.Replace(eps[0], "https://", "http://", 1)}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if cfg.Endpoints == nil {
				cfg.Endpoints = eps
			}
			cfg.RequestTimeout = time.Second
			s := newStore(t, cfg)
			start := time.Now()
			_, err := Get[*api.IPPool](ctx, s, "tls-pool")
			if err == nil {
				t.Fatal("get succeeded, want a failure")
			}
			if d := time.Since(start); d > 2*time.Second {
				t.Errorf("failing get took %s with a 1s request timeout", d)
			}
			checkUnavailable(t, "get", err, cfg.Endpoints)
		})
	}

	// Configurations New itself rejects, with a message that says what is wrong.
	for _, tc := range []struct {
		name string
		cfg  Config
		want []string
	}{
		{"cert without key", Config{CAFile: pki.CA, CertFile: pki.ClientCert}, []string{"key", pki.ClientCert}},
		{"key without cert", Config{CAFile: pki.CA, KeyFile: pki.ClientKey}, []string{"certificate", pki.ClientKey}},
		{"missing cert file", Config{CAFile: pki.CA, CertFile: filepath.Join(dir, "nope.pem"), KeyFile: pki.ClientKey}, []string{"nope.pem"}},
		{"missing CA file", Config{CAFile: filepath.Join(dir, "noca.pem"), CertFile: pki.ClientCert, KeyFile: pki.ClientKey}, []string{"noca.pem"}},
		{"key does not match cert", Config{CAFile: pki.CA, CertFile: pki.ClientCert, KeyFile: pki.ServerKey}, []string{"etcd TLS"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.cfg.Endpoints = eps
			s, err := New(tc.cfg)
			if err == nil {
				s.Close()
				t.Fatalf("New succeeded, want an error")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("New: message %q does not mention %q", err, w)
				}
			}
		})
	}
}
