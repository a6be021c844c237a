//go:debug multipathtcp=0

package bgp

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gobgpapi "github.com/osrg/gobgp/v3/api"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/test/nstest"
)

// The speaker tests run real GoBGP speakers in this process (and one in a child
// process), on 127.0.0.1–3 port 179 inside the network namespace MainInNetNS puts
// the test binary in. They run one after another: GoBGP keeps some settings in
// package globals, which concurrent speakers would race on.
func TestMain(m *testing.M) { nstest.MainInNetNS(m) }

const (
	ipA, ipB, ipC = "127.0.0.1", "127.0.0.2", "127.0.0.3"
	asNode        = 64512
	asToR         = 64513
	// sessionTimeout bounds every wait for a session; they come up in a few seconds.
	sessionTimeout = 20 * time.Second
)

var (
	prefixA  = netip.MustParsePrefix("10.244.1.0/26")
	prefixA2 = netip.MustParsePrefix("10.244.1.64/26")
	prefixB  = netip.MustParsePrefix("10.244.2.0/26")
)

func needNetNS(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: runs BGP speakers on port 179 in a network namespace")
	}
	if !nstest.InNetNS() {
		t.Skip("not in the test network namespace; run through TestMain")
	}
}

// testLogger logs to t, and stops when the test ends: GoBGP goroutines can outlive
// the speaker, and t.Log after the test panics.
func testLogger(t *testing.T, extra ...slog.Handler) *slog.Logger {
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	var h slog.Handler = slog.NewTextHandler(w, &slog.HandlerOptions{Level: slog.LevelInfo})
	if len(extra) > 0 {
		h = teeHandler(append([]slog.Handler{h}, extra...))
	}
	return slog.New(h)
}

type testWriter struct {
	mu   sync.Mutex
	t    *testing.T
	done bool
}

func (w *testWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *testWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

type teeHandler []slog.Handler

func (t teeHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return slices.ContainsFunc(t, func(h slog.Handler) bool { return h.Enabled(ctx, l) })
}

func (t teeHandler) Handle(ctx context.Context, r slog.Record) error {
	for _, h := range t {
		if h.Enabled(ctx, r.Level) {
			_ = h.Handle(ctx, r.Clone())
		}
	}
	return nil
}

func (t teeHandler) WithAttrs(as []slog.Attr) slog.Handler {
	out := make(teeHandler, len(t))
	for i, h := range t {
		out[i] = h.WithAttrs(as)
	}
	return out
}

func (t teeHandler) WithGroup(name string) slog.Handler {
	out := make(teeHandler, len(t))
	for i, h := range t {
		out[i] = h.WithGroup(name)
	}
	return out
}

// recorder keeps the messages of error records.
type recorder struct {
	mu     sync.Mutex
	errors []string
}

func (r *recorder) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelError }
func (r *recorder) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	r.errors = append(r.errors, rec.Message)
	r.mu.Unlock()
	return nil
}
func (r *recorder) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *recorder) WithGroup(string) slog.Handler      { return r }

func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return slices.Clone(r.errors)
}

type speakerOpts struct {
	as        uint32
	nextHopV6 string // the node's IPv6 address: sessions carry IPv6 too
	clusterID string
	grpc      string
	log       *slog.Logger
}

func startSpeaker(t *testing.T, ip string, o speakerOpts) *Speaker {
	t.Helper()
	if o.as == 0 {
		o.as = asNode
	}
	if o.log == nil {
		o.log = testLogger(t).With("speaker", ip)
	}
	a := netip.MustParseAddr(ip)
	var nh6 netip.Addr
	if o.nextHopV6 != "" {
		nh6 = netip.MustParseAddr(o.nextHopV6)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{
		RouterID: a, ASNumber: o.as, ListenPort: 179, ListenAddresses: []string{ip}, LocalAddress: a,
		NextHopV6: nh6, ClusterID: o.clusterID, GRPCAddress: o.grpc, Logger: o.log,
	})
	if err != nil {
		t.Fatalf("Start(%s): %v", ip, err)
	}
	t.Cleanup(s.Close)
	return s
}

// nodePeer is the peer speaker from configures for the node at ip. As in
// DesiredPeers, the lower address of the two waits for the other to connect.
func nodePeer(from, ip, name string, typ PeerType) Peer {
	p := Peer{Address: netip.MustParseAddr(ip), Port: 179, ASNumber: asNode, Type: typ, Name: name, MaxRestartTime: 120 * time.Second}
	p.Passive = netip.MustParseAddr(from).Less(p.Address)
	return p
}

// extPeer is a session with a router outside the cluster: active, as both ends
// of a ToR session are.
func extPeer(ip, name string, as uint32) Peer {
	return Peer{Address: netip.MustParseAddr(ip), Port: 179, ASNumber: as, Type: Global, Name: name, MaxRestartTime: 120 * time.Second}
}

