package node_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"errors"
	"fmt"
	"math/big"
	"net/url"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	hraft "github.com/hashicorp/raft"
	raftboltdb "github.com/hashicorp/raft-boltdb/v2"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
	"github.com/sigil-appliance/sigil/appliance/fleettest"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/keystore/pkcs11"
)

// rawCommitRate is the limit every committed write pays at least once: an
// fsync'd append to a bolt raft log on this disk, measured now.
func rawCommitRate(b *testing.B) float64 {
	store, err := raftboltdb.New(raftboltdb.Options{Path: filepath.Join(b.TempDir(), "raw.db")})
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = store.Close() }()
	data := make([]byte, 256)
	const n = 300
	start := time.Now()
	for i := 1; i <= n; i++ {
		if err := store.StoreLog(&hraft.Log{Index: uint64(i), Term: 1, Type: hraft.LogCommand, Data: data}); err != nil {
			b.Fatal(err)
		}
	}
	return n / time.Since(start).Seconds()
}

// BenchmarkEntryWrites: entries created through the admin API (gRPC over
// mutual TLS to a follower, forwarded to the leader, committed on a quorum
// of three nodes with fsync, audited), sequentially and from 64 clients.
// "x-raw-fsync" divides by one bolt fsync'd append measured in this run.
func BenchmarkEntryWrites(b *testing.B) {
	tr := clustertest.NewTrust(b, "bw", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(b, tr, "node-1", "node-2", "node-3")
	leader := c.WaitLeader(30 * time.Second)
	f := follower(c, leader)
	raw := rawCommitRate(b)
	b.Logf("raw bolt fsync'd append: %.0f/s", raw)
	var seq atomic.Int64
	for _, conc := range []int{1, 64} {
		b.Run(fmt.Sprintf("concurrent-%d", conc), func(b *testing.B) {
			clients := make([]*api.AdminClient, conc)
			for i := range clients {
				clients[i] = c.Admin(f)
			}
			lat := make([]time.Duration, b.N)
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			for g := 0; g < conc; g++ {
				wg.Add(1)
				go func(cl *api.AdminClient) {
					defer wg.Done()
					for {
						i := next.Add(1) - 1
						if i >= int64(b.N) {
							return
						}
						start := time.Now()
						if _, err := cl.EntryCreate(context.Background(), entryFor(int(seq.Add(1)))); err != nil {
							b.Error(err)
							return
						}
						lat[i] = time.Since(start)
					}
				}(clients[g])
			}
			wg.Wait()
			rate := float64(b.N) / b.Elapsed().Seconds()
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(rate, "writes/s")
			b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
			b.ReportMetric(rate/raw, "x-raw-fsync")
		})
	}
}

// BenchmarkFailover: from stopping the leader to the first write
// acknowledged by the new one (500 ms heartbeat/election timeouts), then
// the old leader is restarted and caught up for the next round.
func BenchmarkFailover(b *testing.B) {
	tr := clustertest.NewTrust(b, "bf", []string{"node-1", "node-2", "node-3"}, nil)
	c := clustertest.NewCluster(b, tr, "node-1", "node-2", "node-3")
	// Set up once in the parent: a benchmark without sub-benchmarks runs
	// its body more than once.
	b.Run("3-nodes", func(b *testing.B) { failover(b, c) })
}

var failoverSeq atomic.Int64

func failover(b *testing.B, c *clustertest.Cluster) {
	var times []time.Duration
	for i := 0; i < b.N; i++ {
		leader := c.WaitLeader(30 * time.Second)
		survivor := follower(c, leader)
		adm := c.Admin(survivor)
		start := time.Now()
		c.Stop(leader)
		e := entryFor(int(100000 + failoverSeq.Add(1)))
		for {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := adm.EntryCreate(ctx, e)
			cancel()
			if err == nil {
				break
			}
			if status.Code(err) == codes.FailedPrecondition || status.Code(err) == codes.InvalidArgument {
				b.Fatalf("write refused during failover: %v", err)
			}
			if time.Since(start) > time.Minute {
				b.Fatalf("no leader accepted a write within a minute: %v", err)
			}
		}
		times = append(times, time.Since(start))
		c.Start(leader)
		c.WaitLeader(30 * time.Second)
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	b.ReportMetric(float64(times[len(times)/2].Milliseconds()), "failover-ms")
	b.ReportMetric(float64(times[len(times)-1].Milliseconds()), "max-failover-ms")
}

// BenchmarkX509Issuance: X.509-SVIDs per second through the agent API
// (mutual TLS, CSR checks, HSM signature, audit committed on a quorum of
// three nodes) on a follower, against the raw rate of building and signing
// the same leaf in process with the same SoftHSM key, measured in this run.
// "single" is one SVID per request (a workload's first SVID, or agents
// renewing one at a time), each caller with its own connection as agents
// have; "batch" is how sigil-agent asks when several are due.
func BenchmarkX509Issuance(b *testing.B) {
	ic := newIssuer(b, "bi")
	web := ic.entry(b, "spiffe://example.org/web", agentID)
	node := follower(ic.c, ic.c.WaitLeader(30*time.Second))
	csrs := make([][]byte, 256)
	for i := range csrs {
		csrs[i] = csrFor(b, "")
	}
	csr0, _ := x509.ParseCertificateRequest(csrs[0])
	id := spiffeid.RequireFromString(web.SPIFFEID)
	auth := ic.c.Node(node).Authority()
	var raw float64
	b.Run("raw-hsm-sign", func(b *testing.B) {
		parallel(b, 4, func() error {
			_, err := auth.Sign(ca.Leaf{ID: id, PublicKey: csr0.PublicKey, TTL: time.Hour})
			return err
		})
		raw = float64(b.N) / b.Elapsed().Seconds()
		b.ReportMetric(raw, "svids/s")
	})
	// The same leaf through x509.CreateCertificate with the same HSM key,
	// which verifies every signature it gets back: how the authority
	// signed before its own encoder (ca/leaf.go).
	b.Run("raw-hsm-createcert", func(b *testing.B) {
		ks := pkcs11.New(pkcs11.Options{})
		defer func() { _ = ks.Close() }()
		signer, err := ks.Signer(context.Background(), ic.tr.Nodes[node].KeyURI)
		if err != nil {
			b.Fatal(err)
		}
		issuing := ic.tr.Nodes[node].Issuing
		parallel(b, 4, func() error {
			sn, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
			_, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{SerialNumber: sn, NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour),
				KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
				BasicConstraintsValid: true, URIs: []*url.URL{id.URL()}}, issuing, csr0.PublicKey, signer)
			return err
		})
		rate := float64(b.N) / b.Elapsed().Seconds()
		b.ReportMetric(rate, "svids/s")
		if raw > 0 {
			b.ReportMetric(rate/raw, "x-raw-hsm-sign")
		}
	})
	// Agents keep their connections: each caller's is opened and used
	// once before any timing (a sub-benchmark's body runs once per b.N
	// tried, and handshakes are not issuance).
	conns := make([]*api.AgentClient, 64)
	for i := range conns {
		conns[i] = ic.agent(b, node)
		if err := x509Batch(conns[i], &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csrs[0]}}}); err != nil {
			b.Fatal(err)
		}
	}
	for _, v := range []struct {
		name           string
		callers, batch int
	}{{"agent-api-single-4", 4, 1}, {"agent-api-single-64", 64, 1}, {"agent-api-batch-64", 4, 64}} {
		b.Run(v.name, func(b *testing.B) {
			clients := conns[:v.callers]
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			for g := 0; g < v.callers; g++ {
				wg.Add(1)
				go func(cl *api.AgentClient) {
					defer wg.Done()
					for {
						n := int(min(int64(v.batch), int64(b.N)-next.Add(int64(v.batch))+int64(v.batch)))
						if n <= 0 {
							return
						}
						req := &api.X509SVIDBatch{}
						for i := 0; i < n; i++ {
							req.Requests = append(req.Requests, api.X509SVIDRequest{EntryID: web.ID, CSR: csrs[i%len(csrs)]})
						}
						if err := x509Batch(cl, req); err != nil {
							b.Error(err)
							return
						}
					}
				}(clients[g])
			}
			wg.Wait()
			rate := float64(b.N) / b.Elapsed().Seconds()
			b.ReportMetric(rate, "svids/s")
			if raw > 0 {
				b.ReportMetric(rate/raw, "x-raw-hsm-sign")
			}
		})
	}
}

