package ctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

func pcrShowCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "show", Args: cobra.NoArgs, Short: "Show the PCR values a joining TPM must quote", RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.PCRPolicyShow(ctx, &api.Empty{})
		}, func(w *bufio.Writer, v any) {
			p := v.(*api.PCRPolicyResponse).Policy
			if p == nil {
				fmt.Fprintln(w, "no PCR policy: joining TPMs need not quote any PCR values")
				return
			}
			idx := make([]string, 0, len(p.PCRs))
			for k := range p.PCRs {
				idx = append(idx, k)
			}
			// Numerically: PCR 10 after PCR 9.
			slices.SortFunc(idx, func(a, b string) int {
				if len(a) != len(b) {
					return len(a) - len(b)
				}
				return strings.Compare(a, b)
			})
			rows := make([][]string, 0, len(idx))
			for _, k := range idx {
				rows = append(rows, []string{k, p.Bank, p.PCRs[k]})
			}
			table(w, "PCR\tBANK\tVALUE", rows)
		})
	}}
}

// tokenState is how token list shows a token's state at time now.
func tokenState(t api.JoinToken, now time.Time) string {
	switch {
	case !t.RevokedAt.IsZero():
		return "revoked " + t.RevokedAt.Format(time.RFC3339) + " by " + t.RevokedBy
	case t.UsedBy != "":
		return "used " + t.UsedAt.Format(time.RFC3339) + " by " + t.UsedBy
	case !t.ExpiresAt.After(now):
		return "expired"
	}
	return "unused"
}

func tokenListCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List join tokens by ID (their hash; the tokens themselves are never stored)",
		RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				l, err := c.TokenList(ctx, &api.Empty{})
				if err != nil {
					return nil, err
				}
				return nonNil(l.Tokens), nil
			}, func(w *bufio.Writer, v any) {
				now := time.Now()
				var rows [][]string
				for _, t := range v.([]api.JoinToken) {
					rows = append(rows, []string{t.ID[:min(len(t.ID), 12)], t.CreatedAt.Format(time.RFC3339), t.CreatedBy,
						t.ExpiresAt.Format(time.RFC3339), tokenState(t, now)})
				}
				table(w, "ID\tCREATED\tCREATED BY\tEXPIRES\tSTATE", rows)
			})
		}}
}

func tokenRevokeCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "revoke ID", Args: cobra.ExactArgs(1),
		Short: "Revoke an unused join token, by its ID or its first 12 or more hex digits (as token create and token list show)",
		RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.TokenRevoke(ctx, &api.IDRequest{ID: args[0]})
			}, func(w *bufio.Writer, v any) {
				t := v.(*api.JoinToken)
				fmt.Fprintf(w, "revoked join token %s (it would have expired %s); it no longer joins\n", t.ID, t.ExpiresAt.Format(time.RFC3339))
			})
		}}
}

func agentRemoveCmd(g *globals) *cobra.Command {
	var force bool
	cmd := &cobra.Command{Use: "remove ID", Args: cobra.ExactArgs(1), Short: "Forget an agent: its certificate no longer renews",
		Long: "Deletes the agent's record. The certificate it holds stays valid until it expires, but it no\n" +
			"longer renews, and no workload SVID is issued through it. An agent that is the parent of\n" +
			"entries is refused, with the list, unless --force: then the entries are kept (they serve the\n" +
			"agent again if it joins again under the same ID). Removing is not banning: a host that the\n" +
			"join policy still admits can join again; ban it to keep it out. A snapshot taken before the\n" +
			"removal lists the agent, and snapshot restore refuses it: take a new snapshot afterwards.",
		RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.AgentRemove(ctx, &api.AgentRemoveRequest{ID: args[0], Force: force})
			}, func(w *bufio.Writer, v any) {
				r := v.(*api.AgentRemoved)
				fmt.Fprintf(w, "removed %s\n", r.ID)
				if len(r.KeptEntries) > 0 {
					fmt.Fprintf(w, "kept %d entries parented to it: %s\n", len(r.KeptEntries), strings.Join(r.KeptEntries, ", "))
				}
			})
		}}
	cmd.Flags().BoolVar(&force, "force", false, "remove an agent that is the parent of entries, keeping the entries")
	return cmd
}