func setPeers(t *testing.T, s *Speaker, peers ...Peer) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.SetPeers(ctx, peers); err != nil {
		t.Fatalf("SetPeers: %v", err)
	}
}

func advertise(t *testing.T, s *Speaker, prefixes ...netip.Prefix) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.SetAdvertised(ctx, prefixes); err != nil {
		t.Fatalf("SetAdvertised(%v): %v", prefixes, err)
	}
}

func peerStatus(t *testing.T, s *Speaker, ip string) PeerStatus {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ps, err := s.Peers(ctx)
	if err != nil {
		t.Fatalf("Peers: %v", err)
	}
	for _, p := range ps {
		if p.Address.String() == ip {
			return p
		}
	}
	t.Fatalf("no peer %s in %+v", ip, ps)
	return PeerStatus{}
}

// route is a best path without its peer: what the tests compare.
type route struct {
	Prefix  netip.Prefix
	NextHop netip.Addr
}

func bestPaths(t *testing.T, s *Speaker) []route {
	t.Helper()
	var out []route
	for _, p := range allPaths(t, s) {
		if p.Best {
			out = append(out, route{p.Prefix, p.NextHop})
		}
	}
	return out
}

func allPaths(t *testing.T, s *Speaker) []api.BGPPath {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	ps, err := s.Paths(ctx)
	if err != nil {
		t.Fatalf("Paths: %v", err)
	}
	return ps
}

