// Command sigil-ceremony runs Sigil's offline key ceremonies from a YAML
// script; its command tree is package appliance/ceremony/cli, and
// packaging/ceremony/ has example scripts.
package main

import (
	"context"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/sigil-appliance/sigil/appliance/ceremony/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return cli.Run(ctx, args, stdout, stderr)
}
