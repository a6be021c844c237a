package netpol

import (
	"encoding/json"
	"fmt"

	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"

	"github.com/margay-dev/margay/api"
)

// kindNetworkPolicy is the kind Decode reads of networking.k8s.io/v1.
const kindNetworkPolicy = "NetworkPolicy"

// Decode is api.Decode that also reads Kubernetes NetworkPolicies
// (networking.k8s.io/v1), as documents of their own, items of a List or
// objects of a JSON stream, and returns their translations. Errors name the
// document (and item) as api.Decode's do.
func Decode(data []byte) ([]api.Resource, error) { return api.DecodeWith(data, decodeOne) }

func decodeOne(js []byte) (api.Resource, error) {
	var tm metav1.TypeMeta
	if err := json.Unmarshal(js, &tm); err != nil || tm.APIVersion != networkingv1.SchemeGroupVersion.String() {
		return api.DecodeOne(js)
	}
	if tm.Kind != kindNetworkPolicy {
		return nil, fmt.Errorf("kind: %s %q is not supported: of Kubernetes' kinds, margay reads NetworkPolicy only", tm.APIVersion, tm.Kind)
	}
	var np networkingv1.NetworkPolicy
	if err := yaml.UnmarshalStrict(js, &np); err != nil {
		return nil, fmt.Errorf("%s %s: %v", tm.APIVersion, tm.Kind, err)
	}
	p, err := Translate(&np)
	if err != nil {
		name := np.Name
		if np.Namespace != "" {
			name = np.Namespace + "/" + name
		}
		return nil, fmt.Errorf("%s %s %q: %w", tm.APIVersion, tm.Kind, name, err)
	}
	return p, nil
}
