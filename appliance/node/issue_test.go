package node_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

const agentID = "spiffe://example.org/sigil/agent/tpm/host-a"

// issuer is a cluster with one joined agent and its credential.
type issuer struct {
	c         *clustertest.Cluster
	tr        *clustertest.Trust
	agentCert string
	agentKey  string
}

func newIssuer(t testing.TB, prefix string) *issuer {
	return newIssuerWith(t, prefix, nil)
}

func newIssuerWith(t testing.TB, prefix string, mod func(*node.Config)) *issuer {
	return newIssuerOn(t, clustertest.NewTrust(t, prefix, []string{"node-1", "node-2", "node-3"}, nil), mod)
}

// newIssuerOn is newIssuerWith on a trust made by the caller (who may put
// keys in the nodes' tokens before they start).
func newIssuerOn(t testing.TB, tr *clustertest.Trust, mod func(*node.Config)) *issuer {
	c := clustertest.NewClusterWith(t, tr, mod, "node-1", "node-2", "node-3")
	// The agent joins (issue #6 does this by TPM attestation); here the
	// node records it directly.
	leader := c.WaitLeader(30 * time.Second)
	cmd, _ := state.NewCommand(state.CmdAgentUpsert, "spiffe://example.org/sigil/node/"+leader, time.Now(),
		&state.Agent{ID: agentID, AttestationType: "test"})
	if _, err := c.Node(leader).Raft().Apply(context.Background(), cmd); err != nil {
		t.Fatal(err)
	}
	clustertest.Eventually(t, 10*time.Second, "every node to know the agent", func() bool {
		for _, id := range c.Running() {
			if _, ok := c.Node(id).State().Agent(agentID); !ok {
				return false
			}
		}
		return true
	})
	ks := pkcs11.New(pkcs11.Options{})
	defer func() {
		if err := ks.Close(); err != nil {
			t.Errorf("close key store: %v", err)
		}
	}()
	cert := clustertest.ClientCert(t, tr.Authority(t, ks, "node-2"), "/sigil/agent/tpm/host-a")
	ic := &issuer{c: c, tr: tr}
	ic.agentCert, ic.agentKey = clustertest.WriteCredential(t, c.Dir, "agent", cert)
	return ic
}

func (ic *issuer) agent(t testing.TB, node string) *api.AgentClient {
	conn, err := api.Dial(api.DialConfig{Addr: ic.c.ConfigOf(node).API.Listen, CertFile: ic.agentCert, KeyFile: ic.agentKey, RootFile: ic.tr.RootPath})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return api.NewAgentClient(conn)
}

