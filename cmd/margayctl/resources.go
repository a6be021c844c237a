package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"strings"

	"github.com/spf13/cobra"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
)

// readResources decodes the resources in file ("-" is standard input).
// readResources reads every file given with -f, in order; - is standard input.
func (a *app) readResources(files []string) ([]api.Resource, error) {
	if len(files) == 0 {
		return nil, usagef("give the resources with -f FILE (or -f - for standard input)")
	}
	var all []api.Resource
	for _, f := range files {
		rs, err := a.readFile(f)
		if err != nil {
			return nil, err
		}
		all = append(all, rs...)
	}
	return all, nil
}

func (a *app) readFile(file string) ([]api.Resource, error) {
	if file == "" {
		return nil, usagef("-f: an empty file name")
	}
	var data []byte
	var err error
	if file == "-" {
		data, err = io.ReadAll(a.in)
	} else {
		data, err = os.ReadFile(file)
	}
	if err != nil {
		return nil, err
	}
	rs, err := api.Decode(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return rs, nil
}

func (a *app) applyCmd(verb string) *cobra.Command {
	var files []string
	short := map[string]string{
		"apply":   "Create resources, or update them if they exist",
		"create":  "Create resources; fail if one exists",
		"replace": "Replace existing resources; fail if one does not exist",
	}[verb]
	cmd := &cobra.Command{
		Use:   verb + " -f FILE",
		Short: short,
		Long: short + `. FILE holds one or more YAML or JSON documents, separated by ---.
A resource that carries metadata.resourceVersion is only changed if it still has
that version, so a stale copy cannot overwrite a newer one.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rs, err := a.readResources(files)
			if err != nil {
				return err
			}
			store, err := a.Store()
			if err != nil {
				return err
			}
			return a.each(rs, func(r api.Resource) (string, error) {
				return write(cmd.Context(), store, verb, r)
			})
		},
	}
	cmd.Flags().StringArrayVarP(&files, "filename", "f", nil, "file with the resources, - for standard input; may be repeated")
	return cmd
}

// each runs f on every resource, reporting each outcome, and fails if any failed.
func (a *app) each(rs []api.Resource, f func(api.Resource) (string, error)) error {
	failed := 0
	var last error
	for _, r := range rs {
		what, err := f(r)
		if err != nil {
			failed++
			last = err
			if len(rs) > 1 {
				fmt.Fprintf(a.err, "margayctl: %s\n", oneLine(err.Error()))
			}
			continue
		}
		fmt.Fprintf(a.out, "%s %s\n", api.Ref(r), what)
	}
	switch {
	case failed == 0:
		return nil
	case len(rs) == 1:
		return last
	default:
		return fmt.Errorf("%d of %d resources failed", failed, len(rs))
	}
}

// write creates, updates or replaces one resource and says what it did.
func write(ctx context.Context, s *datastore.Store, verb string, r api.Resource) (string, error) {
	k := api.KindOf(r)
	r.SetDefaults() // a namespaced resource's namespace is part of its name
	name := api.StorageName(r.GetMetadata())
	if verb == "create" {
		_, err := s.Create(ctx, r)
		return "created", err
	}
	cur, err := s.GetResource(ctx, k, name)
	switch {
	case errors.Is(err, datastore.ErrNotFound) && verb == "apply":
		_, err := s.Create(ctx, r)
		return "created", err
	case err != nil:
		return "", err
	}
	if r.GetMetadata().ResourceVersion == "" {
		r.GetMetadata().ResourceVersion = cur.GetMetadata().ResourceVersion
	}
	if sameContent(cur, r) && r.GetMetadata().ResourceVersion == cur.GetMetadata().ResourceVersion {
		return "unchanged", nil
	}
	_, err = s.Update(ctx, r)
	return map[string]string{"apply": "configured", "replace": "replaced"}[verb], err
}

// sameContent compares two resources ignoring their resourceVersions.
func sameContent(x, y api.Resource) bool {
	x.SetDefaults()
	y.SetDefaults()
	jx, _ := json.Marshal(x)
	jy, _ := json.Marshal(y)
	var mx, my map[string]any
	json.Unmarshal(jx, &mx)
	json.Unmarshal(jy, &my)
	for _, m := range []map[string]any{mx, my} {
		if md, ok := m["metadata"].(map[string]any); ok {
			delete(md, "resourceVersion")
		}
	}
	return reflect.DeepEqual(mx, my)
}

func (a *app) deleteCmd() *cobra.Command {
	var files []string
	cmd := &cobra.Command{
		Use:   "delete (-f FILE | KIND NAME...)",
		Short: "Delete resources named in a file or on the command line",
		RunE: func(cmd *cobra.Command, args []string) error {
			var rs []api.Resource
			switch {
			case len(files) > 0 && len(args) > 0:
				return usagef("delete: give either -f FILE or KIND NAME..., not both")
			case len(files) > 0:
				var err error
				if rs, err = a.readResources(files); err != nil {
					return err
				}
			case len(args) >= 2:
				k, err := api.LookupKind(args[0])
				if err != nil {
					return usageError{err}
				}
				for _, n := range args[1:] {
					r := k.New()
					r.GetMetadata().Name = n
					rs = append(rs, r)
				}
			default:
				return usagef("delete: give -f FILE, or a kind and at least one name (margayctl delete ippool my-pool)")
			}
			store, err := a.Store()
			if err != nil {
				return err
			}
			return a.each(rs, func(r api.Resource) (string, error) {
				m := r.GetMetadata()
				if api.KindOf(r).Kind == api.KindNode {
					return a.deleteNode(cmd.Context(), store, r)
				}
				r.SetDefaults()
				_, err := store.Delete(cmd.Context(), api.KindOf(r), api.StorageName(m), m.ResourceVersion)
				return "deleted", err
			})
		},
	}
	cmd.Flags().StringArrayVarP(&files, "filename", "f", nil, "file with the resources, - for standard input; may be repeated")
	return cmd
}

// deleteNode deletes a Node whose agent has stopped, then what it held in IPAM:
// a node that is gone has no use for its addresses and blocks (calicoctl does
// the same).
func (a *app) deleteNode(ctx context.Context, store *datastore.Store, r api.Resource) (string, error) {
	m := r.GetMetadata()
	// A running agent would write its Node again at once.
	_, err := store.DeleteUnlessHeld(ctx, api.KindOf(r), m.Name, m.ResourceVersion, datastore.AgentsPrefix+m.Name)
	var held *datastore.HeldError
	if errors.As(err, &held) {
		return "", fmt.Errorf("node %q has a running margay-node (at %s), which would register it again: stop it first (an agent that was killed keeps its claim on the name for %s)", m.Name, held.Holder, datastore.AgentTTL)
	}
	if err != nil {
		return "", err
	}
	al, err := a.allocator()
	if err != nil {
		return "", err
	}
	rep, _, err := al.ReleaseNode(ctx, m.Name)
	if err != nil {
		return "", fmt.Errorf("node %q deleted, but releasing its addresses and blocks failed (margayctl ipam check --release-leaked retries): %w", m.Name, err)
	}
	if len(rep.Leaked)+len(rep.BadAffinities) == 0 {
		return "deleted", nil
	}
	return fmt.Sprintf("deleted, and released its %s and %s", count(len(rep.Leaked), "address"), count(len(rep.BadAffinities), "block")), nil
}

// count is "1 block" or "2 blocks".
func count(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	if strings.HasSuffix(noun, "s") {
		return fmt.Sprintf("%d %ses", n, noun)
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

func (a *app) getCmd() *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "get KIND [NAME]",
		Short: "Show resources: ippools, bgpconfigurations, bgppeers, nodes, workloadendpoints, ipamconfigurations",
		Args:  rangeArgs(1, 2),
		RunE: func(cmd *cobra.Command, args []string) error {
			k, err := api.LookupKind(args[0])
			if err != nil {
				return usageError{err}
			}
			if !validOutput(output) {
				return usagef("-o %q: use table, wide, yaml or json", output)
			}
			store, err := a.Store()
			if err != nil {
				return err
			}
			var rs []api.Resource
			if len(args) == 2 {
				r, err := store.GetResource(cmd.Context(), k, args[1])
				if err != nil {
					return err
				}
				rs = []api.Resource{r}
			} else if rs, _, err = store.ListResources(cmd.Context(), k); err != nil {
				return err
			}
			return printResources(a.out, k, rs, output, len(args) == 2)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, wide, yaml or json")
	return cmd
}
