package bgp

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	gobgpapi "github.com/osrg/gobgp/v3/api"
	"github.com/osrg/gobgp/v3/pkg/server"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/margay-dev/margay/api"
)

const (
	// connectRetry replaces GoBGP's default of 120 s, with which a session took
	// minutes to come up after a failed first attempt.
	connectRetry = 3 * time.Second
	// exportPolicy is the name of the global export policy Start installs.
	exportPolicy = "margay-export"
	// externalSet is the neighbour set of the eBGP peers, which are sent
	// this node's own routes only, reflector or not.
	externalSet = "margay-ebgp"
	// noNeighbor stands in an empty externalSet: GoBGP matches every
	// neighbour against an empty set, and no peer has this address.
	noNeighbor = "0.0.0.0/32"
	// maxRestartTime is the largest graceful-restart time, in seconds: the
	// capability's field has 12 bits, and GoBGP would spill a larger value into its
	// flags (setting the restart bit, for one).
	maxRestartTime = 1<<12 - 1
	// localPathSource is how GoBGP shows the neighbor of a path added with AddPath
	// (the String of a nil net.IP).
	localPathSource = "<nil>"
)

var (
	ipv4Unicast = &gobgpapi.Family{Afi: gobgpapi.Family_AFI_IP, Safi: gobgpapi.Family_SAFI_UNICAST}
	ipv6Unicast = &gobgpapi.Family{Afi: gobgpapi.Family_AFI_IP6, Safi: gobgpapi.Family_SAFI_UNICAST}

	errClosed = errors.New("bgp: the speaker is closed")
)

// Config configures a Speaker.
type Config struct {
	// RouterID is written as an IPv4 address, usually the node's own; a
	// speaker without an IPv4 address needs one chosen for it.
	RouterID netip.Addr
	ASNumber uint32
	// ListenPort is the port for incoming sessions: 0 means 179, a negative value
	// means accept none (outgoing sessions only).
	ListenPort int
	// ListenAddresses are the addresses to listen on; none means every IPv4
	// address, and every IPv6 one too with NextHopV6.
	ListenAddresses []string
	// LocalAddress is the source address of outgoing sessions, and the only local
	// address incoming sessions are accepted on; the zero Addr lets the kernel choose.
	LocalAddress netip.Addr
	// NextHopV6 is the node's IPv6 address. With it, every IPv4 session also
	// carries IPv6 unicast (MP-BGP), IPv6 prefixes are advertised with it as
	// their next hop, and sessions with IPv6 peers (which carry IPv6 unicast
	// only) have it as their local address; without it, IPv4 only.
	NextHopV6 netip.Addr
	// ClusterID is the route-reflector cluster ID, "" when this node is not a reflector.
	ClusterID string
	// GRPCAddress is where GoBGP's gRPC API listens, so that the gobgp CLI and
	// margayctl work ("127.0.0.1:50051"); "" for no API. Keep it on loopback: the
	// API is unauthenticated.
	GRPCAddress string
	Logger      *slog.Logger // nil means slog.Default()
}

// Speaker is a running GoBGP server with margay's policy. Its methods are safe for
// concurrent use.
type Speaker struct {
	cfg Config
	srv *server.BgpServer
	log *slog.Logger

	stopWatch context.CancelFunc
	changes   chan struct{}
	closeOnce sync.Once

	mu         sync.Mutex // serializes SetPeers, SetAdvertised and Close
	closed     bool
	peers      map[netip.Addr]Peer
	advertised map[netip.Prefix]bool
	external   []string // externalSet's members

	infoMu sync.Mutex
	info   map[string]string // peer address → last error or down reason
}

