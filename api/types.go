package api

import (
	"encoding/json"
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// ASNumber is a 4-byte BGP AS number. It accepts a JSON number, a quoted number, or
// the asdot form "1.10", and rejects anything outside 0–4294967295 with a clear
// message (plain uint32 decoding would only say "cannot unmarshal number").
type ASNumber uint32

// UnmarshalJSON implements json.Unmarshaler.
func (a *ASNumber) UnmarshalJSON(b []byte) error {
	s := strings.Trim(string(b), `"`)
	if hi, lo, ok := strings.Cut(s, "."); ok {
		if b[0] != '"' {
			// YAML reads an unquoted 1.10 as the number 1.1.
			return fmt.Errorf("asNumber %s: write an asdot AS number in quotes, such as \"1.10\"", s)
		}
		h, err1 := strconv.ParseUint(hi, 10, 16)
		l, err2 := strconv.ParseUint(lo, 10, 16)
		if err1 != nil || err2 != nil {
			return fmt.Errorf("asNumber %s: asdot form must be <0-65535>.<0-65535>", s)
		}
		*a = ASNumber(h<<16 | l)
		return nil
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > math.MaxUint32 {
		return fmt.Errorf("asNumber %s is out of range: use 1 to 4294967295", s)
	}
	*a = ASNumber(n)
	return nil
}

// Duration is a time.Duration written as a Go duration string ("90s", "2m").
type Duration struct{ time.Duration }

// MarshalJSON implements json.Marshaler.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.String()) }

// UnmarshalJSON implements json.Unmarshaler.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("duration %s must be a string such as \"90s\"", b)
	}
	v, err := time.ParseDuration(s)
	if err != nil {
		return fmt.Errorf("duration %q: %v (use a form such as \"90s\" or \"2m\")", s, err)
	}
	d.Duration = v
	return nil
}

func ptr[T any](v T) *T { return &v }
