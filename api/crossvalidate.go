package api

import "fmt"

// ValidateAgainst checks r against the other stored resources of its kind: today,
// that a pool does not overlap another pool. others may include r itself (an update).
func ValidateAgainst(r Resource, others []Resource) error {
	p, ok := r.(*IPPool)
	if !ok {
		return nil
	}
	for _, o := range others {
		q, ok := o.(*IPPool)
		if !ok || q.Metadata.Name == p.Metadata.Name {
			continue
		}
		if p.Prefix().Overlaps(q.Prefix()) {
			return &ValidationError{Ref: Ref(p), Fields: []*FieldError{{
				Field: "spec.cidr", Value: p.Spec.CIDR,
				Detail: fmt.Sprintf("overlaps IPPool %q (%s); pools must not overlap", q.Metadata.Name, q.Spec.CIDR),
			}}}
		}
	}
	return nil
}

// ValidateUpdate checks that an update changes no immutable field.
func ValidateUpdate(old, updated Resource) error {
	o, ok1 := old.(*IPPool)
	n, ok2 := updated.(*IPPool)
	if !ok1 || !ok2 {
		return nil
	}
	var e errs
	if o.Spec.CIDR != n.Spec.CIDR {
		e.add("spec.cidr", n.Spec.CIDR, "is immutable (stored: %s); create a new pool, disable this one, then delete it", o.Spec.CIDR)
	}
	if o.Spec.BlockSize != n.Spec.BlockSize {
		e.add("spec.blockSize", n.Spec.BlockSize, "is immutable (stored: %d); create a new pool instead", o.Spec.BlockSize)
	}
	return e.result(n)
}