// Start starts a GoBGP server and returns once it listens and has its policy. A
// gRPC address that cannot be bound is logged, not fatal: the speaker works on
// without its API.
func Start(ctx context.Context, c Config) (*Speaker, error) {
	if !c.RouterID.Is4() {
		return nil, fmt.Errorf("bgp: router ID %q is not an IPv4 address", c.RouterID)
	}
	if c.ASNumber == 0 {
		return nil, errors.New("bgp: AS number 0 is not valid; use 1 to 4294967295")
	}
	if c.ClusterID != "" {
		if a, err := netip.ParseAddr(c.ClusterID); err != nil || !a.Is4() {
			return nil, fmt.Errorf("bgp: route reflector cluster ID %q must be written as an IPv4 address, such as 224.0.0.1", c.ClusterID)
		}
	}
	if c.LocalAddress.IsValid() && !c.LocalAddress.Is4() {
		return nil, fmt.Errorf("bgp: local address %s is not an IPv4 address", c.LocalAddress)
	}
	if c.NextHopV6.IsValid() && (!c.NextHopV6.Is6() || c.NextHopV6.Is4In6() || !c.NextHopV6.IsGlobalUnicast()) {
		return nil, fmt.Errorf("bgp: IPv6 next hop %s is not a global IPv6 address", c.NextHopV6)
	}
	port := c.ListenPort
	switch {
	case port == 0:
		port = api.DefaultBGPPort
	case port < 0:
		port = -1 // GoBGP's "do not listen"
	case port > 65535:
		return nil, fmt.Errorf("bgp: listen port %d is out of range; use 1 to 65535", port)
	}
	listen := c.ListenAddresses
	if len(listen) == 0 {
		// Not GoBGP's default, which always adds "::": that fails on hosts with
		// IPv6 disabled, where margay peers over IPv4 only.
		listen = []string{"0.0.0.0"}
		if c.NextHopV6.IsValid() {
			listen = append(listen, "::")
		}
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	s := &Speaker{
		cfg:        c,
		log:        c.Logger,
		changes:    make(chan struct{}, 1),
		peers:      map[netip.Addr]Peer{},
		advertised: map[netip.Prefix]bool{},
		info:       map[string]string{},
	}
	opts := []server.ServerOption{server.LoggerOption(newGoBGPLogger(c.Logger.With("component", "gobgp"), s.noteGoBGPEvent))}
	if c.GRPCAddress != "" {
		if host, _, err := net.SplitHostPort(c.GRPCAddress); err == nil {
			if a, err := netip.ParseAddr(host); err == nil && !a.IsLoopback() {
				c.Logger.Warn("the GoBGP gRPC API is unauthenticated and listens on a non-loopback address; anyone who reaches it controls this node's routing", "address", c.GRPCAddress)
			}
		}
		opts = append(opts, server.GrpcListenAddress(c.GRPCAddress))
	}
	s.srv = server.NewBgpServer(opts...)
	// Serve never returns; Close stops the server's sessions and listeners.
	go s.srv.Serve()

	if err := s.start(ctx, port, listen); err != nil {
		s.srv.Stop()
		return nil, err
	}
	c.Logger.Info("BGP speaker started", "routerID", c.RouterID, "as", c.ASNumber, "port", port,
		"listen", listen, "clusterID", c.ClusterID, "grpc", c.GRPCAddress)
	return s, nil
}

func (s *Speaker) start(ctx context.Context, port int, listen []string) error {
	c := s.cfg
	err := s.srv.StartBgp(ctx, &gobgpapi.StartBgpRequest{Global: &gobgpapi.Global{
		Asn:             c.ASNumber,
		RouterId:        c.RouterID.String(),
		ListenPort:      int32(port),
		ListenAddresses: listen,
	}})
	if err != nil {
		return fmt.Errorf("bgp: starting GoBGP on port %d of %s: %w", port, strings.Join(listen, ", "), err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}

	// Export: a node advertises only what it originates, so an external peer never
	// learns other nodes' routes through it (and a node is never transit between
	// two external peers). A route reflector passes everything on to its iBGP
	// peers, but not to eBGP ones (a ToR): with itself as next hop it would draw
	// every other node's traffic. Import stays GoBGP's default, accept all.
	def := gobgpapi.RouteAction_REJECT
	if c.ClusterID != "" {
		def = gobgpapi.RouteAction_ACCEPT
	}
	err = s.srv.AddDefinedSet(ctx, &gobgpapi.AddDefinedSetRequest{DefinedSet: &gobgpapi.DefinedSet{
		DefinedType: gobgpapi.DefinedType_NEIGHBOR, Name: externalSet, List: []string{noNeighbor}}})
	if err != nil {
		return fmt.Errorf("bgp: adding the eBGP neighbour set: %w", err)
	}
	s.external = []string{noNeighbor}
	err = s.srv.AddPolicy(ctx, &gobgpapi.AddPolicyRequest{Policy: &gobgpapi.Policy{
		Name: exportPolicy,
		Statements: []*gobgpapi.Statement{{
			Name:       exportPolicy + "-local",
			Conditions: &gobgpapi.Conditions{RouteType: gobgpapi.Conditions_ROUTE_TYPE_LOCAL},
			Actions:    &gobgpapi.Actions{RouteAction: gobgpapi.RouteAction_ACCEPT},
		}, {
			Name:       exportPolicy + "-ebgp",
			Conditions: &gobgpapi.Conditions{NeighborSet: &gobgpapi.MatchSet{Name: externalSet, Type: gobgpapi.MatchSet_ANY}},
			Actions:    &gobgpapi.Actions{RouteAction: gobgpapi.RouteAction_REJECT},
		}},
	}})
	if err != nil {
		return fmt.Errorf("bgp: adding the export policy: %w", err)
	}
	err = s.srv.AddPolicyAssignment(ctx, &gobgpapi.AddPolicyAssignmentRequest{Assignment: &gobgpapi.PolicyAssignment{
		Name:          "global",
		Direction:     gobgpapi.PolicyDirection_EXPORT,
		Policies:      []*gobgpapi.Policy{{Name: exportPolicy}},
		DefaultAction: def,
	}})
	if err != nil {
		return fmt.Errorf("bgp: assigning the export policy: %w", err)
	}

	wctx, cancel := context.WithCancel(context.Background())
	err = s.srv.WatchEvent(wctx, &gobgpapi.WatchEventRequest{
		Peer: &gobgpapi.WatchEventRequest_Peer{},
		Table: &gobgpapi.WatchEventRequest_Table{
			Filters: []*gobgpapi.WatchEventRequest_Table_Filter{{Type: gobgpapi.WatchEventRequest_Table_Filter_BEST, Init: true}},
		}}, s.onEvent)
	if err != nil {
		cancel()
		return fmt.Errorf("bgp: watching best paths and peers: %w", err)
	}
	s.stopWatch = cancel
	return nil
}

// onEvent kicks Changes when a best path learned from a peer changes. Our own
// paths are skipped, so that advertising does not wake the consumer; a batch
// can mix both, hence the loop runs to the end. A peer that GoBGP closed for
// maxPrefixes is held down.
func (s *Speaker) onEvent(r *gobgpapi.WatchEventResponse) {
	s.syncWithServer()
	if p := r.GetPeer().GetPeer(); p.GetState().GetAdminState() == gobgpapi.PeerState_PFX_CT {
		if addr, err := netip.ParseAddr(p.GetConf().GetNeighborAddress()); err == nil {
			// Not in GoBGP's watcher goroutine: holding down calls its API.
			go s.holdDown(addr)
		}
		return
	}
	t := r.GetTable()
	if t == nil {
		return
	}
	for _, p := range t.Paths {
		if isLocal(p) {
			continue
		}
		select {
		case s.changes <- struct{}{}:
		default:
		}
		return
	}
}

// syncWithServer makes a round trip through GoBGP's server goroutine. GoBGP turns
// its path objects into API paths (ListPath, WatchEvent) outside that goroutine,
// which later modifies them (graceful restart marks them stale); the round trip
// orders such reads before the later writes, which the race detector otherwise
// reports as a data race.
func (s *Speaker) syncWithServer() {
	_, _ = s.srv.GetBgp(context.Background(), &gobgpapi.GetBgpRequest{})
}

func isLocal(p *gobgpapi.Path) bool {
	return p.NeighborIp == localPathSource || p.NeighborIp == ""
}

// Changes returns a channel that receives (without blocking the speaker, at most
// one pending) whenever the best paths learned from peers may have changed. Read
// Paths after each receive.
func (s *Speaker) Changes() <-chan struct{} { return s.changes }

// Close stops the speaker: it sends CEASE to every peer, which then drop this
// node's routes at once. It is for cleanup and tests. An agent that restarts must
// not call it, but just exit, so that graceful restart keeps its routes at the
// peers. (GoBGP's Serve goroutine cannot be stopped and stays parked.)
func (s *Speaker) Close() {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		if s.stopWatch != nil {
			s.stopWatch()
		}
		s.srv.Stop()
	})
}

