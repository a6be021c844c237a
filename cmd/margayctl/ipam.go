package main

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"math/big"
	"net/netip"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/ipam"
)

func (a *app) allocator() (*ipam.Allocator, error) {
	s, err := a.Store()
	if err != nil {
		return nil, err
	}
	// Only warnings: info lines would mix with the command's own output.
	log := slog.New(slog.NewTextHandler(a.err, &slog.HandlerOptions{Level: slog.LevelWarn}))
	return ipam.New(s, ipam.Options{Logger: log}), nil
}

func (a *app) ipamCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "ipam", Short: "Inspect and repair IP address management"}
	group(cmd)
	cmd.AddCommand(a.ipamShowCmd(), a.ipamReleaseCmd(), a.ipamCheckCmd(), a.ipamConfigureCmd())
	return cmd
}

func checkJSONOrTable(o string) error {
	if o != "table" && o != "json" {
		return usagef("-o %q: use table or json", o)
	}
	return nil
}

func writeJSON(w io.Writer, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

func (a *app) ipamShowCmd() *cobra.Command {
	var (
		blocks, borrowed bool
		ip, output       string
	)
	cmd := &cobra.Command{
		Use:   "show [--show-blocks | --show-borrowed | --ip IP]",
		Short: "Show address usage per pool, per block, borrowed addresses, or one address",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkJSONOrTable(output); err != nil {
				return err
			}
			n := 0
			for _, set := range []bool{blocks, borrowed, ip != ""} {
				if set {
					n++
				}
			}
			if n > 1 {
				return usagef("ipam show: give at most one of --show-blocks, --show-borrowed and --ip")
			}
			al, err := a.allocator()
			if err != nil {
				return err
			}
			if ip != "" {
				addr, err := netip.ParseAddr(ip)
				if err != nil {
					return usagef("--ip %q is not an IP address", ip)
				}
				in, err := al.LookupIP(cmd.Context(), addr)
				if err != nil {
					return err
				}
				if output == "json" {
					return writeJSON(a.out, in)
				}
				return printIPInfo(a.out, in)
			}
			u, err := al.Usage(cmd.Context())
			if err != nil {
				return err
			}
			switch {
			case output == "json" && blocks:
				return writeJSON(a.out, u.Blocks)
			case output == "json" && borrowed:
				return writeJSON(a.out, u.Borrowed)
			case output == "json":
				return writeJSON(a.out, u.Pools)
			}
			tw := tabwriter.NewWriter(a.out, 0, 4, 2, ' ', 0)
			switch {
			case blocks:
				fmt.Fprintln(tw, "BLOCK\tPOOL\tAFFINITY\tIN USE\tFREE\tBORROWED")
				for _, b := range u.Blocks {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\n", b.CIDR, orDash(b.Pool), orDash(b.Affinity), b.InUse, b.Size-b.InUse, b.Borrowed)
				}
			case borrowed:
				fmt.Fprintln(tw, "IP\tBLOCK\tBLOCK OWNER\tBORROWED BY\tHANDLE")
				for _, b := range u.Borrowed {
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", b.IP, b.Block, orDash(b.BlockOwner), orDash(b.Node), b.Handle)
				}
			default:
				fmt.Fprintln(tw, "POOL\tCIDR\tIN USE\tFREE\tBLOCKS")
				for _, p := range u.Pools {
					free := new(big.Int).Sub(p.Size, big.NewInt(int64(p.InUse)))
					size, _ := new(big.Float).SetInt(p.Size).Float64()
					fmt.Fprintf(tw, "%s\t%s\t%d (%.0f%%)\t%s\t%d\n", p.Name, p.CIDR, p.InUse, 100*float64(p.InUse)/size, bigCount(free), p.Blocks)
				}
			}
			return tw.Flush()
		},
	}
	f := cmd.Flags()
	f.BoolVar(&blocks, "show-blocks", false, "show every block, its owner and occupancy")
	f.BoolVar(&borrowed, "show-borrowed", false, "show addresses used by a node other than their block's owner")
	f.StringVar(&ip, "ip", "", "show who holds this address")
	f.StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}

