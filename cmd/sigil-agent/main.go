// Command sigil-agent runs a host's Sigil agent; see package agent.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/sigil-appliance/sigil/agent"
)

func main() {
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
	a.Run(ctx)
}
