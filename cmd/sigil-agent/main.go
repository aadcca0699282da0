// Command sigil-agent runs a host's Sigil agent (see package agent);
// `sigil-agent inspect` shows what the Workload API gives the caller.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/agent/inspect"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "inspect" {
		os.Exit(inspectCmd(os.Args[2:]))
	}
	config := flag.String("config", "/etc/sigil/agent.yaml", "configuration file")
	flag.Parse()
	cfg, err := agent.LoadConfig(*config)
	if err != nil {
		fmt.Fprintln(os.Stderr, "sigil-agent:", err)
		os.Exit(1)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, nil))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		log.Error("sigil-agent failed to start", "err", err)
		os.Exit(1)
	}
	defer a.Close()
	if err := a.Start(ctx); err != nil {
		log.Error("sigil-agent could not establish its identity", "err", err)
		os.Exit(1)
	}
	if err := a.Serve(ctx); err != nil {
		log.Error("sigil-agent stopped", "err", err)
		os.Exit(1)
	}
}

func inspectCmd(args []string) int {
	fs := flag.NewFlagSet("sigil-agent inspect", flag.ExitOnError)
	socket := fs.String("socket", "", "Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET, then "+agent.DefaultSocket+")")
	aud := fs.String("audience", "", "also fetch JWT-SVIDs for these audiences (comma-separated)")
	timeout := fs.Duration("timeout", 10*time.Second, "give up after")
	fs.Parse(args)
	opts := inspect.Options{Socket: *socket, Timeout: *timeout}
	if *aud != "" {
		opts.Audience = strings.Split(*aud, ",")
	}
	if err := inspect.Run(context.Background(), opts, agent.DefaultSocket, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "sigil-agent inspect:", err)
		return 1
	}
	return 0
}