// SetPeers makes the speaker's sessions those in peers: it adds the new peers,
// deletes the gone ones, and deletes and re-adds a peer whose settings changed
// (GoBGP's UpdatePeer ignores route-reflector changes). Sessions of unchanged peers
// are not touched. It carries on past a failing peer and returns all errors; a
// peer that failed is retried by the next call.
func (s *Speaker) SetPeers(ctx context.Context, peers []Peer) error {
	want := make(map[netip.Addr]Peer, len(peers))
	for _, p := range peers {
		switch {
		case !p.Address.Is4() && !p.Address.Is6() || p.Address.Is4In6() || p.Address.Zone() != "":
			return fmt.Errorf("bgp: peer %q has address %q; give a plain IPv4 or IPv6 address", p.Name, p.Address)
		case p.Address.Is6() && !s.cfg.NextHopV6.IsValid():
			return fmt.Errorf("bgp: peer %s (%s %s) is IPv6, but this node has no IPv6 address (margay-node --ip6)", p.Address, p.Type, p.Name)
		case p.Port < 0 || p.Port > 65535:
			return fmt.Errorf("bgp: peer %s has port %d; use 1 to 65535, or 0 for 179", p.Address, p.Port)
		case p.ASNumber == 0:
			return fmt.Errorf("bgp: peer %s has AS number 0; use 1 to 4294967295", p.Address)
		}
		if _, dup := want[p.Address]; dup {
			return fmt.Errorf("bgp: peer %s is listed twice", p.Address)
		}
		want[p.Address] = p
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errClosed
	}
	// A peer deleted behind margay's back (gobgp neighbor del) is added again.
	// Peers added that way are left alone.
	configured := map[string]bool{}
	if err := s.srv.ListPeer(ctx, &gobgpapi.ListPeerRequest{}, func(p *gobgpapi.Peer) {
		configured[p.GetConf().GetNeighborAddress()] = true
	}); err != nil {
		return fmt.Errorf("bgp: listing peers: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	for addr, p := range s.peers {
		if !configured[addr.String()] {
			s.log.Warn("BGP peer was deleted outside margay; adding it again", "peer", addr, "type", p.Type, "name", p.Name)
			delete(s.peers, addr)
		}
	}

	// The eBGP set before any peer is added, so a new eBGP peer's first
	// update is filtered already.
	if err := s.setExternal(ctx, want); err != nil {
		return err
	}
	var errs []error
	// Deletions first: a changed peer is deleted here and added back below.
	for _, addr := range sortedKeys(s.peers) {
		old := s.peers[addr]
		if p, ok := want[addr]; ok && p == old {
			continue
		}
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		if err := s.deletePeer(ctx, old, want[addr].Password); err != nil {
			errs = append(errs, err)
			continue
		}
		delete(s.peers, addr)
		if _, ok := want[addr]; ok {
			s.log.Info("BGP peer changed; resetting its session", "peer", addr, "type", old.Type, "name", old.Name)
		} else {
			s.log.Info("BGP peer removed", "peer", addr, "type", old.Type, "name", old.Name)
		}
	}
	for _, addr := range sortedKeys(want) {
		if _, ok := s.peers[addr]; ok {
			continue // unchanged, or a failed deletion of a changed peer
		}
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		p := want[addr]
		s.clearInfo(addr)
		if err := s.srv.AddPeer(ctx, &gobgpapi.AddPeerRequest{Peer: s.gobgpPeer(p)}); err != nil {
			errs = append(errs, fmt.Errorf("bgp: adding peer %s (%s %s): %w", addr, p.Type, p.Name, err))
			continue
		}
		s.peers[addr] = p
		s.log.Info("BGP peer added", "peer", addr, "port", p.Port, "as", p.ASNumber, "type", p.Type, "name", p.Name,
			"routeReflectorClient", p.RouteReflectorClient, "passive", p.Passive)
	}
	return errors.Join(errs...)
}

// setExternal makes externalSet the addresses of the eBGP peers in want (and
// noNeighbor, which stays). It adds and removes members in place: GoBGP's
// replace puts a new set beside the one the policy already holds.
func (s *Speaker) setExternal(ctx context.Context, want map[netip.Addr]Peer) error {
	list := []string{noNeighbor}
	for _, addr := range sortedKeys(want) {
		if want[addr].ASNumber != s.cfg.ASNumber {
			list = append(list, netip.PrefixFrom(addr, addr.BitLen()).String())
		}
	}
	var add, del []string
	for _, a := range list {
		if !slices.Contains(s.external, a) {
			add = append(add, a)
		}
	}
	for _, a := range s.external {
		if !slices.Contains(list, a) {
			del = append(del, a)
		}
	}
	set := func(l []string) *gobgpapi.DefinedSet {
		return &gobgpapi.DefinedSet{DefinedType: gobgpapi.DefinedType_NEIGHBOR, Name: externalSet, List: l}
	}
	if len(add) > 0 {
		if err := s.srv.AddDefinedSet(ctx, &gobgpapi.AddDefinedSetRequest{DefinedSet: set(add)}); err != nil {
			return fmt.Errorf("bgp: adding to the eBGP neighbour set: %w", err)
		}
	}
	if len(del) > 0 {
		if err := s.srv.DeleteDefinedSet(ctx, &gobgpapi.DeleteDefinedSetRequest{DefinedSet: set(del)}); err != nil {
			return fmt.Errorf("bgp: removing from the eBGP neighbour set: %w", err)
		}
	}
	s.external = list
	return nil
}

// deletePeer deletes old from GoBGP. newPassword is the password of the peer that
// replaces it, "" if none.
func (s *Speaker) deletePeer(ctx context.Context, old Peer, newPassword string) error {
	addr := old.Address.String()
	if old.Password != "" && newPassword == "" {
		// GoBGP's DeletePeer leaves the peer's TCP MD5 key on the listening socket,
		// so the kernel would drop the peer's connections without a signature from
		// then on: a password removed on both sides would keep the session down for
		// good. UpdatePeer with the password cleared re-creates the peer and, on the
		// way, clears the key; the plain DeletePeer below then removes it.
		p := s.gobgpPeer(old)
		p.Conf.AuthPassword = ""
		if _, err := s.srv.UpdatePeer(ctx, &gobgpapi.UpdatePeerRequest{Peer: p}); err != nil {
			return fmt.Errorf("bgp: clearing the TCP MD5 key of peer %s: %w", addr, err)
		}
	}
	if err := s.srv.DeletePeer(ctx, &gobgpapi.DeletePeerRequest{Address: addr}); err != nil {
		return fmt.Errorf("bgp: deleting peer %s (%s %s): %w", addr, old.Type, old.Name, err)
	}
	s.clearInfo(old.Address)
	return nil
}

// holdDown replaces a peer that GoBGP closed for maxPrefixes (admin state
// PFX_CT) with the same peer, administratively down and marked as held. GoBGP
// alone is not enough: when the peer's TCP close wins the race against
// GoBGP's own Cease, GoBGP takes it for a graceful restart and keeps the
// peer's paths, as stale, for the peer's restart time (up to hours). Deleting
// the peer drops them; re-adding it down keeps it from coming back, and the
// mark keeps the reason visible (node status, gobgp neighbor).
func (s *Speaker) holdDown(addr netip.Addr) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s.mu.Lock()
	defer s.mu.Unlock()
	p, ok := s.peers[addr]
	if s.closed || !ok {
		return
	}
	pfxCt := false
	if err := s.srv.ListPeer(ctx, &gobgpapi.ListPeerRequest{Address: addr.String()}, func(gp *gobgpapi.Peer) {
		pfxCt = gp.GetState().GetAdminState() == gobgpapi.PeerState_PFX_CT
	}); err != nil || !pfxCt {
		return // gone, or held already: a stale event
	}
	log := s.log.With("peer", addr, "type", p.Type, "name", p.Name, "maxPrefixes", p.MaxPrefixes)
	if err := s.deletePeer(ctx, p, p.Password); err != nil {
		log.Error("BGP peer sent more than maxPrefixes, but deleting it to drop its paths failed", "err", err)
		return
	}
	gp := s.gobgpPeer(p)
	gp.Conf.AdminDown = true
	gp.Conf.Description += " " + heldMark
	if err := s.srv.AddPeer(ctx, &gobgpapi.AddPeerRequest{Peer: gp}); err != nil {
		// The next SetPeers adds it again, up.
		delete(s.peers, addr)
		log.Error("BGP peer sent more than maxPrefixes and was deleted, but adding it back held down failed", "err", err)
		return
	}
	log.Warn("BGP peer sent more than maxPrefixes: its paths are dropped and its session stays down until the BGPPeer changes")
}

