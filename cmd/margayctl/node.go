package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	gobgpapi "github.com/osrg/gobgp/v3/api"
	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/margay-dev/margay/bgp"
)

func (a *app) nodeCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Inspect the local margay-node"}
	group(cmd)
	cmd.AddCommand(a.nodeStatusCmd())
	return cmd
}

// nodeStatusCmd prints the local agent's BGP sessions, read from its GoBGP API
// (loopback only), the way `calicoctl node status` reads BIRD's.
func (a *app) nodeStatusCmd() *cobra.Command {
	var addr, mtuFile string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "status",
		Short: "Show this node's BGP peers and their sessions",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			peers, err := listPeers(ctx, addr)
			if err != nil {
				return fmt.Errorf("margay-node's BGP API at %s: %w; is margay-node running on this node (margay-node --bgp-api-listen)?", addr, err)
			}
			fmt.Fprintln(a.out, "margay-node is running.")
			if b, err := os.ReadFile(mtuFile); err == nil {
				fmt.Fprintf(a.out, "Pod MTU: %s (from %s)\n", strings.TrimSpace(string(b)), mtuFile)
			}
			fmt.Fprintln(a.out)
			printPeers(a.out, peers, time.Now())
			return nil
		},
	}
	cmd.Flags().StringVar(&addr, "bgp-api", env("MARGAY_BGP_API", "127.0.0.1:50051"), "margay-node's GoBGP API address (env MARGAY_BGP_API)")
	cmd.Flags().DurationVar(&timeout, "api-timeout", 5*time.Second, "how long to wait for margay-node")
	cmd.Flags().StringVar(&mtuFile, "mtu-file", env("MARGAY_MTU_FILE", "/var/lib/margay/mtu"), "the pod MTU file margay-node writes (env MARGAY_MTU_FILE)")
	return cmd
}

func listPeers(ctx context.Context, addr string) ([]*gobgpapi.Peer, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	stream, err := gobgpapi.NewGobgpApiClient(conn).ListPeer(ctx, &gobgpapi.ListPeerRequest{EnableAdvertised: false})
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

// printPeers writes the peer table: address, type, state, since, info.
func printPeers(w io.Writer, peers []*gobgpapi.Peer, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER ADDRESS\tPEER TYPE\tSTATE\tSINCE\tINFO")
	for _, p := range peers {
		typ, name := "unknown", ""
		if t, n, ok := bgp.ParseDescription(p.GetConf().GetDescription()); ok {
			typ, name = t.String(), n
		}
		if name != "" {
			typ += " (" + name + ")"
		}
		st := p.GetState().GetSessionState()
		state := strings.ToLower(strings.TrimPrefix(st.String(), "PEER_STATE_"))
		state = strings.ToUpper(state[:1]) + state[1:] // Established, Active, Idle ...
		var since time.Time
		if t := p.GetTimers().GetState(); t != nil {
			if st == gobgpapi.PeerState_ESTABLISHED && t.GetUptime() != nil {
				since = t.GetUptime().AsTime()
			} else if t.GetDowntime() != nil {
				since = t.GetDowntime().AsTime()
			}
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", p.GetConf().GetNeighborAddress(), typ, state, ago(since, now), peerInfo(p))
	}
	tw.Flush()
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
		for _, af := range p.GetAfiSafis() {
			rcv += af.GetState().GetReceived()
		}
		return fmt.Sprintf("%d routes received", rcv)
	}
	var why []string
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
