// Command ipambench measures the IPAM allocator against a real etcd and compares it
// with etcd's own single-key transaction rate measured in the same run.
//
//	go run ./test/bench/ipambench [-n 400] [-runs 5] [-fsync=true]
//
// It prints medians over the runs: allocations per second for one node allocating
// sequentially and for 8 nodes allocating at once, the raw etcd transaction rate for
// the same concurrency, their ratio, and the etcd round trips per address; then the
// latency of 30 assignments started at once on one node.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/margay-dev/margay/api"
	"github.com/margay-dev/margay/datastore"
	"github.com/margay-dev/margay/ipam"
	"github.com/margay-dev/margay/test/etcdtest"
)

func main() {
	n := flag.Int("n", 400, "addresses per scenario and run")
	runs := flag.Int("runs", 5, "runs; medians are reported")
	fsync := flag.Bool("fsync", true, "let etcd fsync, as in production")
	flag.Parse()
	if err := run(*n, *runs, *fsync); err != nil {
		log.Fatal(err)
	}
}

// seq makes the keys and pools of every run distinct.
var seq atomic.Int64

type result struct {
	rate       float64 // operations per second
	roundTrips float64 // etcd requests per operation
}

func run(n, runs int, fsync bool) error {
	srv, err := etcdtest.Start(etcdtest.Options{Fsync: fsync})
	if err != nil {
		return err
	}
	defer srv.Close()
	store, err := datastore.New(datastore.Config{Endpoints: srv.Endpoints()})
	if err != nil {
		return err
	}
	defer store.Close()
	ctx := context.Background()

	scenarios := []struct {
		name string
		f    func() (result, error)
	}{
		{"etcd txn, 1 client", func() (result, error) { return rawTxn(ctx, store, 1, n) }},
		{"etcd txn, 8 clients", func() (result, error) { return rawTxn(ctx, store, 8, n) }},
		{"ipam, 1 node, warm allocator", func() (result, error) { return allocate(ctx, store, 1, n, false) }},
		{"ipam, 8 nodes at once, warm", func() (result, error) { return allocate(ctx, store, 8, n, false) }},
		{"ipam, 1 node, new allocator per address (CNI)", func() (result, error) { return allocate(ctx, store, 1, n/4, true) }},
	}
	med := map[string]result{}
	for _, sc := range scenarios {
		var rates, rts []float64
		for range runs {
			res, err := sc.f()
			if err != nil {
				return fmt.Errorf("%s: %w", sc.name, err)
			}
			rates, rts = append(rates, res.rate), append(rts, res.roundTrips)
		}
		med[sc.name] = result{median(rates), median(rts)}
	}

	fmt.Printf("IPAM benchmark: %d addresses per run, median of %d runs, etcd fsync=%t, %s\n\n", n, runs, fsync, time.Now().UTC().Format("2006-01-02"))
	fmt.Println("| scenario | ops/s | etcd round trips per op | ratio to etcd txn/s at the same concurrency |")
	fmt.Println("|---|---:|---:|---:|")
	base := map[string]string{
		"ipam, 1 node, warm allocator":                  "etcd txn, 1 client",
		"ipam, 8 nodes at once, warm":                   "etcd txn, 8 clients",
		"ipam, 1 node, new allocator per address (CNI)": "etcd txn, 1 client",
	}
	for _, sc := range scenarios {
		m := med[sc.name]
		ratio := "baseline"
		if b, ok := base[sc.name]; ok {
			ratio = fmt.Sprintf("%.2f", m.rate/med[b].rate)
		}
		fmt.Printf("| %s | %.0f | %.2f | %s |\n", sc.name, m.rate, m.roundTrips, ratio)
	}
	burst, err := concurrentBurst(ctx, store, 30, runs)
	if err != nil {
		return fmt.Errorf("burst: %w", err)
	}
	fmt.Printf("\n30 assignments at once on one node, each with a new allocator (30 CNI ADDs at once), median of %d runs:\n", runs)
	fmt.Printf("latency p50 %s, p90 %s, max %s; %.1f etcd round trips per address\n",
		burst.p50.Round(time.Millisecond), burst.p90.Round(time.Millisecond), burst.max.Round(time.Millisecond), burst.roundTrips)
	if rt := med["ipam, 1 node, warm allocator"].roundTrips; rt > 2 {
		fmt.Fprintf(os.Stderr, "\nFAIL: %.2f round trips per address in the steady state; the target is at most 2\n", rt)
		os.Exit(1)
	}
	return nil
}

// rawTxn measures etcd's rate for compare-and-swap transactions on one key per
// client: the primitive every IPAM write is made of.
func rawTxn(ctx context.Context, s *datastore.Store, clients, n int) (result, error) {
	var wg sync.WaitGroup
	errs := make(chan error, clients)
	start := time.Now()
	for c := range clients {
		wg.Go(func() {
			key := fmt.Sprintf("%sbench/raw/%d/%d", datastore.Prefix, seq.Add(1), c)
			rev := int64(0)
			for i := c; i < n; i += clients {
				resp, err := s.Txn(ctx, []clientv3.Cmp{clientv3.Compare(clientv3.ModRevision(key), "=", rev)},
					[]clientv3.Op{clientv3.OpPut(key, strconv.Itoa(i))}, nil)
				if err != nil || !resp.Succeeded {
					errs <- fmt.Errorf("raw txn: %v (succeeded %v)", err, resp != nil && resp.Succeeded)
					return
				}
				rev = resp.Header.Revision
			}
		})
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		return result{}, err
	}
	return result{rate: float64(n) / time.Since(start).Seconds(), roundTrips: 1}, nil
}

