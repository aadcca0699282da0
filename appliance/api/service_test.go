package api

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api/internal/apigen/gen"
)

// The *_gen.go files are what the generator makes of the interfaces now:
// an interface edited without go generate fails here.
func TestGeneratedFilesCurrent(t *testing.T) {
	out := t.TempDir()
	if err := gen.Write(".", out); err != nil {
		t.Fatal(err)
	}
	want, err := filepath.Glob(filepath.Join(out, "*_gen.go"))
	if err != nil {
		t.Fatal(err)
	}
	if len(want) != 3 {
		t.Fatalf("generator wrote %d files, want 3 (admin, agent, join): %v", len(want), want)
	}
	for _, w := range want {
		name := filepath.Base(w)
		wb, err := os.ReadFile(w)
		if err != nil {
			t.Fatal(err)
		}
		hb, err := os.ReadFile(name)
		if err != nil {
			t.Errorf("%s is missing: run go generate ./appliance/api", name)
			continue
		}
		if !bytes.Equal(wb, hb) {
			t.Errorf("%s is stale: run go generate ./appliance/api", name)
		}
	}
	have, err := filepath.Glob("*_gen.go")
	if err != nil {
		t.Fatal(err)
	}
	for _, h := range have {
		if _, err := os.Stat(filepath.Join(out, h)); err != nil {
			t.Errorf("%s is not generated from any interface: run go generate ./appliance/api", h)
		}
	}
}

// wire is every method of the three services as the wire knows them:
// full name and kind. It is written out, not derived, so renaming a Go
// method (which renames its wire method) fails here and must be meant.
var wire = map[string]string{
	"/sigil.admin.v1.Admin/EntryCreate":            "unary",
	"/sigil.admin.v1.Admin/EntryUpdate":            "unary",
	"/sigil.admin.v1.Admin/EntryDelete":            "unary",
	"/sigil.admin.v1.Admin/EntryShow":              "unary",
	"/sigil.admin.v1.Admin/EntryList":              "unary",
	"/sigil.admin.v1.Admin/AgentList":              "unary",
	"/sigil.admin.v1.Admin/AgentShow":              "unary",
	"/sigil.admin.v1.Admin/AgentBan":               "unary",
	"/sigil.admin.v1.Admin/AgentUnban":             "unary",
	"/sigil.admin.v1.Admin/EKCAAdd":                "unary",
	"/sigil.admin.v1.Admin/EKCAList":               "unary",
	"/sigil.admin.v1.Admin/EKCARemove":             "unary",
	"/sigil.admin.v1.Admin/EKAllowAdd":             "unary",
	"/sigil.admin.v1.Admin/EKAllowList":            "unary",
	"/sigil.admin.v1.Admin/EKAllowRemove":          "unary",
	"/sigil.admin.v1.Admin/TokenCreate":            "unary",
	"/sigil.admin.v1.Admin/ClusterStatus":          "unary",
	"/sigil.admin.v1.Admin/ClusterJoin":            "unary",
	"/sigil.admin.v1.Admin/ClusterRemove":          "unary",
	"/sigil.admin.v1.Admin/SnapshotSave":           "server-stream",
	"/sigil.admin.v1.Admin/SnapshotRestore":        "client-stream",
	"/sigil.admin.v1.Admin/AuditExport":            "server-stream",
	"/sigil.admin.v1.Admin/AuditList":              "unary",
	"/sigil.admin.v1.Admin/AuditVerify":            "unary",
	"/sigil.admin.v1.Admin/BundleShow":             "unary",
	"/sigil.admin.v1.Admin/AdminCertIssue":         "unary",
	"/sigil.admin.v1.Admin/SVIDRevoke":             "unary",
	"/sigil.admin.v1.Admin/PCRPolicySet":           "unary",
	"/sigil.admin.v1.Admin/AdminRevoke":            "unary",
	"/sigil.admin.v1.Admin/AdminList":              "unary",
	"/sigil.admin.v1.Admin/RootCRLAdd":             "unary",
	"/sigil.admin.v1.Admin/PCRPolicyShow":          "unary",
	"/sigil.admin.v1.Admin/TokenList":              "unary",
	"/sigil.admin.v1.Admin/TokenRevoke":            "unary",
	"/sigil.admin.v1.Admin/AgentRemove":            "unary",
	"/sigil.admin.v1.Admin/JWTKeyRotate":           "unary",
	"/sigil.admin.v1.Admin/NodeIssuingCertInstall": "unary",
	"/sigil.admin.v1.Admin/RootRotate":             "unary",
	"/sigil.admin.v1.Admin/RootRotation":           "unary",
	"/sigil.admin.v1.Admin/JoinRuleCreate":         "unary",
	"/sigil.admin.v1.Admin/JoinRuleList":           "unary",
	"/sigil.admin.v1.Admin/JoinRuleShow":           "unary",
	"/sigil.admin.v1.Admin/JoinRuleDelete":         "unary",
	"/sigil.admin.v1.Admin/FederationAdd":          "unary",
	"/sigil.admin.v1.Admin/FederationList":         "unary",
	"/sigil.admin.v1.Admin/FederationShow":         "unary",
	"/sigil.admin.v1.Admin/FederationDelete":       "unary",
	"/sigil.admin.v1.Admin/FederationBundleSet":    "unary",
	"/sigil.agent.v1.Agent/SignX509SVIDs":          "unary",
	"/sigil.agent.v1.Agent/SignJWTSVID":            "unary",
	"/sigil.agent.v1.Agent/Sync":                   "server-stream",
	"/sigil.agent.v1.Agent/RunEnd":                 "unary",
	"/sigil.agent.v1.Agent/BundleAck":              "unary",
	"/sigil.join.v1.Join/TPMHello":                 "unary",
	"/sigil.join.v1.Join/TPMProve":                 "unary",
	"/sigil.join.v1.Join/Token":                    "unary",
	"/sigil.join.v1.Join/Renew":                    "unary",
	"/sigil.join.v1.Join/Job":                      "unary",
}

