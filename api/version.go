package api

// Version is margay's version, set at build time with
// -ldflags "-X github.com/margay-dev/margay/api.Version=...".
var Version = "dev"