// waitFor polls cond until it holds, failing the test after timeout with cond's
// last description of the state. It returns how long that took.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() (bool, string)) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		ok, state := cond()
		if ok {
			return time.Since(start)
		}
		if time.Since(start) > timeout {
			t.Fatalf("%s: not within %v; last: %s", what, timeout, state)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

type session struct {
	s  *Speaker
	ip string // the peer's address
}

func waitEstablished(t *testing.T, sessions ...session) time.Duration {
	t.Helper()
	return waitFor(t, sessionTimeout, "sessions established", func() (bool, string) {
		var states []string
		ok := true
		for _, se := range sessions {
			st := peerStatus(t, se.s, se.ip)
			states = append(states, fmt.Sprintf("%s→%s %s (%s)", se.s.cfg.RouterID, se.ip, st.State, st.Info))
			ok = ok && st.State == "Established"
		}
		return ok, strings.Join(states, "; ")
	})
}

func waitPaths(t *testing.T, s *Speaker, want ...route) {
	t.Helper()
	waitFor(t, sessionTimeout, fmt.Sprintf("best paths of %s are %v", s.cfg.RouterID, want), func() (bool, string) {
		got := bestPaths(t, s)
		return slices.Equal(got, want), fmt.Sprint(got)
	})
}

func path(p netip.Prefix, nh string) route { return route{Prefix: p, NextHop: netip.MustParseAddr(nh)} }

func drain(c <-chan struct{}) {
	select {
	case <-c:
	default:
	}
}

func waitKick(t *testing.T, s *Speaker, what string) {
	t.Helper()
	select {
	case <-s.Changes():
	case <-time.After(sessionTimeout):
		t.Fatalf("no Changes kick for %s within %v", what, sessionTimeout)
	}
}

func TestSpeakerMeshRoutes(t *testing.T) {
	needNetNS(t)
	a := startSpeaker(t, ipA, speakerOpts{})
	b := startSpeaker(t, ipB, speakerOpts{})
	setPeers(t, a, nodePeer(ipA, ipB, "node-b", Mesh))
	setPeers(t, b, nodePeer(ipB, ipA, "node-a", Mesh))
	d := waitEstablished(t, session{a, ipB}, session{b, ipA})
	t.Logf("mesh session established in %v", d.Round(time.Millisecond))

	st := peerStatus(t, a, ipB)
	if st.Type != Mesh || st.Name != "node-b" || st.Since.IsZero() || st.Since.After(time.Now()) {
		t.Errorf("A's status of B = %+v; want a mesh peer named node-b, established in the past", st)
	}

	drain(a.Changes())
	drain(b.Changes())
	advertise(t, a, prefixA)
	waitKick(t, b, "A's advertisement")
	waitPaths(t, b, path(prefixA, ipA))
	if got := bestPaths(t, a); len(got) != 0 {
		t.Errorf("A's best paths = %v; want none (its own paths are left out)", got)
	}
	// Advertising again is a no-op; A's own paths never kick A.
	advertise(t, a, prefixA)
	select {
	case <-a.Changes():
		t.Error("A's own advertisement kicked A's Changes")
	case <-time.After(500 * time.Millisecond):
	}

	// Withdrawing one prefix leaves the other (a DeletePath without a path would
	// delete both).
	advertise(t, a, prefixA, prefixA2)
	waitPaths(t, b, path(prefixA, ipA), path(prefixA2, ipA))
	drain(b.Changes())
	advertise(t, a, prefixA2)
	waitKick(t, b, "A's withdrawal")
	waitPaths(t, b, path(prefixA2, ipA))
	advertise(t, a)
	waitPaths(t, b)

	// A path and a peer deleted with GoBGP's API behind the speaker's back come
	// back with the next call.
	advertise(t, a, prefixA)
	waitPaths(t, b, path(prefixA, ipA))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	p, err := localPath(prefixA, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	p.IsWithdraw = true
	if err := a.srv.DeletePath(ctx, &gobgpapi.DeletePathRequest{TableType: gobgpapi.TableType_GLOBAL, Family: ipv4Unicast, Path: p}); err != nil {
		t.Fatal(err)
	}
	waitPaths(t, b)
	advertise(t, a, prefixA)
	waitPaths(t, b, path(prefixA, ipA))
	if err := a.srv.DeletePeer(ctx, &gobgpapi.DeletePeerRequest{Address: ipB}); err != nil {
		t.Fatal(err)
	}
	setPeers(t, a, nodePeer(ipA, ipB, "node-b", Mesh))
	if st := peerStatus(t, a, ipB); st.Type != Mesh || st.Name != "node-b" {
		t.Errorf("after SetPeers, the peer deleted behind its back is %+v", st)
	}
}

// TestSpeakerExport: a node sends an external peer (C, another AS) only its own
// routes, and so does a route reflector, which reflects to iBGP peers only:
// with itself as next hop it would draw the others' traffic through it.
func TestSpeakerExport(t *testing.T) {
	needNetNS(t)
	for _, tc := range []struct {
		name      string
		clusterID string // B's
	}{{"node", ""}, {"reflector", "224.0.0.1"}} {
		t.Run(tc.name, func(t *testing.T) {
			a := startSpeaker(t, ipA, speakerOpts{})
			b := startSpeaker(t, ipB, speakerOpts{clusterID: tc.clusterID})
			c := startSpeaker(t, ipC, speakerOpts{as: asToR})
			toA := nodePeer(ipB, ipA, "node-a", Mesh)
			toA.RouteReflectorClient = tc.clusterID != ""
			setPeers(t, a, nodePeer(ipA, ipB, "node-b", Mesh))
			setPeers(t, b, toA, extPeer(ipC, "tor", asToR))
			setPeers(t, c, extPeer(ipB, "node-b", asNode))
			waitEstablished(t, session{a, ipB}, session{b, ipA}, session{b, ipC}, session{c, ipB})

			advertise(t, a, prefixA)
			advertise(t, b, prefixB)
			waitPaths(t, b, path(prefixA, ipA))
			waitPaths(t, c, path(prefixB, ipB))
			time.Sleep(time.Second) // A's route would have come with B's
			if got := bestPaths(t, c); !slices.Equal(got, []route{path(prefixB, ipB)}) {
				t.Errorf("C's best paths = %v; want only B's own %v", got, prefixB)
			}
		})
	}
}

func md5Supported() error {
	l, err := net.Listen("tcp4", ipA+":0")
	if err != nil {
		return err
	}
	defer l.Close()
	sc, err := l.(*net.TCPListener).SyscallConn()
	if err != nil {
		return err
	}
	sig := unix.TCPMD5Sig{Keylen: 4}
	sig.Addr.Family = unix.AF_INET
	copy(sig.Addr.Data[2:], net.ParseIP(ipB).To4())
	copy(sig.Key[:], "test")
	var serr error
	if err := sc.Control(func(fd uintptr) { serr = unix.SetsockoptTCPMD5Sig(int(fd), unix.IPPROTO_TCP, unix.TCP_MD5SIG, &sig) }); err != nil {
		return err
	}
	return serr
}

func TestSpeakerPassword(t *testing.T) {
	needNetNS(t)
	if err := md5Supported(); err != nil {
		t.Skipf("the kernel refuses TCP MD5 keys on listening sockets, which BGP passwords need: %v", err)
	}
	a := startSpeaker(t, ipA, speakerOpts{})
	b := startSpeaker(t, ipB, speakerOpts{})
	toA, toB := nodePeer(ipB, ipA, "node-a", Mesh), nodePeer(ipA, ipB, "node-b", Mesh)
	toA.Password, toB.Password = "secret-b", "secret-a"
	setPeers(t, a, toB)
	setPeers(t, b, toA)

	// Long enough for each side's first attempts to time out.
	for end := time.Now().Add(5 * time.Second); time.Now().Before(end); time.Sleep(100 * time.Millisecond) {
		if st := peerStatus(t, a, ipB); st.State == "Established" {
			t.Fatalf("session came up with different passwords: %+v", st)
		}
	}
	// B connects; A, with the lower address, waits.
	st := peerStatus(t, b, ipA)
	t.Logf("with different passwords: %s, info %q", st.State, st.Info)
	if !strings.HasPrefix(st.Info, "connect: ") {
		t.Errorf("B's status of A has info %q; want the connect error", st.Info)
	}

	toA.Password = "secret-a"
	setPeers(t, b, toA)
	d := waitEstablished(t, session{a, ipB}, session{b, ipA})
	t.Logf("established %v after the passwords were made equal", d.Round(time.Millisecond))
}

// TestSpeakerPasswordRemoved: removing a password on both sides brings the session
// up. GoBGP's DeletePeer leaves the TCP MD5 keys on the listeners, so that without
// SetPeers' workaround each side's kernel would drop the other's unsigned
// connections for good. Without kernel TCP MD5 the passworded session cannot come
// up, but the removal still runs through the workaround.
func TestSpeakerPasswordRemoved(t *testing.T) {
	needNetNS(t)
	md5 := md5Supported()
	a := startSpeaker(t, ipA, speakerOpts{})
	b := startSpeaker(t, ipB, speakerOpts{})
	toA, toB := nodePeer(ipB, ipA, "node-a", Mesh), nodePeer(ipA, ipB, "node-b", Mesh)
	toA.Password, toB.Password = "secret", "secret"
	setPeers(t, a, toB)
	setPeers(t, b, toA)
	if md5 == nil {
		waitEstablished(t, session{a, ipB}, session{b, ipA})
	} else {
		waitFor(t, sessionTimeout, "a connect error reported", func() (bool, string) {
			st := peerStatus(t, b, ipA)
			return strings.HasPrefix(st.Info, "connect: "), fmt.Sprintf("%+v", st)
		})
		t.Logf("without kernel TCP MD5 (%v), a peer with a password reports: %q; the passive end: %q",
			md5, peerStatus(t, b, ipA).Info, peerStatus(t, a, ipB).Info)
	}

	toA.Password, toB.Password = "", ""
	setPeers(t, a, toB)
	setPeers(t, b, toA)
	d := waitEstablished(t, session{a, ipB}, session{b, ipA})
	t.Logf("established %v after the passwords were removed", d.Round(time.Millisecond))
}

// TestSpeakerSetPeers: SetPeers leaves unchanged sessions alone and resets only a
// changed peer, including for a route-reflector change, which GoBGP's UpdatePeer
// would ignore.
func TestSpeakerSetPeers(t *testing.T) {
	needNetNS(t)
	a := startSpeaker(t, ipA, speakerOpts{})
	b := startSpeaker(t, ipB, speakerOpts{clusterID: "224.0.0.1"})
	c := startSpeaker(t, ipC, speakerOpts{})
	toA, toC := nodePeer(ipB, ipA, "node-a", NodeSpecific), nodePeer(ipB, ipC, "node-c", NodeSpecific)
	setPeers(t, a, nodePeer(ipA, ipB, "rr", NodeSpecific))
	setPeers(t, c, nodePeer(ipC, ipB, "rr", NodeSpecific))
	setPeers(t, b, toA, toC)
	waitEstablished(t, session{a, ipB}, session{c, ipB}, session{b, ipA}, session{b, ipC})

	advertise(t, a, prefixA)
	waitPaths(t, b, path(prefixA, ipA))
	time.Sleep(time.Second)
	if got := bestPaths(t, c); len(got) != 0 {
		t.Fatalf("C learned %v from B, which reflects only to clients and C is none", got)
	}

	before := map[string]PeerStatus{ipA: peerStatus(t, b, ipA), ipC: peerStatus(t, b, ipC)}
	aBefore := peerStatus(t, a, ipB)
	setPeers(t, b, toC, toA)
	time.Sleep(500 * time.Millisecond) // for a CEASE to reach A, if one were sent
	for ip, old := range before {
		if st := peerStatus(t, b, ip); st.State != "Established" || !st.Since.Equal(old.Since) {
			t.Errorf("after SetPeers with the same peers, B's session with %s is %s since %v; want Established since %v",
				ip, st.State, st.Since, old.Since)
		}
	}
	if st := peerStatus(t, a, ipB); st.State != "Established" || !st.Since.Equal(aBefore.Since) {
		t.Errorf("A's session with B was reset by an unchanged SetPeers: %+v, before %+v", st, aBefore)
	}

	toC.RouteReflectorClient = true
	setPeers(t, b, toA, toC)
	d := waitFor(t, sessionTimeout, "C learns A's route reflected by B", func() (bool, string) {
		got := bestPaths(t, c)
		return slices.Equal(got, []route{path(prefixA, ipA)}), fmt.Sprint(got)
	})
	t.Logf("C's session reset and reflected routes arrived in %v", d.Round(time.Millisecond))
	if st := peerStatus(t, b, ipC); st.Since.Equal(before[ipC].Since) {
		t.Errorf("B's session with C was not reset by the route-reflector change: %+v", st)
	}
	if st := peerStatus(t, b, ipA); st.State != "Established" || !st.Since.Equal(before[ipA].Since) {
		t.Errorf("B's session with A, unchanged, was reset: %+v, before %+v", st, before[ipA])
	}
}

// TestSpeakerGRPC: the gRPC API answers the gobgp client with margay's peer
// descriptions, and a second speaker given the same, busy, address logs the
// failure and works on without an API.
func TestSpeakerGRPC(t *testing.T) {
	needNetNS(t)
	l, err := net.Listen("tcp", ipA+":0")
	if err != nil {
		t.Fatal(err)
	}
	grpcAddr := l.Addr().String()
	l.Close()

	a := startSpeaker(t, ipA, speakerOpts{grpc: grpcAddr})
	setPeers(t, a, nodePeer(ipA, ipB, "node-b", Mesh))
	waitFor(t, 10*time.Second, "gRPC listening on "+grpcAddr, func() (bool, string) {
		c, err := net.DialTimeout("tcp", grpcAddr, time.Second)
		if err != nil {
			return false, err.Error()
		}
		c.Close()
		return true, ""
	})

	conn, err := grpc.NewClient(grpcAddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := gobgpapi.NewGobgpApiClient(conn).ListPeer(ctx, &gobgpapi.ListPeerRequest{})
	if err != nil {
		t.Fatalf("ListPeer over gRPC: %v", err)
	}
	var descs []string
	for {
		r, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatalf("ListPeer over gRPC: %v", err)
		}
		descs = append(descs, r.GetPeer().GetConf().GetNeighborAddress()+" "+r.GetPeer().GetConf().GetDescription())
	}
	conn.Close()
	if want := []string{ipB + " mesh node-b"}; !slices.Equal(descs, want) {
		t.Errorf("ListPeer over gRPC gave %q; want %q", descs, want)
	}
	// Also orders the gRPC server's goroutines before the next speaker writes
	// grpc.EnableTracing, a package global GoBGP sets in every NewBgpServer.
	peerStatus(t, a, ipB)

	rec := &recorder{}
	b := startSpeaker(t, ipB, speakerOpts{grpc: grpcAddr, log: testLogger(t, rec).With("speaker", ipB)})
	waitFor(t, 10*time.Second, "B logs its gRPC bind failure", func() (bool, string) {
		errs := rec.list()
		return slices.Contains(errs, "failed to listen grpc port"), fmt.Sprint(errs)
	})
	setPeers(t, b, nodePeer(ipB, ipA, "node-a", Mesh))
	waitEstablished(t, session{a, ipB}, session{b, ipA})
	advertise(t, b, prefixB)
	waitPaths(t, a, path(prefixB, ipB))
}

const helperEnv = "MARGAY_BGP_TEST_RESTART_HELPER"

// TestSpeakerGracefulRestart kills -9 a speaker in a child process, as an agent
// restart does: its peer keeps the routes for the restart time the child asked
// for, then drops them.
func TestSpeakerGracefulRestart(t *testing.T) {
	needNetNS(t)
	const restart = 4 * time.Second
	b := startSpeaker(t, ipB, speakerOpts{})
	setPeers(t, b, nodePeer(ipB, ipA, "node-a", Mesh))

	cmd := exec.Command(os.Args[0], "-test.run=^TestSpeakerRestartHelper$", "-test.count=1")
	cmd.Env = append(os.Environ(), helperEnv+"="+restart.String())
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = cmd.Stdout
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	w := &testWriter{t: t}
	t.Cleanup(w.stop)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			fmt.Fprintf(w, "child: %s", sc.Text())
		}
	}()

	waitEstablished(t, session{b, ipA})
	waitPaths(t, b, path(prefixA, ipA))
	killed := time.Now()
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "B sees the session go down", func() (bool, string) {
		st := peerStatus(t, b, ipA)
		return st.State != "Established", st.State
	})
	down := time.Now()
	if got := bestPaths(t, b); !slices.Equal(got, []route{path(prefixA, ipA)}) {
		t.Fatalf("B dropped A's route when A's session went down: best paths %v", got)
	}
	time.Sleep(restart / 2)
	if got := bestPaths(t, b); !slices.Equal(got, []route{path(prefixA, ipA)}) {
		t.Fatalf("B dropped A's route %v after A went down, before the restart time %v: best paths %v", time.Since(down), restart, got)
	}
	waitPaths(t, b)
	// B's restart timer starts when it sees the session fail, after the kill.
	if held := time.Since(killed); held < restart {
		t.Errorf("B kept A's routes %v; want the restart time %v", held, restart)
	} else {
		t.Logf("B kept A's routes %v after A was killed (restart time %v)", held.Round(time.Millisecond), restart)
	}
}

