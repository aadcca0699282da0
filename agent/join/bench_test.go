package join_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/agent/join"
	"github.com/sigil-appliance/sigil/appliance/api"
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
		b.ReportMetric(float64(time.Since(start).Milliseconds())/float64(b.N), "ms/join")
		b.ReportMetric(float64(st.Commands-before.Commands)/float64(b.N), "tpm-cmds/op")
		b.ReportMetric(float64(st.Signatures-before.Signatures)/float64(b.N), "tpm-sigs/op")
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
