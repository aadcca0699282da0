package cli

import (
	"context"
	"errors"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/sigil-appliance/sigil/agent/jobrun"
	"github.com/sigil-appliance/sigil/internal/clirun"
	"github.com/sigil-appliance/sigil/internal/logconfig"
)

// Environment a pipeline may set instead of --server and --root-cert.
const (
	ServersEnv  = "SIGIL_SERVERS"   // host:port,host:port
	RootCertEnv = "SIGIL_ROOT_CERT" // a PEM file
)

type execFlags struct {
	servers                                 []string
	rootCert, rule                          string
	tokenFile, tokenEnv, tokenAud, out, log string
	githubActions                           bool
	audiences                               []string
}

func execCmd() *cobra.Command {
	var f execFlags
	cmd := &cobra.Command{
		Use:   "exec [flags] -- COMMAND [ARGS...]",
		Short: "Run one CI/CD job's command under the run's own identity (no TPM, nothing kept)",
		Long: "Joins the appliance with the pipeline platform's ID token (Join.Job, checked against the join\n" +
			"rule --rule), serves the SPIFFE Workload API to COMMAND on a private socket named in\n" +
			"SPIFFE_ENDPOINT_SOCKET, and ends the run (its SVIDs revoked, the job agent removed) when\n" +
			"COMMAND exits. It exits with COMMAND's status (128+signal when a signal ended it).\n" +
			"The token comes from exactly one of --token-file, --token-env or --github-actions.\n" +
			"--server and --root-cert default to $" + ServersEnv + " (comma-separated) and $" + RootCertEnv + ".",
		Args: func(cmd *cobra.Command, args []string) error {
			if cmd.ArgsLenAtDash() != 0 || len(args) == 0 {
				return errors.New("give the command after --: sigil-agent exec [flags] -- COMMAND [ARGS...]")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			o, err := f.options(args, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			// Signals are jobrun's to forward: the command's lifetime, not
			// the caller's context, decides when the run ends.
			code, err := jobrun.Run(context.WithoutCancel(cmd.Context()), o)
			if err != nil && code == 0 {
				return err
			}
			return &clirun.ExitStatus{Code: code, Err: err}
		},
	}
	fl := cmd.Flags()
	fl.StringArrayVar(&f.servers, "server", nil, "appliance API address host:port (repeatable, tried in order; default $"+ServersEnv+")")
	fl.StringVar(&f.rootCert, "root-cert", "", "the trust domain's root certificate (default $"+RootCertEnv+")")
	fl.StringVar(&f.rule, "rule", "", "the join rule that admits this run (default: the first of the token issuer's rules that does)")
	fl.StringVar(&f.tokenFile, "token-file", "", "read the platform ID token from this file (re-read to renew)")
	fl.StringVar(&f.tokenEnv, "token-env", "", "read the platform ID token from this environment variable (cannot renew)")
	fl.BoolVar(&f.githubActions, "github-actions", false, "request ID tokens from GitHub Actions (needs permissions: id-token: write)")
	fl.StringVar(&f.tokenAud, "token-audience", "", "audience of the requested GitHub Actions token (default: spiffe://<trust domain>)")
	fl.StringVar(&f.out, "out", "", "also write svid.pem, svid-key.pem, bundle.pem and JWT-SVIDs here (0600), removed at exit")
	fl.StringArrayVar(&f.audiences, "audience", nil, "with --out, write a JWT-SVID for this audience to jwt-<audience>.token (repeatable)")
	fl.StringVar(&f.log, "log-level", "info", "sigil-agent's own log on stderr: debug, info, warn or error")
	return cmd
}

func (f *execFlags) options(args []string, stdin io.Reader, stdout, stderr io.Writer) (jobrun.Options, error) {
	o := jobrun.Options{Servers: f.servers, RootCert: f.rootCert, Rule: f.rule, Out: f.out, Audiences: f.audiences,
		Command: args, Stdin: stdin, Stdout: stdout, Stderr: stderr}
	if len(o.Servers) == 0 {
		for _, s := range strings.Split(os.Getenv(ServersEnv), ",") {
			if s = strings.TrimSpace(s); s != "" {
				o.Servers = append(o.Servers, s)
			}
		}
	}
	if o.RootCert == "" {
		o.RootCert = os.Getenv(RootCertEnv)
	}
	switch {
	case len(o.Servers) == 0:
		return o, clirun.Usagef("exec: give --server or $%s", ServersEnv)
	case o.RootCert == "":
		return o, clirun.Usagef("exec: give --root-cert or $%s", RootCertEnv)
	case len(f.audiences) > 0 && f.out == "":
		return o, clirun.Usagef("exec: --audience writes JWT-SVIDs to --out: give --out")
	}
	n := 0
	for _, set := range []bool{f.tokenFile != "", f.tokenEnv != "", f.githubActions} {
		if set {
			n++
		}
	}
	if n != 1 {
		return o, clirun.Usagef("exec: give exactly one of --token-file, --token-env, --github-actions")
	}
	if f.tokenAud != "" && !f.githubActions {
		return o, clirun.Usagef("exec: --token-audience is for --github-actions (other tokens come as they are)")
	}
	lc := logconfig.Config{Level: f.log, Format: "text"}
	if p := lc.Problems(); len(p) > 0 {
		return o, clirun.Usagef("exec: --log-level: %s", strings.Join(p, "; "))
	}
	o.Log = lc.New(stderr)
	switch {
	case f.tokenFile != "":
		o.Token = &jobrun.FileToken{Path: f.tokenFile}
	case f.tokenEnv != "":
		t, err := jobrun.NewEnvToken(f.tokenEnv)
		if err != nil {
			return o, err
		}
		o.Token = t
	default:
		aud := f.tokenAud
		if aud == "" {
			var err error
			if aud, err = jobrun.TrustDomainAudience(o.RootCert); err != nil {
				return o, err
			}
		}
		g, err := jobrun.NewGitHubActions(aud, nil)
		if err != nil {
			return o, err
		}
		o.Token = g
	}
	return o, nil
}