func printIPInfo(w io.Writer, in *ipam.IPInfo) error {
	if in.Pool == "" && !in.Block.IsValid() {
		_, err := fmt.Fprintf(w, "%s is not in any IP pool\n", in.IP)
		return err
	}
	if !in.Allocated {
		_, err := fmt.Fprintf(w, "%s is free (pool %s)\n", in.IP, orDash(in.Pool))
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "IP\t%s\nPool\t%s\nBlock\t%s\nBlock owner\t%s\nHandle\t%s\nNode\t%s\nSequence\t%d\n",
		in.IP, orDash(in.Pool), in.Block, orDash(in.BlockOwner), in.Handle, orDash(in.Node), in.Sequence)
	if in.Time != nil {
		fmt.Fprintf(tw, "Allocated\t%s\n", in.Time.Format(time.RFC3339))
	}
	for k, v := range in.Attrs {
		fmt.Fprintf(tw, "%s\t%s\n", k, v)
	}
	return tw.Flush()
}

func (a *app) ipamReleaseCmd() *cobra.Command {
	var ip, handle string
	cmd := &cobra.Command{
		Use:   "release (--ip IP | --handle HANDLE)",
		Short: "Free one address, or every address held under a handle",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if (ip == "") == (handle == "") {
				return usagef("ipam release: give exactly one of --ip and --handle")
			}
			al, err := a.allocator()
			if err != nil {
				return err
			}
			if handle != "" {
				ips, err := al.ReleaseByHandle(cmd.Context(), handle)
				if err != nil {
					return err
				}
				if len(ips) == 0 {
					return fmt.Errorf("handle %q holds no addresses", handle)
				}
				for _, x := range ips {
					fmt.Fprintf(a.out, "released %s (handle %s)\n", x, handle)
				}
				return nil
			}
			addr, err := netip.ParseAddr(ip)
			if err != nil {
				return usagef("--ip %q is not an IP address", ip)
			}
			al2, err := al.ReleaseIP(cmd.Context(), addr)
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "released %s (handle %s)\n", addr, al2.Handle)
			return nil
		},
	}
	cmd.Flags().StringVar(&ip, "ip", "", "the address to free")
	cmd.Flags().StringVar(&handle, "handle", "", "free every address of this handle, such as k8s-pod-network.<containerID>")
	return cmd
}

