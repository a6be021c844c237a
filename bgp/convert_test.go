package bgp

import (
	"bytes"
	"log/slog"
	"net/netip"
	"strings"
	"testing"
	"time"

	gobgpapi "github.com/osrg/gobgp/v3/api"
	gobgplog "github.com/osrg/gobgp/v3/pkg/log"
	"github.com/osrg/gobgp/v3/pkg/packet/bgp"
)

// These tests need no root: they check what the speaker hands GoBGP and what it
// makes of GoBGP's log messages.

func TestGoBGPPeer(t *testing.T) {
	s := &Speaker{cfg: Config{LocalAddress: netip.MustParseAddr("198.18.1.11"), ClusterID: "224.0.0.1"}}
	p := Peer{
		Address: netip.MustParseAddr("198.18.1.12"), Port: 1179, ASNumber: 65001, Type: NodeSpecific, Name: "rr-b",
		Password: "pw", KeepaliveTime: 1500 * time.Millisecond, HoldTime: 9 * time.Second,
		MaxRestartTime: 2 * time.Hour, RouteReflectorClient: true, Passive: true,
	}
	g := s.gobgpPeer(p)
	checks := []struct {
		what      string
		got, want any
	}{
		{"neighbor address", g.Conf.NeighborAddress, "198.18.1.12"},
		{"peer AS", g.Conf.PeerAsn, uint32(65001)},
		{"password", g.Conf.AuthPassword, "pw"},
		{"description", g.Conf.Description, "node rr-b"},
		{"connect retry", g.Timers.Config.ConnectRetry, uint64(3)},
		{"hold time", g.Timers.Config.HoldTime, uint64(9)},
		{"keepalive rounded up", g.Timers.Config.KeepaliveInterval, uint64(2)},
		{"remote port", g.Transport.RemotePort, uint32(1179)},
		{"local address", g.Transport.LocalAddress, "198.18.1.11"},
		{"passive", g.Transport.PassiveMode, true},
		{"graceful restart", g.GracefulRestart.Enabled, true},
		{"restart time capped at 12 bits", g.GracefulRestart.RestartTime, uint32(4095)},
		{"local restarting", g.GracefulRestart.LocalRestarting, false},
		{"families", len(g.AfiSafis), 1},
		{"family", g.AfiSafis[0].Config.Family.String(), ipv4Unicast.String()},
		{"per-family graceful restart", g.AfiSafis[0].MpGracefulRestart.GetConfig().GetEnabled(), true},
		{"route-reflector client", g.RouteReflector.GetRouteReflectorClient(), true},
		{"cluster ID", g.RouteReflector.GetRouteReflectorClusterId(), "224.0.0.1"},
	}
	for _, c := range checks {
		if c.got != c.want {
			t.Errorf("%s: got %v, want %v", c.what, c.got, c.want)
		}
	}

	g = (&Speaker{}).gobgpPeer(Peer{Address: netip.MustParseAddr("192.0.2.1"), ASNumber: 65001, Type: Global, Name: "tor"})
	if g.RouteReflector != nil || g.Transport.LocalAddress != "" || g.Transport.PassiveMode ||
		g.Timers.Config.HoldTime != 0 || g.GracefulRestart.RestartTime != 120 {
		t.Errorf("plain peer: route reflector %v, local address %q, passive %v, hold time %d, restart time %d; "+
			"want none, \"\", false, 0 (GoBGP's default), 120",
			g.RouteReflector, g.Transport.LocalAddress, g.Transport.PassiveMode, g.Timers.Config.HoldTime, g.GracefulRestart.RestartTime)
	}
}