// x509Batch asks for a batch and fails on any refusal in it.
func x509Batch(cl *api.AgentClient, req *api.X509SVIDBatch) error {
	res, err := cl.SignX509SVIDs(context.Background(), req)
	if err != nil {
		return err
	}
	for _, r := range res.Results {
		if r.Error != "" {
			return errors.New(r.Error)
		}
	}
	return nil
}

// BenchmarkIssuanceLatency: how long one X.509-SVID takes from one caller
// asking a follower for one at a time, against the smallest command there
// is (an audit append of one event with nothing but an action) committed
// through the same three-node raft from its leader in this run: the least
// any audited issuance must wait. x-one-commit is the ratio of the p50s.
func BenchmarkIssuanceLatency(b *testing.B) {
	ic := newIssuer(b, "bl")
	web := ic.entry(b, "spiffe://example.org/web", agentID)
	leader := ic.c.WaitLeader(30 * time.Second)
	node := follower(ic.c, leader)
	csr := csrFor(b, "")
	var commitP50 time.Duration
	b.Run("raft-one-commit", func(b *testing.B) {
		r := ic.c.Node(leader).Raft()
		actor := "spiffe://example.org/sigil/node/" + leader
		lat := timed(b, func() error {
			cmd, err := state.NewCommand(state.CmdAudit, actor, time.Now(), state.AuditAppend{Events: []state.AuditEvent{{Action: "bench.commit"}}})
			if err == nil {
				_, err = r.Apply(context.Background(), cmd)
			}
			return err
		})
		commitP50 = reportLatency(b, lat)
	})
	b.Run("single-1", func(b *testing.B) {
		cl := ic.agent(b, node)
		req := &api.X509SVIDBatch{Requests: []api.X509SVIDRequest{{EntryID: web.ID, CSR: csr}}}
		lat := timed(b, func() error { return x509Batch(cl, req) })
		p50 := reportLatency(b, lat)
		if commitP50 > 0 {
			b.ReportMetric(float64(p50)/float64(commitP50), "x-one-commit")
		}
	})
}

