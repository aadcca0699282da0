package clirun

import (
	"bytes"
	"context"
	"errors"
	"reflect"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

func tree(got *[]string) *cobra.Command {
	root := &cobra.Command{Use: "prog"}
	root.PersistentFlags().String("config", "", "")
	root.PersistentFlags().StringP("output", "o", "text", "")
	grp := &cobra.Command{Use: "grp"}
	leaf := &cobra.Command{Use: "leaf", Args: cobra.MaximumNArgs(1), RunE: func(c *cobra.Command, args []string) error {
		cfg, _ := c.Flags().GetString("config")
		out, _ := c.Flags().GetString("output")
		v, _ := c.Flags().GetBool("verbose")
		*got = append([]string{cfg, out, map[bool]string{true: "v"}[v]}, args...)
		if cfg == "fail" {
			return errors.New("it failed")
		}
		return nil
	}}
	leaf.Flags().Bool("verbose", false, "")
	grp.AddCommand(leaf)
	root.AddCommand(grp)
	return root
}

func TestRun(t *testing.T) {
	for _, tc := range []struct {
		args   []string
		code   int
		got    []string
		stderr string
	}{
		{[]string{"grp", "leaf", "-config", "c", "-verbose"}, 0, []string{"c", "text", "v"}, ""},
		{[]string{"grp", "leaf", "-config=c", "-o", "json"}, 0, []string{"c", "json", ""}, ""},
		{[]string{"-config", "c", "grp", "leaf", "-ojson"}, 0, []string{"c", "json", ""}, ""},
		// A value is taken as it is, even one that looks like a flag.
		{[]string{"grp", "leaf", "--config", "-verbose"}, 0, []string{"-verbose", "text", ""}, ""},
		{[]string{"grp", "leaf", "-o", "-config"}, 0, []string{"", "-config", ""}, ""},
		{[]string{"grp", "leaf", "--", "-config"}, 0, []string{"", "text", "", "-config"}, ""},
		{[]string{"grp", "leaf", "-config", "fail"}, 1, []string{"fail", "text", ""}, "prog: it failed\n"},
		{[]string{"grp", "leaf", "a", "b"}, 2, nil, "prog: grp leaf: accepts at most 1 arg"},
		{[]string{"grp", "leaf", "-nope"}, 2, nil, "prog: grp leaf: unknown shorthand flag: 'n' in -nope"},
		{[]string{"grp", "nope"}, 2, nil, `prog: grp: unknown command "nope" (commands: leaf)`},
		{[]string{"grp"}, 2, nil, "prog: usage: prog grp <command>, one of: leaf"},
		{nil, 2, nil, "usage: prog <command>, one of: grp"},
		{[]string{"nope"}, 2, nil, `prog: unknown command "nope" (commands: grp)`},
	} {
		var got []string
		var out, errb bytes.Buffer
		code := Run(context.Background(), tree(&got), tc.args, &out, &errb)
		if code != tc.code || !reflect.DeepEqual(got, tc.got) || !strings.Contains(errb.String(), tc.stderr) {
			t.Errorf("%q: exit %d (want %d), ran with %q (want %q), stderr %q (want %q)", tc.args, code, tc.code, got, tc.got, errb.String(), tc.stderr)
		}
		if code == ExitUsage && !strings.Contains(errb.String(), "--help' for usage") {
			t.Errorf("%q: a usage error does not say where help is: %q", tc.args, errb.String())
		}
	}
	var got []string
	var out, errb bytes.Buffer
	if code := Run(context.Background(), tree(&got), []string{"grp", "--help"}, &out, &errb); code != 0 || !strings.Contains(out.String(), "leaf") {
		t.Errorf("grp --help: exit %d, %q", code, out.String())
	}
}
