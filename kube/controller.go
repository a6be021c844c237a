package kube

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/kube/endpoint"
)

// Config configures a Controller.
type Config struct {
	Kube  kubernetes.Interface
	Store *datastore.Store
	// Grace is how long an endpoint or node stays without its Kubernetes
	// object before it is deleted, and the IPAM check's grace for addresses
	// without an endpoint (DefaultGrace if 0).
	Grace time.Duration
	// Resync is how often a pass runs without any event: it catches endpoints
	// the CNI plugin wrote without labels, and graces that ran out (10 s if 0).
	Resync  time.Duration
	Logger  *slog.Logger
	Metrics *Metrics // nil: none
	// Now is the clock; tests replace it.
	Now func() time.Time
}

// Controller keeps etcd in step with one Kubernetes cluster. Run it only
// while holding the lease (RunElected): two writing at once would race.
type Controller struct {
	cfg     Config
	log     *slog.Logger
	alloc   *ipam.Allocator
	kick    chan struct{}
	orphans map[string]time.Time

	pods       cache.SharedIndexInformer
	namespaces cache.SharedIndexInformer
	nodes      cache.SharedIndexInformer
	policies   cache.SharedIndexInformer

	mu       sync.Mutex
	leading  bool
	synced   bool
	lastPass time.Time
	lastErr  error
}

// New returns a controller; Run starts it.
func New(cfg Config) *Controller {
	if cfg.Grace == 0 {
		cfg.Grace = DefaultGrace
	}
	if cfg.Resync == 0 {
		cfg.Resync = 10 * time.Second
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Controller{cfg: cfg, log: cfg.Logger, kick: make(chan struct{}, 1), orphans: map[string]time.Time{},
		alloc: ipam.New(cfg.Store, ipam.Options{Logger: cfg.Logger, Now: cfg.Now})}
}

func (c *Controller) wake() {
	select {
	case c.kick <- struct{}{}:
	default:
	}
}

// Run watches the cluster and etcd and applies Compute's decisions until ctx
// is done. A failed pass is logged and retried at the next event or resync.
func (c *Controller) Run(ctx context.Context) error {
	f := informers.NewSharedInformerFactory(c.cfg.Kube, 0)
	c.pods = f.Core().V1().Pods().Informer()
	c.namespaces = f.Core().V1().Namespaces().Informer()
	c.nodes = f.Core().V1().Nodes().Informer()
	c.policies = f.Networking().V1().NetworkPolicies().Informer()
	// Only what Compute reads is kept: a pod's status and managed fields are
	// most of its size.
	if err := c.pods.SetTransform(trimPod); err != nil {
		return err
	}
	h := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { c.wake() },
		UpdateFunc: func(any, any) { c.wake() },
		DeleteFunc: func(any) { c.wake() },
	}
	for _, inf := range []cache.SharedIndexInformer{c.pods, c.namespaces, c.nodes, c.policies} {
		if _, err := inf.AddEventHandler(h); err != nil {
			return err
		}
	}
	f.Start(ctx.Done())
	defer f.Shutdown()
	c.log.Info("waiting for the Kubernetes informers to sync")
	if !cache.WaitForCacheSync(ctx.Done(), c.pods.HasSynced, c.namespaces.HasSynced, c.nodes.HasSynced, c.policies.HasSynced) {
		return ctx.Err()
	}
	// A new endpoint (the CNI plugin wrote it) wakes a pass too, as does a
	// translated policy someone changed or deleted in etcd.
	go c.cfg.Store.NewSyncer(datastore.ResourcePrefix(api.KindOf((*api.WorkloadEndpoint)(nil))), kicker{c}, c.log).Run(ctx)
	go c.cfg.Store.NewSyncer(datastore.ResourcePrefix(api.KindOf((*api.NetworkPolicy)(nil))), kicker{c}, c.log).Run(ctx)
	c.mu.Lock()
	c.synced = true
	c.mu.Unlock()
	c.log.Info("Kubernetes informers synced; keeping etcd in step")

	tick := time.NewTicker(c.cfg.Resync)
	defer tick.Stop()
	lastGC := time.Time{}
	for {
		gc := time.Since(lastGC) >= c.cfg.Resync
		err := c.pass(ctx, gc)
		if gc {
			lastGC = time.Now()
		}
		c.mu.Lock()
		c.lastPass, c.lastErr = time.Now(), err
		c.mu.Unlock()
		if err != nil && ctx.Err() == nil {
			c.log.Error("sync pass failed; retrying at the next change or resync", "err", err)
			c.cfg.Metrics.passFailed()
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-c.kick:
			// Gather a burst of events into one pass.
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
		case <-tick.C:
		}
	}
}

