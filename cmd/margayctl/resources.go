package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"reflect"
	"slices"
	"strings"

	"github.com/spf13/cobra"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/felix/calc"
	"github.com/margay-dev/margay/kube/netpol"
)

// nsFlags are -n and -A, for namespaced kinds.
type nsFlags struct {
	namespace string
	set       bool // -n was given
	all       bool
}

func (f *nsFlags) register(cmd *cobra.Command, withAll bool) {
	cmd.Flags().StringVarP(&f.namespace, "namespace", "n", api.DefaultNamespace, "namespace of namespaced resources (networkpolicies)")
	if withAll {
		cmd.Flags().BoolVarP(&f.all, "all-namespaces", "A", false, "list namespaced resources of every namespace")
	}
	cmd.PreRunE = func(cmd *cobra.Command, _ []string) error {
		f.set = cmd.Flags().Changed("namespace")
		if f.set && f.all {
			return usagef("give -n NAMESPACE or -A, not both")
		}
		return nil
	}
}

// fill gives a namespaced resource the namespace of -n if it names none, and
// refuses one that names another than -n gives.
func (f nsFlags) fill(r api.Resource) error {
	m := r.GetMetadata()
	if !api.KindOf(r).Namespaced {
		return nil
	}
	switch {
	case m.Namespace == "":
		m.Namespace = f.namespace
	case f.set && m.Namespace != f.namespace:
		return fmt.Errorf("%s: its metadata.namespace %q is not the namespace -n gives (%q): drop one", api.Ref(r), m.Namespace, f.namespace)
	}
	return nil
}

// storageName is how NAME on the command line is looked up.
func (f nsFlags) storageName(k api.KindInfo, name string) string {
	if k.Namespaced {
		return f.namespace + "/" + name
	}
	return name
}

// readResources reads every file given with -f, in order; - is standard
// input. A namespaced resource that names no namespace takes ns.namespace.
func (a *app) readResources(files []string, ns nsFlags) ([]api.Resource, error) {
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
	for _, r := range all {
		if err := ns.fill(r); err != nil {
			return nil, err
		}
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
	// Kubernetes NetworkPolicy objects are translated as the controller does.
	rs, err := netpol.Decode(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", file, err)
	}
	return rs, nil
}

func (a *app) applyCmd(verb string) *cobra.Command {
	var files []string
	var ns nsFlags
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
that version, so a stale copy cannot overwrite a newer one. A Kubernetes
networking.k8s.io/v1 NetworkPolicy is translated to a margay NetworkPolicy
named knp.default.NAME, as margay-kube-controllers does.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			rs, err := a.readResources(files, ns)
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
	ns.register(cmd, false)
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
	var ns nsFlags
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
				if rs, err = a.readResources(files, ns); err != nil {
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
					if err := ns.fill(r); err != nil {
						return err
					}
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
	ns.register(cmd, false)
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
	var ns nsFlags
	cmd := &cobra.Command{
		Use:   "get KIND [NAME]",
		Short: "Show resources: ippools, bgpconfigurations, bgppeers, nodes, workloadendpoints, networkpolicies, globalnetworkpolicies, tiers, ipamconfigurations",
		Long: `Show resources. Namespaced kinds (networkpolicies) are listed for the
namespace -n gives (default "default"), or for every namespace with -A.
-o wide on workloadendpoints shows the policies that apply to each, in the
order they are evaluated.`,
		Args: rangeArgs(1, 2),
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
				if ns.all {
					return usagef("-A lists; to get one resource by name give -n NAMESPACE")
				}
				r, err := store.GetResource(cmd.Context(), k, ns.storageName(k, args[1]))
				if err != nil {
					return err
				}
				rs = []api.Resource{r}
			} else if rs, _, err = store.ListResources(cmd.Context(), k); err != nil {
				return err
			}
			if k.Namespaced && !ns.all {
				rs = slices.DeleteFunc(rs, func(r api.Resource) bool { return r.GetMetadata().Namespace != ns.namespace })
			}
			var t tableContext
			if k.Kind == api.KindWorkloadEndpoint && output == "wide" {
				if t.policy, err = loadPolicy(cmd.Context(), store); err != nil {
					return err
				}
			}
			return printResources(a.out, k, rs, output, len(args) == 2, t)
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table, wide, yaml or json")
	ns.register(cmd, true)
	return cmd
}

// loadPolicy reads every policy and tier, for the policies that apply to an
// endpoint.
func loadPolicy(ctx context.Context, store *datastore.Store) (*calc.Policy, error) {
	var pol calc.Policy
	for _, k := range []string{api.KindNetworkPolicy, api.KindGlobalNetworkPolicy, api.KindTier} {
		ki, _ := api.LookupKind(k)
		rs, _, err := store.ListResources(ctx, ki)
		if err != nil {
			return nil, err
		}
		for _, r := range rs {
			switch r := r.(type) {
			case *api.NetworkPolicy:
				pol.Policies = append(pol.Policies, r)
			case *api.GlobalNetworkPolicy:
				pol.Globals = append(pol.Globals, r)
			case *api.Tier:
				pol.Tiers = append(pol.Tiers, r)
			}
		}
	}
	return &pol, nil
}
