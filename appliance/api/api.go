// Package api is the appliance's public interface: the admin service used
// by sigilctl (and, in later issues, the agent service used by sigil-agent),
// their request and response types, and typed clients.
//
// It is gRPC over mutual TLS with a JSON codec: the messages are plain Go
// structs (types.go holds the data types, which the node converts from and
// to its persisted state), so there is no code generator in the build.
// Other programs reach the same service with any gRPC stack by using
// content-subtype "json".
package api

import (
	"context"
	"encoding/json"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/encoding"

	"github.com/sigil-appliance/sigil/appliance/state"
)

// Wire types still shared with the state machine. Clients import only this
// package.
type (
	AuditRecord = state.AuditRecord
	ArchiveMeta = state.ArchiveMeta
)

// VerifyAudit walks audit records and reports the first break.
func VerifyAudit(recs []AuditRecord) (uint64, error) { return state.VerifyAudit(recs) }

// Codec is the JSON codec both ends force; nothing is registered globally.
type Codec struct{}

func (Codec) Marshal(v any) ([]byte, error)      { return json.Marshal(v) }
func (Codec) Unmarshal(data []byte, v any) error { return json.Unmarshal(data, v) }
func (Codec) Name() string                       { return "json" }

var _ encoding.Codec = Codec{}

// MaxRequestSize bounds every message a node reads, whoever sends it: a
// node reads a message before its handlers see it, so this is what any
// caller can make it hold per call. The largest legitimate requests are
// well below it: a restore chunk (SnapshotChunkSize of archive, about
// 700 KB as JSON), a batch of 1000 CSRs (about 0.5 MB; sigil-agent sends
// 64). Anything larger is streamed in pieces.
const MaxRequestSize = 1 << 20

// MaxResponseSize bounds what a client accepts from a node (and what a
// node sends). Answers can be much larger than requests: every entry or
// agent, a page of 10,000 audit records, a full SyncUpdate. The client has
// verified the node, so this bounds only its own memory.
const MaxResponseSize = 64 << 20

// ServerOptions are the gRPC options an appliance server needs.
func ServerOptions() []grpc.ServerOption {
	return []grpc.ServerOption{grpc.ForceServerCodec(Codec{}),
		grpc.MaxRecvMsgSize(MaxRequestSize), grpc.MaxSendMsgSize(MaxResponseSize)}
}

// DialOptions are the options a client needs besides transport security.
// A request over MaxRequestSize fails here, saying so, rather than at the
// node.
func DialOptions() []grpc.DialOption {
	return []grpc.DialOption{grpc.WithDefaultCallOptions(grpc.ForceCodec(Codec{}),
		grpc.MaxCallRecvMsgSize(MaxResponseSize), grpc.MaxCallSendMsgSize(MaxRequestSize))}
}

