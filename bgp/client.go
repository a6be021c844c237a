package bgp

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	gobgpapi "github.com/osrg/gobgp/v3/api"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// ListPeers reads the peers and their sessions from a margay-node's GoBGP API
// at addr (margayctl node status, margay-lab). opts may add a dialer, such as
// one that connects from inside a network namespace.
func ListPeers(ctx context.Context, addr string, opts ...grpc.DialOption) ([]*gobgpapi.Peer, error) {
	conn, err := grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stream, err := gobgpapi.NewGobgpApiClient(conn).ListPeer(ctx, &gobgpapi.ListPeerRequest{})
	if err != nil {
		return nil, err
	}
	var out []*gobgpapi.Peer
	for {
		r, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, err
		}
		out = append(out, r.Peer)
	}
}

// PeerRow is one line of a peer table, as margayctl node status and margay-lab
// print it.
type PeerRow struct {
	Address string
	Type    string // "node-to-node mesh (node2)", "global (tor)" ...
	State   string // Established, Active, Idle ...
	Since   string // "5s ago", or "-"
	Info    string // routes received, or the likeliest reason the session is down
}

// DescribePeer says how a peer read from the API stands.
func DescribePeer(p *gobgpapi.Peer, now time.Time) PeerRow {
	typ, name := "unknown", ""
	if t, n, ok := ParseDescription(p.GetConf().GetDescription()); ok {
		typ, name = t.String(), n
	}
	if name != "" {
		typ += " (" + name + ")"
	}
	state, since := sessionOf(p)
	return PeerRow{Address: p.GetConf().GetNeighborAddress(), Type: typ, State: state, Since: ago(since, now), Info: peerInfo(p)}
}

func ago(t, now time.Time) string {
	if t.IsZero() || t.Unix() <= 0 {
		return "-"
	}
	return now.Sub(t).Round(time.Second).String() + " ago"
}

// peerInfo says what a person needs next: routes received when the session is
// up, and the likeliest reason when it is not.
func peerInfo(p *gobgpapi.Peer) string {
	if p.GetState().GetSessionState() == gobgpapi.PeerState_ESTABLISHED {
		var rcv uint64
		var each []string
		for _, af := range p.GetAfiSafis() {
			n := af.GetState().GetReceived()
			rcv += n
			name := "IPv4"
			if af.GetConfig().GetFamily().GetAfi() == gobgpapi.Family_AFI_IP6 {
				name = "IPv6"
			}
			each = append(each, fmt.Sprintf("%s %d", name, n))
		}
		if len(each) > 1 { // a dual-stack session: say which family has what
			return fmt.Sprintf("%d routes received (%s)", rcv, strings.Join(each, ", "))
		}
		return fmt.Sprintf("%d routes received", rcv)
	}
	var why []string
	if closedForMaxPrefixes(p) {
		return maxPrefixesReason(p)
	}
	if p.GetState().GetAdminState() != gobgpapi.PeerState_UP {
		why = append(why, "administratively down")
	}
	if p.GetConf().GetAuthPassword() != "" {
		// A wrong TCP MD5 password is silent: the kernel drops the segments.
		why = append(why, "TCP MD5 password set: check it matches the peer's")
	}
	why = append(why, fmt.Sprintf("no session with AS %d at %s:%d", p.GetConf().GetPeerAsn(), p.GetConf().GetNeighborAddress(), remotePort(p)))
	return strings.Join(why, "; ")
}

func remotePort(p *gobgpapi.Peer) uint32 {
	if port := p.GetTransport().GetRemotePort(); port != 0 {
		return port
	}
	return 179
}

const maxPrefixesText = "maximum prefixes exceeded"

// closedForMaxPrefixes tells a session GoBGP closed for maxPrefixes: in admin
// state PFX_CT until the speaker holds it down, then down with the held mark.
func closedForMaxPrefixes(p *gobgpapi.Peer) bool {
	switch p.GetState().GetAdminState() {
	case gobgpapi.PeerState_PFX_CT:
		return true
	case gobgpapi.PeerState_DOWN:
		return strings.HasSuffix(p.GetConf().GetDescription(), " "+heldMark)
	}
	return false
}

// maxPrefixesReason says why GoBGP keeps a peer down after it sent more
// prefixes than its limit, and how to bring it back.
func maxPrefixesReason(p *gobgpapi.Peer) string {
	var limit uint32
	for _, af := range p.GetAfiSafis() {
		limit = max(limit, af.GetPrefixLimits().GetMaxPrefixes())
	}
	return fmt.Sprintf("%s: the peer sent more than maxPrefixes %d, so the session was closed; it stays down until the BGPPeer changes or `gobgp neighbor %s enable`",
		maxPrefixesText, limit, p.GetConf().GetNeighborAddress())
}
