// Command sigild runs one Sigil appliance node; see appliance/node.
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

	"github.com/sigil-appliance/sigil/appliance/node"
)

func main() {
	config := flag.String("config", "/etc/sigil/sigild.yaml", "configuration file")
	check := flag.Bool("check-config", false, "validate the configuration and exit")
	flag.Parse()

	cfg, err := node.LoadConfig(*config)
	if err != nil {
		fmt.Fprintf(os.Stderr, "sigild: %s: %v\n", *config, err)
		os.Exit(1)
	}
	if *check {
		fmt.Printf("%s: valid\n", *config)
		return
	}
	var level slog.Level
	level.UnmarshalText([]byte(strings.ToUpper(cfg.Log.Level)))
	opts := &slog.HandlerOptions{Level: level}
	var h slog.Handler = slog.NewJSONHandler(os.Stderr, opts)
	if cfg.Log.Format == "text" {
		h = slog.NewTextHandler(os.Stderr, opts)
	}
	log := slog.New(h)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	n, err := node.Start(ctx, cfg, log)
	if err != nil {
		log.Error("sigild failed to start", "err", err)
		os.Exit(1)
	}
	<-ctx.Done()
	log.Info("stopping")
	n.Stop()
}
