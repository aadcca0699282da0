package node_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/node"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// 10,000 anonymous refused joins (unknown tokens, garbage TPM evidence)
// over the real API grow the replicated audit log by a few summary
// records, not 10,000; the summaries account for every refusal, the node
// log is rate-limited, and the metric counts them. Most garbage hellos
// are refused by the source's bucket for refused hellos (class
// rate-limited) rather than on their evidence; both are anonymous
// refusals, summarized alike.
func TestAttackAnonymousJoinAuditFlood(t *testing.T) {
	// Long enough that the flood spans at most a few summaries per node.
	const interval = 8 * time.Second
	tr := clustertest.NewTrust(t, "fl", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.Audit.RefusalSummaryInterval = node.Duration{Duration: interval}
	}, "node-1", "node-2", "node-3")
	c.WaitLeader(30 * time.Second)
	ctx := context.Background()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}

	// A real token still admits an agent (its SVID signed as an agent's).
	tok, err := c.Admin("node-1").TokenCreate(ctx, &api.TokenRequest{TTL: 60})
	if err != nil {
		t.Fatal(err)
	}
	jconn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf("node-1").API.Listen, RootFile: tr.RootPath, Anonymous: true})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = jconn.Close() }()
	svid, err := api.NewJoinClient(jconn).Token(ctx, &api.JoinTokenRequest{Token: tok.Token, CSR: csr})
	if err != nil || !strings.HasPrefix(svid.AgentID, "spiffe://example.org/sigil/agent/join_token/") {
		t.Fatalf("token join: %v", err)
	}

	// A linearizable read first, so node-1's replica is current.
	if _, err := c.Admin("node-1").AuditList(ctx, &api.AuditRequest{Limit: 1}); err != nil {
		t.Fatal(err)
	}
	before, _ := c.Node("node-1").State().AuditHead()
	const total, workers = 10000, 8
	// Token joins go to node-2, TPM hellos to node-3: one reason class per
	// node.
	clients := make([]*api.JoinClient, workers)
	for w := range clients {
		target := "node-2"
		if w%2 == 1 {
			target = "node-3"
		}
		conn, err := api.Dial(api.DialConfig{Addr: c.ConfigOf(target).API.Listen, RootFile: tr.RootPath, Anonymous: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		clients[w] = api.NewJoinClient(conn)
	}
	start := time.Now()
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < total/workers; i++ {
				junk := make([]byte, 32+i%97)
				rand.Read(junk)
				var err error
				if w%2 == 0 {
					_, err = clients[w].Token(ctx, &api.JoinTokenRequest{Token: base64.RawURLEncoding.EncodeToString(junk), CSR: csr})
				} else {
					_, err = clients[w].TPMHello(ctx, &api.JoinTPMHello{EKPublic: junk, AKPublic: junk})
				}
				if code := status.Code(err); code != codes.PermissionDenied && (w%2 == 0 || code != codes.ResourceExhausted) {
					errs <- fmt.Errorf("worker %d, join %d: %v, want PermissionDenied (or, for a hello, ResourceExhausted)", w, i, err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	elapsed := time.Since(start)
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	t.Logf("%d anonymous joins refused in %v", total, elapsed.Round(time.Millisecond))

	count := func(recs []state.AuditRecord) (map[string]uint64, uint64) {
		by := map[string]uint64{}
		var sum uint64
		for _, r := range recs {
			if r.Action != "join.refuse.summary" {
				continue
			}
			n, _ := strconv.ParseUint(r.Detail["count"], 10, 64)
			by[r.Detail["class"]] += n
			sum += n
		}
		return by, sum
	}
	clustertest.Eventually(t, 2*interval+10*time.Second, "summaries to account for every refusal", func() bool {
		_, sum := count(c.Node("node-1").State().Audit(before, 0))
		return sum >= total
	})
	recs := c.Node("node-1").State().Audit(before, 0)
	by, sum := count(recs)
	// One record per (source, class) and summary interval: three classes
	// over a few intervals.
	if len(recs) > 12 {
		for _, r := range recs {
			t.Logf("%d %s %s %v", r.Seq, r.Action, r.Target, r.Detail)
		}
		t.Fatalf("the audit log grew by %d records for %d anonymous refusals", len(recs), total)
	}
	if sum != total || by["token-unknown"] != total/2 || by["ek-untrusted"]+by["rate-limited"] != total/2 || by["ek-untrusted"] == 0 {
		t.Fatalf("summaries count %d refusals (%v), want %d", sum, by, total)
	}
	for _, r := range recs {
		if r.Action != "join.refuse.summary" || r.Target != "127.0.0.1" || len(r.Detail) != 4 ||
			!strings.HasSuffix(r.Actor, "/sigil/node/node-2") && !strings.HasSuffix(r.Actor, "/sigil/node/node-3") {
			t.Fatalf("unexpected audit record %+v", r)
		}
		for _, f := range []string{"first", "last"} {
			if _, err := time.Parse(time.RFC3339, r.Detail[f]); err != nil {
				t.Fatalf("record %d: %s: %v", r.Seq, f, err)
			}
		}
	}
	t.Logf("%d summary records: %v", len(recs), by)

	// The metric, on the node that saw each class.
	for id, classes := range map[string][]string{
		"node-2": {"token-unknown"},
		"node-3": {"ek-untrusted", "rate-limited"},
	} {
		resp, err := http.Get("http://" + c.Node(id).HTTPAddr() + "/metrics")
		if err != nil {
			t.Fatal(err)
		}
		body, err := io.ReadAll(resp.Body)
		_ = resp.Body.Close() // read to the end
		if err != nil {
			t.Fatal(err)
		}
		var n uint64
		for _, line := range strings.Split(string(body), "\n") {
			for _, class := range classes {
				if v, ok := strings.CutPrefix(line, `sigil_join_refusals_total{class="`+class+`"} `); ok {
					k, _ := strconv.ParseUint(v, 10, 64)
					n += k
				}
			}
		}
		if n != total/2 {
			t.Fatalf("%s /metrics counts %d refusals of class %v, want %d", id, n, classes, total/2)
		}
	}

	// The node log took at most 20 lines a second per class and node, and
	// says how many it left out.
	logs := c.Log.String()
	lines := strings.Count(logs, `"msg":"join refused"`)
	if limit := 3 * 20 * (int(elapsed.Seconds()) + 2); lines == 0 || lines > limit {
		t.Fatalf("%d refusal lines in the node log, want 1..%d", lines, limit)
	}
	if !strings.Contains(logs, "join refusals left out of the log") {
		t.Fatal("the log does not count the refusals it left out")
	}
}

// A JWT-SVID request with too many, too long or too much audience text is
// refused before signing, saying which limit; an unknown entry ID is not
// echoed in full; the refusal records stay small.
func TestAttackOversizedJWTAudiences(t *testing.T) {
	ic := newIssuer(t, "ja")
	ctx := context.Background()
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	ag := ic.agent(t, "node-2")
	adm := ic.c.Admin("node-1")
	start, err := adm.AuditList(ctx, &api.AuditRequest{Limit: 1})
	if err != nil {
		t.Fatal(err)
	}

	a300 := strings.Repeat("a", 300)
	many := make([]string, 9)
	for i := range many {
		many[i] = fmt.Sprintf("aud-%d", i)
	}
	big := make([]string, 8)
	for i := range big {
		big[i] = a300
	}
	for _, tc := range []struct {
		name string
		aud  []string
		want string
	}{
		{"nine audiences", many, "9 audiences: at most 8"},
		{"one 300-byte audience", []string{"db", a300}, "audience 2 is 300 bytes: at most 256"},
		{"8x300 bytes", big, "2400 bytes in total: at most 2048"},
		{"control characters", []string{"db\r\nforged: log line"}, "control characters"},
		{"empty", []string{"db", ""}, "audience 2 is empty"},
	} {
		_, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: tc.aud})
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want InvalidArgument saying %q", tc.name, err, tc.want)
		}
		if err != nil && len(status.Convert(err).Message()) > 100 {
			t.Errorf("%s: %d-byte error", tc.name, len(status.Convert(err).Message()))
		}
	}

	// An unknown entry ID of 100 KB with terminal escapes: not echoed.
	hugeID := strings.Repeat("\x1b[2J\x00", 20000)
	_, err = ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: hugeID, Audience: []string{"db"}})
	msg := status.Convert(err).Message()
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(msg, "no entry") || len(msg) > 100 || strings.ContainsAny(msg, "\x1b\x00") {
		t.Fatalf("unknown entry: %v (%d bytes)", err, len(msg))
	}
	res, err := ag.SignX509SVIDs(ctx, &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: hugeID, CSR: csrFor(t, "")}}})
	if err != nil {
		t.Fatal(err)
	}
	if e := res.Results[0].Error; !strings.Contains(e, "no entry") || len(e) > 100 || strings.ContainsAny(e, "\x1b\x00") {
		t.Fatalf("unknown X.509 entry: %q (%d bytes)", e, len(e))
	}

	// The largest allowed request still signs: 8 audiences, 2 KiB.
	largest := make([]string, 8)
	for i := range largest {
		largest[i] = strings.Repeat(string(rune('a'+i)), 256)
	}
	if _, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: largest}); err != nil {
		t.Fatalf("8 audiences of 256 bytes: %v", err)
	}

	recs, err := adm.AuditList(ctx, &api.AuditRequest{After: start.Head})
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, r := range recs.Records {
		kinds[r.Action]++
		b, _ := json.Marshal(r)
		limit := 1024
		if r.Action == "svid.jwt.issue" {
			limit = 3072 // the audiences it was issued for, at most 2 KiB
		}
		if len(b) > limit {
			t.Errorf("%s record is %d bytes", r.Action, len(b))
		}
		if len(r.Detail["reason"]) > 256 || strings.Contains(string(b), a300) || strings.Contains(r.Detail["entry"], "\x1b") {
			t.Errorf("record echoes the request: %s", b)
		}
	}
	if kinds["svid.jwt.refuse"] != 6 || kinds["svid.x509.refuse"] != 1 || kinds["svid.jwt.issue"] != 1 {
		t.Fatalf("audit records written: %v", kinds)
	}
}

