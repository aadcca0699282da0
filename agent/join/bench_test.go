package join_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent/join"
	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
)

// BenchmarkTPMJoin: a full TPM join on swtpm against a 3-node appliance
// (ms per join), and the TPM's work per join, per renewal and per workload
// SVID. The TPM signs at join and renewal only: workload keys are software
// keys the agent makes, so "tpm-sigs/op" for workload SVIDs is 0.
func BenchmarkTPMJoin(b *testing.B) {
	e := newEnvB(b)
	h := newHostB(b)
	e.trustTPMVendorB(b, h)
	ctx := context.Background()
	var svid *join.SVID
	var tpmJoin time.Duration
	b.Run("join", func(b *testing.B) {
		before := h.tpm.Stats()
		start := time.Now()
		for i := 0; i < b.N; i++ {
			s, err := join.TPM(ctx, e.joinClientB(b, "node-1", nil), h.tpm, h.key)
			if err != nil {
				b.Fatal(err)
			}
			svid = s
		}
		st := h.tpm.Stats()
		tpmJoin = time.Since(start) / time.Duration(b.N)
		b.ReportMetric(float64(time.Since(start).Microseconds())/1000/float64(b.N), "ms/join")
		b.ReportMetric(float64(st.Commands-before.Commands)/float64(b.N), "tpm-cmds/op")
		b.ReportMetric(float64(st.Signatures-before.Signatures)/float64(b.N), "tpm-sigs/op")
	})
	// A pipeline run's join (Join.Job) on the same appliance: the
	// platform token's signature and claims checked against a join rule
	// (static JWKS: no fetch), the replay key and the run's job agent
	// committed through raft with its audit record, the agent SVID signed
	// by the node's HSM. Each token is signed before the clock starts (the
	// platform's work, not ours). x-vs-tpm-join is this join's time over
	// the TPM join's measured just before.
	iss := jobruletest.NewIssuer(b)
	if _, err := e.c.Admin("node-1").JoinRuleCreate(ctx, &api.JoinRule{Name: "bench", Preset: "github-actions",
		Issuer: iss.URL(), JWKS: string(iss.JWKS()), TTL: 600, MaxTokenAge: 300,
		Conditions: []api.ClaimCondition{{Claim: "repository", Pattern: "octo-org/*"}}}); err != nil {
		b.Fatal(err)
	}
	b.Run("job", func(b *testing.B) {
		jc := e.joinClientB(b, "node-2", nil)
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
		tokens := make([]string, b.N)
		for i := range tokens {
			cl := jobruletest.GitHubClaims(iss.URL(), "spiffe://example.org", time.Now())
			cl["jti"], cl["run_id"] = fmt.Sprintf("bench-%d-%d", b.N, i), fmt.Sprintf("%d%d", b.N, i)
			tokens[i] = iss.Sign(b, cl)
		}
		b.ResetTimer()
		start := time.Now()
		for i := 0; i < b.N; i++ {
			if _, err := jc.Job(ctx, &api.JoinJobRequest{Rule: "bench", Token: tokens[i], CSR: csr, UID: 1000}); err != nil {
				b.Fatal(err)
			}
		}
		per := time.Since(start) / time.Duration(b.N)
		b.ReportMetric(float64(per.Microseconds())/1000, "ms/join")
		if tpmJoin > 0 {
			b.ReportMetric(float64(per)/float64(tpmJoin), "x-vs-tpm-join")
		}
	})
	b.Run("renew", func(b *testing.B) {
		before := h.tpm.Stats()
		for i := 0; i < b.N; i++ {
			cur := svid
			s, err := join.Renew(ctx, e.joinClientB(b, "node-2", func() (*tls.Certificate, error) { return cur.TLSCertificate(), nil }), cur.Signer)
			if err != nil {
				b.Fatal(err)
			}
			svid = s
		}
		st := h.tpm.Stats()
		b.ReportMetric(float64(st.Commands-before.Commands)/float64(b.N), "tpm-cmds/op")
		b.ReportMetric(float64(st.Signatures-before.Signatures)/float64(b.N), "tpm-sigs/op")
	})
	// Set up once here: a sub-benchmark's body runs once per N.
	ent, err := e.c.Admin("node-1").EntryCreate(ctx, &api.EntryRequest{Entry: api.Entry{SPIFFEID: "spiffe://example.org/bench",
		ParentID: svid.ID, Selectors: []api.Selector{{Type: "unix", Value: "uid:1"}}}})
	if err != nil {
		b.Fatal(err)
	}
	b.Run("workload-svid", func(b *testing.B) {
		cur := svid
		conn, err := api.Dial(api.DialConfig{Addr: e.c.ConfigOf("node-1").API.Listen, RootFile: e.tr.RootPath,
			Certificate: func() (*tls.Certificate, error) { return cur.TLSCertificate(), nil }})
		if err != nil {
			b.Fatal(err)
		}
		defer func() { _ = conn.Close() }() // the benchmark is over: nothing more goes through it
		ac := api.NewAgentClient(conn)
		wk, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		csr, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, wk)
		// The first call pays the TLS handshake (one TPM signature).
		if _, err := ac.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: ent.ID, CSR: csr}}}); err != nil {
			b.Fatal(err)
		}
		before := h.tpm.Stats()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := ac.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: ent.ID, CSR: csr}}}); err != nil {
				b.Fatal(err)
			}
		}
		st := h.tpm.Stats()
		b.ReportMetric(float64(st.Signatures-before.Signatures)/float64(b.N), "tpm-sigs/op")
	})
}
