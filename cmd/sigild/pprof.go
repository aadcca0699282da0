//go:build pprof

package main

import (
	"net/http"
	_ "net/http/pprof" // the profiles are what this build is for
	"os"
)

// A sigild built with -tags pprof (load tests only; `make build` and the
// packages never set the tag) serves Go's runtime profiles on
// SIGIL_PPROF_ADDR, a loopback address: BenchmarkFleet with
// SIGIL_FLEET_PPROF set reads each node's heap profile from it.
func init() {
	if addr := os.Getenv("SIGIL_PPROF_ADDR"); addr != "" {
		go func() { _ = http.ListenAndServe(addr, nil) }() // a profile that cannot be served shows as the fetch's error
	}
}