// jwtBundle is the trust domain's JWT bundle as node serves it.
func (ic *issuer) jwtBundle(t testing.TB, node string) *jwtbundle.Bundle {
	t.Helper()
	resp, err := ic.c.Admin(node).BundleShow(context.Background(), &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := spiffebundle.Parse(ic.tr.TrustDomain, resp.SPIFFE)
	if err != nil {
		t.Fatal(err)
	}
	return b.JWTBundle()
}

func (ic *issuer) entry(t testing.TB, spiffeID, parent string, dns ...string) api.Entry {
	e, err := ic.c.Admin("node-1").EntryCreate(context.Background(), &api.EntryRequest{Entry: api.Entry{
		SPIFFEID: spiffeID, ParentID: parent, Selectors: []api.Selector{{Type: "unix", Value: "uid:1000"}},
		X509TTL: 600, DNSNames: dns,
	}, Force: true})
	if err != nil {
		t.Fatal(err)
	}
	return *e
}

func csrFor(t testing.TB, uri string) []byte {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.CertificateRequest{}
	if uri != "" {
		u, _ := url.Parse(uri)
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func auditActions(t *testing.T, c *clustertest.Cluster, node string) map[string][]api.AuditRecord {
	recs, err := c.Admin(node).AuditList(context.Background(), &api.AuditRequest{})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]api.AuditRecord{}
	for _, r := range recs.Records {
		out[r.Action] = append(out[r.Action], r)
	}
	return out
}

func TestX509SVIDIssuance(t *testing.T) {
	ic := newIssuer(t, "x5")
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID, "web.example.org")
	other := ic.entry(t, "spiffe://example.org/db", "spiffe://example.org/sigil/agent/tpm/host-b")

	badSig := csrFor(t, "")
	badSig[len(badSig)-3] ^= 0xff
	res, err := ic.agent(t, "node-2").SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{
		{EntryID: web.ID, CSR: csrFor(t, "")},
		{EntryID: web.ID, CSR: csrFor(t, "spiffe://example.org/web")},
		{EntryID: other.ID, CSR: csrFor(t, "")},                         // not this agent's entry
		{EntryID: web.ID, CSR: badSig},                                  // signature broken
		{EntryID: web.ID, CSR: csrFor(t, "spiffe://example.org/admin")}, // asks for another ID
	}})
	if err != nil {
		t.Fatal(err)
	}
	roots := x509bundle.FromX509Authorities(ic.tr.TrustDomain, []*x509.Certificate{ic.tr.Root})
	var serials []string
	for i, r := range res.Results[:2] {
		if r.Error != "" {
			t.Fatalf("request %d: %s", i, r.Error)
		}
		var chain []*x509.Certificate
		for _, der := range r.Chain {
			c, _ := x509.ParseCertificate(der)
			chain = append(chain, c)
		}
		id, _, err := x509svid.Verify(chain, roots)
		if err != nil || id.String() != "spiffe://example.org/web" {
			t.Fatalf("x509svid.Verify: %v %v", id, err)
		}
		leaf := chain[0]
		if leaf.IsCA || len(leaf.URIs) != 1 || len(leaf.DNSNames) != 1 || leaf.DNSNames[0] != "web.example.org" ||
			leaf.NotAfter.Sub(leaf.NotBefore) > 11*time.Minute || len(leaf.ExtKeyUsage) != 2 || chain[1].Subject.CommonName != "node-2" {
			t.Fatalf("leaf %d: CA=%v URIs=%v DNS=%v life=%v EKU=%v issuer=%s", i, leaf.IsCA, leaf.URIs, leaf.DNSNames,
				leaf.NotAfter.Sub(leaf.NotBefore), leaf.ExtKeyUsage, chain[1].Subject)
		}
		serials = append(serials, leaf.SerialNumber.Text(16))
		if i == 0 {
			dir := t.TempDir()
			write := func(name string, c *x509.Certificate) string {
				p := filepath.Join(dir, name)
				if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}), 0o644); err != nil {
					t.Fatal(err)
				}
				return p
			}
			out, err := exec.Command("openssl", "verify", "-CAfile", ic.tr.RootPath, "-untrusted", write("inter.pem", chain[1]), write("leaf.pem", leaf)).CombinedOutput()
			if err != nil || !strings.Contains(string(out), ": OK") {
				t.Fatalf("openssl verify: %v %s", err, out)
			}
		}
	}
	for i, want := range map[int]string{2: "not this agent", 3: "signature does not verify", 4: "asks for"} {
		if !strings.Contains(res.Results[i].Error, want) || len(res.Results[i].Chain) != 0 {
			t.Errorf("request %d: %+v, want refusal %q", i, res.Results[i], want)
		}
	}
	// The audit records were committed before the answer: another node
	// has them now.
	acts := auditActions(t, ic.c, "node-3")
	issued := map[string]bool{}
	for _, r := range acts["svid.x509.issue"] {
		issued[r.Detail["serial"]] = r.Detail["agent"] == agentID && r.Detail["entry"] == web.ID && r.Detail["expires"] != ""
	}
	for _, s := range serials {
		if !issued[s] {
			t.Fatalf("issuance of serial %s is not audited on node-3: %v", s, acts["svid.x509.issue"])
		}
	}
	if n := len(acts["svid.x509.refuse"]); n != 3 {
		t.Fatalf("%d refusals audited, want 3", n)
	}

	// Revocation by serial: node-2's CRL lists it, signed by its issuing CA.
	if _, err := ic.c.Admin("node-1").SVIDRevoke(ctx, &api.RevokeRequest{Serial: serials[0]}); err != nil {
		t.Fatal(err)
	}
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}}
	clustertest.Eventually(t, 10*time.Second, "the CRL to list the serial", func() bool {
		resp, err := client.Get("https://" + ic.c.Node("node-2").BundleAddr() + "/crl")
		if err != nil {
			return false
		}
		defer func() { _ = resp.Body.Close() }()
		der, _ := io.ReadAll(resp.Body)
		crl, err := x509.ParseRevocationList(der)
		if err != nil || crl.CheckSignatureFrom(ic.tr.Nodes["node-2"].Issuing) != nil {
			return false
		}
		for _, e := range crl.RevokedCertificateEntries {
			if e.SerialNumber.Text(16) == serials[0] {
				return true
			}
		}
		return false
	})

	// The bundle endpoint serves the SPIFFE bundle document.
	resp, err := client.Get("https://" + ic.c.Node("node-3").BundleAddr() + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, err := io.ReadAll(resp.Body)
	_ = resp.Body.Close() // read to the end
	if err != nil {
		t.Fatal(err)
	}
	b, err := spiffebundle.Parse(ic.tr.TrustDomain, body)
	if err != nil || len(b.X509Authorities()) != 1 || !b.X509Authorities()[0].Equal(ic.tr.Root) {
		t.Fatalf("bundle endpoint: %v %s", err, body)
	}
	if seq, ok := b.SequenceNumber(); !ok || seq == 0 {
		t.Fatal("bundle has no sequence number")
	}
}

