package k8s_test

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
)

var benchPods = flag.Int("pods", 30, "BenchmarkPodStartup: pods per round, spread over the nodes")

// BenchmarkPodStartup times pods through the kubelet, from the API create to
// Ready as a watch sees it, with margay's conflist and, in the same lab and run,
// with the reference ptp + host-local plugins (the baseline). margay's share
// is its CNI ADD time, from the plugin's log. Each of b.N rounds runs the
// baseline and then margay; run it as
//
//	go test -run '^$' -bench PodStartup -benchtime 1x ./test/k8s
func BenchmarkPodStartup(b *testing.B) {
	c := newCluster(b, 2)
	for _, n := range c.lab.Nodes {
		for _, tool := range []string{"ptp", "host-local"} {
			if err := copyTool(tool, filepath.Join(c.lab.Dir(), n.Name, "cni", "bin")); err != nil {
				b.Fatal(err)
			}
		}
	}
	var startup = map[string][]time.Duration{}
	var adds []time.Duration
	round := 0
	for b.Loop() {
		round++
		for _, plugin := range []string{"ptp+host-local", "margay"} {
			c.useBaseline(plugin != "margay")
			since := time.Now()
			d := c.startPods(fmt.Sprintf("r%d-%s", round, strings.ReplaceAll(plugin, "+", "-")), *benchPods, plugin == "margay")
			startup[plugin] = append(startup[plugin], d...)
			if plugin == "margay" {
				adds = append(adds, c.addDurations(since)...)
			}
		}
	}
	base, mine := median(startup["ptp+host-local"]), median(startup["margay"])
	fmt.Printf("\npod startup through the kubelet, create → Ready, %d pods per round, %d round(s), 2 nodes\n", *benchPods, round)
	fmt.Printf("| plugin | p50 | p99 | max | CNI ADD p50 | CNI ADD p99 | ratio (p50) |\n|---|---:|---:|---:|---:|---:|---:|\n")
	fmt.Printf("| ptp + host-local (baseline) | %v | %v | %v | | | 1.00 |\n", ms(base), ms(pct(startup["ptp+host-local"], 99)), ms(slices.Max(startup["ptp+host-local"])))
	fmt.Printf("| margay | %v | %v | %v | %v | %v | %.2f |\n", ms(mine), ms(pct(startup["margay"], 99)), ms(slices.Max(startup["margay"])),
		ms(median(adds)), ms(pct(adds, 99)), float64(mine)/float64(base))
	fmt.Printf("margay's CNI ADD is %.0f%% of its median pod startup (%d ADDs)\n", 100*float64(median(adds))/float64(mine), len(adds))
	b.ReportMetric(float64(mine)/1e6, "margay-p50-ms")
	b.ReportMetric(float64(base)/1e6, "baseline-p50-ms")
	b.ReportMetric(float64(mine)/float64(base), "ratio")
}

// baselineConf sorts before margay's conflist, which containerd then stops
// using: containerd takes the first configuration in its directory.
const baselineConf = "00-baseline.conflist"

