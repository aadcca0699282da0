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
	// RunEndRequest ends a job agent's run: the agent's record and its
	// run's entry go, and the run's X.509-SVIDs named in Serials (hex, as
	// issued to this agent) are revoked. ExitCode is the run's, audited.
	RunEndRequest struct {
		Serials  []string `json:"serials,omitempty"`
		ExitCode int      `json:"exit_code"`
	}
	// BundleAckRequest tells the node the agent has applied the trust
	// bundle of Sequence: its roots are kept on disk, trusted for dialing
	// nodes and served to its workloads. A root rotation's phases wait
	// for every agent's acknowledgement.
	BundleAckRequest struct {
		Sequence uint64 `json:"sequence"`
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
		// Federated holds the SPIFFE bundle documents of the foreign trust
		// domains the agent's entries federate with, by trust domain name.
		Federated map[string][]byte `json:"federated,omitempty"`
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
	// RunEnd ends the calling job agent's run (job agents only): audited,
	// its SVIDs revoked, its record and entry removed.
	RunEnd(context.Context, *RunEndRequest) (*Empty, error)
	// BundleAck records that the agent applied the bundle of a sequence
	// (the sequence must not be ahead of the node's). Only an
	// acknowledgement a root rotation waits for is committed; others are
	// answered without a state change.
	BundleAck(context.Context, *BundleAckRequest) (*Empty, error)
}

// MaxRunEndSerials bounds a RunEnd request.
const MaxRunEndSerials = 16

// AgentService is the gRPC service name.
const AgentService = "sigil.agent.v1.Agent"
