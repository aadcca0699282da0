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

// adminRevokeCmd revokes an admin name: every certificate issued for it
// so far is refused from then on, on every node.
func adminRevokeCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "revoke NAME", Args: cobra.ExactArgs(1),
		Short: "Revoke every certificate issued so far for an admin name (admin-issuer, root on a node, or the admin itself)",
		RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.AdminRevoke(ctx, &api.AdminRevokeRequest{Name: args[0]})
			}, func(w *bufio.Writer, v any) {
				r := v.(*api.AdminRecord)
				fmt.Fprintf(w, "revoked %s (%s) at %s: certificates issued before are refused; issue a new one to restore access\n",
					r.Name, r.ID, r.RevokedAt.Format(time.RFC3339))
			})
		}}
}

// adminListCmd lists the admin names the appliance recorded.
func adminListCmd(g *globals) *cobra.Command {
	return &cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List admin names: roles, revocations, unexpired certificates",
		RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				l, err := c.AdminList(ctx, &api.Empty{})
				if err != nil {
					return nil, err
				}
				return nonNil(l.Admins), nil
			},
				func(w *bufio.Writer, v any) {
					var rows [][]string
					for _, a := range v.([]api.AdminRecord) {
						revoked := "-"
						if !a.RevokedAt.IsZero() {
							revoked = a.RevokedAt.Format(time.RFC3339) + " by " + a.RevokedBy
						}
						serials := make([]string, len(a.Certs))
						for i, c := range a.Certs {
							serials[i] = c.Serial
						}
						rows = append(rows, []string{a.Name, a.Role, revoked, strings.Join(serials, ",")})
					}
					table(w, "NAME\tROLE\tREVOKED\tCERTIFICATES (SERIALS)", rows)
				})
		}}
}
