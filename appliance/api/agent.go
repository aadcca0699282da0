package api

import (
	"context"
	"time"

	"google.golang.org/grpc"
)

// Agent service messages.
type (
	// X509SVIDRequest asks for one workload SVID: the CSR carries the
	// workload's public key (its private key never leaves the agent).
	X509SVIDRequest struct {
		EntryID string
		CSR     []byte // DER
	}
	X509SVIDBatch struct {
		Requests []X509SVIDRequest
	}
	// X509SVIDResult is one answer: a chain, or why not.
	X509SVIDResult struct {
		EntryID   string
		SPIFFEID  string   `json:",omitempty"`
		Chain     [][]byte `json:",omitempty"` // leaf, then the node's intermediate
		ExpiresAt time.Time
		Error     string `json:",omitempty"`
	}
	X509SVIDBatchResult struct {
		Results []X509SVIDResult
	}
	JWTSVIDRequest struct {
		EntryID  string
		Audience []string
	}
	JWTSVIDResult struct {
		Token     string
		SPIFFEID  string
		ExpiresAt time.Time
	}
	// SyncRequest resumes after a revision (0: from the start).
	SyncRequest struct {
		Revision uint64
	}
	// SyncUpdate is the agent's whole view at a revision: every entry it is
	// parent of and the trust bundle (with the SPIFFE bundle document).
	SyncUpdate struct {
		Revision uint64
		Entries  []Entry
		Bundle   Bundle
		SPIFFE   []byte
	}
)

// AgentServer is the service sigil-agent uses. Every method requires an
// agent certificate of a known, unbanned agent.
//
//apigen:service
type AgentServer interface {
	SignX509SVIDs(context.Context, *X509SVIDBatch) (*X509SVIDBatchResult, error)
	SignJWTSVID(context.Context, *JWTSVIDRequest) (*JWTSVIDResult, error)
	// Sync streams the agent's view (SyncUpdate) after a revision: at once,
	// then on every change that concerns the agent.
	Sync(*SyncRequest, grpc.ServerStreamingServer[SyncUpdate]) error
}

// AgentService is the gRPC service name.
const AgentService = "sigil.agent.v1.Agent"