type serviceCase struct {
	name     string
	register func(grpc.ServiceRegistrar)
	server   reflect.Type // the interface
	client   reflect.Type // *XClient
	newCl    func(grpc.ClientConnInterface) any
}

var services = []serviceCase{
	{AdminService, func(s grpc.ServiceRegistrar) { RegisterAdmin(s, nil) }, reflect.TypeFor[AdminServer](), reflect.TypeFor[*AdminClient](),
		func(cc grpc.ClientConnInterface) any { return NewAdminClient(cc) }},
	{AgentService, func(s grpc.ServiceRegistrar) { RegisterAgent(s, nil) }, reflect.TypeFor[AgentServer](), reflect.TypeFor[*AgentClient](),
		func(cc grpc.ClientConnInterface) any { return NewAgentClient(cc) }},
	{JoinService, func(s grpc.ServiceRegistrar) { RegisterJoin(s, nil) }, reflect.TypeFor[JoinServer](), reflect.TypeFor[*JoinClient](),
		func(cc grpc.ClientConnInterface) any { return NewJoinClient(cc) }},
}

type captured struct {
	desc *grpc.ServiceDesc
	impl any
}

func (c *captured) RegisterService(d *grpc.ServiceDesc, impl any) { c.desc, c.impl = d, impl }

var ctxType = reflect.TypeFor[context.Context]()

// kindOf says what a server interface method is from its signature.
func kindOf(m reflect.Method) string {
	switch {
	case m.Type.NumIn() == 2 && m.Type.In(0) == ctxType:
		return "unary"
	case m.Type.NumIn() == 2:
		return "server-stream"
	case m.Type.NumIn() == 1:
		return "client-stream"
	}
	return "unknown"
}

// What each service registers is, by reflection, exactly its interface's
// method set, with the stream directions its signatures say; the wire
// names are the pinned ones; and the client has every method.
func TestRegisteredMethodsMatchInterfaces(t *testing.T) {
	seen := map[string]bool{}
	for _, sc := range services {
		var c captured
		sc.register(&c)
		if c.desc.ServiceName != sc.name {
			t.Errorf("registered service %q, want %q", c.desc.ServiceName, sc.name)
		}
		if ht := reflect.TypeOf(c.desc.HandlerType).Elem(); ht != sc.server {
			t.Errorf("%s: handler type %v, want %v", sc.name, ht, sc.server)
		}
		registered := map[string]string{}
		for _, m := range c.desc.Methods {
			registered[m.MethodName] = "unary"
		}
		for _, s := range c.desc.Streams {
			switch {
			case s.ServerStreams && !s.ClientStreams:
				registered[s.StreamName] = "server-stream"
			case s.ClientStreams && !s.ServerStreams:
				registered[s.StreamName] = "client-stream"
			default:
				registered[s.StreamName] = "bidi"
			}
		}
		declared := map[string]string{}
		for i := range sc.server.NumMethod() {
			m := sc.server.Method(i)
			declared[m.Name] = kindOf(m)
		}
		if !reflect.DeepEqual(registered, declared) {
			t.Errorf("%s registers %v, its interface declares %v", sc.name, registered, declared)
		}
		for name, kind := range registered {
			full := "/" + sc.name + "/" + name
			seen[full] = true
			if wire[full] != kind {
				t.Errorf("%s is registered as %s; the wire has it as %q", full, kind, wire[full])
			}
		}
		for i := range sc.server.NumMethod() {
			sm := sc.server.Method(i)
			cm, ok := sc.client.MethodByName(sm.Name)
			if !ok {
				t.Errorf("%v has no method %s", sc.client, sm.Name)
				continue
			}
			if kindOf(sm) != "unary" {
				continue // stream clients differ in shape; they compile against the server's types
			}
			if cm.Type.NumIn() != 3 || cm.Type.In(1) != ctxType || cm.Type.In(2) != sm.Type.In(1) ||
				cm.Type.NumOut() != 2 || cm.Type.Out(0) != sm.Type.Out(0) || cm.Type.Out(1) != sm.Type.Out(1) {
				t.Errorf("%v.%s is %v; the server method is %v", sc.client, sm.Name, cm.Type, sm.Type)
			}
		}
	}
	for full := range wire {
		if !seen[full] {
			t.Errorf("%s is no longer registered", full)
		}
	}
}

