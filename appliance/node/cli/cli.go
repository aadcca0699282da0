// Package cli is sigild's command line: the root command runs one
// appliance node from its YAML configuration (see package node), or only
// checks that configuration (--check-config).
package cli

import (
	"context"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

// DefaultConfig is where the packaged unit keeps the configuration.
const DefaultConfig = "/etc/sigil/sigild.yaml"

// Run runs sigild with args (without the program name) and returns its
// exit code. The node stops when ctx ends (main cancels it on SIGINT and
// SIGTERM).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return clirun.Run(ctx, NewCommand(), args, stdout, stderr)
}

// NewCommand returns the sigild command tree.
func NewCommand() *cobra.Command {
	var config string
	var check bool
	root := &cobra.Command{
		Use:   "sigild",
		Short: "Run one Sigil appliance node",
		Long: "Runs the appliance node configured by --config until SIGINT or SIGTERM. With --check-config\n" +
			"it only reads and validates the configuration, listing every problem, and exits.\n" +
			"The log goes to stderr as the config's log section says (json by default).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := node.LoadConfig(config)
			if err != nil {
				return fmt.Errorf("%s: %w", config, err)
			}
			if check {
				_, err := fmt.Fprintf(cmd.OutOrStdout(), "%s: valid\n", config)
				return err
			}
			return serve(cmd.Context(), cfg, cmd.ErrOrStderr())
		},
	}
	root.Flags().StringVar(&config, "config", DefaultConfig, "configuration file (YAML)")
	root.Flags().BoolVar(&check, "check-config", false, "validate the configuration and exit")
	return clirun.Prepare(root)
}

func serve(ctx context.Context, cfg *node.Config, stderr io.Writer) error {
	log := cfg.Log.New(stderr)
	n, err := node.Start(ctx, cfg, log)
	if err != nil {
		return fmt.Errorf("failed to start: %w", err)
	}
	<-ctx.Done()
	log.Info("stopping")
	if err := n.Stop(); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	return nil
}
