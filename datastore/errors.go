package datastore

import (
	"errors"
	"fmt"
	"strings"
)

// Sentinel errors, matched with errors.Is.
var (
	ErrNotFound      = errors.New("not found")
	ErrAlreadyExists = errors.New("already exists")
	ErrConflict      = errors.New("update conflict")
	ErrUnavailable   = errors.New("datastore unavailable")
)

// NotFoundError says a resource or key does not exist.
type NotFoundError struct{ What string }

func (e *NotFoundError) Error() string { return e.What + " not found" }

// Is implements errors.Is.
func (e *NotFoundError) Is(t error) bool { return t == ErrNotFound }

// AlreadyExistsError says a create found the resource already there.
type AlreadyExistsError struct{ What string }

func (e *AlreadyExistsError) Error() string {
	return e.What + " already exists; use apply or replace to change it"
}

// Is implements errors.Is.
func (e *AlreadyExistsError) Is(t error) bool { return t == ErrAlreadyExists }

// ConflictError says the stored object changed since the caller read it. Callers
// re-read and retry.
type ConflictError struct {
	What     string
	Expected string // the resourceVersion the caller had
	Actual   string // the stored one, "" if it was deleted
}

func (e *ConflictError) Error() string {
	if e.Actual == "" {
		return fmt.Sprintf("%s: resourceVersion %s is stale: it was deleted meanwhile", e.What, e.Expected)
	}
	return fmt.Sprintf("%s: resourceVersion %s is stale (now %s): someone changed it; get it again and reapply your change", e.What, e.Expected, e.Actual)
}

// Is implements errors.Is.
func (e *ConflictError) Is(t error) bool { return t == ErrConflict }

// UnavailableError says etcd did not answer in time.
type UnavailableError struct {
	Endpoints []string
	Err       error
}

func (e *UnavailableError) Error() string {
	return fmt.Sprintf("etcd at %s is unavailable: %v; check that etcd is running and that --etcd-endpoints (MARGAY_ETCD_ENDPOINTS) and the TLS files are right",
		strings.Join(e.Endpoints, ","), e.Err)
}

func (e *UnavailableError) Unwrap() error { return e.Err }

// Is implements errors.Is.
func (e *UnavailableError) Is(t error) bool { return t == ErrUnavailable }
