// Command cnibench measures CNI ADD and DEL latency of margay+margay-ipam against
// the reference ptp+host-local plugins, in the same run, on the same node: a
// network namespace with etcd inside it. It needs root.
//
//	go run ./test/bench/cnibench [-n 20] [-burst 30] [-runs 3]
//
// It prints p50 and p99 for sequential ADDs and DELs and for a burst of
// concurrent ADDs, and the ratios margay/reference.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/containernetworking/cni/libcni"

	"github.com/margay-dev/margay/test/etcdtest"
	"github.com/margay-dev/margay/test/nstest"
)

func main() {
	n := flag.Int("n", 20, "sequential ADDs (and DELs) per run")
	burst := flag.Int("burst", 30, "concurrent ADDs per run")
	runs := flag.Int("runs", 3, "runs; the pooled latencies give the percentiles")
	flag.Parse()
	if os.Geteuid() != 0 {
		log.Fatal("cnibench needs root: it makes network namespaces")
	}
	if err := run(*n, *burst, *runs); err != nil {
		log.Fatal(err)
	}
}

type stack struct {
	name string
	conf string
}

func run(n, burst, runs int) error {
	bin, err := os.MkdirTemp("", "margay-cnibench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(bin)
	if out, err := exec.Command("go", "build", "-o", bin, "./cmd/margay", "./cmd/margay-ipam", "./cmd/margayctl").CombinedOutput(); err != nil {
		return fmt.Errorf("build: %v: %s", err, out)
	}
	for _, tool := range []string{"ptp", "host-local"} {
		p, err := exec.Command("go", "tool", "-n", tool).Output()
		if err != nil {
			return fmt.Errorf("build %s: %v", tool, err)
		}
		if err := os.Symlink(strings.TrimSpace(string(p)), filepath.Join(bin, tool)); err != nil {
			return err
		}
	}
	node, err := nstest.Create("bench-node")
	if err != nil {
		return err
	}
	defer node.Delete()
	if err := node.MakeHost("198.18.1.2/24"); err != nil {
		return err
	}
	srv, err := etcdtest.Start(etcdtest.Options{NetNS: node.Name, Fsync: true})
	if err != nil {
		return err
	}
	defer srv.Close()
	etcd := srv.Endpoints()[0]
	pool := filepath.Join(bin, "pool.yaml")
	// The pool, and the Node that margay-node would register.
	os.WriteFile(pool, []byte("apiVersion: margay.dev/v1\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.244.0.0/16}\n---\n"+
		"apiVersion: margay.dev/v1\nkind: Node\nmetadata: {name: node-a}\nspec: {bgp: {ipv4Address: 198.18.1.2/24}}\n"), 0o600)
	if out, err := node.Run(filepath.Join(bin, "margayctl"), "--etcd-endpoints", etcd, "apply", "-f", pool); err != nil {
		return fmt.Errorf("pool: %v: %s", err, out)
	}
	stacks := []stack{
		{"ptp+host-local (reference)", fmt.Sprintf(`{"cniVersion":"1.0.0","name":"bench","plugins":[{"type":"ptp","ipam":{"type":"host-local","dataDir":%q,"ranges":[[{"subnet":"10.99.0.0/16"}]]}}]}`, filepath.Join(bin, "host-local"+"-data"))},
		{"margay+margay-ipam", fmt.Sprintf(`{"cniVersion":"1.0.0","name":"bench","plugins":[{"type":"margay","etcd_endpoints":%q,"nodename":"node-a","mtu":1500,"ipam":{"type":"margay-ipam"}}]}`, etcd)},
	}
	type figures struct {
		add, del, burstAdd []time.Duration
		cpu                time.Duration // plugin CPU time over all burst ADDs
	}
	res := map[string]*figures{}
	for r := range runs {
		for _, st := range stacks { // interleaved, so both see the same machine load
			f := res[st.name]
			if f == nil {
				f = &figures{}
				res[st.name] = f
			}
			list, err := libcni.ConfListFromBytes([]byte(st.conf))
			if err != nil {
				return err
			}
			cache := filepath.Join(bin, fmt.Sprintf("cache-%d-%s", r, strings.Fields(st.name)[0]))
			add, del, err := sequential(node, list, bin, cache, n, r)
			if err != nil {
				return fmt.Errorf("%s: %w", st.name, err)
			}
			b, cpu, err := concurrent(node, list, bin, cache, burst, r)
			if err != nil {
				return fmt.Errorf("%s burst: %w", st.name, err)
			}
			f.add, f.del, f.burstAdd = append(f.add, add...), append(f.del, del...), append(f.burstAdd, b...)
			f.cpu += cpu
		}
	}
	fmt.Printf("CNI ADD/DEL latency: %d sequential and %d concurrent ADDs per run, %d runs, etcd with fsync, %s\n\n", n, burst, runs, time.Now().UTC().Format("2006-01-02"))
	fmt.Printf("| stack | ADD p50 | ADD p99 | DEL p50 | DEL p99 | %d concurrent ADDs p50 | p99 | plugin CPU per concurrent ADD |\n|---|---:|---:|---:|---:|---:|---:|---:|\n", burst)
	for _, st := range stacks {
		f := res[st.name]
		fmt.Printf("| %s | %s | %s | %s | %s | %s | %s | %s |\n", st.name, pct(f.add, 50), pct(f.add, 99), pct(f.del, 50), pct(f.del, 99),
			pct(f.burstAdd, 50), pct(f.burstAdd, 99), (f.cpu / time.Duration(len(f.burstAdd))).Round(100*time.Microsecond))
	}
	ref, mg := res[stacks[0].name], res[stacks[1].name]
	fmt.Printf("\nmargay/reference: single ADD p50 %.2f× (target ≤ 1.5×), DEL p50 %.2f×, concurrent ADD p50 %.2f×; margay concurrent ADD p50 %s (target < 1 s)\n",
		ratio(mg.add, ref.add), ratio(mg.del, ref.del), ratio(mg.burstAdd, ref.burstAdd), pct(mg.burstAdd, 50))
	return nil
}

func rt(ns *nstest.NS, id string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: id, NetNS: ns.Path, IfName: "eth0",
		Args: [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", "bench"}, {"K8S_POD_NAME", id}}}
}

// makePods makes n pod namespaces; cleanup deletes those made, even on error.
func makePods(n int) ([]*nstest.NS, func(), error) {
	var pods []*nstest.NS
	cleanup := func() {
		for _, p := range pods {
			p.Delete()
		}
	}
	for range n {
		p, err := nstest.Create("bench-pod")
		if err != nil {
			return nil, cleanup, err
		}
		pods = append(pods, p)
	}
	return pods, cleanup, nil
}

// sequential adds n pods one after another, then deletes them one after another.
func sequential(node *nstest.NS, list *libcni.NetworkConfigList, bin, cache string, n, run int) (add, del []time.Duration, err error) {
	pods, cleanup, err := makePods(n)
	defer cleanup()
	if err != nil {
		return nil, nil, err
	}
	cfg := libcni.NewCNIConfigWithCacheDir([]string{bin}, cache, nil)
	for i, p := range pods {
		start := time.Now()
		if err := node.Do(func() error {
			_, err := cfg.AddNetworkList(context.Background(), list, rt(p, fmt.Sprintf("s%d-%d", run, i)))
			return err
		}); err != nil {
			return nil, nil, err
		}
		add = append(add, time.Since(start))
	}
	for i, p := range pods {
		start := time.Now()
		if err := node.Do(func() error {
			return cfg.DelNetworkList(context.Background(), list, rt(p, fmt.Sprintf("s%d-%d", run, i)))
		}); err != nil {
			return nil, nil, err
		}
		del = append(del, time.Since(start))
	}
	return add, del, nil
}

// concurrent adds n pods at once, as kubelet starting n pods, then deletes them.
// It also returns the CPU time the plugin processes used for the ADDs: on a
// small machine a burst is CPU-bound, so that is what decides its latency.
func concurrent(node *nstest.NS, list *libcni.NetworkConfigList, bin, cache string, n, run int) ([]time.Duration, time.Duration, error) {
	pods, cleanup, err := makePods(n)
	defer cleanup()
	if err != nil {
		return nil, 0, err
	}
	cpu0 := childCPU()
	lat := make([]time.Duration, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, p := range pods {
		wg.Go(func() {
			cfg := libcni.NewCNIConfigWithCacheDir([]string{bin}, cache, nil)
			start := time.Now()
			errs[i] = node.Do(func() error {
				_, err := cfg.AddNetworkList(context.Background(), list, rt(p, fmt.Sprintf("c%d-%d", run, i)))
				return err
			})
			lat[i] = time.Since(start)
		})
	}
	wg.Wait()
	cpu := childCPU() - cpu0
	for i, p := range pods {
		cfg := libcni.NewCNIConfigWithCacheDir([]string{bin}, cache, nil)
		node.Do(func() error {
			return cfg.DelNetworkList(context.Background(), list, rt(p, fmt.Sprintf("c%d-%d", run, i)))
		})
	}
	for _, err := range errs {
		if err != nil {
			return nil, 0, err
		}
	}
	return lat, cpu, nil
}

// childCPU is the user and system time of the finished child processes: the
// plugins libcni ran (etcd is a child too, but counts only when it exits).
func childCPU() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_CHILDREN, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func pct(xs []time.Duration, p int) time.Duration {
	s := slices.Clone(xs)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)].Round(100 * time.Microsecond)
}

func ratio(a, b []time.Duration) float64 { return float64(pct(a, 50)) / float64(pct(b, 50)) }
