// Command etcdserver runs a single-member etcd from the etcd server package that
// margay is built against. Tests start it as a separate process so that etcd runs
// at full speed under `go test -race` and can be killed and restarted like a real
// etcd; the lab uses it so that nothing needs installing.
package main

import (
	"flag"
	"fmt"
	"log"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

func main() {
	var (
		dataDir    = flag.String("data-dir", "", "data directory (required)")
		clientURL  = flag.String("client-url", "http://127.0.0.1:2379", "URL to serve clients on")
		peerURL    = flag.String("peer-url", "http://127.0.0.1:2380", "URL for the (unused) peer port")
		fsync      = flag.Bool("fsync", false, "fsync writes; off trades durability on power loss for speed")
		certFile   = flag.String("cert-file", "", "server TLS certificate")
		keyFile    = flag.String("key-file", "", "server TLS key")
		caFile     = flag.String("trusted-ca-file", "", "CA that signs client certificates")
		clientAuth = flag.Bool("client-cert-auth", false, "require client certificates")
	)
	flag.Parse()
	if *dataDir == "" {
		log.Fatal("etcdserver: --data-dir is required")
	}
	cu, err := url.Parse(*clientURL)
	if err != nil {
		log.Fatalf("etcdserver: --client-url: %v", err)
	}
	pu, err := url.Parse(*peerURL)
	if err != nil {
		log.Fatalf("etcdserver: --peer-url: %v", err)
	}
	cfg := embed.NewConfig()
	cfg.Name = "margay"
	cfg.Dir = *dataDir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*cu}, []url.URL{*cu}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*pu}, []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.LogLevel = "error"
	cfg.UnsafeNoFsync = !*fsync
	cfg.ClientTLSInfo.CertFile = *certFile
	cfg.ClientTLSInfo.KeyFile = *keyFile
	cfg.ClientTLSInfo.TrustedCAFile = *caFile
	cfg.ClientTLSInfo.ClientCertAuth = *clientAuth
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		log.Fatalf("etcdserver: %v", err)
	}
	select {
	case <-e.Server.ReadyNotify():
	case <-time.After(60 * time.Second):
		log.Fatal("etcdserver: not ready within 60s")
	}
	fmt.Println("ready")
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-sig:
	case err := <-e.Err():
		log.Printf("etcdserver: %v", err)
	}
	e.Close()
}
