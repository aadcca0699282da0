// Package ctl is sigilctl's command tree: the admin's view of the
// appliance over its API (entries, agents, TPM join policy, join tokens,
// cluster membership, snapshots, audit, the trust bundle, admin
// credentials). Output is a table for people or JSON (--output json) for
// scripts.
package ctl

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
)

type globals struct {
	dial    api.DialConfig
	output  string
	timeout time.Duration
	out     io.Writer
	// errOut takes progress and notes, so that out holds only the
	// result (which may be a stream of records).
	errOut io.Writer
}

// NewCommand returns the sigilctl root command. Flags default from the
// environment (SIGIL_SERVER, SIGIL_CERT, SIGIL_KEY, SIGIL_ROOT,
// SIGIL_SOCKET) so that credentials need not be typed each time.
func NewCommand(out io.Writer) *cobra.Command {
	g := &globals{out: out, errOut: os.Stderr}
	root := &cobra.Command{
		Use:           "sigilctl",
		Short:         "Administer a Sigil appliance",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			g.errOut = cmd.ErrOrStderr()
			if g.output != "text" && g.output != "json" {
				return fmt.Errorf("--output must be text or json")
			}
			return nil
		},
	}
	f := root.PersistentFlags()
	f.StringVar(&g.dial.Addr, "server", os.Getenv("SIGIL_SERVER"), "node API address host:port ($SIGIL_SERVER)")
	f.StringVar(&g.dial.CertFile, "cert", os.Getenv("SIGIL_CERT"), "admin certificate chain, PEM ($SIGIL_CERT)")
	f.StringVar(&g.dial.KeyFile, "key", os.Getenv("SIGIL_KEY"), "admin private key, PEM, mode 0600 ($SIGIL_KEY)")
	f.StringVar(&g.dial.RootFile, "root", os.Getenv("SIGIL_ROOT"), "trust domain root certificate ($SIGIL_ROOT)")
	f.StringVar(&g.dial.Socket, "socket", os.Getenv("SIGIL_SOCKET"), "node-local admin socket, as root on a node ($SIGIL_SOCKET)")
	f.StringVarP(&g.output, "output", "o", "text", "output format: text or json")
	f.DurationVar(&g.timeout, "timeout", 30*time.Second, "time limit for each request; for streams (snapshots, audit export), the longest wait without progress")

	root.AddCommand(entryCmd(g), agentCmd(g), tpmCmd(g), tokenCmd(g), clusterCmd(g), snapshotCmd(g), auditCmd(g), bundleCmd(g), adminCmd(g), svidCmd(g))
	root.AddCommand(caCmd(g)) // crl.go
	return root
}

// run dials, calls fn within --timeout and prints its result.
func (g *globals) run(fn func(ctx context.Context, c *api.AdminClient) (any, error), text func(w io.Writer, v any)) error {
	return g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
		ctx, cancel := context.WithTimeout(ctx, g.timeout)
		defer cancel()
		return fn(ctx, c)
	}, text)
}

// session dials, calls fn and prints its result (nothing when fn returns
// nil: it printed as it went). fn bounds its own requests (g.request,
// g.idle), so that a command made of many requests or a long stream is
// not cut off by one overall deadline. An interrupt cancels fn's context,
// so that a command writing a file can remove what it left half done.
func (g *globals) session(fn func(ctx context.Context, c *api.AdminClient) (any, error), text func(w io.Writer, v any)) error {
	conn, err := api.Dial(g.dial)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	v, err := fn(ctx, api.NewAdminClient(conn))
	if err != nil {
		return err
	}
	if v == nil {
		return nil
	}
	return g.print(v, text)
}

