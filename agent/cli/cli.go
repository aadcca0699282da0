// Package cli is sigil-agent's command line: the root command runs the
// agent from its YAML configuration (see package agent); `inspect` shows
// what the Workload API gives the caller; `exec` runs one CI/CD job's
// command under the run's own identity (package agent/jobrun).
package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/agent"
	"github.com/sigil-appliance/sigil/agent/inspect"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

// DefaultConfig is where the packaged unit keeps the configuration.
const DefaultConfig = "/etc/sigil/agent.yaml"

// Run runs sigil-agent with args (without the program name) and returns
// its exit code. ctx ends the agent (main cancels it on SIGINT/SIGTERM).
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return clirun.Run(ctx, NewCommand(), args, stdout, stderr)
}

// NewCommand returns the sigil-agent command tree.
func NewCommand() *cobra.Command {
	var config string
	root := &cobra.Command{
		Use:   "sigil-agent",
		Short: "Run a host's Sigil agent: join the appliance, serve the SPIFFE Workload API",
		Long: "Runs the agent configured by --config: it joins the appliance (TPM attestation or a join\n" +
			"token), keeps its own SVID renewed and serves the SPIFFE Workload API to local workloads.\n" +
			"The log goes to stderr as the config's log section says (json by default).",
		RunE: func(cmd *cobra.Command, _ []string) error {
			return serve(cmd.Context(), config, cmd.ErrOrStderr())
		},
	}
	root.Flags().StringVar(&config, "config", DefaultConfig, "configuration file (YAML)")
	root.AddCommand(inspectCmd(), execCmd())
	return clirun.Prepare(root)
}

func serve(ctx context.Context, path string, stderr io.Writer) error {
	cfg, err := agent.LoadConfig(path)
	if err != nil {
		return err
	}
	if err := cfg.Validate(); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	log := cfg.Log.New(stderr)
	a, err := agent.New(ctx, cfg, log)
	if err != nil {
		return fmt.Errorf("failed to start: %w", err)
	}
	defer func() {
		if err := a.Close(); err != nil {
			log.Warn("closing the TPM", "err", err)
		}
	}()
	if err := a.Start(ctx); err != nil {
		return fmt.Errorf("could not establish its identity: %w", err)
	}
	if err := a.Serve(ctx); err != nil {
		return fmt.Errorf("stopped: %w", err)
	}
	return nil
}

func inspectCmd() *cobra.Command {
	var socket, aud string
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "inspect",
		Short: "Show the SVIDs and bundles the Workload API gives this process",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts := inspect.Options{Socket: socket, Timeout: timeout}
			if aud != "" {
				opts.Audience = strings.Split(aud, ",")
			}
			return inspect.Run(cmd.Context(), opts, agent.DefaultSocket, cmd.OutOrStdout())
		},
	}
	cmd.Flags().StringVar(&socket, "socket", "", "Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET, then "+agent.DefaultSocket+")")
	cmd.Flags().StringVar(&aud, "audience", "", "also fetch JWT-SVIDs for these audiences (comma-separated)")
	cmd.Flags().DurationVar(&timeout, "timeout", 10*time.Second, "give up after this long (0: 10s)")
	return cmd
}
