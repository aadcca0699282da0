// Package ctl is sigilctl's command tree: the admin's view of the
// appliance over its API (entries, agents, TPM join policy, join tokens,
// cluster membership, snapshots, audit, the trust bundle, JWT signing
// keys, admin credentials). Output is a table for people or JSON
// (--output json) for scripts: JSON keys are lower-case snake_case, and
// lists print as a top-level array (audit list, which also reports the
// head, as an object with "records"). A command whose output could not be
// written fails.
package ctl

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/internal/clirun"
)

type globals struct {
	dial    api.DialConfig
	output  string
	timeout time.Duration
	// ctx is the command's context: main cancels it on an interrupt.
	ctx context.Context
	out *outWriter
	// errOut takes progress and notes (g.note), so that out holds only
	// the result (which may be a stream of records).
	errOut io.Writer
}

// note writes a progress line or a note to errOut. A failed write there
// is ignored: the result goes to out (or a file), whose writes are checked,
// and a note that cannot be shown does not make it wrong.
func (g *globals) note(format string, args ...any) {
	_, _ = fmt.Fprintf(g.errOut, format, args...)
}

// outWriter keeps the first error writing the result: every later write
// fails with it, and the command fails with it at the end (a result that
// did not reach its reader is not a success).
type outWriter struct {
	w   io.Writer
	err error
}

func (o *outWriter) Write(p []byte) (int, error) {
	if o.err != nil {
		return 0, o.err
	}
	n, err := o.w.Write(p)
	if err == nil && n < len(p) {
		err = io.ErrShortWrite
	}
	o.err = err
	return n, err
}

// Run runs sigilctl with args (without the program name) and returns its
// exit code: 0, 1 when the command failed, 2 when the command line was
// wrong. Cancelling ctx (main does on SIGINT and SIGTERM) stops a command,
// which removes any file it left half written.
func Run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	return clirun.Run(ctx, NewCommand(stdout), args, stdout, stderr)
}

// NewCommand returns the sigilctl root command, writing results to out.
// Flags default from the environment (SIGIL_SERVER, SIGIL_CERT, SIGIL_KEY,
// SIGIL_ROOT, SIGIL_SOCKET) so that credentials need not be typed each
// time.
func NewCommand(out io.Writer) *cobra.Command {
	g := &globals{out: &outWriter{w: out}, errOut: os.Stderr, ctx: context.Background()}
	root := &cobra.Command{
		Use:   "sigilctl",
		Short: "Administer a Sigil appliance",
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			g.errOut = cmd.ErrOrStderr()
			if ctx := cmd.Context(); ctx != nil {
				g.ctx = ctx
			}
			if g.output != "text" && g.output != "json" {
				return clirun.Usagef("--output must be text or json (got %q)", g.output)
			}
			if g.timeout <= 0 {
				return clirun.Usagef("--timeout must be positive (got %v)", g.timeout)
			}
			return nil
		},
		PersistentPostRunE: func(*cobra.Command, []string) error {
			if g.out.err != nil {
				return fmt.Errorf("writing the result: %w", g.out.err)
			}
			return nil
		},
	}
	f := root.PersistentFlags()
	f.StringVar(&g.dial.Addr, "server", os.Getenv("SIGIL_SERVER"), "node API address host:port, or several separated by commas: the next is tried when one cannot be connected to ($SIGIL_SERVER)")
	f.StringVar(&g.dial.CertFile, "cert", os.Getenv("SIGIL_CERT"), "admin certificate chain, PEM ($SIGIL_CERT)")
	f.StringVar(&g.dial.KeyFile, "key", os.Getenv("SIGIL_KEY"), "admin private key: a PEM file (mode 0600) or a pkcs11: URI of a key in a token, whose PIN comes from the URI's pin-source (file:/path or env:NAME) ($SIGIL_KEY)")
	f.StringVar(&g.dial.RootFile, "root", os.Getenv("SIGIL_ROOT"), "trust domain root certificate ($SIGIL_ROOT)")
	f.StringVar(&g.dial.Socket, "socket", os.Getenv("SIGIL_SOCKET"), "node-local admin socket, as root on a node ($SIGIL_SOCKET)")
	f.StringVarP(&g.output, "output", "o", "text", "output format: text or json")
	f.DurationVar(&g.timeout, "timeout", 30*time.Second, "time limit for each request; for streams (snapshots, audit export), the longest wait without progress")

	root.AddCommand(entryCmd(g), agentCmd(g), tpmCmd(g), tokenCmd(g), clusterCmd(g), snapshotCmd(g), auditCmd(g), bundleCmd(g), jwtCmd(g), adminCmd(g), svidCmd(g))
	root.AddCommand(joinRuleCmd(g))   // joinrule.go
	root.AddCommand(federationCmd(g)) // federation.go
	root.AddCommand(caCmd(g))         // crl.go
	root.AddCommand(nodeCmd(g))       // issuingcert.go
	return clirun.Prepare(root)
}

