// Package api is the appliance's public interface: the admin service used
// by sigilctl, the agent and join services used by sigil-agent, their
// request and response types, and typed clients.
//
// It is gRPC over mutual TLS with a JSON codec: the messages are plain Go
// structs (types.go holds the data types, which the node converts from and
// to its persisted state), so there is no .proto and no protoc. Each
// service is defined once, as the Go interface its server implements
// (AdminServer, AgentServer, JoinServer); go generate derives the
// registration, the full method names and the client from it (the
// *_gen.go files, written by internal/apigen). Other programs reach the
// same services with any gRPC stack by using content-subtype "json".
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

// ForceParentHint ends the refusal of an entry whose parent no agent
// serves, which EntryRequest.Force overrides.
const ForceParentHint = "(force registers it anyway)"

// Messages. Their JSON names (the wire format, and sigilctl's --output
// json) are lower-case snake_case, like the data types'.
type (
	Empty     struct{}
	IDRequest struct {
		ID string `json:"id"`
	}
	// EntryRequest creates or replaces an entry. A refusal that Force
	// would override ends with ForceParentHint.
	EntryRequest struct {
		Entry Entry `json:"entry"`
		// Force registers an entry whose parent is not a joined, unbanned
		// agent (an agent that has yet to join, say); without it such an
		// entry is refused, since no agent would fetch it.
		Force bool `json:"force,omitempty"`
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
	// ClusterStatus is the answering node's own raft state (NodeID to
	// LeaderAddr) and the members as View.NodeID sees them: the leader,
	// asked through raft when a follower answers, or the answering node
	// itself when no leader answered (View.LeaderError says why).
	ClusterStatus struct {
		NodeID       string      `json:"node_id"`
		State        string      `json:"state"`
		Term         uint64      `json:"term"`
		LastIndex    uint64      `json:"last_index"`
		CommitIndex  uint64      `json:"commit_index"`
		AppliedIndex uint64      `json:"applied_index"`
		LeaderID     string      `json:"leader_id"`
		LeaderAddr   string      `json:"leader_addr"`
		View         ClusterView `json:"view"`
		Peers        []Peer      `json:"peers"`
		// Expiries are what the trust chain needs renewed in time, as the
		// answering node's replica knows it: each node's recorded issuing
		// CA, the bundle's roots and JWT keys.
		Expiries []Expiry `json:"expiries,omitempty"`
	}
	// Expiry is one certificate or key and when it expires.
	Expiry struct {
		// Kind is ExpiryIssuingCA, ExpiryRoot or ExpiryJWTKey.
		Kind string `json:"kind"`
		// Name: the node (issuing CA, JWT key), or the root's subject.
		Name string `json:"name"`
		// Serial (hex) of a certificate, or a JWT key's kid.
		Serial   string    `json:"serial"`
		NotAfter time.Time `json:"not_after"`
	}
	// IssuingCertRequest carries a renewed issuing CA certificate (PEM;
	// the first certificate is the node's, any after it are ignored
	// chain certificates) and the node it is for.
	IssuingCertRequest struct {
		Node string `json:"node"`
		PEM  []byte `json:"pem"`
	}
	// IssuingCertInstalled says which certificate a node replaced with
	// which.
	IssuingCertInstalled struct {
		Node             string    `json:"node"`
		Serial           string    `json:"serial"`
		NotAfter         time.Time `json:"not_after"`
		PreviousSerial   string    `json:"previous_serial"`
		PreviousNotAfter time.Time `json:"previous_not_after"`
		// JWTKey is the kid of the JWT key published with the new
		// certificate ("" when that failed: the node logs why and its
		// schedule publishes one later).
		JWTKey string `json:"jwt_key,omitempty"`
		// Staged: the certificate is under a rotation's new root (phase
		// added): the node recorded it and signs with it at the switch.
		Staged bool `json:"staged,omitempty"`
	}
	// RootRotateRequest moves a root rotation: Phase is "add" (Root: the
	// new root, PEM), "switch", "rollback" or "retire". Force skips the
	// waits the proposing node checks (agents' acknowledgements, the
	// federation refresh hint, the lifetime of what the old root signed),
	// never the state's own rules. Audited as forced.
	RootRotateRequest struct {
		Phase string `json:"phase"`
		Root  []byte `json:"root,omitempty"`
		Force bool   `json:"force,omitempty"`
	}
	// RootRotationStatus is where a root rotation stands ("" phase: none
	// in progress) and what the next phase waits for.
	RootRotationStatus struct {
		Phase string `json:"phase"`
		// Old and New are hex SHA-256 fingerprints of the roots.
		Old []string `json:"old,omitempty"`
		New string   `json:"new,omitempty"`
		// Sequence is the bundle sequence agents must acknowledge before
		// the next phase (the one the last phase committed at).
		Sequence uint64    `json:"sequence,omitempty"`
		Since    time.Time `json:"since,omitzero"`
		// Roots are the bundle's roots now (hex SHA-256, with expiry).
		Roots []RootInfo `json:"roots,omitempty"`
		// NodesNotStaged are member nodes with no issuing certificate
		// under the new root staged (phase added) or not yet signing under
		// it (phase switched).
		NodesNotStaged []string `json:"nodes_not_staged,omitempty"`
		// AgentsPending are agents that have not acknowledged Sequence,
		// at most MaxPendingListed of them; AgentsPendingCount counts all.
		AgentsPending      []PendingAgent `json:"agents_pending,omitempty"`
		AgentsPendingCount int            `json:"agents_pending_count"`
		// RetireAfter is when the last SVID the old root's chain signed
		// expires at the latest (phase switched): retire refuses before.
		RetireAfter time.Time `json:"retire_after,omitzero"`
		// Next is what the next phase needs, in words.
		Next string `json:"next,omitempty"`
	}
	RootInfo struct {
		SHA256   string    `json:"sha256"`
		Subject  string    `json:"subject"`
		NotAfter time.Time `json:"not_after"`
	}
	PendingAgent struct {
		SPIFFEID string    `json:"spiffe_id"`
		Acked    uint64    `json:"acked"`
		LastSeen time.Time `json:"last_seen,omitzero"`
	}
	// ClusterView says whose view ClusterStatus.Peers is. Only the leader
	// hears from every member; a follower's own view knows its leader's
	// contact and nothing of the others, and a node without a leader knows
	// only itself: what a view cannot know is left out of Peer, never
	// given as zero.
	ClusterView struct {
		NodeID string `json:"node_id"`
		// Leader: NodeID was the leader when it answered.
		Leader    bool   `json:"leader"`
		Term      uint64 `json:"term"`
		LastIndex uint64 `json:"last_index"`
		// ReachableWithinMS bounds a reachable peer's contact age (three
		// heartbeat timeouts).
		ReachableWithinMS int64 `json:"reachable_within_ms"`
		// LeaderError says why the leader's view is not shown (no leader
		// known, the leader did not answer); empty when it is.
		LeaderError string `json:"leader_error,omitempty"`
	}
	// Peer is one member of the raft configuration as the view's node
	// sees it. Fields the view cannot know are omitted.
	Peer struct {
		ID       string `json:"id"`
		Addr     string `json:"addr"`
		Suffrage string `json:"suffrage"`
		// Reachable: heard from within View.ReachableWithinMS.
		Reachable *bool `json:"reachable,omitempty"`
		// LastContact is by the view node's clock; ContactAgeMS is its
		// age when the view was taken, which needs no agreement between
		// clocks.
		LastContact  time.Time `json:"last_contact,omitzero"`
		ContactAgeMS *int64    `json:"contact_age_ms,omitempty"`
		// MatchIndex is the last log index the peer reported to the
		// leader; Lag is View.LastIndex minus it. Leader's view only.
		MatchIndex *uint64 `json:"match_index,omitempty"`
		Lag        *uint64 `json:"lag,omitempty"`
	}
	SnapshotArchive struct {
		Archive []byte      `json:"archive,omitempty"`
		Meta    ArchiveMeta `json:"meta"`
		SHA256  string      `json:"sha256"`
	}
	AuditRequest struct {
		After uint64 `json:"after"`
		Limit int    `json:"limit"`
		// Filter and NewestFirst apply to AuditList only (AuditFilter).
		Filter      *AuditFilter `json:"filter,omitempty"`
		NewestFirst bool         `json:"newest_first,omitempty"`
		// Before, with NewestFirst, lists records before this sequence
		// number (0: from the head); After then bounds from below.
		Before uint64 `json:"before,omitempty"`
	}
	AuditList struct {
		// Next, on a filtered or newest-first list, is where the node
		// stopped before the end of the log (its scan bound or the limit):
		// the next request's After (Before, newest first). 0: the end.
		Next    uint64        `json:"next,omitempty"`
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
//
//apigen:service
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
	// SnapshotSave streams an archive of the state; the last chunk carries
	// its metadata and SHA-256. The client assembles it (SnapshotSaveTo).
	//apigen:wrap
	SnapshotSave(*Empty, grpc.ServerStreamingServer[SnapshotChunk]) error
	// SnapshotRestore takes an archive in chunks and answers with what it
	// restored. The client sends from a reader (SnapshotRestoreFrom).
	//apigen:wrap
	SnapshotRestore(grpc.ClientStreamingServer[SnapshotChunk, SnapshotArchive]) error
	// AuditExport streams the audit records after a sequence number in
	// pages. The client hands each page to a function.
	//apigen:wrap
	AuditExport(*AuditRequest, grpc.ServerStreamingServer[AuditList]) error
	AuditList(context.Context, *AuditRequest) (*AuditList, error)
	AuditVerify(context.Context, *Empty) (*AuditVerify, error)
	BundleShow(context.Context, *Empty) (*BundleResponse, error)
	AdminCertIssue(context.Context, *AdminCertRequest) (*CertChain, error)
	SVIDRevoke(context.Context, *RevokeRequest) (*Empty, error)
	PCRPolicySet(context.Context, *PCRPolicyRequest) (*Empty, error)
	AdminRevoke(context.Context, *AdminRevokeRequest) (*AdminRecord, error)
	AdminList(context.Context, *Empty) (*AdminList, error)
	// RootCRLAdd adds a CRL signed by a root of the trust bundle (the root
	// ceremony's kind crl): the certificates it lists (node issuing CAs) are
	// refused everywhere from then on.
	RootCRLAdd(context.Context, *RootCRLRequest) (*RootCRLResult, error)
	// PCRPolicyShow answers with the PCR policy a joining TPM must meet.
	PCRPolicyShow(context.Context, *Empty) (*PCRPolicyResponse, error)
	// TokenList lists the join tokens the appliance holds, never a token
	// itself (only its hash is stored).
	TokenList(context.Context, *Empty) (*TokenList, error)
	// TokenRevoke revokes an unused join token by its ID or an unambiguous
	// prefix of at least 12 hex digits.
	TokenRevoke(context.Context, *IDRequest) (*JoinToken, error)
	// AgentRemove forgets an agent: its record goes, so its certificate no
	// longer renews and no workload SVID is issued through it.
	AgentRemove(context.Context, *AgentRemoveRequest) (*AgentRemoved, error)
	// JWTKeyRotate rotates the answering node's own JWT signing key now,
	// as its jwt.rotate-every schedule does: a new key is made in that
	// node's HSM and published in the trust bundle, and from then on the
	// node signs JWT-SVIDs with it. Earlier keys stay in the bundle until
	// the tokens they signed have expired. The answer names the new key
	// and the node. Refused (ResourceExhausted) while the node already has
	// MaxNodeJWTKeys keys in the bundle. Audited: bundle.jwt.rotate names
	// the caller and the kid before the key is made, bundle.jwt.add
	// records its publication.
	JWTKeyRotate(context.Context, *Empty) (*JWTKeyRotated, error)
	// NodeIssuingCertInstall installs a renewed issuing CA certificate on
	// the node it is for, while that node runs: the root ceremony signed
	// it for the node's existing HSM key. Only the node named in the
	// request (and in the certificate) answers; another node refuses
	// (FailedPrecondition) naming it. The node checks the certificate as
	// at start-up (its HSM key, its name, the trust domain, a chain to a
	// root valid now), that no root CRL revokes it and that it expires
	// later than the current one; then it records it (audited with both
	// serials), keeps it in its data directory (issuing/current.pem, the
	// one it replaces as previous.pem; the configured issuing-cert file is
	// never written, and a restart uses the kept one while it expires
	// later), signs with it from then on, and publishes a JWT key carrying
	// it. Refusals change nothing.
	NodeIssuingCertInstall(context.Context, *IssuingCertRequest) (*IssuingCertInstalled, error)
	// RootRotate moves the root rotation one phase (RootRotateRequest) and
	// answers where it then stands. A phase out of order, or one whose
	// wait has not passed, is refused (FailedPrecondition) with the reason.
	RootRotate(context.Context, *RootRotateRequest) (*RootRotationStatus, error)
	// RootRotation answers where the root rotation stands.
	RootRotation(context.Context, *Empty) (*RootRotationStatus, error)
	// JoinRuleCreate adds a join rule for pipeline runs (Join.Job); a
	// preset fills the issuer, claim names and templates it leaves empty.
	JoinRuleCreate(context.Context, *JoinRule) (*JoinRule, error)
	JoinRuleList(context.Context, *Empty) (*JoinRuleList, error)
	JoinRuleShow(context.Context, *IDRequest) (*JoinRule, error)
	// JoinRuleDelete removes a rule: its runs join no more (running ones
	// keep their SVIDs until they expire or end).
	JoinRuleDelete(context.Context, *IDRequest) (*Empty, error)
	// FederationAdd trusts a foreign trust domain: its bundle endpoint
	// (fetched by the leader on the bundle's refresh hint) and optionally
	// an initial bundle (Bundle, a SPIFFE bundle document).
	FederationAdd(context.Context, *FederationRelationship) (*FederationRelationship, error)
	FederationList(context.Context, *Empty) (*FederationList, error)
	FederationShow(context.Context, *IDRequest) (*FederationRelationship, error)
	// FederationDelete stops trusting a foreign trust domain: its bundle
	// leaves every agent's view.
	FederationDelete(context.Context, *IDRequest) (*Empty, error)
	// FederationBundleSet sets a foreign bundle out of band.
	FederationBundleSet(context.Context, *FederationBundle) (*FederationRelationship, error)
}

// Expiry kinds.
const (
	ExpiryIssuingCA = "issuing-ca"
	ExpiryRoot      = "root"
	ExpiryJWTKey    = "jwt-key"
)

// JWTKeyWarnWithin is when sigilctl cluster status warns about a node's
// newest JWT key, whatever --warn-within says: JWT keys live for days by
// design (jwt.rotate-every plus the longest token life), so the newest
// one expiring within the longest JWT-SVID life (24 h) means the node has
// stopped rotating.
const JWTKeyWarnWithin = 24 * time.Hour

// AdminService is the gRPC service name.
const AdminService = "sigil.admin.v1.Admin"

// MaxPendingListed bounds RootRotationStatus.AgentsPending.
const MaxPendingListed = 100
