package node_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/tpmverify"
	"github.com/sigil-appliance/sigil/keystore"
	"github.com/sigil-appliance/sigil/keystore/tpm"
	testenv "github.com/sigil-appliance/sigil/softhsm-testenv"
)

// An anonymous caller floods TPMHello from one address with the public
// area of an allowlisted EK and with the genuine host's own EK public area
// and certificate (no TPM, no private key: public areas are all it needs
// to be given challenges). While the flood goes on, the genuine host with
// a real swtpm joins from another address; the node's table of pending
// challenges stays bounded (one per EK and source), and the flood is
// mostly refused by the per-source rate limit. The host's second hello
// replaces its first challenge.
func TestAttackJoinChallengeFlood(t *testing.T) {
	tr := clustertest.NewTrust(t, "cf", []string{"node-1"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1")
	ctx := context.Background()
	admin := c.Admin("node-1")

	// The genuine host: its TPM vendor's EK CA is trusted.
	host := testenv.NewTPM(t)
	clustertest.TrustEKCAs(t, admin, host.EKCARoot, host.EKCAIssuer)
	k, err := tpm.Open(ctx, tpm.Config{Path: host.Socket})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = k.Close() }()
	hostEK, err := k.EndorsementKey(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// The attacker's material: the EK and AK public areas of another TPM
	// whose EK is allowlisted (a host the attacker once saw, say). The
	// attacker keeps only these bytes, not the TPM.
	var ekPub, akPub []byte
	func() {
		sw := testenv.NewTPM(t)
		k, err := tpm.Open(ctx, tpm.Config{Path: sw.Socket})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = k.Close() }()
		ek, err := k.EndorsementKey(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ak, err := k.NewAK(ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = ak.Close() }()
		ekPub, akPub = ek.Public, ak.Public
		// Its EK hash, as an operator would allowlist it.
		var cas []*x509.Certificate
		for _, p := range []string{sw.EKCARoot, sw.EKCAIssuer} {
			certs, err := api.ReadCerts(p)
			if err != nil {
				t.Fatal(err)
			}
			cas = append(cas, certs...)
		}
		verified, err := tpmverify.VerifyEK(ek.Public, ek.Cert, cas, nil)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := admin.EKAllowAdd(ctx, &api.HashRequest{Hash: verified.Hash}); err != nil {
			t.Fatal(err)
		}
		sw.Stop(t)
	}()

	addr := c.ConfigOf("node-1").API.Listen
	// The flood: 127.0.0.1, 8 connections, half with the allowlisted EK
	// and half with the genuine host's EK, until the genuine join is done
	// (bounded in count and time).
	floods := []*api.JoinTPMHello{
		{EKPublic: ekPub, AKPublic: akPub},
		{EKPublic: hostEK.Public, EKCert: hostEK.Cert, AKPublic: akPub},
	}
	const workers, maxHellos, beforeGenuine = 8, 60000, 12000
	var sent, challenged, limited atomic.Int64
	stop := make(chan struct{})
	floodErr := make(chan error, workers)
	var wg sync.WaitGroup
	floodStart := time.Now()
	for w := 0; w < workers; w++ {
		jc := joinClientFrom(t, tr, addr, "127.0.0.1")
		hello := floods[w%len(floods)]
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(floodStart) < 90*time.Second {
				select {
				case <-stop:
					return
				default:
				}
				if sent.Add(1) > maxHellos {
					return
				}
				_, err := jc.TPMHello(ctx, hello)
				switch status.Code(err) {
				case codes.OK:
					challenged.Add(1)
				case codes.ResourceExhausted:
					limited.Add(1)
				default:
					floodErr <- fmt.Errorf("flood hello: %v", err)
					return
				}
			}
		}()
	}
	stopFlood := func() {
		select {
		case <-stop:
		default:
			close(stop)
		}
		wg.Wait()
	}
	t.Cleanup(stopFlood)

	// More hellos than the node ever held challenges for before the
	// defence (10,000), so an unbounded-per-source table is full by now.
	clustertest.Eventually(t, 60*time.Second, "the flood to send its first hellos", func() bool {
		return sent.Load() >= beforeGenuine || len(floodErr) > 0
	})
	select {
	case err := <-floodErr:
		t.Fatal(err)
	default:
	}
	pendingDuring := pendingChallenges(t, c.Node("node-1").HTTPAddr())

	// The genuine host joins from 127.0.0.2 while the flood goes on.
	keyURI := "tpmkey:file=" + filepath.Join(t.TempDir(), "agent.key")
	if _, err := k.CreateKey(ctx, keystore.CreateKeyRequest{URI: keyURI, Algorithm: keystore.ECDSAP256}); err != nil {
		t.Fatal(err)
	}
	signer, err := k.Signer(ctx, keyURI)
	if err != nil {
		t.Fatal(err)
	}
	ek, err := k.EndorsementKey(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ak, err := k.NewAK(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = ak.Close() }()
	jc := joinClientFrom(t, tr, addr, "127.0.0.2")
	joinStart, sentBefore := time.Now(), sent.Load()
	hello := &api.JoinTPMHello{EKPublic: ek.Public, EKCert: ek.Cert, AKPublic: ak.Public}
	first, err := jc.TPMHello(ctx, hello)
	if err != nil {
		t.Fatalf("genuine host's first hello during the flood: %v", err)
	}
	ch, err := jc.TPMHello(ctx, hello)
	if err != nil {
		t.Fatalf("genuine host's second hello during the flood: %v", err)
	}
	// Hellos for the host's own EK from further addresses while its
	// challenge is pending (its EK certificate is all they need) do not
	// evict that challenge.
	const others = 8
	for i := 3; i < 3+others; i++ {
		if _, err := joinClientFrom(t, tr, addr, fmt.Sprintf("127.0.0.%d", i)).TPMHello(ctx, floods[1]); err != nil {
			t.Fatalf("hello for the host's EK from 127.0.0.%d: %v", i, err)
		}
	}
	cert, err := ak.Certify(ctx, keyURI, ch.Nonce)
	if err != nil {
		t.Fatal(err)
	}
	secret, err := ak.ActivateCredential(ctx, ch.IDObject, ch.EncSecret)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, signer)
	if err != nil {
		t.Fatal(err)
	}
	proof := &api.JoinTPMProof{Nonce: ch.Nonce, CertifyAttest: cert.Attest, CertifySignature: cert.Signature,
		AgentKeyPublic: cert.Public, Secret: secret, CSR: csr}
	// The second hello for this EK replaced the first challenge.
	stale := *proof
	stale.Nonce = first.Nonce
	if _, err := jc.TPMProve(ctx, &stale); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "unknown or already used nonce") {
		t.Fatalf("proof for a replaced challenge: %v, want PermissionDenied (unknown nonce)", err)
	}
	svid, err := jc.TPMProve(ctx, proof)
	if err != nil {
		t.Fatalf("genuine host's join during the flood: %v", err)
	}
	if !strings.HasPrefix(svid.AgentID, "spiffe://example.org/sigil/agent/tpm/") {
		t.Fatalf("agent ID %s", svid.AgentID)
	}
	joinTook, sentDuring := time.Since(joinStart), sent.Load()-sentBefore
	pendingAfter := pendingChallenges(t, c.Node("node-1").HTTPAddr())
	stopFlood()
	select {
	case err := <-floodErr:
		t.Fatal(err)
	default:
	}
	elapsed := time.Since(floodStart)
	t.Logf("flood: %d hellos in %v from 127.0.0.1 (%d challenged, %d rate-limited); genuine join from 127.0.0.2 took %v while %d flood hellos were sent; pending challenges %v during, %v after",
		challenged.Load()+limited.Load(), elapsed.Round(time.Millisecond), challenged.Load(), limited.Load(), joinTook.Round(time.Millisecond), sentDuring, pendingDuring, pendingAfter)
	if sentDuring == 0 {
		t.Fatal("the flood did not go on during the genuine join")
	}
	// Two EKs, one source: the flood holds at most two challenges (after
	// it, the hellos from the other addresses hold one each).
	if pendingDuring < 0 || pendingAfter < 0 {
		t.Fatal("the node does not export sigil_join_challenges_pending")
	}
	if pendingDuring > 2 || pendingAfter > 2+others {
		t.Fatalf("pending challenges %v during and %v after the flood, want at most 2 and %d (one per EK and source)", pendingDuring, pendingAfter, 2+others)
	}
	// The per-source bucket: a burst, then a steady rate.
	if max := int64(20 + 5*elapsed.Seconds() + 5); challenged.Load() > max {
		t.Fatalf("the flooding source got %d challenges in %v, want at most %d", challenged.Load(), elapsed, max)
	}
}