var errReached = errors.New("reached")

// Every client method, called over a real gRPC connection, arrives at
// the server under the full method name the wire has for it, and the
// interceptors see that name with the request type the interface takes.
func TestClientsReachTheirMethods(t *testing.T) {
	var mu sync.Mutex
	got := map[string]string{} // full method -> kind and request type
	srv := grpc.NewServer(append(ServerOptions(), grpc.Creds(LocalCredentials()),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, _ grpc.UnaryHandler) (any, error) {
			mu.Lock()
			got[info.FullMethod] = fmt.Sprintf("unary %T", req)
			mu.Unlock()
			return nil, status.Error(codes.FailedPrecondition, errReached.Error()+" "+info.FullMethod)
		}),
		grpc.StreamInterceptor(func(_ any, ss grpc.ServerStream, info *grpc.StreamServerInfo, _ grpc.StreamHandler) error {
			kind := "bidi"
			switch {
			case info.IsServerStream && !info.IsClientStream:
				kind = "server-stream"
			case info.IsClientStream && !info.IsServerStream:
				kind = "client-stream"
			}
			mu.Lock()
			got[info.FullMethod] = kind
			mu.Unlock()
			return status.Error(codes.FailedPrecondition, errReached.Error()+" "+info.FullMethod)
		}))...)
	for _, sc := range services {
		sc.register(srv)
	}
	cc := serve(t, srv)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, sc := range services {
		client := reflect.ValueOf(sc.newCl(cc))
		for i := range sc.server.NumMethod() {
			sm := sc.server.Method(i)
			full := "/" + sc.name + "/" + sm.Name
			err := callByReflection(ctx, client.MethodByName(sm.Name))
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), errReached.Error()+" "+full) {
				t.Errorf("client %s: %v, want it to reach %s", sm.Name, err, full)
			}
			want := wire[full]
			if want == "unary" {
				want = "unary " + sm.Type.In(1).String()
			}
			mu.Lock()
			g := got[full]
			mu.Unlock()
			if g != want {
				t.Errorf("%s: the interceptor saw %q, want %q", full, g, want)
			}
		}
	}
	if len(got) != len(wire) {
		t.Errorf("the server saw %d methods, the wire has %d", len(got), len(wire))
	}
}

// serve runs srv on a Unix socket in a temporary directory and returns a
// connection to it made with Dial; both stop when the test ends.
func serve(t *testing.T, srv *grpc.Server) *grpc.ClientConn {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "api.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		srv.Stop()
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	cc, err := Dial(DialConfig{Socket: sock})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cc.Close() }) // a test may have closed it already
	return cc
}

// callByReflection calls a client method with zero requests (a reader of
// a few bytes, a writer that discards, a callback that accepts) and
// returns its error; for a stream it returns, the stream's.
func callByReflection(ctx context.Context, m reflect.Value) error {
	var args []reflect.Value
	for i := range m.Type().NumIn() {
		in := m.Type().In(i)
		switch {
		case in == ctxType:
			args = append(args, reflect.ValueOf(ctx))
		case in.Kind() == reflect.Pointer:
			args = append(args, reflect.New(in.Elem()))
		case in == reflect.TypeFor[io.Reader]():
			args = append(args, reflect.ValueOf(io.Reader(strings.NewReader("chunk"))))
		case in == reflect.TypeFor[io.Writer]():
			args = append(args, reflect.ValueOf(io.Discard))
		case in.Kind() == reflect.Func:
			args = append(args, reflect.MakeFunc(in, func([]reflect.Value) []reflect.Value {
				return []reflect.Value{reflect.Zero(in.Out(0))}
			}))
		default:
			return fmt.Errorf("no argument for a %v", in)
		}
	}
	out := m.Call(args)
	if err, _ := out[len(out)-1].Interface().(error); err != nil {
		return err
	}
	if len(out) == 2 {
		if cs, ok := out[0].Interface().(grpc.ClientStream); ok {
			// A stream opened fine; its status comes with the first read.
			_ = cs.CloseSend()
			var m json.RawMessage
			return cs.RecvMsg(&m)
		}
	}
	return errors.New("the call succeeded")
}