type kicker struct{ c *Controller }

func (k kicker) OnEvent(datastore.Event) { k.c.wake() }
func (k kicker) OnSync()                 { k.c.wake() }

// trimPod keeps of a pod what the controller reads: its containers' named
// ports, not the rest of their specs.
func trimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	meta := *p.ObjectMeta.DeepCopy()
	meta.ManagedFields, meta.Annotations = nil, nil
	var containers []corev1.Container
	for _, c := range p.Spec.Containers {
		var ports []corev1.ContainerPort
		for _, cp := range c.Ports {
			if cp.Name != "" {
				ports = append(ports, cp)
			}
		}
		if len(ports) > 0 {
			containers = append(containers, corev1.Container{Ports: ports})
		}
	}
	return &corev1.Pod{
		ObjectMeta: meta,
		Spec:       corev1.PodSpec{NodeName: p.Spec.NodeName, ServiceAccountName: p.Spec.ServiceAccountName, Containers: containers},
		Status:     corev1.PodStatus{Phase: p.Status.Phase},
	}, nil
}

// input reads both sides.
func (c *Controller) input(ctx context.Context) (Input, error) {
	in := Input{Now: c.cfg.Now(), Grace: c.cfg.Grace, Orphans: c.orphans,
		Pods: map[PodKey]endpoint.Pod{}, Namespaces: map[string]map[string]string{}, K8sNodes: map[string]bool{}}
	for _, o := range c.pods.GetStore().List() {
		p := o.(*corev1.Pod)
		if k, pod, ok := podOf(p); ok {
			in.Pods[k] = pod
		}
	}
	for _, o := range c.namespaces.GetStore().List() {
		ns := o.(*corev1.Namespace)
		in.Namespaces[ns.Name] = ns.Labels
	}
	for _, o := range c.nodes.GetStore().List() {
		in.K8sNodes[o.(*corev1.Node).Name] = true
	}
	for _, o := range c.policies.GetStore().List() {
		in.K8sPolicies = append(in.K8sPolicies, o.(*networkingv1.NetworkPolicy))
	}
	var err error
	if in.Endpoints, err = datastore.List[*api.WorkloadEndpoint](ctx, c.cfg.Store); err != nil {
		return in, err
	}
	if in.Nodes, err = datastore.List[*api.Node](ctx, c.cfg.Store); err != nil {
		return in, err
	}
	if in.Policies, err = datastore.List[*api.NetworkPolicy](ctx, c.cfg.Store); err != nil {
		return in, err
	}
	return in, nil
}

// podOf is a pod as Compute sees it.
func podOf(p *corev1.Pod) (PodKey, endpoint.Pod, bool) {
	pod, ok := endpoint.FromPod(p)
	return PodKey{p.Namespace, p.Name}, pod, ok
}

