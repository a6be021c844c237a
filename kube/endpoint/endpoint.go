// Package endpoint derives a Kubernetes pod's WorkloadEndpoint labels, and
// reads them from the API server for the CNI plugin's ADD. It keeps to
// client-go's REST and kubeconfig packages, not the typed clientset, so that
// the CNI plugins stay small.
package endpoint

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/margay-dev/margay/api"
)

// Labels margay derives for every Kubernetes WorkloadEndpoint, as Calico's
// projectcalico.org/namespace and friends. Pod labels under these prefixes
// are dropped, so that a pod cannot pose as another namespace's.
const (
	LabelNamespace      = api.LabelNamespace
	LabelOrchestrator   = "margay.dev/orchestrator"
	LabelServiceAccount = "margay.dev/serviceaccount"
	// NamespaceLabelPrefix carries the pod's namespace's labels, so that a
	// policy's namespaceSelector is a selector on the endpoint. It has no
	// '/', as Calico's pcns., so that a prefixed key such as
	// kubernetes.io/metadata.name stays a valid key.
	NamespaceLabelPrefix = api.NamespaceLabelPrefix
	reservedPrefix       = "margay.dev/"
)

// Pod is what margay needs of a Kubernetes pod.
type Pod struct {
	Node           string // spec.nodeName
	ServiceAccount string
	Labels         map[string]string
	Ports          []api.EndpointPort // its containers' named ports
}

// Labels are the labels of a pod's WorkloadEndpoint: the pod's own,
// then margay's, then its namespace's under NamespaceLabelPrefix. The CNI
// plugin (at ADD) and the controller (on every change) both use it. A label
// that would not be valid is left out (a namespace label whose key is too
// long with the prefix, a service account name over 63 characters): an
// endpoint must stay writable.
func Labels(namespace string, p Pod, nsLabels map[string]string) map[string]string {
	out := make(map[string]string, len(p.Labels)+len(nsLabels)+3)
	set := func(k, v string) {
		if api.ValidLabelKey(k) && api.ValidLabelValue(v) {
			out[k] = v
		}
	}
	for k, v := range p.Labels {
		if !reserved(k) {
			set(k, v)
		}
	}
	set(LabelNamespace, namespace)
	set(LabelOrchestrator, api.OrchestratorK8s)
	if p.ServiceAccount != "" {
		set(LabelServiceAccount, p.ServiceAccount)
	}
	for k, v := range nsLabels {
		set(NamespaceLabelPrefix+k, v)
	}
	return out
}

func reserved(k string) bool {
	return strings.HasPrefix(k, reservedPrefix) || strings.HasPrefix(k, NamespaceLabelPrefix)
}

// FromPod is what Labels needs of a pod. A pod that has finished (Succeeded
// or Failed) holds no address: kubelet has torn its sandbox down; ok is false.
func FromPod(p *corev1.Pod) (pod Pod, ok bool) {
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return Pod{}, false
	}
	return Pod{Node: p.Spec.NodeName, ServiceAccount: p.Spec.ServiceAccountName, Labels: p.Labels, Ports: Ports(p)}, true
}

// Ports are the named ports of a pod's containers, in the order they are
// declared: what a policy's named port resolves to. A port that could not
// be stored (a protocol margay does not know) is left out.
func Ports(p *corev1.Pod) []api.EndpointPort {
	var out []api.EndpointPort
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == "" || cp.ContainerPort < 1 || cp.ContainerPort > 65535 {
				continue
			}
			proto, ok := api.ProtocolFromName(string(cp.Protocol))
			if cp.Protocol == "" {
				proto, ok = api.Protocol{Name: "TCP"}, true
			}
			if !ok || !api.ValidPortName(cp.Name) {
				continue
			}
			out = append(out, api.EndpointPort{Name: cp.Name, Protocol: proto, Port: uint16(cp.ContainerPort)})
		}
	}
	return out
}

// Read reads a pod and its namespace from the API server named by
// kubeconfig and returns the pod's endpoint labels and named ports.
func Read(ctx context.Context, kubeconfig, userAgent, namespace, name string) (map[string]string, []api.EndpointPort, error) {
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, nil, fmt.Errorf("kubeconfig %s: %w", kubeconfig, err)
	}
	rc.UserAgent = userAgent
	hc, err := rest.HTTPClientFor(rc)
	if err != nil {
		return nil, nil, err
	}
	var pod corev1.Pod
	if err := get(ctx, hc, rc.Host, "/api/v1/namespaces/"+url.PathEscape(namespace)+"/pods/"+url.PathEscape(name), &pod); err != nil {
		return nil, nil, fmt.Errorf("reading pod %s/%s: %w", namespace, name, err)
	}
	var ns corev1.Namespace
	if err := get(ctx, hc, rc.Host, "/api/v1/namespaces/"+url.PathEscape(namespace), &ns); err != nil {
		return nil, nil, fmt.Errorf("reading namespace %s: %w", namespace, err)
	}
	p, _ := FromPod(&pod)
	return Labels(namespace, p, ns.Labels), Ports(&pod), nil
}

// get decodes the JSON object at path, or says how the API server refused.
func get(ctx context.Context, hc *http.Client, host, path string, into any) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, strings.TrimSuffix(host, "/")+path, nil)
	if err != nil {
		return err
	}
	req.Header.Set("Accept", "application/json")
	resp, err := hc.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 4<<20))
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		var st struct {
			Reason  string `json:"reason"`
			Message string `json:"message"`
		}
		if json.Unmarshal(body, &st) == nil && st.Message != "" {
			return fmt.Errorf("%s (%d %s): %s", strings.ToLower(st.Reason), resp.StatusCode, http.StatusText(resp.StatusCode), st.Message)
		}
		return fmt.Errorf("%d %s", resp.StatusCode, http.StatusText(resp.StatusCode))
	}
	return json.Unmarshal(body, into)
}