// gobgpPeer is p as GoBGP's API wants it.
func (s *Speaker) gobgpPeer(p Peer) *gobgpapi.Peer {
	restart := p.MaxRestartTime
	if restart <= 0 {
		restart = api.DefaultMaxRestartTime
	}
	gp := &gobgpapi.Peer{
		Conf: &gobgpapi.PeerConf{
			NeighborAddress: p.Address.String(),
			PeerAsn:         p.ASNumber,
			AuthPassword:    p.Password,
			Description:     p.description(),
		},
		Timers: &gobgpapi.Timers{Config: &gobgpapi.TimersConfig{
			ConnectRetry:      uint64(connectRetry / time.Second),
			HoldTime:          seconds(p.HoldTime),
			KeepaliveInterval: seconds(p.KeepaliveTime),
		}},
		Transport: &gobgpapi.Transport{RemotePort: uint32(p.Port), PassiveMode: p.Passive},
		// Both halves are needed: the per-peer switch (Global.GracefulRestart is not
		// applied to peers) and the per-family one, without which no family is
		// preserved. LocalRestarting stays off: set on a first boot it only delays
		// the initial updates.
		GracefulRestart: &gobgpapi.GracefulRestart{
			Enabled:     true,
			RestartTime: uint32(min(seconds(restart), maxRestartTime)),
		},
	}
	for _, f := range s.families(p.Address) {
		as := &gobgpapi.AfiSafi{
			Config:            &gobgpapi.AfiSafiConfig{Family: f, Enabled: true},
			MpGracefulRestart: &gobgpapi.MpGracefulRestart{Config: &gobgpapi.MpGracefulRestartConfig{Enabled: true}},
		}
		if p.MaxPrefixes > 0 {
			// GoBGP counts the peer's prefixes as they arrive, per family: one
			// over sends a Cease (maximum number of prefixes reached), closes
			// the session and keeps it down (admin state PFX_CT) until the peer
			// is re-added.
			as.PrefixLimits = &gobgpapi.PrefixLimit{Family: f, MaxPrefixes: p.MaxPrefixes}
		}
		gp.AfiSafis = append(gp.AfiSafis, as)
	}
	if local := s.localAddress(p.Address); local.IsValid() {
		gp.Transport.LocalAddress = local.String()
	}
	if p.RouteReflectorClient {
		gp.RouteReflector = &gobgpapi.RouteReflector{RouteReflectorClient: true, RouteReflectorClusterId: s.cfg.ClusterID}
	}
	return gp
}

