// Command sigil-ceremony runs Sigil's offline key ceremonies from a YAML
// script: see appliance/ceremony and packaging/ceremony/ for examples.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sigil-appliance/sigil/appliance/ceremony"
)

func usage() {
	fmt.Fprintf(os.Stderr, `usage:
  sigil-ceremony <kind> --config FILE.yaml [--dry-run]
  sigil-ceremony verify-transcript FILE

kinds: %s
  --dry-run   validate the script against the files it names, open no HSM
`, strings.Join(ceremony.Kinds, ", "))
}

func main() { os.Exit(run(os.Args[1:])) }

func run(args []string) int {
	if len(args) < 1 || strings.HasPrefix(args[0], "-") {
		usage()
		return 2
	}
	kind := args[0]
	if kind == "verify-transcript" {
		if len(args) != 2 {
			usage()
			return 2
		}
		n, err := ceremony.VerifyTranscript(args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, "sigil-ceremony:", err)
			return 1
		}
		fmt.Printf("%s: %d records, hash chain intact\n", args[1], n)
		return 0
	}
	fs := flag.NewFlagSet("sigil-ceremony "+kind, flag.ContinueOnError)
	config := fs.String("config", "", "ceremony script (YAML)")
	dryRun := fs.Bool("dry-run", false, "validate only; open no HSM, write nothing")
	fs.Usage = usage
	if err := fs.Parse(args[1:]); err != nil || *config == "" || fs.NArg() != 0 {
		usage()
		return 2
	}
	cfg, err := ceremony.Load(*config, kind)
	if err != nil {
		fmt.Fprintf(os.Stderr, "sigil-ceremony: %s: %v\n", *config, err)
		return 1
	}
	plan, err := cfg.Validate(time.Now())
	if err != nil {
		fmt.Fprintf(os.Stderr, "sigil-ceremony: %s: %v\nNothing was done: no HSM was opened and no file was written.\n", *config, err)
		return 1
	}
	if *dryRun {
		fmt.Printf("%s: valid %s ceremony script; nothing was done (dry run)\n", *config, kind)
		return 0
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := ceremony.Run(ctx, plan, ceremony.Options{Out: os.Stdout}); err != nil {
		fmt.Fprintln(os.Stderr, "sigil-ceremony:", err)
		return 1
	}
	return 0
}