// TestSpeakerRestartHelper is the child of TestSpeakerGracefulRestart: speaker A,
// advertising prefixA to B, until it is killed.
func TestSpeakerRestartHelper(t *testing.T) {
	v := os.Getenv(helperEnv)
	if v == "" {
		t.Skip("runs only as the child process of TestSpeakerGracefulRestart")
	}
	restart, err := time.ParseDuration(v)
	if err != nil {
		t.Fatal(err)
	}
	a := netip.MustParseAddr(ipA)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := Start(ctx, Config{RouterID: a, ASNumber: asNode, ListenPort: 179, ListenAddresses: []string{ipA}, LocalAddress: a,
		Logger: slog.New(slog.NewTextHandler(os.Stdout, &slog.HandlerOptions{Level: slog.LevelWarn}))})
	if err != nil {
		t.Fatal(err)
	}
	toB := nodePeer(ipA, ipB, "node-b", Mesh)
	toB.MaxRestartTime = restart
	if err := s.SetPeers(ctx, []Peer{toB}); err != nil {
		t.Fatal(err)
	}
	if err := s.SetAdvertised(ctx, []netip.Prefix{prefixA}); err != nil {
		t.Fatal(err)
	}
	fmt.Println("helper ready, pid " + strconv.Itoa(os.Getpid()))
	// The parent kills this process; the bound keeps a lost child from lingering.
	time.Sleep(time.Minute)
	t.Error("not killed within a minute")
}