// families are the address families of a session with peer: IPv6 alone
// with an IPv6 peer, IPv4 with IPv6 beside it (MP-BGP) when this node has an
// IPv6 address, else IPv4.
func (s *Speaker) families(peer netip.Addr) []*gobgpapi.Family {
	switch {
	case peer.Is6():
		return []*gobgpapi.Family{ipv6Unicast}
	case s.cfg.NextHopV6.IsValid():
		return []*gobgpapi.Family{ipv4Unicast, ipv6Unicast}
	}
	return []*gobgpapi.Family{ipv4Unicast}
}

// allFamilies are the families of every session this node can have.
func (s *Speaker) allFamilies() []*gobgpapi.Family { return s.families(netip.IPv4Unspecified()) }

// localAddress is the local address of a session with peer, invalid to let
// the kernel choose.
func (s *Speaker) localAddress(peer netip.Addr) netip.Addr {
	if peer.Is6() {
		return s.cfg.NextHopV6
	}
	return s.cfg.LocalAddress
}

// seconds rounds d up to whole seconds, so that a short non-zero time does not
// become 0, which GoBGP reads as "default".
func seconds(d time.Duration) uint64 {
	if d <= 0 {
		return 0
	}
	return uint64((d + time.Second - 1) / time.Second)
}

// SetAdvertised makes the speaker originate exactly prefixes (IPv6 ones only
// with Config.NextHopV6). It
// withdraws the prefixes of the previous call that are gone, and adds every prefix
// again: GoBGP ignores an identical AddPath (nothing reaches the peers), so a
// periodic call is cheap and repairs a path deleted behind margay's back, with the
// gobgp CLI for instance.
func (s *Speaker) SetAdvertised(ctx context.Context, prefixes []netip.Prefix) error {
	want := make(map[netip.Prefix]bool, len(prefixes))
	for _, p := range prefixes {
		switch {
		case !p.IsValid() || p.Addr().Is4In6():
			return fmt.Errorf("bgp: cannot advertise %q: not a prefix", p)
		case p.Addr().Is6() && !s.cfg.NextHopV6.IsValid():
			return fmt.Errorf("bgp: cannot advertise %s: this node has no IPv6 address (margay-node --ip6)", p)
		}
		want[p.Masked()] = true
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return errClosed
	}
	var errs []error
	for _, p := range sortedKeys(s.advertised) {
		if want[p] {
			continue
		}
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		// A withdrawal names the path (a DeletePath with neither path nor UUID
		// deletes every local path) and says IsWithdraw, without which GoBGP wants a
		// next hop.
		path, err := localPath(p, s.cfg.NextHopV6)
		if err == nil {
			path.IsWithdraw = true
			err = s.srv.DeletePath(ctx, &gobgpapi.DeletePathRequest{TableType: gobgpapi.TableType_GLOBAL, Family: path.Family, Path: path})
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("bgp: withdrawing %s: %w", p, err))
			continue
		}
		delete(s.advertised, p)
		s.log.Debug("withdrew prefix", "prefix", p)
	}
	for _, p := range sortedKeys(want) {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		path, err := localPath(p, s.cfg.NextHopV6)
		if err == nil {
			_, err = s.srv.AddPath(ctx, &gobgpapi.AddPathRequest{TableType: gobgpapi.TableType_GLOBAL, Path: path})
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("bgp: advertising %s: %w", p, err))
			continue
		}
		if !s.advertised[p] {
			s.advertised[p] = true
			s.log.Debug("advertised prefix", "prefix", p)
		}
	}
	return errors.Join(errs...)
}

