// Package cli is sigil-ceremony's command line: one subcommand per
// ceremony kind (each runs a YAML script, see package ceremony and
// packaging/ceremony/), and verify-transcript.
package cli

import (
	"context"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/ceremony"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

// Run runs sigil-ceremony with args (without the program name) and
// returns its exit code. Cancelling ctx (main does on SIGINT and SIGTERM)
// stops a ceremony between steps.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return clirun.Run(ctx, NewCommand(), args, stdout, stderr)
}

const usage = "usage: sigil-ceremony <kind> --config FILE.yaml [--dry-run]\n" +
	"       sigil-ceremony verify-transcript FILE"

func kinds() string { return strings.Join(ceremony.Kinds, ", ") }

// NewCommand returns the sigil-ceremony command tree.
func NewCommand() *cobra.Command {
	// --config and --dry-run belong to the kind subcommands; the root
	// takes them too (hidden) only to say so when they come before a kind.
	var config string
	var dryRun bool
	root := &cobra.Command{
		Use:   "sigil-ceremony",
		Short: "Run Sigil's offline key ceremonies from YAML scripts",
		Long: usage + "\n\n" +
			"kinds, in the order a new trust domain uses them: " + kinds(),
		Args: func(_ *cobra.Command, args []string) error {
			if len(args) > 0 {
				return fmt.Errorf("unknown ceremony kind %q; one of: %s (or verify-transcript FILE)\n%s", args[0], kinds(), usage)
			}
			return nil
		},
		RunE: func(*cobra.Command, []string) error {
			if config != "" || dryRun {
				return clirun.Usagef("the ceremony kind comes first, then --config; one of: %s\n%s", kinds(), usage)
			}
			return clirun.Usagef("a ceremony kind is required; one of: %s\n%s", kinds(), usage)
		},
	}
	root.Flags().StringVar(&config, "config", "", "")
	root.Flags().BoolVar(&dryRun, "dry-run", false, "")
	root.Flags().Lookup("config").Hidden = true
	root.Flags().Lookup("dry-run").Hidden = true
	for _, kind := range ceremony.Kinds {
		root.AddCommand(kindCmd(kind))
	}
	root.AddCommand(&cobra.Command{
		Use:   "verify-transcript FILE",
		Short: "Check a ceremony transcript's hash chain",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			n, err := ceremony.VerifyTranscript(args[0])
			if err != nil {
				return err
			}
			_, err = fmt.Fprintf(cmd.OutOrStdout(), "%s: %d records, hash chain intact\n", args[0], n)
			return err
		},
	})
	return clirun.Prepare(root)
}

func kindCmd(kind string) *cobra.Command {
	var config string
	var dryRun bool
	cmd := &cobra.Command{
		Use:   kind + " --config FILE.yaml [--dry-run]",
		Short: "Run the " + kind + " ceremony of a script",
		Long: "Run the " + kind + " ceremony of a script. The script is validated in full before any HSM\n" +
			"is opened; --dry-run stops there and prints the plan the witnesses check.",
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if config == "" {
				return clirun.Usagef("--config is required (the ceremony script)\nusage: sigil-ceremony %s --config FILE.yaml [--dry-run]", kind)
			}
			out := cmd.OutOrStdout()
			cfg, err := ceremony.Load(config, kind)
			if err != nil {
				return fmt.Errorf("%s: %w", config, err)
			}
			now := time.Now()
			plan, err := cfg.Validate(now)
			if err != nil {
				return fmt.Errorf("%s: %w\nNothing was done: no HSM was opened and no file was written", config, err)
			}
			if dryRun {
				if err := plan.Describe(out, now); err != nil {
					return err
				}
				_, err := fmt.Fprintf(out, "%s: valid %s ceremony script; nothing was done (dry run)\n", config, kind)
				return err
			}
			return ceremony.Run(cmd.Context(), plan, ceremony.Options{Out: out})
		},
	}
	cmd.Flags().StringVar(&config, "config", "", "ceremony script (YAML)")
	cmd.Flags().BoolVar(&dryRun, "dry-run", false, "validate the script against the files it names and print the plan; open no HSM, write nothing")
	return cmd
}
