package endpoint

import (
	"fmt"
	"maps"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/margay-dev/margay/api"
)

func TestLabels(t *testing.T) {
	got := Labels("prod", Pod{ServiceAccount: "web-sa", Labels: map[string]string{
		"app": "web", LabelNamespace: "kube-system", "margay.dev/other": "x", NamespaceLabelPrefix + "team": "evil",
	}}, map[string]string{"team": "blue", "kubernetes.io/metadata.name": "prod"})
	want := map[string]string{
		"app": "web", LabelNamespace: "prod", LabelOrchestrator: "k8s", LabelServiceAccount: "web-sa",
		NamespaceLabelPrefix + "team": "blue", NamespaceLabelPrefix + "kubernetes.io/metadata.name": "prod",
	}
	if !maps.Equal(got, want) {
		t.Errorf("EndpointLabels = %v\nwant %v", got, want)
	}
	long := "a-label-key-that-is-fifty-eight-characters-long-1234567890"
	got = Labels("default", Pod{ServiceAccount: strings.Repeat("s", 64)}, map[string]string{long: "x", "ok": "y"})
	if want := map[string]string{LabelNamespace: "default", LabelOrchestrator: "k8s", NamespaceLabelPrefix + "ok": "y"}; !maps.Equal(got, want) {
		t.Errorf("EndpointLabels with labels too long = %v, want %v", got, want)
	}
	for k, v := range Labels("prod", Pod{}, map[string]string{"kubernetes.io/metadata.name": "prod"}) {
		if !api.ValidLabelKey(k) || !api.ValidLabelValue(v) {
			t.Errorf("label %s=%s is not valid", k, v)
		}
	}
	if got := Labels("default", Pod{}, nil); !maps.Equal(got, map[string]string{LabelNamespace: "default", LabelOrchestrator: "k8s"}) {
		t.Errorf("EndpointLabels of a bare pod = %v", got)
	}
}

func TestPorts(t *testing.T) {
	p := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{
		{Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {ContainerPort: 9090}, {Name: "dns", Protocol: corev1.ProtocolUDP, ContainerPort: 53}}},
		{Ports: []corev1.ContainerPort{{Name: "sctp", Protocol: corev1.ProtocolSCTP, ContainerPort: 9}, {Name: "Bad_Name", ContainerPort: 1}}},
	}}}
	got := fmt.Sprint(Ports(p))
	if want := "[{http TCP 8080} {dns UDP 53} {sctp SCTP 9}]"; got != want {
		t.Errorf("Ports = %s, want %s (unnamed and invalid ports left out)", got, want)
	}
	if pod, _ := FromPod(p); fmt.Sprint(pod.Ports) != got {
		t.Errorf("FromPod ports = %v", pod.Ports)
	}
}