// joinClientFrom dials a node's API anonymously from a chosen loopback
// address, as a separate host would (the node keys its per-source limits
// by the caller's address).
func joinClientFrom(t *testing.T, tr *clustertest.Trust, addr, from string) *api.JoinClient {
	t.Helper()
	return api.NewJoinClient(anonConnFrom(t, tr, addr, from, nil))
}

// anonConnFrom is joinClientFrom's connection; wrap, if set, sees each
// TCP connection gRPC dials.
func anonConnFrom(t *testing.T, tr *clustertest.Trust, addr, from string, wrap func(net.Conn) net.Conn) *grpc.ClientConn {
	t.Helper()
	roots, err := api.ReadCerts(tr.RootPath)
	if err != nil {
		t.Fatal(err)
	}
	bundle := x509bundle.FromX509Authorities(tr.TrustDomain, roots)
	tlsCfg := &tls.Config{
		MinVersion: tls.VersionTLS13,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return &tls.Certificate{}, nil
		},
		InsecureSkipVerify: true, // verified below by SPIFFE ID, as api.Dial does
		VerifyConnection: func(cs tls.ConnectionState) error {
			raw := make([][]byte, len(cs.PeerCertificates))
			for i, c := range cs.PeerCertificates {
				raw[i] = c.Raw
			}
			id, _, err := x509svid.ParseAndVerify(raw, bundle)
			if err != nil {
				return err
			}
			if !strings.HasPrefix(id.Path(), "/sigil/node/") {
				return fmt.Errorf("%s is not a node", id)
			}
			return nil
		},
	}
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(from)}, Timeout: 5 * time.Second}
	conn, err := grpc.NewClient("passthrough:///"+addr, append(api.DialOptions(),
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) {
			c, err := d.DialContext(ctx, "tcp", a)
			if err == nil && wrap != nil {
				c = wrap(c)
			}
			return c, err
		}))...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	return conn
}

