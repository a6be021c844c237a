package kube

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// Election configures the lease that lets one replica write at a time.
type Election struct {
	Namespace, Name string
	Identity        string // unique per replica: the pod name
	// The leader gives up writing after RenewDeadline without renewing,
	// before a rival may take the lease at LeaseDuration: the two never
	// overlap while the clocks run at the same rate.
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

// DefaultElection is client-go's usual timing, as kube-controller-manager's.
func DefaultElection(namespace, identity string) Election {
	return Election{Namespace: namespace, Name: "margay-kube-controllers", Identity: identity,
		LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second}
}

// ErrLostLease is returned by RunElected when the lease was lost: the process
// should exit, and its restart stands for the lease again.
var ErrLostLease = errors.New("lost the leader lease")

// RunElected stands for the lease and runs c while it holds it. It returns
// nil when ctx is done, releasing the lease, and ErrLostLease if the lease
// was lost; either way only after c has stopped writing.
func RunElected(ctx context.Context, k kubernetes.Interface, c *Controller, e Election) error {
	log := c.log.With("lease", e.Namespace+"/"+e.Name, "identity", e.Identity)
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: e.Namespace, Name: e.Name},
		Client:     k.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: e.Identity},
	}
	ran := make(chan error, 1)
	var led atomic.Bool
	le, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
		Lock: lock, Name: e.Name, ReleaseOnCancel: true,
		LeaseDuration: e.LeaseDuration, RenewDeadline: e.RenewDeadline, RetryPeriod: e.RetryPeriod,
		Callbacks: leaderelection.LeaderCallbacks{
			// client-go runs this in its own goroutine and does not wait for
			// it: ran is how RunElected does.
			OnStartedLeading: func(lctx context.Context) {
				led.Store(true)
				log.Info("leading: syncing etcd with the cluster")
				c.cfg.Metrics.setLeader(true)
				c.setLeading(true)
				err := c.Run(lctx)
				c.setLeading(false)
				c.cfg.Metrics.setLeader(false)
				ran <- err
			},
			OnStoppedLeading: func() { log.Info("stopped leading") },
			OnNewLeader: func(id string) {
				if id != e.Identity {
					log.Info("standing by", "leader", id)
				}
			},
		},
	})
	if err != nil {
		return fmt.Errorf("leader election: %w", err)
	}
	// Run returns when ctx is done or the lease is lost, having cancelled the
	// controller's context (and, on ctx, released the lease): no write starts
	// after that. It does not wait for the controller, so this does.
	le.Run(ctx)
	if !led.Load() {
		return nil
	}
	err = <-ran
	if ctx.Err() == nil {
		log.Error("lost the lease; stopped writing", "err", err)
		return ErrLostLease
	}
	return nil
}

// Health serves /livez and /readyz for c. A replica standing by is live and
// ready: it has nothing to do. The leader is ready once its informers have
// synced and its last pass worked, and live while passes keep coming.
func (c *Controller) Health() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/livez", func(w http.ResponseWriter, _ *http.Request) {
		leading, synced, last, _ := c.status()
		if leading && synced && time.Since(last) > 3*c.cfg.Resync+time.Minute {
			http.Error(w, fmt.Sprintf("no sync pass since %s", last.Format(time.RFC3339)), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		leading, synced, _, err := c.status()
		switch {
		case !leading:
			fmt.Fprintln(w, "ok: standing by")
		case !synced:
			http.Error(w, "waiting for the Kubernetes informers to sync", http.StatusServiceUnavailable)
		case err != nil:
			http.Error(w, "last sync pass failed: "+err.Error(), http.StatusServiceUnavailable)
		default:
			fmt.Fprintln(w, "ok: leading")
		}
	})
	return mux
}