func TestJWTSVIDAndRotation(t *testing.T) {
	ic := newIssuer(t, "jw")
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	ag := ic.agent(t, "node-1")
	first, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	jwtBundle := func() *jwtbundle.Bundle { return ic.jwtBundle(t, "node-3") }
	svid, err := jwtsvid.ParseAndValidate(first.Token, jwtBundle(), []string{"db"})
	if err != nil || svid.ID.String() != "spiffe://example.org/web" {
		t.Fatalf("jwtsvid.ParseAndValidate: %v %v", svid, err)
	}
	if _, err := jwtsvid.ParseAndValidate(first.Token, jwtBundle(), []string{"other"}); err == nil {
		t.Fatal("token valid for the wrong audience")
	}
	if got := time.Until(svid.Expiry); got > 5*time.Minute+time.Second || got < 4*time.Minute {
		t.Fatalf("token lifetime %v, want the 5 minute default", got)
	}

	// Rotate: a new key is published (the bundle now holds both) and signs
	// from now on; the old token still validates.
	kid, err := ic.c.Node("node-1").JWTRotate(ctx)
	if err != nil {
		t.Fatal(err)
	}
	second, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	b := jwtBundle()
	if len(b.JWTAuthorities()) < 2 {
		t.Fatalf("bundle after rotation has %d JWT keys", len(b.JWTAuthorities()))
	}
	if _, err := jwtsvid.ParseAndValidate(first.Token, b, []string{"db"}); err != nil {
		t.Fatalf("token from before the rotation: %v", err)
	}
	s2, err := jwtsvid.ParseAndValidate(second.Token, b, []string{"db"})
	if err != nil {
		t.Fatal(err)
	}
	if s2.ID != svid.ID {
		t.Fatal("second token is for another ID")
	}
	if got := tokenKID(t, second.Token); got != kid {
		t.Fatalf("token after rotation signed with %s, want the new key %s", got, kid)
	}
	if tokenKID(t, first.Token) == kid {
		t.Fatal("token before rotation claims the new key")
	}

	// Empty audience: refused and audited.
	if _, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("empty audience: %v", err)
	}
	acts := auditActions(t, ic.c, "node-2")
	if len(acts["svid.jwt.issue"]) != 2 || len(acts["svid.jwt.refuse"]) != 1 || len(acts["bundle.jwt.add"]) < 2 {
		t.Fatalf("audit: issue %d, refuse %d, keys %d", len(acts["svid.jwt.issue"]), len(acts["svid.jwt.refuse"]), len(acts["bundle.jwt.add"]))
	}
}

func tokenKID(t *testing.T, tok string) string {
	b, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[0])
	if err != nil {
		t.Fatal(err)
	}
	var hdr struct{ Alg, Kid string }
	if err := json.Unmarshal(b, &hdr); err != nil || hdr.Alg != "ES256" {
		t.Fatalf("JWT header %s: %v", b, err)
	}
	return hdr.Kid
}