// pass runs Compute once and applies it; with gc, it also releases the
// addresses an IPAM check finds leaked by pods and nodes that are gone.
func (c *Controller) pass(ctx context.Context, gc bool) error {
	start := time.Now()
	defer func() { c.cfg.Metrics.observePass(time.Since(start)) }()
	in, err := c.input(ctx)
	if err != nil {
		return err
	}
	out := Compute(in)
	c.orphans = out.Orphans
	eps := map[string]*api.WorkloadEndpoint{}
	for _, w := range in.Endpoints {
		eps[w.Metadata.Name] = w
	}
	var errs []error
	for _, r := range out.UpdateEndpoints {
		w := *eps[r.Name]
		w.Metadata.Labels, w.Spec.Ports = r.Labels, r.Ports
		if _, err := c.cfg.Store.Update(ctx, &w); err != nil {
			errs = append(errs, fmt.Errorf("labelling WorkloadEndpoint %s: %w", r.Name, err))
			continue
		}
		c.cfg.Metrics.relabelled()
		c.log.Debug("labelled WorkloadEndpoint", "endpoint", r.Name, "labels", r.Labels, "ports", len(r.Ports))
	}
	errs = append(errs, c.applyPolicies(ctx, out)...)
	wepKind, nodeKind := api.KindOf((*api.WorkloadEndpoint)(nil)), api.KindOf((*api.Node)(nil))
	for _, d := range out.DeleteEndpoints {
		if _, err := c.cfg.Store.Delete(ctx, wepKind, d.Name, d.ResourceVersion); err != nil && !errors.Is(err, datastore.ErrNotFound) {
			errs = append(errs, fmt.Errorf("deleting WorkloadEndpoint %s: %w", d.Name, err))
			continue
		}
		gc = true // its addresses are leaked now
		c.cfg.Metrics.deleted("WorkloadEndpoint")
		c.log.Info("deleted WorkloadEndpoint", "endpoint", d.Name, "reason", d.Reason)
	}
	for _, d := range out.DeleteNodes {
		if _, err := c.cfg.Store.Delete(ctx, nodeKind, d.Name, d.ResourceVersion); err != nil && !errors.Is(err, datastore.ErrNotFound) {
			errs = append(errs, fmt.Errorf("deleting Node %s: %w", d.Name, err))
			continue
		}
		gc = true
		c.cfg.Metrics.deleted("Node")
		c.log.Info("deleted Node", "node", d.Name, "reason", d.Reason)
	}
	if gc {
		errs = append(errs, c.releaseLeaked(ctx, in))
	}
	// A resource changed since it was read (the CNI plugin rewrote an
	// endpoint, say): not a failure, just a reason for another pass.
	kept := errs[:0]
	for _, err := range errs {
		if errors.Is(err, datastore.ErrConflict) {
			c.log.Debug("changed since read; another pass follows", "err", err)
			c.wake()
			continue
		}
		kept = append(kept, err)
	}
	return errors.Join(kept...)
}

// applyPolicies writes and deletes translated policies, and reports the
// Kubernetes policies that could not be translated.
func (c *Controller) applyPolicies(ctx context.Context, out Output) []error {
	var errs []error
	for _, p := range out.PutPolicies {
		name := api.StorageName(&p.Metadata)
		var err error
		verb := "updated"
		if p.Metadata.ResourceVersion == "" {
			_, err = c.cfg.Store.Create(ctx, p)
			verb = "created"
		} else {
			_, err = c.cfg.Store.Update(ctx, p)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("writing NetworkPolicy %s: %w", name, err))
			continue
		}
		c.cfg.Metrics.policyWritten()
		c.log.Info(verb+" NetworkPolicy from Kubernetes", "policy", name)
	}
	npKind := api.KindOf((*api.NetworkPolicy)(nil))
	for _, d := range out.DeletePolicies {
		if _, err := c.cfg.Store.Delete(ctx, npKind, d.Name, d.ResourceVersion); err != nil && !errors.Is(err, datastore.ErrNotFound) {
			errs = append(errs, fmt.Errorf("deleting NetworkPolicy %s: %w", d.Name, err))
			continue
		}
		c.cfg.Metrics.deleted("NetworkPolicy")
		c.log.Info("deleted NetworkPolicy", "policy", d.Name, "reason", d.Reason)
	}
	c.cfg.Metrics.untranslated(len(out.Problems))
	for _, p := range out.Problems {
		c.log.Warn(p)
	}
	return errs
}

// releaseLeaked runs the IPAM check and mends what SelectRepairs keeps.
func (c *Controller) releaseLeaked(ctx context.Context, in Input) error {
	r, err := c.alloc.Check(ctx, c.cfg.Grace)
	if err != nil {
		return fmt.Errorf("IPAM check: %w", err)
	}
	fix := SelectRepairs(r, in)
	if fix.Problems() == 0 {
		return nil
	}
	n, err := c.alloc.Repair(ctx, fix)
	for _, f := range fix.Leaked {
		c.log.Info("releasing leaked address", "ip", f.IP, "handle", f.Handle, "pod", f.Pod, "reason", f.Reason)
	}
	for _, f := range fix.BadAffinities {
		c.log.Info("releasing block of a deleted node", "block", f.Block, "node", f.Node, "reason", f.Reason)
	}
	c.cfg.Metrics.repaired(n)
	if err != nil {
		return fmt.Errorf("IPAM repair (%d of %d fixed): %w", n, fix.Problems(), err)
	}
	return nil
}

// status says whether the controller leads, has synced, and how its last pass went.
func (c *Controller) status() (leading, synced bool, last time.Time, err error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leading, c.synced, c.lastPass, c.lastErr
}

func (c *Controller) setLeading(on bool) {
	c.mu.Lock()
	c.leading = on
	if !on {
		c.synced = false
	}
	c.mu.Unlock()
}
