package kube

import (
	"strings"

	"github.com/margay-dev/margay/ipam"
)

// SelectRepairs keeps, of an IPAM check's findings, those the controller
// mends on its own: addresses of pods that no longer exist (or are bound to a
// node that no longer does), and whatever a deleted node held when its
// Kubernetes node is gone too. An address whose pod may still run is never
// among them, even without its WorkloadEndpoint; nor is anything of a node
// Kubernetes still has (its agent registers it again). Everything else is
// left to `margayctl ipam check --fix`.
func SelectRepairs(r *ipam.Report, in Input) *ipam.Report {
	out := &ipam.Report{Revision: r.Revision}
	for _, f := range r.Leaked {
		if f.Pod != "" {
			ns, name, _ := strings.Cut(f.Pod, "/")
			if in.podLive(PodKey{ns, name}) {
				continue
			}
		}
		switch gone := f.DeletedNode(); {
		case gone != "" && !in.K8sNodes[gone]:
		case gone == "" && f.Pod != "" && strings.HasPrefix(f.Handle, ipam.PodHandlePrefix):
		default:
			continue
		}
		out.Leaked = append(out.Leaked, f)
	}
	for _, f := range r.BadAffinities {
		if gone := f.DeletedNode(); gone != "" && !in.K8sNodes[gone] {
			out.BadAffinities = append(out.BadAffinities, f)
		}
	}
	return out
}