// localPath is p originated here: origin IGP, next hop 0.0.0.0, which GoBGP
// replaces with each session's local address (for IPv6, which travels over
// IPv4 sessions, the node's IPv6 address instead), and the highest local
// preference. A node originates only its own blocks and pods, and its path
// must stay its best: a peer's path with a higher local preference would
// otherwise win on this node, which then stops advertising its own prefix
// (GoBGP exports best paths only) and leaves the others only the peer's path.
// On a tie the local path wins. iBGP peers see the same preference; eBGP
// peers are not sent it.
func localPath(p netip.Prefix, nextHopV6 netip.Addr) (*gobgpapi.Path, error) {
	nlri, err := anypb.New(&gobgpapi.IPAddressPrefix{Prefix: p.Addr().String(), PrefixLen: uint32(p.Bits())})
	if err != nil {
		return nil, err
	}
	family := ipv4Unicast
	var nextHop proto.Message = &gobgpapi.NextHopAttribute{NextHop: "0.0.0.0"}
	if p.Addr().Is6() {
		family = ipv6Unicast
		nextHop = &gobgpapi.MpReachNLRIAttribute{Family: ipv6Unicast, NextHops: []string{nextHopV6.String()}, Nlris: []*anypb.Any{nlri}}
	}
	var attrs []*anypb.Any
	for _, m := range []proto.Message{
		&gobgpapi.OriginAttribute{Origin: 0},
		nextHop,
		&gobgpapi.LocalPrefAttribute{LocalPref: math.MaxUint32},
	} {
		a, err := anypb.New(m)
		if err != nil {
			return nil, err
		}
		attrs = append(attrs, a)
	}
	return &gobgpapi.Path{Family: family, Nlri: nlri, Pattrs: attrs}, nil
}

