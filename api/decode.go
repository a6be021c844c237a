package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"

	yaml3 "gopkg.in/yaml.v3"
	"sigs.k8s.io/yaml"
)

// KindList is the kind of a list of resources, as printed by `margayctl get -o yaml`.
const KindList = "List"

var docSeparator = regexp.MustCompile(`(?m)^---[ \t]*(#.*)?\r?$`)

// Decode parses one or more YAML or JSON documents (YAML documents separated by
// "---"; a document of kind List contributes its items) into resources. Unknown
// fields are errors, so a typo in a field name does not pass silently. Defaults are
// applied; validation is left to the caller.
func Decode(data []byte) ([]Resource, error) { return DecodeWith(data, DecodeOne) }

// DecodeWith is Decode with one in place of DecodeOne for every object (a
// document, a List's item, an object of a JSON stream), so that a caller can
// accept objects of other APIs (Kubernetes' NetworkPolicy) in the same files,
// with the same document splitting and the same error positions.
func DecodeWith(data []byte, one func(js []byte) (Resource, error)) ([]Resource, error) {
	var out []Resource
	for i, doc := range docSeparator.Split(string(data), -1) {
		if len(bytes.TrimSpace(stripComments([]byte(doc)))) == 0 {
			continue
		}
		rs, err := decodeDoc([]byte(doc), one)
		if err != nil {
			return nil, fmt.Errorf("document %d: %w", i+1, err)
		}
		out = append(out, rs...)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("no resources found in input")
	}
	return out, nil
}

var commentLine = regexp.MustCompile(`(?m)^[ \t]*#.*$`)

func stripComments(b []byte) []byte { return commentLine.ReplaceAll(b, nil) }

type listDoc struct {
	TypeMeta `json:",inline"`
	// Metadata is ignored: kubectl's lists carry one ({resourceVersion: ""}),
	// and `kubectl get ... -o yaml` is input margayctl reads.
	Metadata json.RawMessage   `json:"metadata,omitempty"`
	Items    []json.RawMessage `json:"items"`
}

func decodeDoc(doc []byte, one func([]byte) (Resource, error)) ([]Resource, error) {
	if trimmed := bytes.TrimSpace(doc); len(trimmed) > 0 && trimmed[0] == '{' {
		rs, err := decodeJSONStream(trimmed, one)
		if se := new(json.SyntaxError); !errors.As(err, &se) {
			return rs, err
		}
		// Flow-style YAML ({kind: Node, ...}) starts with a brace too.
		js, yerr := yamlToJSON(doc)
		if yerr != nil {
			// Report in the language the document is written in: JSON keys are quoted.
			if rest := bytes.TrimSpace(trimmed[1:]); len(rest) > 0 && rest[0] != '"' && rest[0] != '}' {
				return nil, fmt.Errorf("not valid YAML: %v", yerr)
			}
			return nil, err
		}
		return decodeObject(js, one)
	}
	js, err := yamlToJSON(doc)
	if err != nil {
		return nil, fmt.Errorf("not valid YAML or JSON: %v", err)
	}
	return decodeObject(js, one)
}

// yamlToJSON converts one YAML document. yaml.YAMLToJSON converts the first
// node and drops whatever follows it, so a second parser checks that nothing
// does.
func yamlToJSON(doc []byte) ([]byte, error) {
	dec := yaml3.NewDecoder(bytes.NewReader(doc))
	var n yaml3.Node
	if err := dec.Decode(&n); err != nil {
		return nil, err
	}
	if err := dec.Decode(&n); err != io.EOF {
		if err == nil {
			err = errors.New("more than one document: separate them with a line holding only ---")
		}
		return nil, err
	}
	return yaml.YAMLToJSON(doc)
}

// decodeObject decodes one JSON object: a List's items, or a single resource.
func decodeObject(js []byte, one func([]byte) (Resource, error)) ([]Resource, error) {
	var tm TypeMeta
	if err := json.Unmarshal(js, &tm); err != nil {
		return nil, fmt.Errorf("expected an object with apiVersion and kind: %v", err)
	}
	if tm.Kind == KindList {
		if err := checkFields(js, reflect.TypeFor[listDoc]()); err != nil {
			return nil, err
		}
		var l listDoc
		if err := strictJSON(js, &l); err != nil {
			return nil, err
		}
		var out []Resource
		for i, item := range l.Items {
			r, err := one(item)
			if err != nil {
				return nil, fmt.Errorf("item %d: %w", i+1, err)
			}
			out = append(out, r)
		}
		return out, nil
	}
	r, err := one(js)
	if err != nil {
		return nil, err
	}
	return []Resource{r}, nil
}

// decodeJSONStream decodes one or more concatenated JSON objects (as `jq -c` prints
// them); YAMLToJSON would silently keep only the first.
func decodeJSONStream(data []byte, one func([]byte) (Resource, error)) ([]Resource, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var out []Resource
	for dec.More() {
		var raw json.RawMessage
		if err := dec.Decode(&raw); err != nil {
			return nil, fmt.Errorf("not valid JSON: %w", err)
		}
		rs, err := decodeObject(raw, one)
		if err != nil {
			return nil, err
		}
		out = append(out, rs...)
	}
	return out, nil
}

// DecodeOne parses a single JSON (or YAML) resource strictly and applies defaults.
func DecodeOne(data []byte) (Resource, error) {
	js, err := yamlToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("not valid YAML or JSON: %v", err)
	}
	var tm TypeMeta
	if err := json.Unmarshal(js, &tm); err != nil {
		return nil, fmt.Errorf("expected an object with apiVersion and kind: %v", err)
	}
	if tm.Kind == "" {
		return nil, fmt.Errorf("kind: is required")
	}
	if tm.APIVersion != APIVersion {
		return nil, fmt.Errorf("apiVersion: %q is not supported; use %q", tm.APIVersion, APIVersion)
	}
	k, err := LookupKind(tm.Kind)
	if err != nil || k.Kind != tm.Kind {
		return nil, fmt.Errorf("kind: %q is not a margay kind", tm.Kind)
	}
	r := k.New()
	if err := checkFields(js, reflect.TypeOf(r)); err != nil {
		return nil, fmt.Errorf("%s: %w", k.Kind, err)
	}
	if err := strictJSON(js, r); err != nil {
		return nil, fmt.Errorf("%s: %w", k.Kind, err)
	}
	if m := r.GetMetadata(); len(m.Labels) == 0 {
		m.Labels = nil // `labels: {}` and no labels are the same thing
	}
	r.SetDefaults()
	return r, nil
}

func strictJSON(js []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return humanizeJSONError(err)
	}
	if dec.More() {
		return fmt.Errorf("unexpected data after the object")
	}
	return nil
}

func humanizeJSONError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Errorf("%s: expected %s, got %s", te.Field, te.Type, te.Value)
	}
	return err
}