// run dials, calls fn within --timeout and prints its result.
func (g *globals) run(fn func(ctx context.Context, c *api.AdminClient) (any, error), text func(w *bufio.Writer, v any)) error {
	return g.session(func(ctx context.Context, c *api.AdminClient) (any, error) {
		ctx, cancel := context.WithTimeout(ctx, g.timeout)
		defer cancel()
		return fn(ctx, c)
	}, text)
}

// session dials, calls fn and prints its result (nothing when fn returns
// nil: it printed as it went). fn bounds its own requests (g.request,
// g.idle), so that a command made of many requests or a long stream is
// not cut off by one overall deadline. fn's context is the command's, which
// an interrupt cancels, so that a command writing a file can remove what
// it left half done.
func (g *globals) session(fn func(ctx context.Context, c *api.AdminClient) (any, error), text func(w *bufio.Writer, v any)) error {
	dial, closeKey, err := g.dialConfig(g.ctx)
	if err != nil {
		return err
	}
	defer closeKey()
	conn, err := g.connect(dial) // ops.go
	if err != nil {
		return err
	}
	defer func() { _ = conn.Close() }() // fn's calls returned: nothing is pending
	v, err := fn(g.ctx, api.NewAdminClient(conn))
	if err != nil {
		return err
	}
	if v == nil {
		return nil
	}
	return g.print(v, text)
}

