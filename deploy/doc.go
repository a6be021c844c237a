// Package deploy holds margay's deployment files: the Kubernetes manifest, the
// systemd units, the example etcd cluster. It has no code; its test checks that
// the files agree with the binaries, with each other and with their schemas.
package deploy
