package ctl

import (
	"bufio"
	"context"
	"fmt"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/pemfile"
)

// maxIssuingCertFile bounds what `node issuing-cert install` reads: a
// certificate, perhaps with its root after it.
const maxIssuingCertFile = 64 << 10

// nodeCmd handles one node's own trust material: its issuing CA.
func nodeCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "A node's own issuing CA"}
	ic := &cobra.Command{Use: "issuing-cert", Short: "The node's issuing CA certificate"}
	var node string
	install := &cobra.Command{Use: "install FILE [--node ID]", Args: cobra.ExactArgs(1),
		Short: "Install a renewed issuing CA certificate on the node it is for, while it runs",
		Long: "Installs a renewed issuing CA certificate (PEM, as the sign-issuing ceremony wrote it for the node's\n" +
			"existing HSM key) on the node it is for. Send it to that node (--server): another node refuses and\n" +
			"names it. --node defaults to the node the certificate names. The node checks it as at start-up (its\n" +
			"HSM key, its name, the trust domain, a chain to a root, valid now), that no root CRL revokes it and\n" +
			"that it expires later than the current one; a refusal changes nothing. Then the change is recorded\n" +
			"(audited with both serials), the node signs with the new certificate from then on, keeps it in its\n" +
			"data directory (issuing/current.pem; the configured issuing-cert file is not written, and a restart\n" +
			"uses the kept certificate while it expires later than that file's) and publishes a JWT key carrying it.\n" +
			"While a root rotation is in phase added, a certificate under the new root is staged instead: the node\n" +
			"signs with it when the rotation switches (sigilctl ca rotate).",
		RunE: func(_ *cobra.Command, args []string) error {
			b, err := readSmallFile(args[0], maxIssuingCertFile)
			if err != nil {
				return err
			}
			certs, err := pemfile.ParseCerts(args[0], b)
			if err != nil {
				return err
			}
			if node == "" {
				node = certs[0].Subject.CommonName
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.NodeIssuingCertInstall(ctx, &api.IssuingCertRequest{Node: node, PEM: b})
			}, func(w *bufio.Writer, v any) {
				r := v.(*api.IssuingCertInstalled)
				if r.Staged {
					fmt.Fprintf(w, "node %s staged issuing CA serial %s (expires %s) under the rotation's new root: it signs with it from the switch on (sigilctl ca rotate switch)\n", r.Node, r.Serial, r.NotAfter.Format(time.RFC3339))
					return
				}
				fmt.Fprintf(w, "node %s signs with issuing CA serial %s (expires %s) from now on\n", r.Node, r.Serial, r.NotAfter.Format(time.RFC3339))
				fmt.Fprintf(w, "replaced serial %s (expires %s)\n", r.PreviousSerial, r.PreviousNotAfter.Format(time.RFC3339))
				fmt.Fprintf(w, "JWT key published with it: %s\n", orNone(r.JWTKey))
			})
		}}
	install.Flags().StringVar(&node, "node", "", "the node the certificate is for (default: the node it names)")
	ic.AddCommand(install)
	cmd.AddCommand(ic)
	return cmd
}

// printExpiries lists the trust chain's expiries and warns about those
// within warn: issuing CAs and roots by --warn-within, a node's newest
// JWT key by the shorter of that and api.JWTKeyWarnWithin (its keys are
// short-lived by design; the newest one running out means rotation has
// stopped).
func printExpiries(w *bufio.Writer, exp []api.Expiry, warn time.Duration, now time.Time) {
	if len(exp) == 0 {
		return
	}
	var rows [][]string
	var warnings []string
	for _, e := range exp {
		left := e.NotAfter.Sub(now)
		rows = append(rows, []string{e.Kind, e.Name, e.Serial, e.NotAfter.Format(time.RFC3339), left.Round(time.Minute).String()})
		within := warn
		if e.Kind == api.ExpiryJWTKey {
			within = min(warn, api.JWTKeyWarnWithin)
		}
		switch {
		case left <= 0:
			warnings = append(warnings, fmt.Sprintf("WARNING: %s %s (%s) EXPIRED at %s", e.Kind, e.Name, e.Serial, e.NotAfter.Format(time.RFC3339)))
		case left < within:
			warnings = append(warnings, fmt.Sprintf("WARNING: %s %s (%s) expires within %v, at %s%s", e.Kind, e.Name, e.Serial, within, e.NotAfter.Format(time.RFC3339), renewHint(e.Kind)))
		}
	}
	table(w, "EXPIRY\tNAME\tSERIAL/KID\tNOT AFTER\tLEFT", rows)
	for _, s := range warnings {
		fmt.Fprintln(w, s)
	}
}

func renewHint(kind string) string {
	switch kind {
	case api.ExpiryIssuingCA:
		return ": renew it (sign-issuing ceremony, then sigilctl node issuing-cert install)"
	case api.ExpiryRoot:
		return ": plan the root ceremony"
	case api.ExpiryJWTKey:
		return ": the node has stopped rotating its JWT keys"
	}
	return ""
}