// pendingChallenges reads the node's sigil_join_challenges_pending gauge
// (-1 without one).
func pendingChallenges(t *testing.T, httpAddr string) float64 {
	t.Helper()
	return metricValue(t, httpAddr, "sigil_join_challenges_pending")
}

// metricValue reads one unlabelled metric from a node's /metrics (-1
// without it).
func metricValue(t *testing.T, httpAddr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + httpAddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = resp.Body.Close() }()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	return -1 // no such metric
}

// An anonymous caller sends 1000 TPM hellos with garbage evidence to a
// follower from one address. Each was refused only after the node
// checked the evidence and, to confirm the refusal against the latest
// policy, took a read barrier through the leader, and none was ever
// rate-limited: the per-source bucket charged only hellos that would get
// a challenge. Refused hellos now draw on a second, larger bucket per
// source (checked before the evidence), and concurrent refusals share
// their read barriers; another address is still answered on its
// evidence.
func TestAttackRefusedHelloFlood(t *testing.T) {
	tr := clustertest.NewTrust(t, "rh", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(t, tr, "node-1", "node-2", "node-3")
	target := follower(c, c.WaitLeader(30*time.Second))
	addr, httpAddr := c.ConfigOf(target).API.Listen, c.Node(target).HTTPAddr()
	ctx := context.Background()
	garbage := func() *api.JoinTPMHello {
		junk := make([]byte, 64)
		rand.Read(junk)
		return &api.JoinTPMHello{EKPublic: junk, AKPublic: junk}
	}

	const total, workers = 1000, 4
	readsBefore := metricValue(t, httpAddr, "sigil_join_read_barriers_total")
	var denied, limited atomic.Int64
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < workers; w++ {
		jc := joinClientFrom(t, tr, addr, "127.0.0.1")
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < total/workers; i++ {
				_, err := jc.TPMHello(ctx, garbage())
				switch status.Code(err) {
				case codes.PermissionDenied:
					denied.Add(1)
				case codes.ResourceExhausted:
					limited.Add(1)
				default:
					errs <- fmt.Errorf("garbage hello: %v", err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	reads := metricValue(t, httpAddr, "sigil_join_read_barriers_total") - readsBefore
	t.Logf("%d garbage hellos from one address to follower %s in %v: %d refused on their evidence, %d rate-limited; %v read barriers",
		total, target, elapsed.Round(time.Millisecond), denied.Load(), limited.Load(), reads)
	// The refused-hello bucket: a burst of 200, then 50 a second.
	if limit := int64(200 + 50*elapsed.Seconds() + 1); denied.Load() > limit {
		t.Fatalf("%d of %d garbage hellos from one address were checked and refused on their evidence in %v, want at most %d (the rest rate-limited)",
			denied.Load(), total, elapsed.Round(time.Millisecond), limit)
	}
	if readsBefore < 0 {
		t.Fatal("the node does not export sigil_join_read_barriers_total")
	}
	if reads > float64(denied.Load()) {
		t.Fatalf("%v read barriers for %d refusals", reads, denied.Load())
	}
	// Another address is not limited by the flood's bucket.
	if _, err := joinClientFrom(t, tr, addr, "127.0.0.2").TPMHello(ctx, garbage()); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("garbage hello from 127.0.0.2 after the flood: %v, want PermissionDenied (refused on its evidence)", err)
	}
}
