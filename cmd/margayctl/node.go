package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	gobgpapi "github.com/osrg/gobgp/v3/api"
	"github.com/spf13/cobra"

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
			peers, err := bgp.ListPeers(ctx, addr)
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

// printPeers writes the peer table: address, type, state, since, info.
func printPeers(w io.Writer, peers []*gobgpapi.Peer, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "PEER ADDRESS\tPEER TYPE\tSTATE\tSINCE\tINFO")
	for _, p := range peers {
		st := bgp.DescribePeer(p, now)
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", st.Address, st.Type, st.State, st.Since, st.Info)
	}
	tw.Flush()
}