// useBaseline puts the ptp + host-local conflist in front of margay's (or
// takes it away) on every node, and waits until containerd uses it: a probe
// pod's address tells which network it got.
func (c *cluster) useBaseline(on bool) {
	c.t.Helper()
	for i, n := range c.lab.Nodes {
		path := filepath.Join(c.lab.Dir(), n.Name, "cni", "net.d", baselineConf)
		if !on {
			os.Remove(path)
			continue
		}
		conf := fmt.Sprintf(`{"cniVersion": "1.0.0", "name": "baseline", "plugins": [{"type": "ptp", "mtu": 1450,
			"ipam": {"type": "host-local", "dataDir": %q, "ranges": [[{"subnet": "10.250.%d.0/24"}]]}}]}`,
			filepath.Join(c.lab.Dir(), n.Name, "host-local"), i)
		if err := os.WriteFile(path, []byte(conf), 0o644); err != nil {
			c.t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	for try := 0; ; try++ {
		var wrong []string
		for _, n := range c.lab.Nodes {
			name := fmt.Sprintf("probe-%d-%s", try, n.Name)
			c.pod(ctx, "default", name, n.Name, nil)
			p := c.waitReady(ctx, "default", name)[name]
			ip := netip.MustParseAddr(p.Status.PodIP)
			if podCIDR.Contains(ip) == on {
				wrong = append(wrong, n.Name)
			}
			c.deletePods(ctx, "default", name)
		}
		if len(wrong) == 0 {
			return
		}
		if ctx.Err() != nil {
			c.t.Fatalf("containerd on %v did not switch networks", wrong)
		}
		time.Sleep(time.Second)
	}
}

// startPods creates n pods in a new namespace, round robin over the nodes,
// returns each one's time from its create call to the watch event that shows
// it Ready, and deletes them.
func (c *cluster) startPods(ns string, n int, margay bool) []time.Duration {
	c.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	if _, err := c.admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		c.t.Fatal(err)
	}
	w, err := c.admin.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	defer w.Stop()
	var mu sync.Mutex
	created := map[string]time.Time{}
	createErr := make(chan error, 1)
	go func() {
		for i := range n {
			name := fmt.Sprintf("p%02d", i)
			mu.Lock()
			created[name] = time.Now()
			mu.Unlock()
			if _, err := c.admin.CoreV1().Pods(ns).Create(ctx, podSpec(ns, name, c.lab.Nodes[i%len(c.lab.Nodes)].Name, nil), metav1.CreateOptions{}); err != nil {
				createErr <- err
				return
			}
		}
	}()
	var took []time.Duration
	seen := map[string]bool{}
	for len(took) < n {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				c.t.Fatal("the watch ended")
			}
			p, isPod := ev.Object.(*corev1.Pod)
			if !isPod || ev.Type == watch.Deleted || seen[p.Name] || !podReady(p) {
				continue
			}
			if margay && !podCIDR.Contains(netip.MustParseAddr(p.Status.PodIP)) {
				c.t.Fatalf("pod %s got %s, not from margay's pool", p.Name, p.Status.PodIP)
			}
			seen[p.Name] = true
			mu.Lock()
			took = append(took, time.Since(created[p.Name]))
			mu.Unlock()
		case err := <-createErr:
			c.t.Fatalf("create a pod: %v", err)
		case <-ctx.Done():
			c.t.Fatalf("%d of %d pods Ready", len(took), n)
		}
	}
	var names []string
	for name := range seen {
		names = append(names, name)
	}
	c.deletePods(ctx, ns, names...)
	return took
}

// deletePods deletes pods and waits until the API has forgotten them.
func (c *cluster) deletePods(ctx context.Context, ns string, names ...string) {
	c.t.Helper()
	for _, name := range names {
		if err := c.admin.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
			c.t.Fatal(err)
		}
	}
	for {
		l, err := c.admin.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
		if err != nil {
			c.t.Fatal(err)
		}
		left := 0
		for _, p := range l.Items {
			if slices.Contains(names, p.Name) {
				left++
			}
		}
		if left == 0 {
			return
		}
		select {
		case <-ctx.Done():
			c.t.Fatalf("%d pods in %s not deleted", left, ns)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// addDurations are the successful CNI ADDs the plugin logged since t, on every
// node.
func (c *cluster) addDurations(since time.Time) []time.Duration {
	c.t.Helper()
	var d []time.Duration
	for _, n := range c.lab.Nodes {
		f, err := os.Open(c.cniLogs[n.Name])
		if err != nil {
			c.t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			var line struct {
				Time     time.Time
				Msg      string
				Duration time.Duration
			}
			if json.Unmarshal(sc.Bytes(), &line) == nil && line.Msg == "ADD" && line.Time.After(since) {
				d = append(d, line.Duration)
			}
		}
		f.Close()
	}
	return d
}

func median(d []time.Duration) time.Duration { return pct(d, 50) }

// pct is the p-th percentile (nearest rank).
func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(d))
	i := (p*len(s) + 99) / 100
	return s[max(0, min(len(s), i)-1)]
}

func ms(d time.Duration) string { return fmt.Sprintf("%.0f ms", float64(d)/1e6) }