// fullMesh starts three node speakers at ipA, ipB and ipC, all peered.
func fullMesh(t *testing.T) (a, b, c *Speaker) {
	t.Helper()
	a, b, c = startSpeaker(t, ipA, speakerOpts{}), startSpeaker(t, ipB, speakerOpts{}), startSpeaker(t, ipC, speakerOpts{})
	setPeers(t, a, nodePeer(ipA, ipB, "node-b", Mesh), nodePeer(ipA, ipC, "node-c", Mesh))
	setPeers(t, b, nodePeer(ipB, ipA, "node-a", Mesh), nodePeer(ipB, ipC, "node-c", Mesh))
	setPeers(t, c, nodePeer(ipC, ipA, "node-a", Mesh), nodePeer(ipC, ipB, "node-b", Mesh))
	waitEstablished(t, session{a, ipB}, session{a, ipC}, session{b, ipC})
	return a, b, c
}

// Paths lists every path to a prefix, with the peer that sent it, the best
// first: calc needs the others when the best does not lead to the owner.
func TestSpeakerAllPaths(t *testing.T) {
	needNetNS(t)
	a, b, c := fullMesh(t)
	advertise(t, b, prefixB)
	advertise(t, c, prefixB)
	waitFor(t, sessionTimeout, "A has both paths to "+prefixB.String(), func() (bool, string) {
		ps := allPaths(t, a)
		if len(ps) != 2 || !ps[0].Best || ps[1].Best {
			return false, fmt.Sprint(ps)
		}
		peers := []string{ps[0].Peer.String(), ps[1].Peer.String()}
		slices.Sort(peers)
		for _, p := range ps {
			if p.Prefix != prefixB || p.NextHop != p.Peer {
				return false, fmt.Sprint(ps)
			}
		}
		return slices.Equal(peers, []string{ipB, ipC}), fmt.Sprint(ps)
	})
}

