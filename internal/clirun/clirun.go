// Package clirun owns how Sigil's four binaries (sigild, sigil-agent,
// sigil-ceremony, sigilctl) run their cobra command trees, so that they
// behave alike: errors go to stderr as "<binary>: <error>" with exit 1, a
// command line that cannot be understood (bad flag, unknown or missing
// subcommand, wrong arguments) exits 2, --help lists the subcommands and
// exits 0, and long flags given with one dash (-config, the Go flag
// package's style that existing units and scripts use) are accepted.
package clirun

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
)

// Exit codes.
const (
	ExitOK      = 0
	ExitFailure = 1
	ExitUsage   = 2
)

// UsageError is a command line that cannot be understood, as opposed to a
// command that ran and failed.
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef returns a UsageError.
func Usagef(format string, a ...any) error {
	return &UsageError{Err: fmt.Errorf(format, a...)}
}

// ExitStatus ends the process with Code, as a command that passes on
// another's exit status does (sigil-agent exec). Err, when set, is
// reported as any error is; nil prints nothing.
type ExitStatus struct {
	Code int
	Err  error
}

func (e *ExitStatus) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}
func (e *ExitStatus) Unwrap() error { return e.Err }

const preparedKey = "sigil.clirun.prepared"

// Prepare makes a command tree behave as the package doc says. It is
// idempotent; Run calls it, and constructors call it too so that a tree
// executed directly (as tests do) behaves the same.
//
// Cobra by default prints a group command's help and succeeds when it is
// given an unknown subcommand or none (`sigilctl entry bogus` exits 0):
// here both are usage errors.
func Prepare(root *cobra.Command) *cobra.Command {
	if root.Annotations[preparedKey] != "" {
		return root
	}
	if root.Annotations == nil {
		root.Annotations = map[string]string{}
	}
	root.Annotations[preparedKey] = "yes"
	root.SilenceErrors, root.SilenceUsage = true, true
	root.CompletionOptions.DisableDefaultCmd = true
	root.SetFlagErrorFunc(func(c *cobra.Command, err error) error {
		return &UsageError{Err: within(c, err)}
	})
	var walk func(c *cobra.Command)
	walk = func(c *cobra.Command) {
		c.InitDefaultHelpFlag()
		if c.HasSubCommands() {
			if !c.Runnable() {
				c.RunE = func(c *cobra.Command, _ []string) error {
					return Usagef("usage: %s <command>, one of: %s", c.CommandPath(), strings.Join(commandNames(c), ", "))
				}
			}
			if c.Args == nil {
				c.Args = unknownCommand
			}
		}
		if orig := c.Args; orig != nil {
			c.Args = func(c *cobra.Command, args []string) error {
				if err := orig(c, args); err != nil {
					if !c.HasSubCommands() && len(args) > 0 && strings.HasPrefix(err.Error(), "unknown command") {
						// cobra.NoArgs says "unknown command" even
						// where there are no commands to choose from.
						err = fmt.Errorf("takes no arguments (got %q)", args[0])
					}
					return &UsageError{Err: within(c, err)}
				}
				return nil
			}
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	return root
}

// within names the subcommand an error is about (Run already names the
// program).
func within(c *cobra.Command, err error) error {
	if !c.HasParent() {
		return err
	}
	_, path, _ := strings.Cut(c.CommandPath(), " ")
	return fmt.Errorf("%s: %w", path, err)
}

func unknownCommand(c *cobra.Command, args []string) error {
	if len(args) > 0 {
		return fmt.Errorf("unknown command %q (commands: %s)", args[0], strings.Join(commandNames(c), ", "))
	}
	return nil
}

func commandNames(c *cobra.Command) []string {
	var out []string
	for _, s := range c.Commands() {
		if s.IsAvailableCommand() {
			out = append(out, s.Name())
		}
	}
	return out
}

// Run executes root with args and returns the process's exit code. Errors
// are written to stderr, prefixed with the root's name; a usage error adds
// where to find help.
func Run(ctx context.Context, root *cobra.Command, args []string, stdout, stderr io.Writer) int {
	Prepare(root)
	root.SetArgs(LongFlagsWithOneDash(root, args))
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetContext(ctx)
	cmd, err := root.ExecuteC()
	if err == nil {
		return ExitOK
	}
	var st *ExitStatus
	if errors.As(err, &st) {
		if st.Err != nil {
			_, _ = fmt.Fprintf(stderr, "%s: %v\n", root.Name(), st.Err)
		}
		return st.Code
	}
	// A failed write to stderr has nowhere left to be reported; the exit
	// code still says the command failed.
	_, _ = fmt.Fprintf(stderr, "%s: %v\n", root.Name(), err)
	var u *UsageError
	if errors.As(err, &u) {
		if cmd == nil {
			cmd = root
		}
		_, _ = fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
		return ExitUsage
	}
	return ExitFailure
}

// LongFlagsWithOneDash rewrites "-name" and "-name=value", where name is a
// long flag of the command that args select, to "--name...": the Go flag
// package's style, which pflag would otherwise read as a run of
// one-letter flags. Flag values and everything after "--" are left as
// they are.
func LongFlagsWithOneDash(root *cobra.Command, args []string) []string {
	Prepare(root)
	cmd, _, err := root.Find(args)
	if err != nil || cmd == nil {
		cmd = root
	}
	out := make([]string, 0, len(args))
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			out = append(out, args[i:]...)
			break
		}
		if len(a) < 2 || a[0] != '-' {
			out = append(out, a)
			continue
		}
		var f *pflag.Flag
		name, _, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch {
		case strings.HasPrefix(a, "--"):
			f = lookup(cmd, name)
		case len(name) == 1:
			f = shorthand(cmd, name)
		default:
			if f = lookup(cmd, name); f != nil {
				a = "-" + a
			}
		}
		out = append(out, a)
		// A flag that takes a value and was given none with "=" takes the
		// next argument as it is, even if it starts with a dash.
		if f != nil && !hasValue && f.NoOptDefVal == "" && i+1 < len(args) {
			i++
			out = append(out, args[i])
		}
	}
	return out
}

func lookup(c *cobra.Command, name string) *pflag.Flag {
	if f := c.Flags().Lookup(name); f != nil {
		return f
	}
	return c.InheritedFlags().Lookup(name)
}

func shorthand(c *cobra.Command, name string) *pflag.Flag {
	if f := c.Flags().ShorthandLookup(name); f != nil {
		return f
	}
	return c.InheritedFlags().ShorthandLookup(name)
}
