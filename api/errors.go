package api

import (
	"fmt"
	"regexp"
	"strings"
)

// FieldError is one thing wrong with one field, phrased so a person can fix it.
type FieldError struct {
	Field  string // a JSON path such as spec.blockSize
	Value  any    // the offending value, nil when the field is missing
	Detail string // what is wrong and what to do
}

func (e *FieldError) Error() string {
	if e.Value == nil {
		return fmt.Sprintf("%s: %s", e.Field, e.Detail)
	}
	return fmt.Sprintf("%s: %v: %s", e.Field, quoteString(e.Value), e.Detail)
}

func quoteString(v any) any {
	if s, ok := v.(string); ok {
		return fmt.Sprintf("%q", s)
	}
	return v
}

// ValidationError collects the field errors of one resource.
type ValidationError struct {
	Ref    string // `IPPool "default"`
	Fields []*FieldError
}

func (e *ValidationError) Error() string {
	parts := make([]string, len(e.Fields))
	for i, f := range e.Fields {
		parts[i] = f.Error()
	}
	return fmt.Sprintf("invalid %s: %s", e.Ref, strings.Join(parts, "; "))
}

// errs accumulates field errors while validating.
type errs []*FieldError

func (e *errs) add(field string, value any, format string, args ...any) {
	*e = append(*e, &FieldError{Field: field, Value: value, Detail: fmt.Sprintf(format, args...)})
}

func (e errs) result(r Resource) error {
	if len(e) == 0 {
		return nil
	}
	return &ValidationError{Ref: Ref(r), Fields: e}
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$`)

func (e *errs) checkMeta(kind string, tm *TypeMeta, m *ObjectMeta) {
	if tm.APIVersion != APIVersion {
		e.add("apiVersion", tm.APIVersion, "must be %q", APIVersion)
	}
	if tm.Kind != kind {
		e.add("kind", tm.Kind, "must be %q", kind)
	}
	switch {
	case m.Name == "":
		e.add("metadata.name", nil, "is required")
	case len(m.Name) > 253 || !nameRE.MatchString(m.Name):
		e.add("metadata.name", m.Name, "must be lower-case letters, digits, '-' and '.', starting and ending with a letter or digit, at most 253 characters")
	}
	namespaced := false
	for _, k := range kinds {
		namespaced = namespaced || k.Kind == kind && k.Namespaced
	}
	switch {
	case namespaced && m.Namespace == "":
		e.add("metadata.namespace", nil, "is required")
	case namespaced && (len(m.Namespace) > 63 || !labelValueRE.MatchString(m.Namespace) || !nameRE.MatchString(m.Namespace) || strings.Contains(m.Namespace, ".")):
		e.add("metadata.namespace", m.Namespace, "must be lower-case letters, digits and '-', starting and ending with a letter or digit, at most 63 characters")
	case !namespaced && m.Namespace != "":
		e.add("metadata.namespace", m.Namespace, "must not be set: %s is not namespaced", kind)
	}
	for k, v := range m.Labels {
		if !ValidLabelKey(k) {
			e.add("metadata.labels", k, "is not a valid label key (letters, digits, '-', '_', '.', optionally prefixed by a DNS name and '/')")
		}
		if !ValidLabelValue(v) {
			e.add("metadata.labels."+k, v, "is not a valid label value (at most 63 letters, digits, '-', '_' or '.')")
		}
	}
}

// ValidLabelKey tells whether k may be a label key: a name of at most 63
// letters, digits, '-', '_' and '.', perhaps after a DNS prefix and '/'.
func ValidLabelKey(k string) bool { return labelKeyRE.MatchString(k) }

// ValidLabelValue tells whether v may be a label value.
func ValidLabelValue(v string) bool { return len(v) <= 63 && (v == "" || labelValueRE.MatchString(v)) }

var (
	labelKeyRE   = regexp.MustCompile(`^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$`)
	labelValueRE = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
)

func (e *errs) checkSelector(field, sel string) {
	if _, err := ParseSelector(sel); err != nil {
		e.add(field, sel, "%v", err)
	}
}