// A peer that sends more than its maxPrefixes loses its session, which stays
// down with a reason that names the limit; the other sessions carry on.
func TestSpeakerMaxPrefixes(t *testing.T) {
	needNetNS(t)
	a := startSpeaker(t, ipA, speakerOpts{})
	tor := startSpeaker(t, ipB, speakerOpts{as: asToR})
	c := startSpeaker(t, ipC, speakerOpts{})
	limited := extPeer(ipB, "tor", asToR)
	limited.MaxPrefixes = 2
	setPeers(t, a, limited, nodePeer(ipA, ipC, "node-c", Mesh))
	// The ToR waits for A to connect: with both ends active, GoBGP's idle
	// hold after a reset makes each close the other's attempts for a while.
	fromToR := extPeer(ipA, "node-a", asNode)
	fromToR.Passive = true
	setPeers(t, tor, fromToR)
	setPeers(t, c, nodePeer(ipC, ipA, "node-a", Mesh))
	advertise(t, tor, prefixA, prefixA2)
	waitEstablished(t, session{a, ipB}, session{a, ipC})
	waitFor(t, sessionTimeout, "A learns the ToR's two prefixes", func() (bool, string) {
		got := bestPaths(t, a)
		return len(got) == 2, fmt.Sprint(got)
	})

	advertise(t, tor, prefixA, prefixA2, prefixB) // one over the limit
	waitFor(t, sessionTimeout, "the ToR's session closed for maxPrefixes", func() (bool, string) {
		st := peerStatus(t, a, ipB)
		return st.State != "Established" && strings.Contains(st.Info, "maximum prefixes exceeded: the peer sent more than maxPrefixes 2"), fmt.Sprintf("%+v", st)
	})
	waitFor(t, sessionTimeout, "A drops the ToR's paths", func() (bool, string) {
		got := bestPaths(t, a)
		return len(got) == 0, fmt.Sprint(got)
	})
	// GoBGP would retry an ordinary session after 5 s: this one must stay
	// down, and keep saying why.
	start := time.Now()
	for time.Since(start) < 8*time.Second {
		st := peerStatus(t, a, ipB)
		if st.State == "Established" || !strings.Contains(st.Info, "maximum prefixes exceeded") {
			t.Fatalf("after %v the ToR's session is %+v; want down for maxPrefixes", time.Since(start).Round(time.Millisecond), st)
		}
		if got := bestPaths(t, a); len(got) != 0 {
			t.Fatalf("after %v A has the ToR's paths again: %v", time.Since(start).Round(time.Millisecond), got)
		}
		time.Sleep(200 * time.Millisecond)
	}
	if st := peerStatus(t, a, ipC); st.State != "Established" {
		t.Errorf("the mesh session went down with the ToR's: %+v", st)
	}
	// Raising the limit re-creates the session.
	limited.MaxPrefixes = 10
	setPeers(t, a, limited, nodePeer(ipA, ipC, "node-c", Mesh))
	waitEstablished(t, session{a, ipB})
	waitFor(t, sessionTimeout, "A learns the ToR's three prefixes", func() (bool, string) {
		got := bestPaths(t, a)
		return len(got) == 3, fmt.Sprint(got)
	})
}