// connect dials the node: the local socket, or the first of the
// comma-separated --server addresses that accepts a connection. Only a
// connection that could not be made (refused, unreachable, a TLS
// handshake that failed) moves on to the next address; the connection is
// made before any request is sent, so no request reaches two nodes, and
// an answer of a node (permission denied, invalid argument, no quorum) is
// the command's answer.
func (g *globals) connect(dial api.DialConfig) (*grpc.ClientConn, error) {
	if dial.Socket != "" {
		return api.Dial(dial)
	}
	addrs, err := serverList(dial.Addr)
	if err != nil {
		return nil, err
	}
	var failed []string
	for i, addr := range addrs {
		d := dial
		d.Addr = addr
		conn, err := api.Dial(d)
		if err != nil {
			return nil, err // the credentials, the same for every address
		}
		if err = g.reach(conn); err == nil {
			return conn, nil
		}
		_ = conn.Close() // never used
		failed = append(failed, fmt.Sprintf("%s: %v", addr, err))
		if i < len(addrs)-1 {
			g.note("note: node %s unreachable (%v); trying %s\n", addr, err, addrs[i+1])
		}
	}
	if len(addrs) == 1 {
		return nil, fmt.Errorf("cannot connect to node %s", failed[0])
	}
	return nil, fmt.Errorf("cannot connect to any of the %d nodes: %s", len(addrs), strings.Join(failed, "; "))
}

// serverList splits --server into addresses.
func serverList(s string) ([]string, error) {
	var out []string
	for _, a := range strings.Split(s, ",") {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a); err != nil {
			return nil, clirun.Usagef("--server %q: %q is not host:port (%v)", s, a, err)
		}
		out = append(out, a)
	}
	if len(out) == 0 {
		return nil, errors.New("no server address (--server or $SIGIL_SERVER) or local socket (--socket)")
	}
	return out, nil
}

// reach makes conn's connection within --timeout. A connection that
// fails is reported with gRPC's reason, which a fail-fast call on the
// unconnected channel returns without reaching any node.
func (g *globals) reach(conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(g.ctx, g.timeout)
	defer cancel()
	conn.Connect()
	for {
		s := conn.GetState()
		switch s {
		case connectivity.Ready:
			return nil
		case connectivity.TransientFailure, connectivity.Shutdown:
			_, err := api.NewAdminClient(conn).ClusterStatus(ctx, &api.Empty{})
			if err == nil {
				return nil // connected meanwhile
			}
			if st, ok := status.FromError(err); ok && st.Code() == codes.Unavailable {
				return errors.New(st.Message())
			}
			return err
		}
		if !conn.WaitForStateChange(ctx, s) {
			return fmt.Errorf("no connection within %v (--timeout)", g.timeout)
		}
	}
}

// lastSeen is how agent list and show put the answering node's view of
// an agent's contacts (api.Agent.SeenBy).
func lastSeen(a api.Agent, now time.Time) string {
	switch {
	case a.Connected:
		return "connected"
	case a.LastSeen.IsZero():
		return "not seen"
	}
	return now.Sub(a.LastSeen).Round(time.Second).String() + " ago"
}

const lastSeenHelp = "Lists the agents the appliance admitted. LAST SEEN is the answering node's own view (the\n" +
	"header names it): \"connected\" while the agent holds a sync stream open to that node, else when\n" +
	"it last called it, or \"not seen\". Nodes keep it in memory, not replicated: an agent that talks\n" +
	"to another node is not seen here, a restarted node has seen no one yet, and a host that vanished\n" +
	"without closing its connection shows connected until gRPC notices."
