// Command pause is the process of the kubelet lab's image: the pod sandbox's,
// as Kubernetes' own pause is, and the test pods' container. No registry is
// reachable from the lab, so k8stest builds it and imports it into containerd.
// It waits for SIGTERM or SIGINT, as PID 1 of its container.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}