func TestLocalPath(t *testing.T) {
	p, err := localPath(netip.MustParsePrefix("10.244.1.0/26"), netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	var nlri gobgpapi.IPAddressPrefix
	if err := p.Nlri.UnmarshalTo(&nlri); err != nil || nlri.Prefix != "10.244.1.0" || nlri.PrefixLen != 26 {
		t.Errorf("NLRI %v (%v); want 10.244.1.0/26", &nlri, err)
	}
	var origin, nh bool
	for _, a := range p.Pattrs {
		m, err := a.UnmarshalNew()
		if err != nil {
			t.Fatal(err)
		}
		switch v := m.(type) {
		case *gobgpapi.OriginAttribute:
			origin = v.Origin == 0
		case *gobgpapi.NextHopAttribute:
			nh = v.NextHop == "0.0.0.0"
		}
	}
	if !origin || !nh {
		t.Errorf("attributes %v: want origin IGP and next hop 0.0.0.0", p.Pattrs)
	}
}

func TestGoBGPLogger(t *testing.T) {
	var buf bytes.Buffer
	var noted []string
	l := newGoBGPLogger(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})),
		func(msg string, _ goBGPFields) { noted = append(noted, msg) })

	// GoBGP calls Fatal when its gRPC port is taken, and Panic on "impossible"
	// states; neither may take the agent down.
	l.Fatal("failed to listen grpc port", gobgplog.Fields{"Err": "address in use"})
	l.Panic("code logic bug", gobgplog.Fields{"Topic": "Peer"})
	l.Debug("failed to connect", gobgplog.Fields{"Key": "192.0.2.1"})
	out := buf.String()
	for _, want := range []string{
		`level=ERROR msg="failed to listen grpc port" err="address in use"`,
		`level=ERROR msg="code logic bug" topic=Peer`,
	} {
		if !strings.Contains(out, want) {
			t.Errorf("log output %q lacks %q", out, want)
		}
	}
	if strings.Contains(out, "failed to connect") {
		t.Errorf("a debug message reached an info-level handler: %q", out)
	}
	if len(noted) != 3 {
		t.Errorf("note saw %q; want all three messages, the debug one too", noted)
	}
	if l.GetLevel() != gobgplog.DebugLevel {
		t.Errorf("GetLevel = %v; want debug, so that GoBGP emits its connect errors", l.GetLevel())
	}
	l.SetLevel(gobgplog.ErrorLevel)
	buf.Reset()
	l.Warn("dropped", nil)
	if buf.Len() != 0 {
		t.Errorf("after SetLevel(error), a warning was written: %q", buf.String())
	}
}

func TestPeerInfoFromLog(t *testing.T) {
	s := &Speaker{info: map[string]string{}}
	for _, tc := range []struct {
		msg    string
		fields goBGPFields
		want   string
	}{
		{"failed to connect", goBGPFields{"Key": "192.0.2.1", "Error": "dial tcp: connection refused"}, "connect: dial tcp: connection refused"},
		{"Peer Down", goBGPFields{"Key": "192.0.2.1", "Reason": "hold-timer-expired"}, "session down: hold-timer-expired"},
		{"received notification", goBGPFields{"Key": "192.0.2.1", "Code": uint8(bgp.BGP_ERROR_CEASE), "Subcode": uint8(bgp.BGP_ERROR_SUB_PEER_DECONFIGURED)},
			"received notification: " + bgp.NewNotificationErrorCode(bgp.BGP_ERROR_CEASE, bgp.BGP_ERROR_SUB_PEER_DECONFIGURED).String()},
		{"sent notification", goBGPFields{"Key": "192.0.2.1", "Data": bgp.NewMessageError(bgp.BGP_ERROR_OPEN_MESSAGE_ERROR, bgp.BGP_ERROR_SUB_BAD_PEER_AS, nil, "as number mismatch")},
			"sent notification: " + bgp.NewNotificationErrorCode(bgp.BGP_ERROR_OPEN_MESSAGE_ERROR, bgp.BGP_ERROR_SUB_BAD_PEER_AS).String() + ": as number mismatch"},
		{"Add a peer configuration", goBGPFields{"Key": "192.0.2.1"}, "sent notification: " + bgp.NewNotificationErrorCode(bgp.BGP_ERROR_OPEN_MESSAGE_ERROR, bgp.BGP_ERROR_SUB_BAD_PEER_AS).String() + ": as number mismatch"},
	} {
		s.noteGoBGPEvent(tc.msg, tc.fields)
		if got := s.info["192.0.2.1"]; got != tc.want {
			t.Errorf("after %q: info %q, want %q", tc.msg, got, tc.want)
		}
	}
}

// An established session says what it received, by family when it carries
// both.
func TestPeerInfoReceived(t *testing.T) {
	af := func(afi gobgpapi.Family_Afi, n uint64) *gobgpapi.AfiSafi {
		return &gobgpapi.AfiSafi{Config: &gobgpapi.AfiSafiConfig{Family: &gobgpapi.Family{Afi: afi, Safi: gobgpapi.Family_SAFI_UNICAST}},
			State: &gobgpapi.AfiSafiState{Received: n}}
	}
	up := &gobgpapi.PeerState{SessionState: gobgpapi.PeerState_ESTABLISHED}
	for _, c := range []struct {
		afs  []*gobgpapi.AfiSafi
		want string
	}{
		{[]*gobgpapi.AfiSafi{af(gobgpapi.Family_AFI_IP, 3)}, "3 routes received"},
		{[]*gobgpapi.AfiSafi{af(gobgpapi.Family_AFI_IP, 3), af(gobgpapi.Family_AFI_IP6, 2)}, "5 routes received (IPv4 3, IPv6 2)"},
	} {
		if got := peerInfo(&gobgpapi.Peer{State: up, AfiSafis: c.afs}); got != c.want {
			t.Errorf("peerInfo = %q, want %q", got, c.want)
		}
	}
}