// print writes v as JSON (--output json) or with text. text writes into a
// bufio.Writer, which keeps the first write error for its Flush: print
// returns that, so text need not check each write.
func (g *globals) print(v any, text func(w *bufio.Writer, v any)) error {
	if g.output == "json" {
		enc := json.NewEncoder(g.out)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	if text == nil {
		return nil
	}
	w := bufio.NewWriter(g.out)
	text(w, v)
	if err := w.Flush(); err != nil {
		return fmt.Errorf("writing the result: %w", err)
	}
	return nil
}

// nonNil makes an empty list print as [] rather than null.
func nonNil[T any](l []T) []T {
	if l == nil {
		return []T{}
	}
	return l
}

// table writes rows aligned under header. tabwriter's only write errors
// are w's, which w keeps for its Flush (see print).
func table(w *bufio.Writer, header string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	_, _ = fmt.Fprintln(tw, header)
	for _, r := range rows {
		_, _ = fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	_ = tw.Flush()
}

func ok(msg string) func(*bufio.Writer, any) {
	return func(w *bufio.Writer, _ any) { fmt.Fprintln(w, msg) }
}

// wholeSeconds converts a duration flag to the whole seconds the
// appliance stores. A duration it cannot represent is refused rather than
// truncated (1500ms would silently become 1s).
func wholeSeconds(flag string, d time.Duration) (api.Seconds, error) {
	if d < 0 {
		return 0, clirun.Usagef("--%s %v: must not be negative", flag, d)
	}
	if d%time.Second != 0 {
		return 0, clirun.Usagef("--%s %v: the appliance keeps whole seconds; give a whole number of seconds (such as %v)",
			flag, d, max(d.Round(time.Second), time.Second))
	}
	return api.Seconds(d / time.Second), nil
}

func agentCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "agent", Short: "Attested agents"}
	printAgent := func(w *bufio.Writer, v any) {
		a := v.(*api.Agent)
		rows := [][]string{{"id", a.ID}, {"attestation", a.AttestationType}, {"serial", a.SerialNumber},
			{"expires", a.ExpiresAt.Format(time.RFC3339)}, {"banned", fmt.Sprint(a.Banned)}, {"joined", a.JoinedAt.Format(time.RFC3339)},
			{"last_seen", lastSeen(*a, time.Now()) + " (by " + a.SeenBy + ")"}}
		if j := a.Job; j != nil {
			rows = append(rows, []string{"job.rule", j.Rule}, []string{"job.run", j.Run}, []string{"job.identity", j.SPIFFEID},
				[]string{"job.uid", fmt.Sprint(j.UID)}, []string{"job.ttl", j.TTL.Duration().String()})
		}
		for k, v := range a.Facts {
			rows = append(rows, []string{"fact." + k, v})
		}
		table(w, "FIELD\tVALUE", rows)
	}
	cmd.AddCommand(
		&cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List agents", Long: lastSeenHelp, RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				l, err := c.AgentList(ctx, &api.Empty{})
				if err != nil {
					return nil, err
				}
				return nonNil(l.Agents), nil
			},
				func(w *bufio.Writer, v any) {
					var rows [][]string
					by := ""
					now := time.Now()
					for _, a := range v.([]api.Agent) {
						rows = append(rows, []string{a.ID, a.AttestationType, a.ExpiresAt.Format(time.RFC3339), fmt.Sprint(a.Banned), lastSeen(a, now)})
						by = a.SeenBy
					}
					table(w, "ID\tATTESTATION\tSVID EXPIRES\tBANNED\tLAST SEEN (BY "+by+")", rows) // lastSeen: ops.go
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
		agentRemoveCmd(g), // ops.go
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
			}, func(w *bufio.Writer, v any) {
				fmt.Fprintf(w, "trusted %s (%s)\n", v.(*api.EKCA).ID, v.(*api.EKCA).Subject)
			})
		}},
		&cobra.Command{Use: "list", Args: cobra.NoArgs, Short: "List trusted EK CAs", RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				l, err := c.EKCAList(ctx, &api.Empty{})
				if err != nil {
					return nil, err
				}
				return nonNil(l.CAs), nil
			},
				func(w *bufio.Writer, v any) {
					var rows [][]string
					for _, ca := range v.([]api.EKCA) {
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
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				l, err := c.EKAllowList(ctx, &api.Empty{})
				if err != nil {
					return nil, err
				}
				return nonNil(l.Hashes), nil
			},
				func(w *bufio.Writer, v any) {
					for _, h := range v.([]string) {
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
		pcrShowCmd(g), // ops.go
	)
	cmd.AddCommand(ekca, allow, pcr)
	return cmd
}

func tokenCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "token", Short: "One-time join tokens for hosts without a TPM"}
	var ttl time.Duration
	create := &cobra.Command{Use: "create", Args: cobra.NoArgs, Short: "Create a join token (shown once)", RunE: func(*cobra.Command, []string) error {
		secs, err := wholeSeconds("ttl", ttl)
		if err != nil {
			return err
		}
		return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			return c.TokenCreate(ctx, &api.TokenRequest{TTL: secs})
		}, func(w *bufio.Writer, v any) {
			t := v.(*api.TokenResponse)
			fmt.Fprintf(w, "%s\n(expires %s; shown once, the appliance keeps only its hash %.12s)\n", t.Token, t.ExpiresAt.Format(time.RFC3339), t.ID)
		})
	}}
	create.Flags().DurationVar(&ttl, "ttl", time.Hour, "how long the token may be used")
	cmd.AddCommand(create, tokenListCmd(g), tokenRevokeCmd(g)) // list, revoke: ops.go
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
	var warnWithin time.Duration
	status := &cobra.Command{Use: "status", Args: cobra.NoArgs, Short: "Leader, term, indexes, each member's reachability and lag as the leader sees them, and expiries",
		Long: clusterStatusLong, RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) { return c.ClusterStatus(ctx, &api.Empty{}) },
				func(w *bufio.Writer, v any) {
					s := v.(*api.ClusterStatus)
					printClusterStatus(w, s)                             // cluster.go
					printExpiries(w, s.Expiries, warnWithin, time.Now()) // issuingcert.go
				})
		}}
	status.Flags().DurationVar(&warnWithin, "warn-within", 720*time.Hour, "warn about issuing CAs and roots expiring within this (a node's newest JWT key: within 24h at most)")
	cmd.AddCommand(
		status,
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
			func(w *bufio.Writer, v any) {
				b := v.(*api.BundleResponse)
				if format == "pem" {
					for _, der := range b.Bundle.Roots {
						// A block without headers always encodes; a write
						// error stays in w for print.
						w.Write(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
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

func jwtCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "jwt", Short: "JWT-SVID signing keys"}
	cmd.AddCommand(&cobra.Command{Use: "rotate", Args: cobra.NoArgs,
		Short: "Rotate the answering node's JWT signing key now, and print the new key's kid and the node",
		Long: "The node that answers (the first --server that accepts a connection) makes a new JWT signing\n" +
			"key in its own HSM, publishes it in the trust bundle and signs JWT-SVIDs with it from then on,\n" +
			"as its jwt.rotate-every schedule would; each node has its own keys, so rotate every node by\n" +
			"asking each (--server one node at a time). Earlier keys stay in the bundle until the tokens\n" +
			"they signed have expired. Audited: bundle.jwt.rotate names you and the kid, bundle.jwt.add\n" +
			"records the publication. Refused while the node already has " + strconv.Itoa(api.MaxNodeJWTKeys) + " keys in the bundle, so\n" +
			"that a script in a loop cannot grow the bundle every agent receives without bound; the refusal\n" +
			"says when the first of them leaves.",
		RunE: func(*cobra.Command, []string) error {
			return g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
				return c.JWTKeyRotate(ctx, &api.Empty{})
			}, func(w *bufio.Writer, v any) {
				r := v.(*api.JWTKeyRotated)
				fmt.Fprintf(w, "node %s rotated its JWT signing key: kid %s\n", r.Node, r.KID)
			})
		}})
	return cmd
}

func adminCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{Use: "admin", Short: "Admin credentials"}
	var name, keyOut, certOut, role string
	var ttl time.Duration
	issue := &cobra.Command{Use: "issue", Args: cobra.NoArgs, Short: "Make a key here (in a file or a token) and have a node certify it as an admin", RunE: func(*cobra.Command, []string) (err error) {
		if name == "" || keyOut == "" || certOut == "" {
			return clirun.Usagef("--name, --key-out and --cert-out are required")
		}
		secs, err := wholeSeconds("ttl", ttl)
		if err != nil {
			return err
		}
		token := isTokenURI(keyOut)
		if token {
			if err := checkTokenURI("key-out", keyOut); err != nil {
				return err
			}
		}
		// Claim the output files before making the key or asking the
		// appliance, so a name clash does not leave a certificate without
		// its key (or a token key without its certificate).
		var kf *os.File
		if !token {
			if kf, err = os.OpenFile(keyOut, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600); err != nil {
				return err
			}
		}
		cf, err := os.OpenFile(certOut, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			if kf != nil {
				_ = kf.Close() // empty, and removed now
				err = removeClaimed(err, keyOut)
			}
			return err
		}
		written := false
		defer func() {
			// Both were closed, their errors checked, before written was
			// set; otherwise they are being removed.
			if kf != nil {
				_ = kf.Close()
			}
			_ = cf.Close()
			if !written {
				if kf != nil {
					err = removeClaimed(err, keyOut)
				}
				err = removeClaimed(err, certOut)
			}
		}()
		key, err := newAdminKey(g.ctx, keyOut)
		if err != nil {
			return err
		}
		defer key.close()
		csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: name}}, key.signer)
		if err != nil {
			return fmt.Errorf("certificate request: %w", err)
		}
		err = g.run(func(ctx context.Context, c *api.AdminClient) (any, error) {
			chain, err := c.AdminCertIssue(ctx, &api.AdminCertRequest{Name: name, CSR: csr, TTL: secs, Role: role})
			if err != nil {
				return nil, err
			}
			if len(chain.Chain) == 0 {
				return nil, errors.New("the node returned no certificate")
			}
			leaf, err := x509.ParseCertificate(chain.Chain[0])
			if err != nil || len(leaf.URIs) != 1 {
				return nil, fmt.Errorf("the node returned a certificate that is not an admin SVID: %v", err)
			}
			for _, der := range chain.Chain {
				if err := pem.Encode(cf, &pem.Block{Type: "CERTIFICATE", Bytes: der}); err != nil {
					return nil, fmt.Errorf("%s: %w", certOut, err)
				}
			}
			if err := cf.Close(); err != nil {
				return nil, fmt.Errorf("%s: %w", certOut, err)
			}
			if kf != nil {
				if err := pem.Encode(kf, &pem.Block{Type: "PRIVATE KEY", Bytes: key.pkcs8}); err != nil {
					return nil, fmt.Errorf("%s: %w", keyOut, err)
				}
				if err := kf.Close(); err != nil {
					return nil, fmt.Errorf("%s: %w", keyOut, err)
				}
			}
			written = true
			out := map[string]string{"id": leaf.URIs[0].String(), "serial": leaf.SerialNumber.Text(16),
				"not_after": leaf.NotAfter.Format(time.RFC3339), "cert": certOut, "key": keyOut}
			if role != "" {
				out["role"] = role
			}
			return out, nil
		}, func(w *bufio.Writer, v any) {
			m := v.(map[string]string)
			r := m["role"]
			if r == "" {
				r = "kept, or admin for a new name"
			}
			fmt.Fprintf(w, "admin credential %s (role %s, serial %s, until %s): %s, key %s\n", m["id"], r, m["serial"], m["not_after"], m["cert"], m["key"])
		})
		if err != nil && !written && token {
			return fmt.Errorf("%w (the new key %s stays in the token, uncertified)", err, keyOut)
		}
		return err
	}}
	issue.Flags().StringVar(&name, "name", "", "admin name (spiffe://<td>/sigil/admin/<name>)")
	issue.Flags().StringVar(&keyOut, "key-out", "", "where to make the new private key: a new file (0600), or a pkcs11: URI of a new key object in a token, whose PIN comes from the URI's pin-source (file:/path or env:NAME)")
	issue.Flags().StringVar(&certOut, "cert-out", "", "where to write the certificate chain")
	issue.Flags().DurationVar(&ttl, "ttl", 8*time.Hour, "certificate lifetime")
	issue.Flags().StringVar(&role, "role", "", "admin (administers, renews itself) or admin-issuer (also issues and revokes any admin name); default: the name's current role, admin for a new name")
	cmd.AddCommand(issue, adminRevokeCmd(g), adminListCmd(g))
	return cmd
}

// removeClaimed removes a file admin issue claimed but did not complete,
// after err; err says so if the file could not be removed.
func removeClaimed(err error, path string) error {
	if rerr := os.Remove(path); rerr != nil && !errors.Is(rerr, os.ErrNotExist) {
		return fmt.Errorf("%w (and %s could not be removed: %v)", err, path, rerr)
	}
	return err
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