// A peer that announces this node's prefix with the highest local preference
// does not take it over: the node keeps its own path as best, and so goes on
// advertising it, and its peers keep the owner's path beside the rogue one.
func TestSpeakerOwnPathStaysBest(t *testing.T) {
	needNetNS(t)
	a, b, rogue := fullMesh(t)
	advertise(t, a, prefixA)
	waitPaths(t, b, path(prefixA, ipA))

	p, err := localPath(prefixA, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	lp, _ := anypb.New(&gobgpapi.LocalPrefAttribute{LocalPref: math.MaxUint32})
	p.Pattrs = append(p.Pattrs[:2], lp)
	if _, err := rogue.srv.AddPath(context.Background(), &gobgpapi.AddPathRequest{TableType: gobgpapi.TableType_GLOBAL, Path: p}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, sessionTimeout, "A and B see the rogue path", func() (bool, string) {
		ok := true
		var seen []string
		for _, s := range []*Speaker{a, b} {
			ps := allPaths(t, s)
			seen = append(seen, fmt.Sprint(ps))
			ok = ok && slices.ContainsFunc(ps, func(p api.BGPPath) bool { return p.Peer.String() == ipC })
		}
		return ok, strings.Join(seen, "; ")
	})
	// B still has A's own path: A did not withdraw it.
	ps := allPaths(t, b)
	if !slices.ContainsFunc(ps, func(p api.BGPPath) bool { return p.Peer.String() == ipA && p.NextHop.String() == ipA && p.Best }) {
		t.Errorf("B lost A's path to %s, or it is not the best: %v", prefixA, ps)
	}
}

// TestSpeakerIPv6: with their IPv6 addresses, two nodes exchange IPv6 prefixes
// over their IPv4 session (MP-BGP), each with the advertiser's IPv6 address as
// next hop, beside the IPv4 ones; a withdrawal removes only its own family's
// prefix. A speaker without an IPv6 address refuses to advertise one.
func TestSpeakerIPv6(t *testing.T) {
	needNetNS(t)
	a := startSpeaker(t, ipA, speakerOpts{nextHopV6: "fd00:18:1::1"})
	b := startSpeaker(t, ipB, speakerOpts{nextHopV6: "fd00:18:1::2"})
	setPeers(t, a, nodePeer(ipA, ipB, "node-b", Mesh))
	setPeers(t, b, nodePeer(ipB, ipA, "node-a", Mesh))
	waitEstablished(t, session{a, ipB}, session{b, ipA})
	v6A, v6B := netip.MustParsePrefix("fd00:244::/122"), netip.MustParsePrefix("fd00:244::40/122")
	advertise(t, a, prefixA, v6A)
	advertise(t, b, v6B)
	waitPaths(t, b, path(prefixA, ipA), path(v6A, "fd00:18:1::1"))
	waitPaths(t, a, path(v6B, "fd00:18:1::2"))
	advertise(t, a, prefixA)
	waitPaths(t, b, path(prefixA, ipA))

	c := startSpeaker(t, ipC, speakerOpts{})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.SetAdvertised(ctx, []netip.Prefix{v6A}); err == nil || !strings.Contains(err.Error(), "no IPv6 address (margay-node --ip6)") {
		t.Errorf("advertising IPv6 without an IPv6 address: %v", err)
	}
	if _, err := Start(ctx, Config{RouterID: netip.MustParseAddr(ipC), ASNumber: asNode, ListenPort: -1, NextHopV6: netip.MustParseAddr("fe80::1")}); err == nil || !strings.Contains(err.Error(), "not a global IPv6 address") {
		t.Errorf("a link-local IPv6 next hop: %v", err)
	}
}

// TestSpeakerIPv6Session: a node without an IPv4 address (no IPv4 local
// address or listener) peers with a dual-stack node over IPv6. The
// session carries IPv6 unicast alone, from each node's IPv6 address: the
// IPv6 prefixes cross it with the advertiser's address as next hop, the
// dual-stack node's IPv4 prefix does not. An eBGP peer over IPv6 is in the
// external set as a /128, so it learns nothing but the node's own prefixes.
func TestSpeakerIPv6Session(t *testing.T) {
	needNetNS(t)
	const v6A, v6B, v6C = "fd00:18:1::1", "fd00:18:1::2", "fd00:18:1::3"
	for _, a := range []string{v6A, v6B, v6C} {
		if out, err := exec.Command("ip", "-6", "addr", "replace", a+"/128", "dev", "lo", "nodad").CombinedOutput(); err != nil {
			t.Fatalf("ip -6 addr add %s: %v: %s", a, err, out)
		}
	}
	start := func(name, id, v4, v6 string, as uint32) *Speaker {
		c := Config{RouterID: netip.MustParseAddr(id), ASNumber: as, ListenPort: 179, ListenAddresses: []string{v6},
			NextHopV6: netip.MustParseAddr(v6), Logger: testLogger(t).With("speaker", name)}
		if v4 != "" {
			c.LocalAddress, c.ListenAddresses = netip.MustParseAddr(v4), []string{v4, v6}
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		s, err := Start(ctx, c)
		if err != nil {
			t.Fatalf("Start(%s): %v", name, err)
		}
		t.Cleanup(s.Close)
		return s
	}
	a := start("node-a", "192.0.2.1", "", v6A, asNode) // IPv6 only
	b := start("node-b", ipB, ipB, v6B, asNode)        // dual stack
	tor := start("tor", "192.0.2.3", "", v6C, asToR)   // an eBGP router over IPv6
	setPeers(t, a, nodePeer(v6A, v6B, "node-b", Mesh), extPeer(v6C, "tor", asToR))
	setPeers(t, b, nodePeer(v6B, v6A, "node-a", Mesh))
	setPeers(t, tor, extPeer(v6A, "node-a", asNode))
	waitEstablished(t, session{a, v6B}, session{b, v6A}, session{a, v6C}, session{tor, v6A})

	pA, pB := netip.MustParsePrefix("fd00:244::/122"), netip.MustParsePrefix("fd00:244::40/122")
	advertise(t, a, pA)
	advertise(t, b, prefixB, pB)
	waitPaths(t, b, path(pA, v6A))
	waitPaths(t, a, path(pB, v6B))
	// The ToR learns a's own prefix only, not b's through a.
	waitPaths(t, tor, path(pA, v6A))
	for _, sess := range []session{{a, v6B}, {b, v6A}} {
		if got := sessionFamilies(t, sess); !slices.Equal(got, []string{"AFI_IP6/SAFI_UNICAST"}) {
			t.Errorf("session with %s carries %v, want IPv6 unicast only", sess.ip, got)
		}
	}
	for _, p := range allPaths(t, a) {
		if p.Prefix.Addr().Is4() {
			t.Errorf("node-a, IPv6 only, has the IPv4 path %+v", p)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	v4only := startSpeaker(t, ipC, speakerOpts{})
	if err := v4only.SetPeers(ctx, []Peer{extPeer(v6C, "tor", asToR)}); err == nil || !strings.Contains(err.Error(), "no IPv6 address (margay-node --ip6)") {
		t.Errorf("an IPv6 peer on a node without IPv6: %v", err)
	}
}

// sessionFamilies are the families the session has negotiated, as "AFI/SAFI".
func sessionFamilies(t *testing.T, sess session) []string {
	t.Helper()
	var out []string
	err := sess.s.srv.ListPeer(context.Background(), &gobgpapi.ListPeerRequest{Address: sess.ip, EnableAdvertised: false}, func(p *gobgpapi.Peer) {
		for _, as := range p.AfiSafis {
			if as.GetState().GetEnabled() {
				f := as.GetState().GetFamily()
				out = append(out, f.GetAfi().String()+"/"+f.GetSafi().String())
			}
		}
	})
	if err != nil {
		t.Fatalf("ListPeer %s: %v", sess.ip, err)
	}
	return out
}