// Paths returns every unicast path of the sessions' families learned from
// peers, best or not,
// sorted by prefix with each prefix's best path first. Paths this speaker
// originates are left out. Paths a restarting peer left behind (graceful
// restart) are included until they expire. All paths, not just the best: the
// data plane must skip a best path that does not lead to its prefix's owner
// and take the next one that does (felix/calc).
func (s *Speaker) Paths(ctx context.Context) ([]api.BGPPath, error) {
	var out []api.BGPPath
	var bad []error
	for _, f := range s.allFamilies() {
		err := s.srv.ListPath(ctx, &gobgpapi.ListPathRequest{TableType: gobgpapi.TableType_GLOBAL, Family: f},
			func(d *gobgpapi.Destination) {
				for _, p := range d.Paths {
					if p.IsWithdraw || isLocal(p) {
						continue
					}
					path, err := toPath(d.Prefix, p)
					if err != nil {
						bad = append(bad, err)
						continue
					}
					out = append(out, path)
				}
			})
		s.syncWithServer()
		if err != nil {
			return nil, fmt.Errorf("bgp: listing paths: %w", err)
		}
	}
	// ListPath stops early without an error when ctx ends.
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if len(bad) > 0 {
		s.log.Warn("skipped paths that could not be read", "count", len(bad), "first", bad[0])
	}
	sort.SliceStable(out, func(i, j int) bool {
		if c := out[i].Prefix.Compare(out[j].Prefix); c != 0 {
			return c < 0
		}
		return out[i].Best && !out[j].Best
	})
	return out, nil
}

func toPath(prefix string, p *gobgpapi.Path) (api.BGPPath, error) {
	pfx, err := netip.ParsePrefix(prefix)
	if err != nil {
		return api.BGPPath{}, fmt.Errorf("prefix %q: %w", prefix, err)
	}
	peer, _ := netip.ParseAddr(p.NeighborIp)
	for _, a := range p.Pattrs {
		m, err := a.UnmarshalNew()
		if err != nil {
			continue
		}
		var nh string
		switch v := m.(type) {
		case *gobgpapi.NextHopAttribute:
			nh = v.NextHop
		case *gobgpapi.MpReachNLRIAttribute:
			if len(v.NextHops) > 0 {
				nh = v.NextHops[0]
			}
		default:
			continue
		}
		addr, err := netip.ParseAddr(nh)
		if err != nil {
			return api.BGPPath{}, fmt.Errorf("%s: next hop %q: %w", prefix, nh, err)
		}
		return api.BGPPath{Prefix: pfx, NextHop: addr, Peer: peer, Best: p.Best}, nil
	}
	return api.BGPPath{}, fmt.Errorf("%s: no next hop", prefix)
}