func TestBanAndNoQuorum(t *testing.T) {
	ic := newIssuer(t, "ban")
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	ag := ic.agent(t, "node-3")

	// The sync stream delivers the agent's entries at once, and changes.
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := ag.Sync(sctx, &api.SyncRequest{})
	if err != nil {
		t.Fatal(err)
	}
	// Updates arrive as this node applies changes; read until the view
	// holds what was written.
	recvUntil := func(entries int) *api.SyncUpdate {
		t.Helper()
		deadline := time.AfterFunc(10*time.Second, cancel)
		defer deadline.Stop()
		for {
			u, err := stream.Recv()
			if err != nil {
				t.Fatalf("sync: waiting for %d entries: %v", entries, err)
			}
			if len(u.Entries) == entries {
				return u
			}
		}
	}
	u := recvUntil(1)
	if u.Entries[0].ID != web.ID || len(u.Bundle.Roots) != 1 || len(u.SPIFFE) == 0 {
		t.Fatalf("first sync: %+v", u)
	}
	ic.entry(t, "spiffe://example.org/api", agentID)
	if u2 := recvUntil(2); u2.Revision <= u.Revision {
		t.Fatalf("second sync revision %d after %d", u2.Revision, u.Revision)
	}

	if _, err := ic.c.Admin("node-1").AgentBan(ctx, &api.IDRequest{ID: agentID}); err != nil {
		t.Fatal(err)
	}
	// At once, on any node.
	_, err = ag.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrFor(t, "")}}})
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "banned") {
		t.Fatalf("banned agent: %v", err)
	}
	if _, err := stream.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("sync stream of a banned agent: %v", err)
	}
	acts := auditActions(t, ic.c, "node-1")
	found := false
	for _, r := range acts["svid.x509.refuse"] {
		found = found || strings.HasPrefix(r.Detail["reason"], "agent is banned")
	}
	if !found {
		t.Fatal("banned agent's request not audited")
	}
	if _, err := ic.c.Admin("node-1").AgentUnban(ctx, &api.IDRequest{ID: agentID}); err != nil {
		t.Fatal(err)
	}

	// A node that cannot reach a quorum issues nothing.
	ic.c.Stop("node-1")
	ic.c.Stop("node-2")
	qctx, qcancel := context.WithTimeout(ctx, 15*time.Second)
	defer qcancel()
	res, err := ag.SignX509SVIDs(qctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrFor(t, "")}}})
	if status.Code(err) != codes.Unavailable || res != nil {
		t.Fatalf("minority node: %v %+v", err, res)
	}
	jctx, jcancel := context.WithTimeout(ctx, 15*time.Second)
	defer jcancel()
	if _, err := ag.SignJWTSVID(jctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}}); status.Code(err) != codes.Unavailable {
		t.Fatalf("minority node JWT: %v", err)
	}
}

// The schedule rotates keys by itself: with a 2 s signing period a new key
// is published and used, and tokens from the old one still validate.
func TestJWTRotationSchedule(t *testing.T) {
	ic := newIssuerWith(t, "jr", func(c *node.Config) { c.JWT.RotateEvery = node.Duration{Duration: 2 * time.Second} })
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	ag := ic.agent(t, "node-1")
	first, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	var later *api.JWTSVIDResult
	clustertest.Eventually(t, 20*time.Second, "a token from a rotated key", func() bool {
		later, err = ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
		return err == nil && tokenKID(t, later.Token) != tokenKID(t, first.Token)
	})
	b := ic.jwtBundle(t, "node-2")
	for _, tok := range []string{first.Token, later.Token} {
		if _, err := jwtsvid.ParseAndValidate(tok, b, []string{"db"}); err != nil {
			t.Fatalf("token %s after scheduled rotation: %v", tokenKID(t, tok), err)
		}
	}
}

