package agent_test

import (
	"bytes"
	"context"
	"fmt"
	"net"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"

	"github.com/sigil-appliance/sigil/agent"
	wlapi "github.com/sigil-appliance/sigil/agent/workload"
	"github.com/sigil-appliance/sigil/appliance/api"
)

// BenchmarkWorkloadAPI measures the agent's Workload API from its cache:
//
//   - raw-grpc-unix: a bare gRPC server stream over a Unix socket in this
//     process (health Watch: open, first answer, cancel), the floor any
//     Workload API stream stands on;
//   - FetchX509SVID: open a stream and receive the first answer (peer
//     credentials, pidfd, /proc attestation, matching, response), p50/p99;
//     x-raw-p50 is raw p50 ÷ FetchX509SVID p50;
//   - cold-first-fetch: a new workload's first SVID: from its entry's
//     creation acknowledged to the first answer holding the SVID (sync to
//     the agent, attestation, key and CSR, the appliance round trip with
//     its audit commit, the answer), p50/p99; a one-node appliance here
//     (BenchmarkIssuanceLatency has the three-node round trip);
//   - streams-10k: 10,000 open FetchX509SVID streams (100 connections);
//     heap per stream (client and server share this process, so it counts
//     both ends), then forced rotations: the time from Rotate until every
//     stream has the new SVID, and the fan-out part of it (from the cache
//     holding the new SVID to the last stream receiving it).
func BenchmarkWorkloadAPI(b *testing.B) {
	e := newAgentEnv(b, "wlb", func(c *agent.Config) {
		c.WorkloadAPI.Limits = wlapi.Limits{StreamsPerCaller: 20000, RequestsPerSecond: 1e6, Burst: 1e6, ConnectionsPerCaller: 200}
	})
	e.entry(b, "/bench/root", 0, "", "unix:uid:0")
	ctx := metadata.AppendToOutgoingContext(context.Background(), "workload.spiffe.io", "true")
	dial := func(sock string) *grpc.ClientConn {
		c, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { _ = c.Close() })
		return c
	}
	first := func(wc workload.SpiffeWorkloadAPIClient) {
		sctx, cancel := context.WithCancel(ctx)
		defer cancel()
		s, err := wc.FetchX509SVID(sctx, &workload.X509SVIDRequest{})
		if err == nil {
			_, err = s.Recv()
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	wc := workload.NewSpiffeWorkloadAPIClient(dial(e.w.socket))
	first(wc) // the cache is warm

	var rawP50 time.Duration
	b.Run("raw-grpc-unix", func(b *testing.B) {
		sock := filepath.Join(b.TempDir(), "raw.sock")
		l, err := net.Listen("unix", sock)
		if err != nil {
			b.Fatal(err)
		}
		g := grpc.NewServer()
		healthpb.RegisterHealthServer(g, health.NewServer())
		go func() {
			// Serve returns nil once the deferred Stop runs.
			if err := g.Serve(l); err != nil {
				b.Error(err)
			}
		}()
		defer g.Stop()
		hc := healthpb.NewHealthClient(dial(sock))
		d := make([]time.Duration, 0, b.N)
		for i := 0; i < b.N; i++ {
			t0 := time.Now()
			wctx, cancel := context.WithCancel(ctx)
			s, err := hc.Watch(wctx, &healthpb.HealthCheckRequest{})
			if err == nil {
				_, err = s.Recv()
			}
			cancel()
			if err != nil {
				b.Fatal(err)
			}
			d = append(d, time.Since(t0))
		}
		rawP50 = pct(d, 50)
		b.ReportMetric(float64(pct(d, 50).Microseconds()), "p50-µs")
		b.ReportMetric(float64(pct(d, 99).Microseconds()), "p99-µs")
	})
	b.Run("FetchX509SVID", func(b *testing.B) {
		d := make([]time.Duration, 0, b.N)
		for i := 0; i < b.N; i++ {
			t0 := time.Now()
			first(wc)
			d = append(d, time.Since(t0))
		}
		b.ReportMetric(float64(pct(d, 50).Microseconds()), "p50-µs")
		b.ReportMetric(float64(pct(d, 99).Microseconds()), "p99-µs")
		if rawP50 > 0 {
			b.ReportMetric(float64(rawP50)/float64(pct(d, 50)), "x-raw-p50")
		}
	})

	// The cold path: an entry is registered for a workload and the
	// workload asks at once. From the entry's creation acknowledged to the
	// first answer holding its SVID: the entry reaching the agent (sync),
	// the caller attested, a key and CSR made, the appliance round trip
	// (checks, HSM signature, audit committed), the answer. The entry is
	// deleted after each round so every round starts alike.
	b.Run("cold-first-fetch", func(b *testing.B) {
		adm := e.c.Admin(e.c.WaitLeader(10 * time.Second))
		d := make([]time.Duration, 0, b.N)
		for i := 0; i < b.N; i++ {
			path := fmt.Sprintf("/bench/cold/%d", i)
			en := e.entry(b, path, 0, "", "unix:uid:0")
			t0 := time.Now()
			if err := waitFor(ctx, wc, e.td+path); err != nil {
				b.Fatal(err)
			}
			d = append(d, time.Since(t0))
			if _, err := adm.EntryDelete(ctx, &api.IDRequest{ID: en.ID}); err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(pct(d, 50).Microseconds())/1000, "p50-ms")
		b.ReportMetric(float64(pct(d, 99).Microseconds())/1000, "p99-ms")
	})

	const streams, conns = 10000, 100
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heap0, g0 := ms.HeapInuse, runtime.NumGoroutine()
	sctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var mu sync.Mutex
	latest := make([][]byte, streams)
	var got atomic.Int64
	arrived := make(chan struct{}, streams)
	var wg sync.WaitGroup
	clients := make([]workload.SpiffeWorkloadAPIClient, conns)
	for i := range clients {
		clients[i] = workload.NewSpiffeWorkloadAPIClient(dial(e.w.socket))
	}
	open := time.Now()
	for i := range streams {
		s, err := clients[i%conns].FetchX509SVID(sctx, &workload.X509SVIDRequest{})
		if err != nil {
			b.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				r, err := s.Recv()
				if err != nil {
					return
				}
				mu.Lock()
				changed := !bytes.Equal(latest[i], r.Svids[0].X509Svid)
				latest[i] = r.Svids[0].X509Svid
				mu.Unlock()
				if changed {
					got.Add(1)
					arrived <- struct{}{}
				}
			}
		}()
	}
	for range streams {
		<-arrived
	}
	opened := time.Since(open)
	runtime.GC()
	runtime.ReadMemStats(&ms)
	perStream := float64(ms.HeapInuse-heap0) / streams
	goroutines := runtime.NumGoroutine() - g0

	b.Run("streams-10k", func(b *testing.B) {
		var total, fanout time.Duration
		for i := 0; i < b.N; i++ {
			_, changed := e.a.Cache().Current()
			t0 := time.Now()
			e.a.Cache().Rotate()
			<-changed
			t1 := time.Now()
			for range streams {
				<-arrived
			}
			t2 := time.Now()
			total += t2.Sub(t0)
			fanout += t2.Sub(t1)
		}
		b.ReportMetric(float64(streams), "streams")
		b.ReportMetric(perStream/1024, "KiB/stream")
		b.ReportMetric(float64(goroutines)/streams, "goroutines/stream")
		b.ReportMetric(float64(opened.Milliseconds()), "open-all-ms")
		b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "rotation-ms")
		b.ReportMetric(float64(fanout.Milliseconds())/float64(b.N), "fanout-ms")
	})
	cancel()
	wg.Wait()
}

func pct(d []time.Duration, p int) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[min(len(s)-1, len(s)*p/100)]
}

// waitFor opens a FetchX509SVID stream and reads it until an answer holds
// an SVID for id.
func waitFor(ctx context.Context, wc workload.SpiffeWorkloadAPIClient, id string) error {
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	s, err := wc.FetchX509SVID(sctx, &workload.X509SVIDRequest{})
	if err != nil {
		return err
	}
	for {
		r, err := s.Recv()
		if err != nil {
			return fmt.Errorf("waiting for %s: %w", id, err)
		}
		for _, v := range r.Svids {
			if v.SpiffeId == id {
				return nil
			}
		}
	}
}
