package ctl

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// joinRuleCmd is `sigilctl join-rule`: the rules by which pipeline runs
// join with their platform's signed ID token.
func joinRuleCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "join-rule", Short: "Rules admitting pipeline runs (GitHub Actions, GitLab CI, Kubernetes, OIDC) by their platform's ID token"}
	var r api.JoinRule
	var jwksFile, caFile string
	var conds []string
	var ttl, maxAge time.Duration
	create := &cobra.Command{Use: "create NAME", Args: cobra.ExactArgs(1), Short: "Create a join rule",
		Long: "Creates a join rule. A run presenting a token of --issuer for --audience that meets every\n" +
			"--claim condition joins as spiffe://<td>/sigil/agent/job/NAME/<run> and gets the identity\n" +
			"--spiffe-id (a path template filled from the token's claims) for --ttl. --preset\n" +
			"(github-actions, gitlab-ci, kubernetes, oidc) fills the issuer, templates and audited claims\n" +
			"left empty; the audience defaults to the trust domain's ID (spiffe://<td>). Keys come from the\n" +
			"issuer's OIDC discovery, or from --jwks-file on an appliance that cannot reach the issuer.\n" +
			"Conditions are CLAIM=PATTERN: exact, or a glob where * stays within one /-separated part.",
		RunE: func(_ *cobra.Command, args []string) error {
			r.Name = args[0]
			var err error
			if r.TTL, err = wholeSeconds("ttl", ttl); err != nil {
				return err
			}
			if r.MaxTokenAge, err = wholeSeconds("max-token-age", maxAge); err != nil {
				return err
			}
			for _, c := range conds {
				k, v, ok := strings.Cut(c, "=")
				if !ok || k == "" {
					return fmt.Errorf("--claim %q: want CLAIM=PATTERN", c)
				}
				r.Conditions = append(r.Conditions, api.ClaimCondition{Claim: k, Pattern: v})
			}
			if jwksFile != "" {
				b, err := os.ReadFile(jwksFile)
				if err != nil {
					return fmt.Errorf("--jwks-file: %w", err)
				}
				r.JWKS = string(b)
			}
			if caFile != "" {
				b, err := os.ReadFile(caFile)
				if err != nil {
					return fmt.Errorf("--issuer-ca: %w", err)
				}
				r.IssuerCA = string(b)
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.JoinRuleCreate(ctx, &r) },
				func(w *bufio.Writer, v any) { printJoinRule(w, v.(*api.JoinRule)) })
		}}
	f := create.Flags()
	f.StringVar(&r.Preset, "preset", "", "github-actions, gitlab-ci, kubernetes or oidc")
	f.StringVar(&r.Issuer, "issuer", "", "the token issuer (https URL; the preset's when empty)")
	f.StringVar(&r.Audience, "audience", "", "the audience tokens must carry (default: spiffe://<trust domain>)")
	f.StringArrayVar(&conds, "claim", nil, "CLAIM=PATTERN condition (repeatable; all must hold)")
	f.StringVar(&r.SPIFFEIDTemplate, "spiffe-id", "", "the run's identity, a path template such as /ci/github/{{repository_owner}}/{{repository_name}}")
	f.StringVar(&r.RunTemplate, "run", "", "template naming the run (one path segment; the preset's when empty)")
	f.StringArrayVar(&r.AuditClaims, "audit-claim", nil, "claim recorded with each join (repeatable; the preset's when none)")
	f.DurationVar(&ttl, "ttl", time.Hour, "lifetime of the run's SVIDs (1m to 24h)")
	f.DurationVar(&maxAge, "max-token-age", 10*time.Minute, "refuse tokens issued longer ago than this (1m to 24h)")
	f.StringVar(&jwksFile, "jwks-file", "", "the issuer's JWKS (JSON) for appliances that cannot reach it")
	f.StringVar(&caFile, "issuer-ca", "", "PEM roots for the issuer's TLS certificate (default: the system's)")

	list := &cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List join rules", RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.JoinRuleList(ctx, &api.Empty{}) },
			func(w *bufio.Writer, v any) {
				var rows [][]string
				for _, r := range v.(*api.JoinRuleList).Rules {
					rows = append(rows, []string{r.Name, r.Issuer, r.Audience, r.SPIFFEIDTemplate, r.TTL.Duration().String(), fmt.Sprint(len(r.Conditions))})
				}
				table(w, "NAME\tISSUER\tAUDIENCE\tIDENTITY\tTTL\tCONDITIONS", rows)
			})
	}}
	show := &cobra.Command{Use: "show NAME", Args: cobra.ExactArgs(1), Short: "Show a join rule", RunE: func(_ *cobra.Command, args []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.JoinRuleShow(ctx, &api.IDRequest{ID: args[0]})
		},
			func(w *bufio.Writer, v any) { printJoinRule(w, v.(*api.JoinRule)) })
	}}
	del := &cobra.Command{Use: "delete NAME", Args: cobra.ExactArgs(1), Short: "Delete a join rule (running jobs keep their SVIDs until they expire or end)",
		RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.JoinRuleDelete(ctx, &api.IDRequest{ID: args[0]})
			}, ok("deleted join rule "+args[0]))
		}}
	cmd.AddCommand(create, list, show, del)
	return cmd
}

func printJoinRule(w *bufio.Writer, r *api.JoinRule) {
	keys := "OIDC discovery"
	if r.JWKS != "" {
		keys = "static JWKS"
	}
	preset := r.Preset
	if preset == "" {
		preset = "-"
	}
	rows := [][]string{
		{"name", r.Name}, {"preset", preset}, {"issuer", r.Issuer}, {"keys", keys}, {"audience", r.Audience},
		{"identity", "spiffe://<td>" + r.SPIFFEIDTemplate}, {"run", r.RunTemplate},
		{"ttl", r.TTL.Duration().String()}, {"max token age", r.MaxTokenAge.Duration().String()},
		{"audit claims", strings.Join(r.AuditClaims, ", ")},
		{"created", r.CreatedAt.Format(time.RFC3339) + " by " + r.CreatedBy},
	}
	for _, c := range r.Conditions {
		rows = append(rows, []string{"condition", c.Claim + " = " + c.Pattern})
	}
	table(w, "FIELD\tVALUE", rows)
}