// An agent whose node has lost its quorum is told only that this node
// cannot sign now; why (raft's errors, no leader) is in the node's log,
// with the request and the agent.
func TestInternalFailureShownGeneric(t *testing.T) {
	ic := newIssuer(t, "ig")
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	ag := ic.agent(t, "node-3")
	clustertest.Eventually(t, 10*time.Second, "node-3 to know the entry", func() bool {
		_, ok := ic.c.Node("node-3").State().Entry(web.ID)
		return ok
	})
	ic.c.Stop("node-1")
	ic.c.Stop("node-2")
	// The agent is told which kind of cluster failure (as the node sees it
	// at that moment: a commit that fails, then no leader), in one of the
	// fixed messages, never raft's words; signing itself works here, so
	// never that signing is unavailable.
	generic := []string{
		"this node has no cluster leader now, try another",
		"this node cannot catch up with the cluster now (no quorum, or overloaded), try another",
		"the cluster cannot commit now (no quorum, or overloaded), try another",
	}
	check := func(what string, err error) {
		t.Helper()
		st, _ := status.FromError(err)
		if st.Code() != codes.Unavailable || !slices.Contains(generic, st.Message()) {
			t.Fatalf("%s on a node without quorum: %v, want Unavailable with one of %q", what, err, generic)
		}
	}
	qctx, qcancel := context.WithTimeout(ctx, 20*time.Second)
	defer qcancel()
	res, err := ag.SignX509SVIDs(qctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrFor(t, "")}}})
	if res != nil {
		t.Fatalf("minority node answered: %+v", res)
	}
	check("X.509-SVID batch", err)
	_, err = ag.SignJWTSVID(qctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
	check("JWT-SVID", err)
	// An entry the node does not know sends it to the read barrier, which
	// cannot complete.
	_, err = ag.SignJWTSVID(qctx, &api.JWTSVIDRequest{EntryID: "no-such-entry", Audience: []string{"db"}})
	check("JWT-SVID for an unknown entry", err)
	// Sync reads this replica and needs no quorum, but once the node knows
	// no leader it refuses, saying so.
	clustertest.Eventually(t, 10*time.Second, "node-3 to lose its leader", func() bool { return ic.c.Node("node-3").Raft().LeaderID() == "" })
	stream, err := ag.Sync(qctx, &api.SyncRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if st, _ := status.FromError(err); st.Code() != codes.Unavailable || st.Message() != generic[0] {
		t.Fatalf("Sync on a node without a leader: %v, want Unavailable %q", err, generic[0])
	}

	// The detail is in the node's log, at error level, naming the request
	// and the agent.
	for _, req := range []string{"svid.x509", "svid.jwt"} {
		found := false
		for _, line := range strings.Split(ic.c.Log.String(), "\n") {
			var rec map[string]any
			if json.Unmarshal([]byte(line), &rec) != nil {
				continue
			}
			if rec["level"] == "ERROR" && rec["request"] == req && rec["agent"] == agentID &&
				(rec["err"] != nil || strings.Contains(rec["msg"].(string), "no leader")) {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("no error logged with the detail of the failed %s request:\n%s", req, ic.c.Log.String())
		}
	}
}

// svidLoad asks a node for one X.509-SVID at a time, every so often,
// verifying each against a bundle: requests that succeed, those that
// fail (and the first error), and the issuing CA of the last SVID.
type svidLoad struct {
	ok, failed atomic.Int64
	lastIssuer atomic.Pointer[x509.Certificate]
	firstErr   atomic.Value
	stop       chan struct{}
	once       sync.Once
	wg         sync.WaitGroup
}

func startSVIDLoad(t testing.TB, ag *api.AgentClient, entryID string, every time.Duration, bundle *x509bundle.Bundle) *svidLoad {
	l := &svidLoad{stop: make(chan struct{})}
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(every):
			}
			rctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			res, err := ag.SignX509SVIDs(rctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: entryID, CSR: csrFor(t, "")}}})
			cancel()
			if err == nil && res.Results[0].Error != "" {
				err = fmt.Errorf("%s", res.Results[0].Error)
			}
			var chain []*x509.Certificate
			if err == nil {
				for _, der := range res.Results[0].Chain {
					c, perr := x509.ParseCertificate(der)
					if perr != nil {
						err = perr
						break
					}
					chain = append(chain, c)
				}
			}
			if err == nil {
				_, _, err = x509svid.Verify(chain, bundle)
			}
			if err != nil {
				l.failed.Add(1)
				l.firstErr.CompareAndSwap(nil, err.Error())
				continue
			}
			l.ok.Add(1)
			l.lastIssuer.Store(chain[1])
		}
	}()
	return l
}

// end stops the load and waits for its last request.
func (l *svidLoad) end() {
	l.once.Do(func() { close(l.stop) })
	l.wg.Wait()
}
