package api

import (
	"context"
	"time"

	"google.golang.org/grpc"
)

// Agent service messages (JSON names as in api.go).
type (
	// X509SVIDRequest asks for one workload SVID: the CSR carries the
	// workload's public key (its private key never leaves the agent).
	X509SVIDRequest struct {
		EntryID string `json:"entry_id"`
		CSR     []byte `json:"csr"` // DER
	}
	X509SVIDBatch struct {
		Requests []X509SVIDRequest `json:"requests"`
	}
	// X509SVIDResult is one answer: a chain, or why not.
	X509SVIDResult struct {
		EntryID   string    `json:"entry_id"`
		SPIFFEID  string    `json:"spiffe_id,omitempty"`
		Chain     [][]byte  `json:"chain,omitempty"` // leaf, then the node's intermediate
		ExpiresAt time.Time `json:"expires_at"`
		Error     string    `json:"error,omitempty"`
	}
	X509SVIDBatchResult struct {
		Results []X509SVIDResult `json:"results"`
	}
	JWTSVIDRequest struct {
		EntryID  string   `json:"entry_id"`
		Audience []string `json:"audience"`
	}
	JWTSVIDResult struct {
		Token     string    `json:"token"`
		SPIFFEID  string    `json:"spiffe_id"`
		ExpiresAt time.Time `json:"expires_at"`
	}
	// SyncRequest resumes after a revision (0: from the start).
	SyncRequest struct {
		Revision uint64 `json:"revision"`
	}
	// SyncUpdate is the agent's whole view at a revision: every entry it is
	// parent of and the trust bundle (with the SPIFFE bundle document).
	SyncUpdate struct {
		Revision uint64  `json:"revision"`
		Entries  []Entry `json:"entries"`
		Bundle   Bundle  `json:"bundle"`
		SPIFFE   []byte  `json:"spiffe"`
	}
)

// AgentServer is the service sigil-agent uses. Every method requires an
// agent certificate of a known, unbanned agent.
type AgentServer interface {
	SignX509SVIDs(context.Context, *X509SVIDBatch) (*X509SVIDBatchResult, error)
	SignJWTSVID(context.Context, *JWTSVIDRequest) (*JWTSVIDResult, error)
	Sync(*SyncRequest, grpc.ServerStreamingServer[SyncUpdate]) error
}

// AgentService is the gRPC service name.
const AgentService = "sigil.agent.v1.Agent"

// RegisterAgent adds the agent service to a gRPC server.
func RegisterAgent(s grpc.ServiceRegistrar, impl AgentServer) {
	s.RegisterService(&grpc.ServiceDesc{
		ServiceName: AgentService,
		HandlerType: (*AgentServer)(nil),
		Methods: []grpc.MethodDesc{
			unary(AgentService, "SignX509SVIDs", AgentServer.SignX509SVIDs),
			unary(AgentService, "SignJWTSVID", AgentServer.SignJWTSVID),
		},
		Streams: []grpc.StreamDesc{{
			StreamName:    "Sync",
			ServerStreams: true,
			Handler: func(srv any, stream grpc.ServerStream) error {
				req := new(SyncRequest)
				if err := stream.RecvMsg(req); err != nil {
					return err
				}
				return srv.(AgentServer).Sync(req, &grpc.GenericServerStream[SyncRequest, SyncUpdate]{ServerStream: stream})
			},
		}},
	}, impl)
}

// AgentClient calls the agent service.
type AgentClient struct{ cc grpc.ClientConnInterface }

// NewAgentClient wraps a connection made with DialOptions.
func NewAgentClient(cc grpc.ClientConnInterface) *AgentClient { return &AgentClient{cc: cc} }

func agentCall[Req, Resp any](ctx context.Context, cc grpc.ClientConnInterface, name string, req *Req) (*Resp, error) {
	resp := new(Resp)
	if err := cc.Invoke(ctx, "/"+AgentService+"/"+name, req, resp, grpc.ForceCodec(Codec{})); err != nil {
		return nil, err
	}
	return resp, nil
}

func (c *AgentClient) SignX509SVIDs(ctx context.Context, r *X509SVIDBatch) (*X509SVIDBatchResult, error) {
	return agentCall[X509SVIDBatch, X509SVIDBatchResult](ctx, c.cc, "SignX509SVIDs", r)
}

func (c *AgentClient) SignJWTSVID(ctx context.Context, r *JWTSVIDRequest) (*JWTSVIDResult, error) {
	return agentCall[JWTSVIDRequest, JWTSVIDResult](ctx, c.cc, "SignJWTSVID", r)
}

// Sync opens the update stream.
func (c *AgentClient) Sync(ctx context.Context, r *SyncRequest) (grpc.ServerStreamingClient[SyncUpdate], error) {
	desc := &grpc.StreamDesc{StreamName: "Sync", ServerStreams: true}
	stream, err := c.cc.NewStream(ctx, desc, "/"+AgentService+"/Sync", grpc.ForceCodec(Codec{}))
	if err != nil {
		return nil, err
	}
	x := &grpc.GenericClientStream[SyncRequest, SyncUpdate]{ClientStream: stream}
	if err := x.ClientStream.SendMsg(r); err != nil {
		return nil, err
	}
	if err := x.ClientStream.CloseSend(); err != nil {
		return nil, err
	}
	return x, nil
}