// register writes the Node that margay-node would; IPAM serves only
// registered nodes.
func register(ctx context.Context, s *datastore.Store, node string) error {
	_, err := s.Create(ctx, api.NewNode(node))
	return err
}

// allocate assigns n addresses from a fresh pool with `nodes` nodes in parallel.
// The first address of each node (which claims its block) is not timed: this is
// the steady state. With cold, every address gets a new Allocator, as every CNI
// invocation does.
func allocate(ctx context.Context, s *datastore.Store, nodes, n int, cold bool) (result, error) {
	k := seq.Add(1)
	p := api.NewIPPool(fmt.Sprintf("bench-%d", k))
	p.Spec.CIDR = fmt.Sprintf("10.%d.0.0/16", k%250)
	if _, err := s.Create(ctx, p); err != nil {
		return result{}, err
	}
	defer s.Delete(ctx, api.KindOf(p), p.Metadata.Name, "")
	var wg sync.WaitGroup
	errs := make(chan error, nodes)
	allocs := make([]*ipam.Allocator, nodes)
	for i := range nodes {
		allocs[i] = ipam.New(s, ipam.Options{})
		node := fmt.Sprintf("bench-%s-%d", p.Metadata.Name, i)
		if err := register(ctx, s, node); err != nil {
			return result{}, err
		}
		if _, err := allocs[i].AutoAssign(ctx, ipam.AssignArgs{Handle: node + "-warm", Node: node, Pools: []string{p.Metadata.Name}}); err != nil {
			return result{}, err
		}
	}
	before := s.RoundTrips()
	start := time.Now()
	for i := range nodes {
		node := fmt.Sprintf("bench-%s-%d", p.Metadata.Name, i)
		wg.Go(func() {
			a := allocs[i]
			for j := i; j < n; j += nodes {
				if cold {
					a = ipam.New(s, ipam.Options{})
				}
				if _, err := a.AutoAssign(ctx, ipam.AssignArgs{Handle: fmt.Sprintf("%s-%d", node, j), Node: node, Pools: []string{p.Metadata.Name}}); err != nil {
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	if err := <-errs; err != nil {
		return result{}, err
	}
	return result{rate: float64(n) / elapsed.Seconds(), roundTrips: float64(s.RoundTrips()-before) / float64(n)}, nil
}

type burstResult struct {
	p50, p90, max time.Duration
	roundTrips    float64
}

// concurrentBurst starts n assignments on one node at the same moment, each with a
// fresh allocator as separate CNI processes would have, and reports their latency
// percentiles (medians over runs). They all contend for the same block.
func concurrentBurst(ctx context.Context, s *datastore.Store, n, runs int) (burstResult, error) {
	var p50s, p90s, maxes, rts []float64
	for range runs {
		k := seq.Add(1)
		p := api.NewIPPool(fmt.Sprintf("burst-%d", k))
		p.Spec.CIDR = fmt.Sprintf("10.%d.0.0/16", k%250)
		if _, err := s.Create(ctx, p); err != nil {
			return burstResult{}, err
		}
		node := "burst-" + p.Metadata.Name
		if err := register(ctx, s, node); err != nil {
			return burstResult{}, err
		}
		// The node already has its block, as a node running pods does.
		if _, err := ipam.New(s, ipam.Options{}).AutoAssign(ctx, ipam.AssignArgs{Handle: node + "-warm", Node: node, Pools: []string{p.Metadata.Name}}); err != nil {
			return burstResult{}, err
		}
		lat := make([]float64, n)
		errs := make(chan error, n)
		before := s.RoundTrips()
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() {
				start := time.Now()
				_, err := ipam.New(s, ipam.Options{}).AutoAssign(ctx, ipam.AssignArgs{Handle: fmt.Sprintf("%s-%d", node, i), Node: node, Pools: []string{p.Metadata.Name}})
				lat[i] = float64(time.Since(start))
				if err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		close(errs)
		if err := <-errs; err != nil {
			return burstResult{}, err
		}
		rts = append(rts, float64(s.RoundTrips()-before)/float64(n))
		slices.Sort(lat)
		p50s, p90s, maxes = append(p50s, lat[n/2]), append(p90s, lat[n*9/10]), append(maxes, lat[n-1])
		s.Delete(ctx, api.KindOf(p), p.Metadata.Name, "")
	}
	return burstResult{time.Duration(median(p50s)), time.Duration(median(p90s)), time.Duration(median(maxes)), median(rts)}, nil
}

func median(xs []float64) float64 {
	slices.Sort(xs)
	return xs[len(xs)/2]
}
