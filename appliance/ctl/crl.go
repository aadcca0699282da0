package ctl

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// maxCRLFile bounds what `ca revoke` reads (a root CRL lists a handful of
// node CAs; the appliance takes at most 128 KiB of DER).
const maxCRLFile = 1 << 20

// caCmd handles the node issuing CAs: revoking them with a CRL from the
// root key ceremony (kind crl).
func caCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "ca", Short: "Node issuing CAs and the root: revocation, rotation"}
	var crlFile string
	revoke := &cobra.Command{Use: "revoke --crl FILE", Args: cobra.NoArgs,
		Short: "Add a root-signed CRL (from the crl ceremony): every certificate of the CAs it lists is refused from then on",
		Long: "Adds a CRL signed by a root of the trust bundle (PEM or DER, as the crl ceremony wrote it). Every node\n" +
			"and agent then refuses the node issuing CAs it lists and everything they signed (admin, agent and node\n" +
			"certificates, workload SVIDs), and their nodes' JWT keys leave the bundle. Each new CRL of a root must\n" +
			"have a higher number and list every CA the previous one did: a revocation cannot be undone.\n" +
			"Remove the revoked node from the cluster too (sigilctl cluster remove).",
		RunE: func(*cobra.Command, []string) error {
			if crlFile == "" {
				return errors.New("--crl is required (the CRL file the crl ceremony wrote)")
			}
			b, err := readSmallFile(crlFile, maxCRLFile)
			if err != nil {
				return err
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.RootCRLAdd(ctx, &api.RootCRLRequest{CRL: b})
			}, func(w *bufio.Writer, v any) {
				r := v.(*api.RootCRLResult)
				fmt.Fprintf(w, "root CRL number %s of root %.16s stored (next update %s)\n", r.CRL.Number, r.CRL.Root, r.CRL.NextUpdate.Format("2006-01-02T15:04:05Z07:00"))
				fmt.Fprintf(w, "revoked CA serials: %s\n", orNone(strings.Join(r.CRL.Revoked, ", ")))
				fmt.Fprintf(w, "JWT keys withdrawn: %s\n", orNone(strings.Join(r.WithdrawnJWTKeys, ", ")))
			})
		}}
	revoke.Flags().StringVar(&crlFile, "crl", "", "CRL file signed by the root (PEM or DER)")
	cmd.AddCommand(revoke, rotateCmd(g)) // rotate.go
	return cmd
}

func orNone(s string) string {
	if s == "" {
		return "none"
	}
	return s
}

func readSmallFile(path string, limit int64) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer func() { _ = f.Close() }() // read only
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("%s is larger than %d bytes: not a CRL", path, limit)
	}
	return b, nil
}