// PeerStatus is the state of one configured session.
type PeerStatus struct {
	Address netip.Addr
	Type    PeerType // 0 for a peer not added by this package
	Name    string
	State   string    // "Idle", "Connect", "Active", "OpenSent", "OpenConfirm", "Established"
	Since   time.Time // when the session reached State; zero if unknown
	Info    string    // the last error or down reason, when known
}

var sessionStates = map[gobgpapi.PeerState_SessionState]string{
	gobgpapi.PeerState_IDLE:        "Idle",
	gobgpapi.PeerState_CONNECT:     "Connect",
	gobgpapi.PeerState_ACTIVE:      "Active",
	gobgpapi.PeerState_OPENSENT:    "OpenSent",
	gobgpapi.PeerState_OPENCONFIRM: "OpenConfirm",
	gobgpapi.PeerState_ESTABLISHED: "Established",
}

// sessionOf is a peer's session state by name, and since when it has been in
// it (zero if unknown), as the API reports them.
func sessionOf(p *gobgpapi.Peer) (string, time.Time) {
	st := p.GetState().GetSessionState()
	name := sessionStates[st]
	if name == "" {
		name = "Unknown"
	}
	ts := p.GetTimers().GetState()
	t := ts.GetDowntime()
	if st == gobgpapi.PeerState_ESTABLISHED {
		t = ts.GetUptime()
	}
	if t == nil {
		return name, time.Time{}
	}
	return name, t.AsTime()
}

// Peers returns the state of every session, sorted by address.
func (s *Speaker) Peers(ctx context.Context) ([]PeerStatus, error) {
	var out []PeerStatus
	err := s.srv.ListPeer(ctx, &gobgpapi.ListPeerRequest{}, func(p *gobgpapi.Peer) {
		conf, state := p.GetConf(), p.GetState()
		addr, err := netip.ParseAddr(conf.GetNeighborAddress())
		if err != nil {
			return // an interface (unnumbered) peer; margay adds none
		}
		st := PeerStatus{Address: addr}
		var since time.Time
		if st.State, since = sessionOf(p); !since.IsZero() {
			st.Since = since.Local()
		}
		st.Type, st.Name, _ = ParseDescription(conf.GetDescription())
		switch {
		case closedForMaxPrefixes(p):
			st.Info = maxPrefixesReason(p)
		case state.GetAdminState() == gobgpapi.PeerState_DOWN:
			st.Info = "administratively shut down"
		case p.GetTransport().GetPassiveMode() && st.State != "Established":
			st.Info = "passive: waiting for the peer to connect"
		}
		out = append(out, st)
	})
	if err != nil {
		return nil, fmt.Errorf("bgp: listing peers: %w", err)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	s.infoMu.Lock()
	for i := range out {
		if info := s.info[out[i].Address.String()]; info != "" && !strings.HasPrefix(out[i].Info, maxPrefixesText) {
			out[i].Info = info
		}
	}
	s.infoMu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Address.Less(out[j].Address) })
	return out, nil
}

func (s *Speaker) clearInfo(addr netip.Addr) {
	s.infoMu.Lock()
	delete(s.info, addr.String())
	s.infoMu.Unlock()
}

// noteGoBGPEvent keeps, per peer, the last reason GoBGP logged for a session not
// coming up or going down: its API has no field for it.
func (s *Speaker) noteGoBGPEvent(msg string, f goBGPFields) {
	addr, _ := f["Key"].(string)
	if addr == "" {
		return
	}
	var info string
	switch msg {
	case "Peer Down":
		info = fmt.Sprintf("session down: %v", f["Reason"])
	case "failed to connect":
		info = fmt.Sprintf("connect: %v", f["Error"])
	case "received notification", "sent notification":
		info = msg + ": " + notificationText(f)
	case "hold timer expired", "graceful restart timer expired":
		info = msg
	default:
		return
	}
	s.infoMu.Lock()
	s.info[addr] = info
	s.infoMu.Unlock()
}

func sortedKeys[K interface {
	comparable
	Compare(K) int
}, V any](m map[K]V) []K {
	out := make([]K, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Compare(out[j]) < 0 })
	return out
}
