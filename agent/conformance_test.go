package agent_test

import (
	"context"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/clustertest"
)

// The Workload API measured against the SPIFFE specs with clients no one
// here wrote: go-spiffe's workloadapi client, the Workload API's generated
// gRPC client (go-spiffe's, which, unlike the workloadapi client, shows
// the response as sent, duplicate hints included) and grpc's reflection
// client. One agent serves the caller (this test, uid 0):
//
//   - hints are unique within a response (a MUST of the Workload API
//     spec): of two entries with hint "db", only the older one's SVID is
//     sent, in FetchX509SVID and in FetchJWTSVID; entries without a hint
//     are all sent;
//   - an entry's IP SANs are in the X.509-SVID go-spiffe's client gets;
//   - server reflection (a SHOULD of the Workload Endpoint spec) lists the
//     Workload API to a client that sends no security header, and
//     describes nothing but what the socket serves.
//
// The per-caller limits answering Unavailable are TestWorkloadAPILimits'.
func TestWorkloadAPIConformance(t *testing.T) {
	e := newAgentEnv(t, "conf", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	create := func(path, hint string, ips ...string) *api.Entry {
		t.Helper()
		r := &api.EntryRequest{Entry: api.Entry{SPIFFEID: e.td + path, ParentID: e.id, Hint: hint, IPAddresses: ips,
			Selectors: []api.Selector{{Type: "unix", Value: "uid:0"}}}}
		en, err := e.c.Admin(e.c.WaitLeader(10*time.Second)).EntryCreate(ctx, r)
		if err != nil {
			t.Fatal(err)
		}
		return en
	}
	older := create("/conf/db", "db", "10.0.0.5", "fd00::1")
	newer := create("/conf/db-replica", "db")
	create("/conf/plain-1", "")
	create("/conf/plain-2", "")
	want := []string{older.SPIFFEID + "#db", e.td + "/conf/plain-1#", e.td + "/conf/plain-2#"}

	conn, err := grpc.NewClient("unix://"+e.w.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	wc := workload.NewSpiffeWorkloadAPIClient(conn)
	hdr := metadata.AppendToOutgoingContext(ctx, "workload.spiffe.io", "true")

	t.Run("hints unique in FetchX509SVID", func(t *testing.T) {
		// The stream sends again as SVIDs are signed: wait for the three
		// it should end with, and check every response on the way.
		sctx, scancel := context.WithCancel(hdr)
		defer scancel()
		s, err := wc.FetchX509SVID(sctx, &workload.X509SVIDRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for {
			r, err := s.Recv()
			if err != nil {
				t.Fatalf("stream ended before the three SVIDs: %v", err)
			}
			var got []string
			for _, v := range r.Svids {
				got = append(got, v.SpiffeId+"#"+v.Hint)
				if v.SpiffeId == newer.SPIFFEID {
					t.Fatalf("the newer entry with hint %q was sent: %q", newer.Hint, got)
				}
			}
			if slices.Equal(got, want) {
				break
			}
		}
		svids, err := e.client(t).FetchX509SVIDs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, s := range svids {
			got = append(got, s.ID.String()+"#"+s.Hint)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("go-spiffe's client got %q, want %q", got, want)
		}
	})

	t.Run("hints unique in FetchJWTSVID", func(t *testing.T) {
		r, err := wc.FetchJWTSVID(hdr, &workload.JWTSVIDRequest{Audience: []string{"svc-conf"}})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, v := range r.Svids {
			got = append(got, v.SpiffeId+"#"+v.Hint)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("FetchJWTSVID sent %q, want %q", got, want)
		}
		// Named by its ID, the newer entry still gets its token: the
		// response has one SVID, so its hint is unique in it.
		r, err = wc.FetchJWTSVID(hdr, &workload.JWTSVIDRequest{Audience: []string{"svc-conf"}, SpiffeId: newer.SPIFFEID})
		if err != nil || len(r.Svids) != 1 || r.Svids[0].SpiffeId != newer.SPIFFEID || r.Svids[0].Hint != "db" {
			t.Fatalf("FetchJWTSVID for %s: %v %v", newer.SPIFFEID, r, err)
		}
		svids, err := e.client(t).FetchJWTSVIDs(ctx, jwtsvid.Params{Audience: "svc-conf"})
		if err != nil {
			t.Fatal(err)
		}
		got = nil
		for _, s := range svids {
			got = append(got, s.ID.String()+"#"+s.Hint)
		}
		if !slices.Equal(got, want) {
			t.Fatalf("go-spiffe's client got %q, want %q", got, want)
		}
	})

	t.Run("IP SANs in the X.509-SVID", func(t *testing.T) {
		svids, err := e.client(t).FetchX509SVIDs(ctx)
		if err != nil {
			t.Fatal(err)
		}
		i := slices.IndexFunc(svids, func(s *x509svid.SVID) bool { return s.ID.String() == older.SPIFFEID })
		if i < 0 {
			t.Fatalf("no SVID for %s", older.SPIFFEID)
		}
		leaf := svids[i].Certificates[0]
		if len(leaf.IPAddresses) != 2 || !leaf.IPAddresses[0].Equal(net.ParseIP("10.0.0.5")) || !leaf.IPAddresses[1].Equal(net.ParseIP("fd00::1")) {
			t.Fatalf("leaf IP SANs %v, want [10.0.0.5 fd00::1]", leaf.IPAddresses)
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != older.SPIFFEID {
			t.Fatalf("leaf URIs %v", leaf.URIs)
		}
		// An entry change reaches the SVID: the agent re-signs it.
		en, err := e.c.Admin(e.c.WaitLeader(10*time.Second)).EntryShow(ctx, &api.IDRequest{ID: older.ID})
		if err != nil {
			t.Fatal(err)
		}
		en.IPAddresses = []string{"192.0.2.7"}
		if _, err := e.c.Admin(e.c.WaitLeader(10*time.Second)).EntryUpdate(ctx, &api.EntryRequest{Entry: *en}); err != nil {
			t.Fatal(err)
		}
		clustertest.Eventually(t, 20*time.Second, "SVID re-signed with the new IP SAN", func() bool {
			svids, err := e.client(t).FetchX509SVIDs(ctx)
			if err != nil {
				return false
			}
			i := slices.IndexFunc(svids, func(s *x509svid.SVID) bool { return s.ID.String() == older.SPIFFEID })
			ips := svids[max(i, 0)].Certificates[0].IPAddresses
			return i >= 0 && len(ips) == 1 && ips[0].Equal(net.ParseIP("192.0.2.7"))
		})
	})

	t.Run("server reflection", func(t *testing.T) {
		// No security header: generic tools such as grpcurl send none.
		rs, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ask := func(req *reflectionpb.ServerReflectionRequest) *reflectionpb.ServerReflectionResponse {
			t.Helper()
			if err := rs.Send(req); err != nil {
				t.Fatal(err)
			}
			r, err := rs.Recv()
			if err != nil {
				t.Fatal(err)
			}
			return r
		}
		r := ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
		var names []string
		for _, s := range r.GetListServicesResponse().GetService() {
			names = append(names, s.Name)
		}
		if !slices.Contains(names, "SpiffeWorkloadAPI") {
			t.Fatalf("reflection lists %q, not SpiffeWorkloadAPI", names)
		}
		for _, n := range names {
			if n != "SpiffeWorkloadAPI" && !strings.HasPrefix(n, "grpc.reflection.") {
				t.Errorf("reflection lists a service this socket should not serve: %s", n)
			}
		}
		for _, sym := range []string{"SpiffeWorkloadAPI", "X509SVIDResponse", "grpc.reflection.v1.ServerReflection"} {
			r = ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: sym}})
			if len(r.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
				t.Errorf("no descriptor for %s: %v", sym, r.GetErrorResponse())
			}
		}
		// Linked into the agent, but not what this socket serves.
		r = ask(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "google.protobuf.Duration"}})
		if r.GetErrorResponse() == nil {
			t.Errorf("reflection describes google.protobuf.Duration, which the Workload API does not use")
		}
		_ = rs.CloseSend()
	})
}
