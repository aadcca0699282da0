package ctl

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

// federationCmd is `sigilctl federation`: the foreign trust domains this
// appliance trusts, and their bundles.
func federationCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "federation", Short: "SPIFFE federation: foreign trust domains whose bundles entries may federate with"}
	var r api.FederationRelationship
	var bundleFile, caFile string
	add := &cobra.Command{Use: "add TRUST_DOMAIN", Args: cobra.ExactArgs(1), Short: "Trust a foreign trust domain",
		Long: "Adds a federation relationship. The leader fetches the foreign bundle from --bundle-endpoint\n" +
			"on the bundle's refresh hint (5m when it has none, between 30s and 1h) and keeps it current;\n" +
			"without an endpoint the bundle is only ever set with bundle-set.\n\n" +
			"Profiles: https_spiffe authenticates the endpoint by an X.509-SVID of --endpoint-spiffe-id,\n" +
			"checked against the foreign bundle itself, so the first bundle must come out of band\n" +
			"(--bundle-file, a SPIFFE bundle document you obtained and checked yourself). https_web\n" +
			"authenticates it with Web PKI: the system's roots, or the PEM roots of --endpoint-ca.\n\n" +
			"Entries then name the trust domain with --federates-with; their workloads get its bundle.",
		RunE: func(_ *cobra.Command, args []string) error {
			r.TrustDomain = args[0]
			if bundleFile != "" {
				b, err := os.ReadFile(bundleFile)
				if err != nil {
					return fmt.Errorf("--bundle-file: %w", err)
				}
				r.Bundle = b
			}
			if caFile != "" {
				b, err := os.ReadFile(caFile)
				if err != nil {
					return fmt.Errorf("--endpoint-ca: %w", err)
				}
				r.EndpointCA = string(b)
			}
			if r.BundleEndpointURL != "" && r.Profile == "" {
				return clirun.Usagef("--bundle-endpoint needs --profile https_spiffe or https_web")
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.FederationAdd(ctx, &r) },
				func(w *bufio.Writer, v any) { printFederation(w, v.(*api.FederationRelationship)) })
		}}
	f := add.Flags()
	f.StringVar(&r.BundleEndpointURL, "bundle-endpoint", "", "the foreign bundle endpoint (https URL)")
	f.StringVar(&r.Profile, "profile", "", "https_spiffe or https_web")
	f.StringVar(&r.EndpointSPIFFEID, "endpoint-spiffe-id", "", "https_spiffe: the SPIFFE ID the endpoint's X.509-SVID must carry")
	f.StringVar(&caFile, "endpoint-ca", "", "https_web: PEM roots for the endpoint's certificate (default: the system's)")
	f.StringVar(&bundleFile, "bundle-file", "", "the foreign trust domain's SPIFFE bundle document (JSON), obtained out of band")

	list := &cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List federation relationships", RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.FederationList(ctx, &api.Empty{}) },
			func(w *bufio.Writer, v any) {
				var rows [][]string
				for _, r := range v.(*api.FederationList).Relationships {
					rows = append(rows, []string{r.TrustDomain, dash(r.Profile), dash(r.BundleEndpointURL), bundleState(&r), fetchState(&r)})
				}
				table(w, "TRUST DOMAIN\tPROFILE\tENDPOINT\tBUNDLE\tLAST FETCH (THIS NODE)", rows)
			})
	}}
	show := &cobra.Command{Use: "show TRUST_DOMAIN", Args: cobra.ExactArgs(1), Short: "Show a federation relationship", RunE: func(_ *cobra.Command, args []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.FederationShow(ctx, &api.IDRequest{ID: args[0]})
		}, func(w *bufio.Writer, v any) { printFederation(w, v.(*api.FederationRelationship)) })
	}}
	del := &cobra.Command{Use: "delete TRUST_DOMAIN", Args: cobra.ExactArgs(1),
		Short: "Stop trusting a foreign trust domain (its bundle leaves every workload's view; entries keep the name)",
		RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.FederationDelete(ctx, &api.IDRequest{ID: args[0]})
			}, ok("deleted federation with "+args[0]))
		}}
	var setFile string
	var setForce bool
	set := &cobra.Command{Use: "bundle-set TRUST_DOMAIN", Args: cobra.ExactArgs(1),
		Short: "Set a foreign bundle out of band (its sequence must not go back, unless --force)",
		RunE: func(_ *cobra.Command, args []string) error {
			if setFile == "" {
				return clirun.Usagef("--bundle-file is required")
			}
			b, err := os.ReadFile(setFile)
			if err != nil {
				return fmt.Errorf("--bundle-file: %w", err)
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.FederationBundleSet(ctx, &api.FederationBundle{TrustDomain: args[0], Bundle: b, Force: setForce})
			}, func(w *bufio.Writer, v any) { printFederation(w, v.(*api.FederationRelationship)) })
		}}
	set.Flags().StringVar(&setFile, "bundle-file", "", "the SPIFFE bundle document (JSON)")
	set.Flags().BoolVar(&setForce, "force", false, "replace the stored bundle whatever its sequence (the way back from a sequence a subverted endpoint set far ahead; audited)")
	cmd.AddCommand(add, list, show, del, set)
	return cmd
}

func dash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func bundleState(r *api.FederationRelationship) string {
	if len(r.Bundle) == 0 {
		return "none"
	}
	sum := sha256.Sum256(r.Bundle)
	seq := "no sequence"
	if r.BundleSequence != 0 {
		seq = fmt.Sprintf("sequence %d", r.BundleSequence)
	}
	return fmt.Sprintf("%s, sha256 %s", seq, hex.EncodeToString(sum[:])[:16])
}

func fetchState(r *api.FederationRelationship) string {
	switch {
	case r.LastFetch.IsZero():
		return "-"
	case r.LastFetchError != "":
		return r.LastFetch.Format(time.RFC3339) + " failed: " + r.LastFetchError
	}
	return r.LastFetch.Format(time.RFC3339) + " ok"
}

func printFederation(w *bufio.Writer, r *api.FederationRelationship) {
	rows := [][]string{
		{"trust_domain", r.TrustDomain}, {"bundle_endpoint", dash(r.BundleEndpointURL)}, {"profile", dash(r.Profile)},
		{"endpoint_spiffe_id", dash(r.EndpointSPIFFEID)},
		{"bundle", bundleState(r)}, {"bundle_changes", fmt.Sprint(r.BundleChanges)},
		{"refresh_hint", r.RefreshHint.Duration().String()},
	}
	if r.EndpointCA != "" {
		sum := sha256.Sum256([]byte(r.EndpointCA))
		rows = append(rows, []string{"endpoint_ca", "sha256 " + hex.EncodeToString(sum[:])[:16]})
	}
	if !r.BundleUpdatedAt.IsZero() {
		rows = append(rows, []string{"bundle_updated", r.BundleUpdatedAt.Format(time.RFC3339)})
	}
	rows = append(rows, []string{"last_fetch (this node)", fetchState(r)},
		[]string{"created", r.CreatedAt.Format(time.RFC3339) + " by " + r.CreatedBy}, []string{"revision", fmt.Sprint(r.Revision)})
	table(w, "FIELD\tVALUE", rows)
}