// print writes v as JSON (--output json) or with text.
func (g *globals) print(v any, text func(w io.Writer, v any)) error {
	if g.output == "json" {
		enc := json.NewEncoder(g.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	if text != nil {
		text(g.out, v)
	}
	return nil
}

func table(w io.Writer, header string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	tw.Flush()
}

func ok(msg string) func(io.Writer, any) {
	return func(w io.Writer, _ any) { fmt.Fprintln(w, msg) }
}

func entryCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "entry", Short: "Registration entries"}
	var e api.Entry
	var selectors []string
	var x509TTL, jwtTTL time.Duration
	addFlags := func(c *cobra.Command) {
		c.Flags().StringVar(&e.SPIFFEID, "spiffe-id", "", "SPIFFE ID to issue")
		c.Flags().StringVar(&e.ParentID, "parent-id", "", "agent (or node) that may obtain it")
		c.Flags().StringArrayVar(&selectors, "selector", nil, "type:value the workload must show (repeatable)")
		c.Flags().DurationVar(&x509TTL, "x509-ttl", 0, "X.509-SVID lifetime (default 1h)")
		c.Flags().DurationVar(&jwtTTL, "jwt-ttl", 0, "JWT-SVID lifetime (default 5m)")
		c.Flags().StringArrayVar(&e.DNSNames, "dns", nil, "DNS SAN (repeatable)")
		c.Flags().StringVar(&e.Hint, "hint", "", "hint for workloads with several identities")
	}
	build := func() error {
		e.Selectors = nil
		for _, s := range selectors {
			typ, val, found := strings.Cut(s, ":")
			if !found {
				return fmt.Errorf("selector %q: want type:value, e.g. unix:uid:1000", s)
			}
			e.Selectors = append(e.Selectors, api.Selector{Type: typ, Value: val})
		}
		e.X509TTL, e.JWTTTL = api.Seconds(x509TTL/time.Second), api.Seconds(jwtTTL/time.Second)
		return nil
	}
	create := &cobra.Command{Use: "create", Short: "Create an entry", Args: cobra.NoArgs, RunE: func(*cobra.Command, []string) error {
		if err := build(); err != nil {
			return err
		}
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.EntryCreate(ctx, &api.EntryRequest{Entry: e})
		}, printEntry)
	}}
	addFlags(create)
	update := &cobra.Command{Use: "update ID", Short: "Replace an entry", Args: cobra.ExactArgs(1), RunE: func(_ *cobra.Command, args []string) error {
		if err := build(); err != nil {
			return err
		}
		e.ID = args[0]
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.EntryUpdate(ctx, &api.EntryRequest{Entry: e})
		}, printEntry)
	}}
	addFlags(update)
	var filter api.EntryListRequest
	list := &cobra.Command{Use: "list", Short: "List entries", Args: cobra.NoArgs, RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.EntryList(ctx, &filter) },
			func(w io.Writer, v any) {
				var rows [][]string
				for _, e := range v.(*api.EntryList).Entries {
					rows = append(rows, []string{e.ID, e.SPIFFEID, e.ParentID, selectorString(e.Selectors)})
				}
				table(w, "ID\tSPIFFE ID\tPARENT\tSELECTORS", rows)
			})
	}}
	list.Flags().StringVar(&filter.ParentID, "parent-id", "", "only entries of this parent")
	list.Flags().StringVar(&filter.SPIFFEID, "spiffe-id", "", "only entries for this SPIFFE ID")
	show := &cobra.Command{Use: "show ID", Short: "Show an entry", Args: cobra.ExactArgs(1), RunE: func(_ *cobra.Command, args []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.EntryShow(ctx, &api.IDRequest{ID: args[0]})
		}, printEntry)
	}}
	del := &cobra.Command{Use: "delete ID", Short: "Delete an entry", Args: cobra.ExactArgs(1), RunE: func(_ *cobra.Command, args []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.EntryDelete(ctx, &api.IDRequest{ID: args[0]})
		}, ok("deleted "+args[0]))
	}}
	cmd.AddCommand(create, update, list, show, del)
	return cmd
}

func selectorString(s []api.Selector) string {
	out := make([]string, len(s))
	for i, x := range s {
		out[i] = x.String()
	}
	return strings.Join(out, ",")
}

func printEntry(w io.Writer, v any) {
	e := v.(*api.Entry)
	table(w, "FIELD\tVALUE", [][]string{
		{"id", e.ID}, {"spiffe_id", e.SPIFFEID}, {"parent_id", e.ParentID}, {"selectors", selectorString(e.Selectors)},
		{"x509_ttl", e.X509TTL.Duration().String()}, {"jwt_ttl", e.JWTTTL.Duration().String()},
		{"dns_names", strings.Join(e.DNSNames, ",")}, {"hint", e.Hint},
		{"revision", fmt.Sprint(e.Revision)},
	})
}

func agentCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "agent", Short: "Attested agents"}
	printAgent := func(w io.Writer, v any) {
		a := v.(*api.Agent)
		rows := [][]string{{"id", a.ID}, {"attestation", a.AttestationType}, {"serial", a.SerialNumber},
			{"expires", a.ExpiresAt.Format(time.RFC3339)}, {"banned", fmt.Sprint(a.Banned)}, {"joined", a.JoinedAt.Format(time.RFC3339)}}
		for k, v := range a.Facts {
			rows = append(rows, []string{"fact." + k, v})
		}
		table(w, "FIELD\tVALUE", rows)
	}
	cmd.AddCommand(
		&cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List agents", RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.AgentList(ctx, &api.Empty{}) },
				func(w io.Writer, v any) {
					var rows [][]string
					for _, a := range v.(*api.AgentList).Agents {
						rows = append(rows, []string{a.ID, a.AttestationType, a.ExpiresAt.Format(time.RFC3339), fmt.Sprint(a.Banned)})
					}
					table(w, "ID\tATTESTATION\tSVID EXPIRES\tBANNED", rows)
				})
		}},
		&cobra.Command{Use: "show ID", Args: cobra.ExactArgs(1), Short: "Show an agent", RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.AgentShow(ctx, &api.IDRequest{ID: args[0]})
			}, printAgent)
		}},
		&cobra.Command{Use: "ban ID", Args: cobra.ExactArgs(1), Short: "Stop all issuance to an agent", RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.AgentBan(ctx, &api.IDRequest{ID: args[0]})
			}, ok("banned "+args[0]))
		}},
		&cobra.Command{Use: "unban ID", Args: cobra.ExactArgs(1), Short: "Lift a ban", RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.AgentUnban(ctx, &api.IDRequest{ID: args[0]})
			}, ok("unbanned "+args[0]))
		}},
	)
	return cmd
}

func tpmCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "tpm", Short: "TPM join policy"}
	ekca := &cobra.Command{Use: "ek-ca", Short: "Trusted TPM manufacturer CAs"}
	ekca.AddCommand(
		&cobra.Command{Use: "add CERT.pem", Args: cobra.ExactArgs(1), Short: "Trust a TPM manufacturer CA", RunE: func(_ *cobra.Command, args []string) error {
			certs, err := api.ReadCerts(args[0])
			if err != nil {
				return err
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				var last *api.EKCA
				for _, cert := range certs {
					ca, err := c.EKCAAdd(ctx, &api.EKCARequest{DER: cert.Raw})
					if err != nil {
						return nil, err
					}
					last = ca
				}
				return last, nil
			}, func(w io.Writer, v any) { fmt.Fprintf(w, "trusted %s (%s)\n", v.(*api.EKCA).ID, v.(*api.EKCA).Subject) })
		}},
		&cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List trusted EK CAs", RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.EKCAList(ctx, &api.Empty{}) },
				func(w io.Writer, v any) {
					var rows [][]string
					for _, ca := range v.(*api.EKCAList).CAs {
						rows = append(rows, []string{ca.ID, ca.Subject})
					}
					table(w, "ID (SHA-256)\tSUBJECT", rows)
				})
		}},
		&cobra.Command{Use: "remove ID", Args: cobra.ExactArgs(1), Short: "Stop trusting an EK CA", RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.EKCARemove(ctx, &api.IDRequest{ID: args[0]})
			}, ok("removed "+args[0]))
		}},
	)
	allow := &cobra.Command{Use: "allow", Short: "EK public keys allowed without a certificate"}
	allow.AddCommand(
		&cobra.Command{Use: "add SHA256", Args: cobra.ExactArgs(1), Short: "Allow an EK by the SHA-256 of its public key", RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.EKAllowAdd(ctx, &api.HashRequest{Hash: args[0]})
			}, ok("allowed "+args[0]))
		}},
		&cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List allowed EKs", RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.EKAllowList(ctx, &api.Empty{}) },
				func(w io.Writer, v any) {
					for _, h := range v.(*api.HashList).Hashes {
						fmt.Fprintln(w, h)
					}
				})
		}},
		&cobra.Command{Use: "remove SHA256", Args: cobra.ExactArgs(1), Short: "Remove an EK from the allowlist", RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.EKAllowRemove(ctx, &api.HashRequest{Hash: args[0]})
			}, ok("removed "+args[0]))
		}},
	)
	pcr := &cobra.Command{Use: "pcr", Short: "PCR values a joining TPM must quote"}
	pcr.AddCommand(
		&cobra.Command{Use: "set INDEX=SHA256HEX...", Args: cobra.MinimumNArgs(1), Short: "Require these sha256 PCR values at join", RunE: func(_ *cobra.Command, args []string) error {
			p := &api.PCRPolicy{Bank: "sha256", PCRs: map[string]string{}}
			for _, a := range args {
				k, v, ok := strings.Cut(a, "=")
				if !ok {
					return fmt.Errorf("%q: want INDEX=SHA256HEX", a)
				}
				p.PCRs[k] = strings.ToLower(v)
			}
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.PCRPolicySet(ctx, &api.PCRPolicyRequest{Policy: p})
			}, ok("PCR policy set"))
		}},
		&cobra.Command{Use: "clear", Args: cobra.NoArgs, Short: "Stop requiring PCR values", RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.PCRPolicySet(ctx, &api.PCRPolicyRequest{})
			}, ok("PCR policy cleared"))
		}},
	)
	cmd.AddCommand(ekca, allow, pcr)
	return cmd
}

func tokenCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "One-time join tokens for hosts without a TPM"}
	var ttl time.Duration
	create := &cobra.Command{Use: "create", Args: cobra.NoArgs, Short: "Create a join token (shown once)", RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.TokenCreate(ctx, &api.TokenRequest{TTL: api.Seconds(ttl / time.Second)})
		}, func(w io.Writer, v any) {
			t := v.(*api.TokenResponse)
			fmt.Fprintf(w, "%s\n(expires %s; shown once, the appliance keeps only its hash %.12s)\n", t.Token, t.ExpiresAt.Format(time.RFC3339), t.ID)
		})
	}}
	create.Flags().DurationVar(&ttl, "ttl", time.Hour, "how long the token may be used")
	cmd.AddCommand(create)
	return cmd
}

func clusterCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "cluster", Short: "Cluster membership"}
	var join api.JoinRequest
	joinCmd := &cobra.Command{Use: "join", Args: cobra.NoArgs, Short: "Add a node (its certificate must chain to the root)", RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.ClusterJoin(ctx, &join) }, ok("added "+join.NodeID))
	}}
	joinCmd.Flags().StringVar(&join.NodeID, "node-id", "", "node ID")
	joinCmd.Flags().StringVar(&join.Addr, "addr", "", "the node's raft address host:port")
	cmd.AddCommand(
		&cobra.Command{Use: "status", Args: cobra.NoArgs, Short: "Leader, term, indexes and peers", RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.ClusterStatus(ctx, &api.Empty{}) },
				func(w io.Writer, v any) {
					s := v.(*api.ClusterStatus)
					fmt.Fprintf(w, "node %s (%s), leader %s at %s, term %d, last index %d, commit %d, applied %d\n",
						s.NodeID, s.State, s.LeaderID, s.LeaderAddr, s.Term, s.LastIndex, s.CommitIndex, s.AppliedIndex)
					var rows [][]string
					for _, p := range s.Peers {
						lc := "-"
						if !p.LastContact.IsZero() {
							lc = time.Since(p.LastContact).Round(time.Millisecond).String() + " ago"
						}
						rows = append(rows, []string{p.ID, p.Addr, p.Suffrage, lc, fmt.Sprint(p.LastIndex)})
					}
					table(w, "PEER\tADDRESS\tSUFFRAGE\tLAST CONTACT\tLAST INDEX", rows)
				})
		}},
		joinCmd,
		&cobra.Command{Use: "remove NODE-ID", Args: cobra.ExactArgs(1), Short: "Remove a node", RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.ClusterRemove(ctx, &api.IDRequest{ID: args[0]})
			}, ok("removed "+args[0]))
		}},
	)
	return cmd
}

func bundleCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "bundle", Short: "The trust bundle"}
	var format string
	show := &cobra.Command{Use: "show", Args: cobra.NoArgs, Short: "Show the trust bundle", RunE: func(*cobra.Command, []string) error {
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.BundleShow(ctx, &api.Empty{}) },
			func(w io.Writer, v any) {
				b := v.(*api.BundleResponse)
				if format == "pem" {
					for _, der := range b.Bundle.Roots {
						pem.Encode(w, &pem.Block{Type: "CERTIFICATE", Bytes: der})
					}
					return
				}
				w.Write(b.SPIFFE)
				fmt.Fprintln(w)
			})
	}}
	show.Flags().StringVar(&format, "format", "spiffe", "spiffe (JWKS bundle document) or pem (X.509 roots)")
	cmd.AddCommand(show)
	return cmd
}

func adminCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "admin", Short: "Admin credentials"}
	var name, keyOut, certOut, role string
	var ttl time.Duration
	issue := &cobra.Command{Use: "issue", Args: cobra.NoArgs, Short: "Make a key here and have a node certify it as an admin", RunE: func(*cobra.Command, []string) error {
		if name == "" || keyOut == "" || certOut == "" {
			return errors.New("--name, --key-out and --cert-out are required")
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return err
		}
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key)
		if err != nil {
			return err
		}
		kd, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			return err
		}
		// Claim both outputs before asking the appliance, so a name clash
		// does not leave a certificate without its key.
		kf, err := os.OpenFile(keyOut, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		cf, err := os.OpenFile(certOut, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			kf.Close()
			os.Remove(keyOut)
			return err
		}
		err = g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			chain, err := c.AdminCertIssue(ctx, &api.AdminCertRequest{Name: name, CSR: csr, TTL: api.Seconds(ttl / time.Second), Role: role})
			if err != nil {
				return nil, err
			}
			for _, der := range chain.Chain {
				if err := pem.Encode(cf, &pem.Block{Type: "CERTIFICATE", Bytes: der}); err != nil {
					return nil, err
				}
			}
			if err := pem.Encode(kf, &pem.Block{Type: "PRIVATE KEY", Bytes: kd}); err != nil {
				return nil, err
			}
			leaf, _ := x509.ParseCertificate(chain.Chain[0])
			out := map[string]string{"id": leaf.URIs[0].String(), "serial": leaf.SerialNumber.Text(16),
				"not_after": leaf.NotAfter.Format(time.RFC3339), "cert": certOut, "key": keyOut}
			if role != "" {
				out["role"] = role
			}
			return out, nil
		}, func(w io.Writer, v any) {
			m := v.(map[string]string)
			r := m["role"]
			if r == "" {
				r = "kept, or admin for a new name"
			}
			fmt.Fprintf(w, "admin credential %s (role %s, serial %s, until %s): %s, key %s\n", m["id"], r, m["serial"], m["not_after"], m["cert"], m["key"])
		})
		kf.Close()
		cf.Close()
		if err != nil {
			os.Remove(keyOut)
			os.Remove(certOut)
		}
		return err
	}}
	issue.Flags().StringVar(&name, "name", "", "admin name (spiffe://<td>/sigil/admin/<name>)")
	issue.Flags().StringVar(&keyOut, "key-out", "", "where to write the new private key (0600)")
	issue.Flags().StringVar(&certOut, "cert-out", "", "where to write the certificate chain")
	issue.Flags().DurationVar(&ttl, "ttl", 8*time.Hour, "certificate lifetime")
	issue.Flags().StringVar(&role, "role", "", "admin (administers, renews itself) or admin-issuer (also issues and revokes any admin name); default: the name's current role, admin for a new name")
	cmd.AddCommand(issue, adminRevokeCmd(g), adminListCmd(g))
	return cmd
}

func svidCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "svid", Short: "Issued SVIDs"}
	cmd.AddCommand(&cobra.Command{Use: "revoke SERIAL", Args: cobra.ExactArgs(1),
		Short: "Revoke an X.509-SVID by serial (hex, as in the audit log); the issuing node's CRL lists it",
		RunE: func(_ *cobra.Command, args []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.SVIDRevoke(ctx, &api.RevokeRequest{Serial: args[0]})
			}, ok("revoked "+args[0]))
		}})
	return cmd
}