// timed runs f b.N times in sequence and returns each call's latency,
// sorted.
func timed(b *testing.B, f func() error) []time.Duration {
	lat := make([]time.Duration, b.N)
	b.ResetTimer()
	for i := range lat {
		start := time.Now()
		if err := f(); err != nil {
			b.Fatal(err)
		}
		lat[i] = time.Since(start)
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat
}

// reportLatency reports p50 and p99 of sorted latencies and returns p50.
func reportLatency(b *testing.B, lat []time.Duration) time.Duration {
	p50 := fleettest.Quantile(lat, 0.5)
	b.ReportMetric(fleettest.Ms(p50), "p50-ms")
	b.ReportMetric(fleettest.Ms(fleettest.Quantile(lat, 0.99)), "p99-ms")
	return p50
}

// BenchmarkJWTIssuance: JWT-SVIDs per second through the agent API (mutual
// TLS, entry and audience checks, ES256 with the node's HSM-held JWT key,
// audit committed on three nodes), against the raw rate of ES256
// signatures with a key in the same SoftHSM, measured in this run.
func BenchmarkJWTIssuance(b *testing.B) {
	ic := newIssuer(b, "bj")
	web := ic.entry(b, "spiffe://example.org/web", agentID)
	node := follower(ic.c, ic.c.WaitLeader(30*time.Second))
	ks := pkcs11.New(pkcs11.Options{})
	defer func() {
		if err := ks.Close(); err != nil {
			b.Errorf("close key store: %v", err)
		}
	}()
	signer, err := ks.Signer(context.Background(), ic.tr.Nodes[node].KeyURI)
	if err != nil {
		b.Fatal(err)
	}
	var raw float64
	b.Run("raw-hsm-es256", func(b *testing.B) {
		input := []byte(`eyJhbGciOiJFUzI1NiIsImtpZCI6Im5vZGUtMiJ9.eyJzdWIiOiJzcGlmZmU6Ly9leGFtcGxlLm9yZy93ZWIifQ`)
		parallel(b, 4, func() error {
			d := sha256.Sum256(input)
			_, err := signer.Sign(rand.Reader, d[:], crypto.SHA256)
			return err
		})
		raw = float64(b.N) / b.Elapsed().Seconds()
		b.ReportMetric(raw, "sigs/s")
	})
	for _, callers := range []int{4, 64} {
		b.Run(fmt.Sprintf("agent-api-%d-callers", callers), func(b *testing.B) {
			cl := ic.agent(b, node)
			b.ResetTimer()
			parallel(b, callers, func() error {
				_, err := cl.SignJWTSVID(context.Background(), &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"bench"}})
				return err
			})
			rate := float64(b.N) / b.Elapsed().Seconds()
			b.ReportMetric(rate, "jwts/s")
			if raw > 0 {
				b.ReportMetric(rate/raw, "x-raw-hsm-es256")
			}
		})
	}
}

// parallel runs f b.N times across workers goroutines.
func parallel(b *testing.B, workers int, f func() error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	for g := 0; g < workers; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(b.N) {
				if err := f(); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
}
