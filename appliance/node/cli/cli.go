// Package cli is sigild's command line: the root command runs one
// appliance node from its YAML configuration (see package node), or only
// checks that configuration (--check-config, check.go): its fields, the
// files it names, and the issuing CA key in the HSM, opened read-only,
// against the issuing certificate and the roots.
package cli

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

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
			"it checks, without starting anything, every field, every file the configuration names (PIN\n" +
			"file permissions included), and the issuing CA key in the HSM (opened read-only, logged in to)\n" +
			"against the issuing certificate, which must chain to the roots and name this node; it lists\n" +
			"every problem, then what it could not check (raft peers, listen addresses), and exits 1 on any\n" +
			"problem. The HSM's own settings come from the environment as for the node (SOFTHSM2_CONF).\n" +
			"The log goes to stderr as the config's log section says (json by default).",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if check {
				return runCheck(cmd, config)
			}
			cfg, err := node.LoadConfig(config)
			if err != nil {
				return fmt.Errorf("%s: %w", config, err)
			}
			return serve(cmd.Context(), cfg, cmd.ErrOrStderr())
		},
	}
	root.Flags().StringVar(&config, "config", DefaultConfig, "configuration file (YAML)")
	root.Flags().BoolVar(&check, "check-config", false, "validate the configuration and exit")
	return clirun.Prepare(root)
}

// runCheck is --check-config: every problem is listed on stderr (exit 1),
// or "valid" on stdout; either way, what was not checked follows.
func runCheck(cmd *cobra.Command, config string) error {
	cfg, err := node.DecodeConfigFile(config)
	if err != nil {
		return fmt.Errorf("%s: %w", config, err)
	}
	r := checkConfig(cmd.Context(), cfg)
	var b strings.Builder
	if len(r.problems) > 0 {
		fmt.Fprintf(&b, "%s: invalid sigild config:\n  - %s", config, strings.Join(r.problems, "\n  - "))
	} else {
		fmt.Fprintf(&b, "%s: valid", config)
	}
	fmt.Fprintf(&b, "\nnot checked (only the running node finds these out):\n  - %s", strings.Join(r.notChecked, "\n  - "))
	if len(r.problems) > 0 {
		return errors.New(b.String())
	}
	_, err = fmt.Fprintln(cmd.OutOrStdout(), b.String())
	return err
}

func serve(ctx context.Context, cfg *node.Config, stderr io.Writer) error {
	log := cfg.Log.New(stderr)
	n, err := node.Start(ctx, cfg, log)
	if err != nil {
		return fmt.Errorf("failed to start: %w", err)
	}
	<-ctx.Done()
	reason := "stop requested"
	if c := context.Cause(ctx); c != nil && !errors.Is(c, context.Canceled) {
		reason = c.Error()
	}
	if err := n.StopBecause(reason); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	return nil
}
