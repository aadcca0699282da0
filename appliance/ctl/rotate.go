package ctl

import (
	"bufio"
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// rotateCmd moves a root rotation phase by phase (state/rootrotation.go
// has the rules). Each phase command commits, then waits up to --wait for
// every agent to acknowledge the bundle the phase committed (and, after
// add and switch, for every node to stage or sign under the new root),
// printing who it waits for as that changes.
func rotateCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "rotate", Short: "Roll the trust domain over to a new root, phase by phase: add, switch, retire (rollback until retire)",
		Long: "A root rotation moves every node, agent and workload from the current root to a new one made in a\n" +
			"ceremony, with no SVID ever chaining to a root its relying parties do not trust:\n" +
			"  add NEW-ROOT.pem  the new root joins the trust bundle; agents and federated peers receive it\n" +
			"  (stage)           each node's issuing certificate under the new root: sigilctl node issuing-cert install\n" +
			"  switch            nodes sign under the new root (refused until every node staged one and every\n" +
			"                    agent acknowledged the add)\n" +
			"  retire            the old root leaves the bundle (refused until everything signed under it has expired)\n" +
			"  rollback          one phase back, until retire\n" +
			"See the README's \"Rolling the root\"."}
	var wait time.Duration
	var force bool
	phase := func(name, short string, args cobra.PositionalArgs, root bool) *cobra.Command {
		c := &cobra.Command{Use: name, Short: short, Args: args,
			RunE: func(_ *cobra.Command, args []string) error {
				req := &api.RootRotateRequest{Phase: name, Force: force}
				if root {
					b, err := readSmallFile(args[0], maxIssuingCertFile)
					if err != nil {
						return err
					}
					req.Root = b
				}
				return g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
					rctx, cancel := g.request(ctx)
					st, err := c.RootRotate(rctx, req)
					cancel()
					if err != nil {
						return nil, err
					}
					if g.output == "json" {
						return st, nil // the committed phase's status; status polls the rest
					}
					w := bufio.NewWriter(g.out)
					fmt.Fprintf(w, "%s committed\n", name)
					printRotation(w, st)
					if err := w.Flush(); err != nil {
						return nil, err
					}
					if name == "rollback" || wait <= 0 {
						return nil, nil
					}
					if err := g.waitRotation(ctx, c, st, wait); err != nil {
						return nil, fmt.Errorf("%s committed, but waiting for the acknowledgements failed (sigilctl ca rotate status shows them): %w", name, err)
					}
					return nil, nil
				}, func(w *bufio.Writer, v any) { printRotation(w, v.(*api.RootRotationStatus)) })
			}}
		if name != "rollback" {
			c.Flags().DurationVar(&wait, "wait", 2*time.Minute, "how long to wait for agents' acknowledgements (and after a switch, every node under the new root) after the commit; 0: do not wait; -o json does not wait")
		}
		if name != "add" {
			c.Flags().BoolVar(&force, "force", false, "skip the waits the node checks (agents' acknowledgements, federation refresh, lifetimes); audited as forced")
		}
		return c
	}
	status := &cobra.Command{Use: "status", Args: cobra.NoArgs, Short: "Where the rotation stands and what its next phase waits for",
		RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.RootRotation(ctx, &api.Empty{})
			}, func(w *bufio.Writer, v any) { printRotation(w, v.(*api.RootRotationStatus)) })
		}}
	cmd.AddCommand(
		phase("add", "Add the new root (PEM, from the root ceremony) to the trust bundle", cobra.ExactArgs(1), true),
		phase("switch", "Make every node sign under the new root", cobra.NoArgs, false),
		phase("retire", "Remove the old root from the trust bundle (final)", cobra.NoArgs, false),
		phase("rollback", "Go one phase back (switched to added; added to no rotation)", cobra.NoArgs, false),
		status)
	return cmd
}

// waitRotation polls the status until nothing is pending or wait passes.
func (g *globals) waitRotation(ctx context.Context, c *api.AdminClient, st *api.RootRotationStatus, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	last := ""
	for {
		line := pendingLine(st)
		if line != last {
			_, _ = fmt.Fprintf(g.out, "%s  %s\n", time.Now().UTC().Format(time.TimeOnly), line) // g.out keeps its first error for the command's end
			last = line
		}
		// Staging after an add is the operator's next step, not a wait.
		if st.AgentsPendingCount == 0 && (st.Phase != "switched" || len(st.NodesNotStaged) == 0) {
			return nil
		}
		if time.Now().After(deadline) {
			_, _ = fmt.Fprintf(g.out, "still waiting after %s; see sigilctl ca rotate status\n", wait) // g.out keeps its first error
			return nil
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(2 * time.Second):
		}
		rctx, cancel := g.request(ctx)
		next, err := c.RootRotation(rctx, &api.Empty{})
		cancel()
		if err != nil {
			return err
		}
		st = next
	}
}

func pendingLine(st *api.RootRotationStatus) string {
	var parts []string
	if st.AgentsPendingCount > 0 {
		var ids []string
		for i, a := range st.AgentsPending {
			if i == 5 {
				break
			}
			ids = append(ids, a.SPIFFEID)
		}
		parts = append(parts, fmt.Sprintf("%d agents have not acknowledged sequence %d (%s)", st.AgentsPendingCount, st.Sequence, strings.Join(ids, ", ")))
	}
	if len(st.NodesNotStaged) > 0 && st.Phase == "switched" {
		parts = append(parts, "nodes not yet under the new root: "+strings.Join(st.NodesNotStaged, ", "))
	}
	if len(parts) == 0 {
		return fmt.Sprintf("every agent acknowledged sequence %d", st.Sequence)
	}
	return strings.Join(parts, "; ")
}

func printRotation(w *bufio.Writer, st *api.RootRotationStatus) {
	phase := st.Phase
	if phase == "" {
		phase = "none"
	}
	fmt.Fprintf(w, "phase: %s\n", phase)
	if st.New != "" {
		fmt.Fprintf(w, "old root(s): %s\nnew root: %s\n", strings.Join(st.Old, ", "), st.New)
		fmt.Fprintf(w, "since: %s (bundle sequence %d)\n", st.Since.UTC().Format(time.RFC3339), st.Sequence)
	}
	var rows [][]string
	for _, r := range st.Roots {
		rows = append(rows, []string{r.SHA256, r.Subject, r.NotAfter.UTC().Format(time.RFC3339)})
	}
	table(w, "BUNDLE ROOT SHA-256\tSUBJECT\tNOT AFTER", rows)
	if !st.RetireAfter.IsZero() {
		fmt.Fprintf(w, "retire allowed after: %s\n", st.RetireAfter.UTC().Format(time.RFC3339))
	}
	if len(st.NodesNotStaged) > 0 {
		fmt.Fprintf(w, "nodes not yet under the new root: %s\n", strings.Join(st.NodesNotStaged, ", "))
	}
	if st.AgentsPendingCount > 0 {
		fmt.Fprintf(w, "agents that have not acknowledged sequence %d: %d\n", st.Sequence, st.AgentsPendingCount)
		rows = rows[:0]
		for _, a := range st.AgentsPending {
			seen := "-"
			if !a.LastSeen.IsZero() {
				seen = a.LastSeen.UTC().Format(time.RFC3339)
			}
			rows = append(rows, []string{a.SPIFFEID, fmt.Sprint(a.Acked), seen})
		}
		table(w, "AGENT\tACKNOWLEDGED\tLAST SEEN (THIS NODE)", rows)
	}
	if st.Next != "" {
		fmt.Fprintf(w, "next: %s\n", st.Next)
	}
}