// Messages. Their JSON names (the wire format, and sigilctl's --output
// json) are lower-case snake_case, like the data types'.
type (
	Empty     struct{}
	IDRequest struct {
		ID string `json:"id"`
	}
	EntryRequest struct {
		Entry Entry `json:"entry"`
	}
	EntryListRequest struct {
		ParentID string `json:"parent_id,omitempty"`
		SPIFFEID string `json:"spiffe_id,omitempty"`
	}
	EntryList struct {
		Entries []Entry `json:"entries"`
	}
	AgentList struct {
		Agents []Agent `json:"agents"`
	}
	EKCARequest struct {
		DER []byte `json:"der"`
	}
	EKCAList struct {
		CAs []EKCA `json:"cas"`
	}
	HashRequest struct {
		Hash string `json:"hash"`
	}
	HashList struct {
		Hashes []string `json:"hashes"`
	}
	TokenRequest struct {
		TTL Seconds `json:"ttl"`
	}
	TokenResponse struct {
		// Token is shown once; the appliance keeps only its SHA-256 (ID).
		Token     string    `json:"token"`
		ID        string    `json:"id"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	JoinRequest struct {
		NodeID string `json:"node_id"`
		Addr   string `json:"addr"`
	}
	ClusterStatus struct {
		NodeID       string `json:"node_id"`
		State        string `json:"state"`
		Term         uint64 `json:"term"`
		LastIndex    uint64 `json:"last_index"`
		CommitIndex  uint64 `json:"commit_index"`
		AppliedIndex uint64 `json:"applied_index"`
		LeaderID     string `json:"leader_id"`
		LeaderAddr   string `json:"leader_addr"`
		Peers        []Peer `json:"peers"`
	}
	Peer struct {
		ID          string    `json:"id"`
		Addr        string    `json:"addr"`
		Suffrage    string    `json:"suffrage"`
		LastContact time.Time `json:"last_contact,omitzero"`
		LastIndex   uint64    `json:"last_index"`
	}
	SnapshotArchive struct {
		Archive []byte      `json:"archive,omitempty"`
		Meta    ArchiveMeta `json:"meta"`
		SHA256  string      `json:"sha256"`
	}
	AuditRequest struct {
		After uint64 `json:"after"`
		Limit int    `json:"limit"`
	}
	AuditList struct {
		Records []AuditRecord `json:"records"`
		// Head is the newest record's sequence number at the time of the
		// call, so auditors know whether they saw everything.
		Head uint64 `json:"head"`
		// First is the first retained record; older ones were pruned to
		// signed segment files on each node (sigilctl audit export).
		First uint64 `json:"first,omitempty"`
	}
	AuditVerify struct {
		Records  uint64 `json:"records"`
		Intact   bool   `json:"intact"`
		FirstBad uint64 `json:"first_bad,omitempty"`
		Error    string `json:"error,omitempty"`
		// From and To are the first and last records verified; records
		// up to LastCheckpoint are covered by Checkpoints HSM signatures
		// that chain to the root, later ones by the hash chain alone.
		From           uint64 `json:"from"`
		To             uint64 `json:"to"`
		Checkpoints    int    `json:"checkpoints"`
		LastCheckpoint uint64 `json:"last_checkpoint"`
	}
	BundleResponse struct {
		Bundle Bundle `json:"bundle"`
		// SPIFFE is the bundle as a SPIFFE bundle document (JWKS).
		SPIFFE json.RawMessage `json:"spiffe"`
	}
	AdminCertRequest struct {
		Name string  `json:"name"` // becomes spiffe://<td>/sigil/admin/<name>
		CSR  []byte  `json:"csr"`  // DER; the admin's key never leaves the admin
		TTL  Seconds `json:"ttl"`
		// Role is AdminRoleAdmin or AdminRoleIssuer; "" keeps the name's
		// current role (admin for a new name).
		Role string `json:"role,omitempty"`
	}
	// AdminRevokeRequest revokes every certificate issued so far for an
	// admin name.
	AdminRevokeRequest struct {
		Name string `json:"name"`
	}
	AdminList struct {
		Admins []AdminRecord `json:"admins"`
	}
	CertChain struct {
		Chain [][]byte `json:"chain"` // DER, leaf first
	}
	RevokeRequest struct {
		Serial string `json:"serial"` // hex, as in the issuance audit record
	}
	// PCRPolicyRequest sets (or, with nil, clears) the PCR values a joining
	// TPM must quote.
	PCRPolicyRequest struct {
		Policy *PCRPolicy `json:"policy"`
	}
)

// AdminServer is the admin service. Every method requires an admin peer;
// the server authorizes before it is called.
type AdminServer interface {
	EntryCreate(context.Context, *EntryRequest) (*Entry, error)
	EntryUpdate(context.Context, *EntryRequest) (*Entry, error)
	EntryDelete(context.Context, *IDRequest) (*Empty, error)
	EntryShow(context.Context, *IDRequest) (*Entry, error)
	EntryList(context.Context, *EntryListRequest) (*EntryList, error)
	AgentList(context.Context, *Empty) (*AgentList, error)
	AgentShow(context.Context, *IDRequest) (*Agent, error)
	AgentBan(context.Context, *IDRequest) (*Empty, error)
	AgentUnban(context.Context, *IDRequest) (*Empty, error)
	EKCAAdd(context.Context, *EKCARequest) (*EKCA, error)
	EKCAList(context.Context, *Empty) (*EKCAList, error)
	EKCARemove(context.Context, *IDRequest) (*Empty, error)
	EKAllowAdd(context.Context, *HashRequest) (*Empty, error)
	EKAllowList(context.Context, *Empty) (*HashList, error)
	EKAllowRemove(context.Context, *HashRequest) (*Empty, error)
	TokenCreate(context.Context, *TokenRequest) (*TokenResponse, error)
	ClusterStatus(context.Context, *Empty) (*ClusterStatus, error)
	ClusterJoin(context.Context, *JoinRequest) (*Empty, error)
	ClusterRemove(context.Context, *IDRequest) (*Empty, error)
	SnapshotSave(*Empty, grpc.ServerStreamingServer[SnapshotChunk]) error
	SnapshotRestore(grpc.ClientStreamingServer[SnapshotChunk, SnapshotArchive]) error
	AuditExport(*AuditRequest, grpc.ServerStreamingServer[AuditList]) error
	AuditList(context.Context, *AuditRequest) (*AuditList, error)
	AuditVerify(context.Context, *Empty) (*AuditVerify, error)
	BundleShow(context.Context, *Empty) (*BundleResponse, error)
	AdminCertIssue(context.Context, *AdminCertRequest) (*CertChain, error)
	SVIDRevoke(context.Context, *RevokeRequest) (*Empty, error)
	PCRPolicySet(context.Context, *PCRPolicyRequest) (*Empty, error)
	AdminRevoke(context.Context, *AdminRevokeRequest) (*AdminRecord, error)
	AdminList(context.Context, *Empty) (*AdminList, error)
	RootCRLAdd(context.Context, *RootCRLRequest) (*RootCRLResult, error)
}

// AdminService is the gRPC service name.
const AdminService = "sigil.admin.v1.Admin"

func unary[S any, Req, Resp any](service, name string, call func(S, context.Context, *Req) (*Resp, error)) grpc.MethodDesc {
	full := "/" + service + "/" + name
	return grpc.MethodDesc{MethodName: name, Handler: func(srv any, ctx context.Context, dec func(any) error, ic grpc.UnaryServerInterceptor) (any, error) {
		req := new(Req)
		if err := dec(req); err != nil {
			return nil, err
		}
		h := func(ctx context.Context, r any) (any, error) { return call(srv.(S), ctx, r.(*Req)) }
		if ic == nil {
			return h(ctx, req)
		}
		return ic(ctx, req, &grpc.UnaryServerInfo{Server: srv, FullMethod: full}, h)
	}}
}

// RegisterAdmin adds the admin service to a gRPC server.
func RegisterAdmin(s grpc.ServiceRegistrar, impl AdminServer) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: AdminService,
		HandlerType: (*AdminServer)(nil),
		Methods: []grpc.MethodDesc{
			unary(AdminService, "EntryCreate", AdminServer.EntryCreate),
			unary(AdminService, "EntryUpdate", AdminServer.EntryUpdate),
			unary(AdminService, "EntryDelete", AdminServer.EntryDelete),
			unary(AdminService, "EntryShow", AdminServer.EntryShow),
			unary(AdminService, "EntryList", AdminServer.EntryList),
			unary(AdminService, "AgentList", AdminServer.AgentList),
			unary(AdminService, "AgentShow", AdminServer.AgentShow),
			unary(AdminService, "AgentBan", AdminServer.AgentBan),
			unary(AdminService, "AgentUnban", AdminServer.AgentUnban),
			unary(AdminService, "EKCAAdd", AdminServer.EKCAAdd),
			unary(AdminService, "EKCAList", AdminServer.EKCAList),
			unary(AdminService, "EKCARemove", AdminServer.EKCARemove),
			unary(AdminService, "EKAllowAdd", AdminServer.EKAllowAdd),
			unary(AdminService, "EKAllowList", AdminServer.EKAllowList),
			unary(AdminService, "EKAllowRemove", AdminServer.EKAllowRemove),
			unary(AdminService, "TokenCreate", AdminServer.TokenCreate),
			unary(AdminService, "ClusterStatus", AdminServer.ClusterStatus),
			unary(AdminService, "ClusterJoin", AdminServer.ClusterJoin),
			unary(AdminService, "ClusterRemove", AdminServer.ClusterRemove),
			unary(AdminService, "AuditList", AdminServer.AuditList),
			unary(AdminService, "AuditVerify", AdminServer.AuditVerify),
			unary(AdminService, "BundleShow", AdminServer.BundleShow),
			unary(AdminService, "AdminCertIssue", AdminServer.AdminCertIssue),
			unary(AdminService, "SVIDRevoke", AdminServer.SVIDRevoke),
			unary(AdminService, "PCRPolicySet", AdminServer.PCRPolicySet),
			unary(AdminService, "AdminRevoke", AdminServer.AdminRevoke),
			unary(AdminService, "AdminList", AdminServer.AdminList),
			unary(AdminService, "RootCRLAdd", AdminServer.RootCRLAdd),
		},
		Streams: adminStreams,
	}, impl)
}

// AdminClient calls the admin service.
type AdminClient struct{ cc grpc.ClientConnInterface }

// NewAdminClient wraps a connection made with DialOptions.
func NewAdminClient(cc grpc.ClientConnInterface) *AdminClient { return &AdminClient{cc: cc} }

func call[Req, Resp any](ctx context.Context, cc grpc.ClientConnInterface, name string, req *Req) (*Resp, error) {
	resp := new(Resp)
	if err := cc.Invoke(ctx, "/"+AdminService+"/"+name, req, resp, grpc.ForceCodec(Codec{})); err != nil {
		return nil, err
	}
	return resp, nil
}

func (c *AdminClient) EntryCreate(ctx context.Context, r *EntryRequest) (*Entry, error) {
	return call[EntryRequest, Entry](ctx, c.cc, "EntryCreate", r)
}
func (c *AdminClient) EntryUpdate(ctx context.Context, r *EntryRequest) (*Entry, error) {
	return call[EntryRequest, Entry](ctx, c.cc, "EntryUpdate", r)
}
func (c *AdminClient) EntryDelete(ctx context.Context, r *IDRequest) (*Empty, error) {
	return call[IDRequest, Empty](ctx, c.cc, "EntryDelete", r)
}
func (c *AdminClient) EntryShow(ctx context.Context, r *IDRequest) (*Entry, error) {
	return call[IDRequest, Entry](ctx, c.cc, "EntryShow", r)
}
func (c *AdminClient) EntryList(ctx context.Context, r *EntryListRequest) (*EntryList, error) {
	return call[EntryListRequest, EntryList](ctx, c.cc, "EntryList", r)
}
func (c *AdminClient) AgentList(ctx context.Context, r *Empty) (*AgentList, error) {
	return call[Empty, AgentList](ctx, c.cc, "AgentList", r)
}
func (c *AdminClient) AgentShow(ctx context.Context, r *IDRequest) (*Agent, error) {
	return call[IDRequest, Agent](ctx, c.cc, "AgentShow", r)
}
func (c *AdminClient) AgentBan(ctx context.Context, r *IDRequest) (*Empty, error) {
	return call[IDRequest, Empty](ctx, c.cc, "AgentBan", r)
}
func (c *AdminClient) AgentUnban(ctx context.Context, r *IDRequest) (*Empty, error) {
	return call[IDRequest, Empty](ctx, c.cc, "AgentUnban", r)
}
func (c *AdminClient) EKCAAdd(ctx context.Context, r *EKCARequest) (*EKCA, error) {
	return call[EKCARequest, EKCA](ctx, c.cc, "EKCAAdd", r)
}
func (c *AdminClient) EKCAList(ctx context.Context, r *Empty) (*EKCAList, error) {
	return call[Empty, EKCAList](ctx, c.cc, "EKCAList", r)
}
func (c *AdminClient) EKCARemove(ctx context.Context, r *IDRequest) (*Empty, error) {
	return call[IDRequest, Empty](ctx, c.cc, "EKCARemove", r)
}
func (c *AdminClient) EKAllowAdd(ctx context.Context, r *HashRequest) (*Empty, error) {
	return call[HashRequest, Empty](ctx, c.cc, "EKAllowAdd", r)
}
func (c *AdminClient) EKAllowList(ctx context.Context, r *Empty) (*HashList, error) {
	return call[Empty, HashList](ctx, c.cc, "EKAllowList", r)
}
func (c *AdminClient) EKAllowRemove(ctx context.Context, r *HashRequest) (*Empty, error) {
	return call[HashRequest, Empty](ctx, c.cc, "EKAllowRemove", r)
}
func (c *AdminClient) TokenCreate(ctx context.Context, r *TokenRequest) (*TokenResponse, error) {
	return call[TokenRequest, TokenResponse](ctx, c.cc, "TokenCreate", r)
}
func (c *AdminClient) ClusterStatus(ctx context.Context, r *Empty) (*ClusterStatus, error) {
	return call[Empty, ClusterStatus](ctx, c.cc, "ClusterStatus", r)
}
func (c *AdminClient) ClusterJoin(ctx context.Context, r *JoinRequest) (*Empty, error) {
	return call[JoinRequest, Empty](ctx, c.cc, "ClusterJoin", r)
}
func (c *AdminClient) ClusterRemove(ctx context.Context, r *IDRequest) (*Empty, error) {
	return call[IDRequest, Empty](ctx, c.cc, "ClusterRemove", r)
}
func (c *AdminClient) AuditList(ctx context.Context, r *AuditRequest) (*AuditList, error) {
	return call[AuditRequest, AuditList](ctx, c.cc, "AuditList", r)
}
func (c *AdminClient) AuditVerify(ctx context.Context, r *Empty) (*AuditVerify, error) {
	return call[Empty, AuditVerify](ctx, c.cc, "AuditVerify", r)
}
func (c *AdminClient) BundleShow(ctx context.Context, r *Empty) (*BundleResponse, error) {
	return call[Empty, BundleResponse](ctx, c.cc, "BundleShow", r)
}
func (c *AdminClient) AdminCertIssue(ctx context.Context, r *AdminCertRequest) (*CertChain, error) {
	return call[AdminCertRequest, CertChain](ctx, c.cc, "AdminCertIssue", r)
}
func (c *AdminClient) SVIDRevoke(ctx context.Context, r *RevokeRequest) (*Empty, error) {
	return call[RevokeRequest, Empty](ctx, c.cc, "SVIDRevoke", r)
}

func (c *AdminClient) PCRPolicySet(ctx context.Context, r *PCRPolicyRequest) (*Empty, error) {
	return call[PCRPolicyRequest, Empty](ctx, c.cc, "PCRPolicySet", r)
}
func (c *AdminClient) AdminRevoke(ctx context.Context, r *AdminRevokeRequest) (*AdminRecord, error) {
	return call[AdminRevokeRequest, AdminRecord](ctx, c.cc, "AdminRevoke", r)
}
func (c *AdminClient) AdminList(ctx context.Context, r *Empty) (*AdminList, error) {
	return call[Empty, AdminList](ctx, c.cc, "AdminList", r)
}

// RootCRLAdd adds a CRL signed by a root of the trust bundle (the root
// ceremony's kind crl): the certificates it lists (node issuing CAs) are
// refused everywhere from then on.
func (c *AdminClient) RootCRLAdd(ctx context.Context, r *RootCRLRequest) (*RootCRLResult, error) {
	return call[RootCRLRequest, RootCRLResult](ctx, c.cc, "RootCRLAdd", r)
}