// roundTrip implements the streaming methods and one unary method of each
// service; the rest are nil and never called.
type roundTrip struct {
	AdminServer
	AgentServer
	JoinServer
}

func (roundTrip) EntryShow(_ context.Context, r *IDRequest) (*Entry, error) {
	return &Entry{ID: r.ID}, nil
}

func (roundTrip) SnapshotSave(_ *Empty, s grpc.ServerStreamingServer[SnapshotChunk]) error {
	for _, p := range []string{"first ", "second"} {
		if err := s.Send(&SnapshotChunk{Data: []byte(p)}); err != nil {
			return err
		}
	}
	return s.Send(&SnapshotChunk{Meta: &ArchiveMeta{Index: 7}, SHA256: "sum"})
}

func (roundTrip) SnapshotRestore(s grpc.ClientStreamingServer[SnapshotChunk, SnapshotArchive]) error {
	var all []byte
	for {
		ch, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return s.SendAndClose(&SnapshotArchive{SHA256: fmt.Sprintf("%d bytes: %.12s", len(all), all)})
		}
		if err != nil {
			return err
		}
		all = append(all, ch.Data...)
	}
}

func (roundTrip) AuditExport(r *AuditRequest, s grpc.ServerStreamingServer[AuditList]) error {
	for i := range 2 {
		if err := s.Send(&AuditList{Head: r.After + uint64(i)}); err != nil {
			return err
		}
	}
	return nil
}

func (roundTrip) Sync(r *SyncRequest, s grpc.ServerStreamingServer[SyncUpdate]) error {
	return s.Send(&SyncUpdate{Revision: r.Revision + 1})
}

func (roundTrip) Token(_ context.Context, r *JoinTokenRequest) (*AgentSVID, error) {
	return &AgentSVID{AgentID: r.Token}, nil
}

// The generated handlers reach the implementation with the request sent,
// and the clients (generated and hand-written over the generated
// openers) get back what it answered, for every kind of method.
func TestRoundTrip(t *testing.T) {
	srv := grpc.NewServer(append(ServerOptions(), grpc.Creds(LocalCredentials()))...)
	var impl roundTrip
	RegisterAdmin(srv, impl)
	RegisterAgent(srv, impl)
	RegisterJoin(srv, impl)
	cc := serve(t, srv)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	adm, ag, join := NewAdminClient(cc), NewAgentClient(cc), NewJoinClient(cc)

	if e, err := adm.EntryShow(ctx, &IDRequest{ID: "e1"}); err != nil || e.ID != "e1" {
		t.Errorf("EntryShow: %+v, %v", e, err)
	}
	if s, err := join.Token(ctx, &JoinTokenRequest{Token: "tok"}); err != nil || s.AgentID != "tok" {
		t.Errorf("Token: %+v, %v", s, err)
	}
	snap, err := adm.SnapshotSave(ctx, &Empty{})
	if err != nil || string(snap.Archive) != "first second" || snap.SHA256 != "sum" || snap.Meta.Index != 7 {
		t.Errorf("SnapshotSave: %+v, %v", snap, err)
	}
	big := bytes.Repeat([]byte("x"), SnapshotChunkSize*2+1) // three chunks
	res, err := adm.SnapshotRestoreFrom(ctx, bytes.NewReader(big))
	if want := fmt.Sprintf("%d bytes: xxxxxxxxxxxx", len(big)); err != nil || res.SHA256 != want {
		t.Errorf("SnapshotRestoreFrom: %+v, %v; want %q", res, err, want)
	}
	var heads []uint64
	err = adm.AuditExport(ctx, &AuditRequest{After: 10}, func(l *AuditList) error { heads = append(heads, l.Head); return nil })
	if err != nil || !slices.Equal(heads, []uint64{10, 11}) {
		t.Errorf("AuditExport: pages %v, %v", heads, err)
	}
	st, err := ag.Sync(ctx, &SyncRequest{Revision: 4})
	if err != nil {
		t.Fatal(err)
	}
	u, err := st.Recv()
	if err != nil || u.Revision != 5 {
		t.Errorf("Sync: %+v, %v", u, err)
	}
	if _, err := st.Recv(); !errors.Is(err, io.EOF) {
		t.Errorf("Sync after its one update: %v, want EOF", err)
	}
}