// With audit.checkpoint-every 50 the leader signs the chain head after
// enough records; the signature verifies with its issuing certificate over
// state.CheckpointDigest, and every node has the checkpoint.
func TestAuditCheckpointSigned(t *testing.T) {
	tr := clustertest.NewTrust(t, "cp", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewClusterWith(t, tr, func(cfg *node.Config) {
		cfg.Audit.CheckpointEvery = 50
		cfg.Audit.CheckpointInterval = node.Duration{Duration: time.Hour}
	}, "node-1", "node-2", "node-3")
	leader := c.WaitLeader(30 * time.Second)
	ctx := context.Background()
	adm := c.Admin(leader)
	for i := 0; i < 80; i++ {
		if _, err := adm.EntryCreate(ctx, entryFor(i)); err != nil {
			t.Fatal(err)
		}
	}
	clustertest.Eventually(t, 20*time.Second, "a checkpoint on every node", func() bool {
		for _, id := range c.Running() {
			if c.Node(id).State().LastCheckpoint() < 50 {
				return false
			}
		}
		return true
	})

	// The committed checkpoint records, as an auditor reads them.
	recs, err := c.Admin("node-3").AuditList(ctx, &api.AuditRequest{})
	if err != nil {
		t.Fatal(err)
	}
	bySeq := map[uint64]api.AuditRecord{}
	var cps []api.AuditRecord
	for _, r := range recs.Records {
		bySeq[r.Seq] = r
		if r.Action == state.CmdAuditCheckpoint {
			cps = append(cps, r)
		}
	}
	if len(cps) == 0 {
		t.Fatal("no checkpoint record")
	}
	var prev uint64
	for _, r := range cps {
		seq, _ := strconv.ParseUint(r.Detail["seq"], 10, 64)
		if seq-prev < 50 {
			t.Errorf("checkpoint at %d, %d records after the one before", seq, seq-prev)
		}
		prev = seq
		if head := bySeq[seq]; head.Hash != r.Detail["hash"] || seq == 0 {
			t.Fatalf("checkpoint %d names hash %.16s, the record there has %.16s", seq, r.Detail["hash"], head.Hash)
		}
		node := r.Detail["node"]
		if !strings.HasSuffix(r.Actor, "/sigil/node/"+node) || tr.Nodes[node] == nil {
			t.Fatalf("checkpoint by %s for node %q", r.Actor, node)
		}
		sig, err := base64.StdEncoding.DecodeString(r.Detail["signature"])
		if err != nil {
			t.Fatal(err)
		}
		cert, err := base64.StdEncoding.DecodeString(r.Detail["cert"])
		if err != nil || !bytes.Equal(cert, tr.Nodes[node].Issuing.Raw) {
			t.Fatalf("checkpoint %d carries another certificate than %s's issuing CA: %v", seq, node, err)
		}
		issuing := tr.Nodes[node].Issuing
		digest := state.CheckpointDigest(tr.TrustDomain.Name(), seq, r.Detail["hash"])
		pub, ok := issuing.PublicKey.(*ecdsa.PublicKey)
		if !ok || !ecdsa.VerifyASN1(pub, digest, sig) {
			t.Fatalf("checkpoint %d: signature does not verify with %s's issuing certificate", seq, node)
		}
		if ca.VerifyCheckpoint(issuing, state.CheckpointDigest(tr.TrustDomain.Name(), seq+1, r.Detail["hash"]), sig) == nil {
			t.Fatal("checkpoint signature verifies for another sequence number")
		}
	}
	if last := c.Node("node-3").State().LastCheckpoint(); last != prev {
		t.Fatalf("LastCheckpoint %d, newest checkpoint record %d", last, prev)
	}
	// The leader logged it.
	if !strings.Contains(c.Log.String(), `"msg":"audit checkpoint"`) {
		t.Fatal("checkpoint not logged")
	}
}