func (a *app) ipamCheckCmd() *cobra.Command {
	var (
		output  string
		release bool
		grace   time.Duration
	)
	cmd := &cobra.Command{
		Use:   "check [--release-leaked]",
		Short: "Find leaked addresses, orphan handles and inconsistent affinities",
		Long: `Audit the IPAM data at one etcd revision. A pod's address is leaked when no
WorkloadEndpoint has its container and it was assigned longer than --grace ago.
With --release-leaked, leaked addresses are freed, unreferenced allocations are
linked back to their handles, orphan handles are pruned and bad affinities are
mended or removed; each fix is conditional on nothing having changed since the
audit.

A node without a Node resource is a deleted one. Its tunnel addresses, the
addresses of pods whose WorkloadEndpoint names it, and its blocks are reported at
once; their fixes (which delete those endpoints, and leave the blocks ownerless)
are conditional on the node staying deleted, with no margay-node running under
its name.

Exit code: 0 when nothing was found (or everything found was fixed), 3 when
problems were found and left, 1 when the check or a fix failed.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkJSONOrTable(output); err != nil {
				return err
			}
			al, err := a.allocator()
			if err != nil {
				return err
			}
			rep, err := al.Check(cmd.Context(), grace)
			if err != nil {
				return err
			}
			fixed, problems := 0, rep.Problems()
			var repairErr error
			if release && problems > 0 {
				fixed, repairErr = al.Repair(cmd.Context(), rep)
			}
			if output == "json" {
				err = writeJSON(a.out, struct {
					*ipam.Report
					Fixed int `json:"fixed"`
				}{rep, fixed})
			} else {
				printReport(a.out, rep)
				if release {
					fmt.Fprintf(a.out, "Fixed %s.\n", count(fixed, "problem"))
				}
			}
			switch {
			case err != nil:
				return err
			case repairErr != nil:
				return fmt.Errorf("fixed %d of %s: %w", fixed, count(problems, "problem"), repairErr)
			case problems > 0 && !release:
				return problemsError{fmt.Errorf("found %s; --release-leaked fixes them", count(problems, "problem"))}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&output, "output", "o", "table", "output format: table or json")
	f.BoolVar(&release, "release-leaked", false, "fix what the check finds")
	f.DurationVar(&grace, "grace", ipam.DefaultLeakGrace, "how old an allocation without an owner must be to count as leaked")
	return cmd
}

func printReport(w io.Writer, r *ipam.Report) {
	fmt.Fprintf(w, "Checked %d blocks, %d allocations and %d handles at etcd revision %d.\n", r.Blocks, r.Allocations, r.Handles, r.Revision)
	sections := []struct {
		title string
		fs    []ipam.Finding
	}{
		{"Leaked addresses", r.Leaked},
		{"Allocations missing from their handle", r.Unreferenced},
		{"Orphan handles", r.OrphanHandles},
		{"Bad affinities", r.BadAffinities},
	}
	for _, s := range sections {
		if len(s.fs) == 0 {
			continue
		}
		fmt.Fprintf(w, "%s (%d):\n", s.title, len(s.fs))
		for _, f := range s.fs {
			var parts []string
			if f.IP.IsValid() {
				parts = append(parts, f.IP.String())
			} else if f.Block.IsValid() {
				parts = append(parts, f.Block.String())
			}
			for _, p := range []string{f.Handle, f.Node} {
				if p != "" {
					parts = append(parts, p)
				}
			}
			fmt.Fprintf(w, "  %s: %s\n", strings.Join(parts, " "), f.Reason)
		}
	}
	if r.Clean() {
		fmt.Fprintln(w, "No problems found.")
	}
}

func (a *app) ipamConfigureCmd() *cobra.Command {
	var (
		strict    bool
		maxBlocks int
	)
	cmd := &cobra.Command{
		Use:   "configure [--strict-affinity=true|false] [--max-blocks-per-host N]",
		Short: "Change the cluster's IPAM configuration",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			f := cmd.Flags()
			if !f.Changed("strict-affinity") && !f.Changed("max-blocks-per-host") {
				return usagef("ipam configure: give --strict-affinity=true|false and/or --max-blocks-per-host N")
			}
			if maxBlocks < 0 {
				return usagef("--max-blocks-per-host %d: use 0 (no limit) or more", maxBlocks)
			}
			store, err := a.Store()
			if err != nil {
				return err
			}
			c, err := ipam.Configure(cmd.Context(), store, func(s *api.IPAMConfigurationSpec) {
				if f.Changed("strict-affinity") {
					s.StrictAffinity = strict
				}
				if f.Changed("max-blocks-per-host") {
					s.MaxBlocksPerHost = &maxBlocks
				}
			})
			if err != nil {
				return err
			}
			fmt.Fprintf(a.out, "IPAM configuration: strictAffinity=%t maxBlocksPerHost=%d\n", c.Spec.StrictAffinity, c.MaxBlocks())
			return nil
		},
	}
	cmd.Flags().BoolVar(&strict, "strict-affinity", false, "forbid borrowing addresses from other nodes' blocks")
	cmd.Flags().IntVar(&maxBlocks, "max-blocks-per-host", api.DefaultMaxBlocksPerHost, "how many blocks one node may claim; 0 means no limit")
	return cmd
}

// bigCount writes n exactly below 2^50 and in e-notation above, as an IPv6
// pool's free addresses need (1.209e+24 for a /48).
func bigCount(n *big.Int) string {
	if n.BitLen() < 50 {
		return n.String()
	}
	f, _ := new(big.Float).SetInt(n).Float64()
	return strconv.FormatFloat(f, 'g', 4, 64)
}
