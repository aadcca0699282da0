package node

import (
	"bufio"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"hash"
	"io"
	"log/slog"
	"maps"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/ca"
	"github.com/sigil-appliance/sigil/appliance/state"
	"github.com/sigil-appliance/sigil/internal/nodeid"
	"github.com/sigil-appliance/sigil/raft"
)

// admin implements api.AdminServer. Writes go through raft (forwarded to
// the leader by the raft package); reads wait for a linearizable read index
// first, so a follower never answers with stale state.
type admin struct {
	td         spiffeid.TrustDomain
	nodeID     string
	roots      []*x509.Certificate // verify the audit log's checkpoints
	dataDir    string              // uploaded archives are checked under it
	maxCertTTL time.Duration       // api.admin-cert-max-ttl, bounded by the state's
	log        *slog.Logger
	authLog    *rateLog // refusals of authenticated callers, rate-limited

	seen   *seenAgents        // this node's view of agent contacts (agentseen.go)
	state  *state.FSM         // the replica this service administers
	member raftMember         // commands, reads and membership
	ca     adminSigner        // issues admin certificates
	jwt    jwtRotator         // this node's JWT signing keys
	fed    *federationFetcher // this node's fetch status of foreign bundles (nil: none)
	// renew installs renewed issuing certificates (issuingcert.go; nil:
	// refused).
	renew *issuingRenewal
	// rotation is what a root rotation's phases wait for on this node
	// (rootrotation.go; nil: refused).
	rotation rotationWaits
}

// rotationWaits is the node as RootRotate consults it.
type rotationWaits interface {
	maxSignedLife() time.Duration
	waitsFor(rot *state.RootRotation, phase string) error
}

// jwtRotator is this node's JWT key rotation (ca.JWTKeys) as admins ask
// for it.
type jwtRotator interface {
	RotateOnDemand(context.Context, ca.OnDemand) (string, error)
}

// adminSigner is the node's issuing CA as the admin service uses it.
type adminSigner interface {
	SignAdmin(ca.Leaf) ([]*x509.Certificate, error)
}

var _ api.AdminServer = (*admin)(nil)

// apply proposes a command as the caller. An admin certificate's command
// names the certificate (its serial), so that the state machine decides at
// commit, in log order, whether that certificate may still act for its
// name and with which role: this replica's own check may lag (a follower
// behind, a node restarting) and a name may have been revoked and
// re-issued meanwhile.
func (a *admin) apply(ctx context.Context, c caller, typ string, payload any) ([]byte, error) {
	if c.Local {
		return a.member.apply(ctx, c.Actor, typ, payload)
	}
	cmd, err := state.NewAdminCommand(typ, c.Actor, c.Serial, time.Now(), payload)
	if err != nil {
		return nil, err
	}
	start := time.Now()
	resp, err := a.member.raft.Apply(ctx, cmd)
	a.member.metrics.observeApply(typ, time.Since(start), err)
	return resp, err
}

// write proposes a command as the caller and decodes the FSM's response.
func write[T any](ctx context.Context, a *admin, typ string, payload any) (*T, error) {
	c := callerFrom(ctx)
	resp, err := a.apply(ctx, c, typ, payload)
	if err != nil {
		return nil, a.fail(typ, c, err)
	}
	out := new(T)
	if len(resp) > 0 {
		if err := json.Unmarshal(resp, out); err != nil {
			a.log.Error("admin request failed: response does not decode", "request", typ, "actor", c.Actor, "err", err)
			return nil, status.Errorf(codes.Internal, "decode %s response: %v", typ, err)
		}
	}
	a.log.Info("admin change", "command", typ, "actor", c.Actor, "target", commandTarget(payload))
	return out, nil
}

// commandTarget names what an admin command changes, for the log line
// that reports it ("" when the command has no single target, such as a
// PCR policy or a restore). Token IDs are hashes of the token, never the
// token itself.
func commandTarget(payload any) string {
	switch p := payload.(type) {
	case *state.Entry:
		return p.ID + " " + p.SPIFFEID
	case state.EntryID:
		return p.ID
	case state.AgentID:
		return p.ID
	case state.AgentRemove:
		return p.ID
	case state.EKCARemove:
		return p.ID
	case state.EKHash:
		return p.Hash
	case state.TokenCreate:
		return p.ID
	case state.TokenRevoke:
		return p.ID
	case state.AdminRevoke:
		return p.Name
	case state.Revoke:
		return p.Serial
	case *state.Federation:
		return p.TrustDomain
	case state.FederationDelete:
		return p.TrustDomain
	case state.FederationBundleSet:
		return p.TrustDomain
	}
	return ""
}

// fail logs a refused or failed request and maps it to a gRPC status.
func (a *admin) fail(what string, c caller, err error) error {
	var ae *raft.ApplyError
	switch {
	case (errors.Is(err, state.ErrRefused) || errors.As(err, &ae)) && strings.Contains(err.Error(), state.AdminRevokedMarker):
		// Refused at commit: the caller's name was revoked before this
		// command, and this replica had not applied it yet.
		a.authLog.warn("admin call refused: certificate revoked", "request", what, "actor", c.Actor, "serial", c.Serial, "reason", err.Error())
		return status.Errorf(codes.Unauthenticated, "admin certificate %s (serial %s) was revoked: %s", c.Actor, c.Serial, err.Error())
	case errors.Is(err, state.ErrRefused) || errors.As(err, &ae):
		a.log.Warn("admin request refused", "request", what, "actor", c.Actor, "reason", err.Error())
		return status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, raft.ErrNoLeader), errors.Is(err, context.DeadlineExceeded):
		a.log.Error("admin request failed: no quorum", "request", what, "actor", c.Actor, "err", err)
		return status.Errorf(codes.Unavailable, "the cluster cannot commit now (no leader or no quorum): %v", err)
	}
	a.log.Error("admin request failed", "request", what, "actor", c.Actor, "err", err)
	return status.Errorf(codes.Unavailable, "%s: %v", what, err)
}

// read makes this replica current for the call, then checks the admin's
// certificate again against it: a revocation committed before the call
// began counts even where it had not been applied when the call was
// authenticated.
func (a *admin) read(ctx context.Context, what string) error {
	c := callerFrom(ctx)
	if err := a.member.raft.ReadIndex(ctx); err != nil {
		return a.fail(what, c, err)
	}
	if c.Peer.Role == ca.RoleAdmin {
		return checkAdminRevoked(a.state, a.authLog, what, c)
	}
	return nil
}

func (a *admin) EntryCreate(ctx context.Context, r *api.EntryRequest) (*api.Entry, error) {
	e := stateEntry(r.Entry)
	if e.ID == "" {
		e.ID = newID()
	}
	if err := state.ValidateEntry(a.td, &e); err != nil {
		a.log.Warn("admin request refused", "request", state.CmdEntryCreate, "actor", callerFrom(ctx).Actor, "reason", err.Error())
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := a.read(ctx, state.CmdEntryCreate); err != nil {
		return nil, err
	}
	if err := a.checkParent(ctx, state.CmdEntryCreate, e.ParentID, r.Force); err != nil {
		return nil, err
	}
	return writeEntry(ctx, a, state.CmdEntryCreate, &e)
}

// EntryUpdate replaces an entry with the one given. A nonzero revision
// makes it replace only that revision of the entry (the state machine
// compares), so that a client that read, changed and wrote back the entry
// loses no change made in between.
func (a *admin) EntryUpdate(ctx context.Context, r *api.EntryRequest) (*api.Entry, error) {
	e := stateEntry(r.Entry)
	if err := state.ValidateEntry(a.td, &e); err != nil {
		a.log.Warn("admin request refused", "request", state.CmdEntryUpdate, "actor", callerFrom(ctx).Actor, "reason", err.Error())
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := a.read(ctx, state.CmdEntryUpdate); err != nil {
		return nil, err
	}
	// An entry keeps its parent through updates that do not move it,
	// whatever became of the agent since: only a new parent is checked.
	// (An entry that does not exist is the state machine's to refuse.)
	if old, ok := a.state.Entry(e.ID); ok && old.ParentID != e.ParentID {
		if err := a.checkParent(ctx, state.CmdEntryUpdate, e.ParentID, r.Force); err != nil {
			return nil, err
		}
	}
	return writeEntry(ctx, a, state.CmdEntryUpdate, &e)
}

// checkParent refuses, unless forced, an entry no agent would fetch: its
// parent is a node (nodes fetch no workload entries), an agent that has
// not joined, or a banned one. It is the operator's mistake that it
// catches, not a rule of the state: an entry may be registered ahead of
// its agent's join, with force, and the state machine stores it either
// way. A forced override is logged with the reason it overrode. The
// caller has made this replica current (a.read).
func (a *admin) checkParent(ctx context.Context, what, parent string, force bool) error {
	var reason string
	switch ag, ok := a.state.Agent(parent); {
	case strings.HasPrefix(parent, "spiffe://"+a.td.Name()+"/sigil/node/"):
		reason = "parent_id " + parent + " is a node: only agents fetch workload entries"
	case !ok:
		reason = "parent_id " + parent + " is not an agent that has joined this appliance: no agent fetches the entry until one joins with that ID"
	case ag.Banned:
		reason = "parent_id " + parent + " is a banned agent: it gets no SVIDs until it is unbanned"
	default:
		return nil
	}
	c := callerFrom(ctx)
	if force {
		a.log.Warn("entry parent check overridden", "request", what, "actor", c.Actor, "reason", reason)
		return nil
	}
	a.log.Warn("admin request refused", "request", what, "actor", c.Actor, "reason", reason)
	return status.Error(codes.FailedPrecondition, reason+" "+api.ForceParentHint)
}

// writeEntry proposes an entry command and serves the stored entry.
func writeEntry(ctx context.Context, a *admin, typ string, e *state.Entry) (*api.Entry, error) {
	stored, err := write[state.Entry](ctx, a, typ, e)
	if err != nil {
		return nil, err
	}
	out := apiEntry(*stored)
	return &out, nil
}

func (a *admin) EntryDelete(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdEntryDelete, state.EntryID{ID: r.ID})
}

func (a *admin) EntryShow(ctx context.Context, r *api.IDRequest) (*api.Entry, error) {
	if err := a.read(ctx, "entry show"); err != nil {
		return nil, err
	}
	e, ok := a.state.Entry(r.ID)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no entry %s", r.ID)
	}
	out := apiEntry(e)
	return &out, nil
}

func (a *admin) EntryList(ctx context.Context, r *api.EntryListRequest) (*api.EntryList, error) {
	if err := a.read(ctx, "entry list"); err != nil {
		return nil, err
	}
	out := &api.EntryList{}
	for _, e := range a.state.Entries() {
		if (r.ParentID == "" || e.ParentID == r.ParentID) && (r.SPIFFEID == "" || e.SPIFFEID == r.SPIFFEID) {
			out.Entries = append(out.Entries, apiEntry(e))
		}
	}
	return out, nil
}

func (a *admin) AgentList(ctx context.Context, _ *api.Empty) (*api.AgentList, error) {
	if err := a.read(ctx, "agent list"); err != nil {
		return nil, err
	}
	agents := a.state.Agents()
	out := &api.AgentList{Agents: apiAgents(agents)}
	known := make(map[string]bool, len(agents))
	for i := range out.Agents {
		a.lastSeen(&out.Agents[i])
		known[agents[i].ID] = true
	}
	a.seen.prune(func(id string) bool { return known[id] })
	return out, nil
}

// lastSeen adds this node's view of the agent's contacts.
func (a *admin) lastSeen(ag *api.Agent) {
	if a.seen == nil {
		return
	}
	ag.SeenBy = a.nodeID
	ag.LastSeen, ag.Connected = a.seen.contact(ag.ID)
}

func (a *admin) AgentShow(ctx context.Context, r *api.IDRequest) (*api.Agent, error) {
	if err := a.read(ctx, "agent show"); err != nil {
		return nil, err
	}
	ag, ok := a.state.Agent(r.ID)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no agent %s", r.ID)
	}
	out := apiAgent(ag)
	a.lastSeen(&out)
	return &out, nil
}

func (a *admin) AgentBan(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdAgentBan, state.AgentID{ID: r.ID})
}

func (a *admin) AgentUnban(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdAgentUnban, state.AgentID{ID: r.ID})
}

func (a *admin) EKCAAdd(ctx context.Context, r *api.EKCARequest) (*api.EKCA, error) {
	c, err := write[state.EKCA](ctx, a, state.CmdEKCAAdd, state.EKCAAdd{DER: r.DER})
	if err != nil {
		return nil, err
	}
	out := apiEKCA(*c)
	return &out, nil
}

func (a *admin) EKCAList(ctx context.Context, _ *api.Empty) (*api.EKCAList, error) {
	if err := a.read(ctx, "ek-ca list"); err != nil {
		return nil, err
	}
	return &api.EKCAList{CAs: apiEKCAs(a.state.Policy().EKCAs)}, nil
}

func (a *admin) EKCARemove(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdEKCARemove, state.EKCARemove{ID: r.ID})
}

func (a *admin) EKAllowAdd(ctx context.Context, r *api.HashRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdEKAllowAdd, state.EKHash{Hash: r.Hash})
}

func (a *admin) EKAllowList(ctx context.Context, _ *api.Empty) (*api.HashList, error) {
	if err := a.read(ctx, "allow list"); err != nil {
		return nil, err
	}
	return &api.HashList{Hashes: a.state.Policy().EKAllow}, nil
}

func (a *admin) EKAllowRemove(ctx context.Context, r *api.HashRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdEKAllowRemove, state.EKHash{Hash: r.Hash})
}

// TokenCreate makes a 256-bit join token. Only its hash is replicated and
// audited; the token itself is returned once, to this caller.
func (a *admin) TokenCreate(ctx context.Context, r *api.TokenRequest) (*api.TokenResponse, error) {
	ttl := r.TTL.Duration()
	if ttl <= 0 {
		ttl = time.Hour
	}
	if ttl > 7*24*time.Hour {
		return nil, status.Errorf(codes.InvalidArgument, "token TTL %v is longer than 7 days", ttl)
	}
	raw := make([]byte, 32)
	rand.Read(raw)
	tok := base64.RawURLEncoding.EncodeToString(raw)
	id := TokenID(tok)
	exp := time.Now().Add(ttl).UTC().Truncate(time.Second)
	if _, err := write[state.JoinToken](ctx, a, state.CmdTokenCreate, state.TokenCreate{ID: id, ExpiresAt: exp}); err != nil {
		return nil, err
	}
	return &api.TokenResponse{Token: tok, ID: id, ExpiresAt: exp}, nil
}

// TokenID is how a join token is known to the state and the audit log.
func TokenID(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// ClusterStatus answers with this node's own state and the leader's view
// of the members, asked through raft when this node does not lead; when
// the leader cannot be asked it shows this node's own view and says why.
// It never fails for want of a leader: the answer is the report.
func (a *admin) ClusterStatus(ctx context.Context, _ *api.Empty) (*api.ClusterStatus, error) {
	r := a.member.raft
	local := r.Status(ctx)
	view, err := local, error(nil)
	if local.State != "leader" {
		fctx, cancel := context.WithTimeout(ctx, leaderStatusWait(ctx))
		view, err = r.LeaderStatus(fctx)
		cancel()
		if err != nil {
			view = local
		}
	}
	out := clusterStatus(local, view)
	if err != nil {
		out.View.LeaderError = err.Error()
	}
	out.Expiries = expiries(a.state.NodeCAs(), a.state.Bundle())
	return out, nil
}

// expiries lists what the trust chain needs renewed in time, as this
// replica knows it: each node's recorded issuing CA, every root, and each
// node's newest JWT key (older keys are meant to expire; the newest one
// running out means rotation has stopped).
func expiries(cas []state.NodeCA, b state.Bundle) []api.Expiry {
	var out []api.Expiry
	for _, r := range cas {
		if !r.NotAfter.IsZero() { // recorded before expiries were kept
			out = append(out, api.Expiry{Kind: api.ExpiryIssuingCA, Name: r.Node, Serial: r.Serial, NotAfter: r.NotAfter})
		}
	}
	for _, der := range b.Roots {
		if c, err := x509.ParseCertificate(der); err == nil {
			out = append(out, api.Expiry{Kind: api.ExpiryRoot, Name: c.Subject.String(), Serial: c.SerialNumber.Text(16), NotAfter: c.NotAfter.UTC()})
		}
	}
	newest := map[string]state.JWTKey{}
	for _, k := range b.JWTKeys {
		if cur, ok := newest[k.Node]; !ok || k.NotAfter.After(cur.NotAfter) {
			newest[k.Node] = k
		}
	}
	for _, node := range slices.Sorted(maps.Keys(newest)) {
		k := newest[node]
		out = append(out, api.Expiry{Kind: api.ExpiryJWTKey, Name: node, Serial: k.KID, NotAfter: k.NotAfter.UTC()})
	}
	return out
}

// leaderStatusWait bounds the question to the leader: 2s, or half of what
// the caller has left, so that the local view can still be answered when
// the leader does not.
func leaderStatusWait(ctx context.Context) time.Duration {
	wait := 2 * time.Second
	if d, ok := ctx.Deadline(); ok {
		wait = min(wait, time.Until(d)/2)
	}
	return max(wait, time.Millisecond)
}

func clusterStatus(st, view raft.Status) *api.ClusterStatus {
	out := &api.ClusterStatus{NodeID: st.NodeID, State: st.State, Term: st.Term, LastIndex: st.LastIndex,
		CommitIndex: st.CommitIndex, AppliedIndex: st.AppliedIndex, LeaderID: st.LeaderID, LeaderAddr: st.LeaderAddr,
		View: api.ClusterView{NodeID: view.NodeID, Leader: view.State == "leader", Term: view.Term, LastIndex: view.LastIndex,
			ReachableWithinMS: view.ReachableWithin.Milliseconds()}}
	for _, p := range view.Peers {
		ap := api.Peer{ID: p.ID, Addr: p.Addr, Suffrage: p.Suffrage, Reachable: p.Reachable, LastContact: p.LastContact,
			MatchIndex: p.MatchIndex, Lag: p.Lag}
		if !p.LastContact.IsZero() {
			ms := p.ContactAge.Milliseconds()
			ap.ContactAgeMS = &ms
		}
		out.Peers = append(out.Peers, ap)
	}
	return out
}

func (a *admin) ClusterJoin(ctx context.Context, r *api.JoinRequest) (*api.Empty, error) {
	if err := nodeid.Check(r.NodeID); err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if err := a.member.raft.Join(ctx, r.NodeID, r.Addr); err != nil {
		return nil, a.fail("cluster join", callerFrom(ctx), err)
	}
	a.audit(ctx, "cluster.join", r.NodeID, map[string]string{"addr": r.Addr})
	return &api.Empty{}, nil
}

func (a *admin) ClusterRemove(ctx context.Context, r *api.IDRequest) (*api.Empty, error) {
	if err := a.member.raft.Remove(ctx, r.ID); err != nil {
		return nil, a.fail("cluster remove", callerFrom(ctx), err)
	}
	a.audit(ctx, "cluster.remove", r.ID, nil)
	return &api.Empty{}, nil
}

// audit records an action that is not itself a state change (membership
// lives in raft's configuration, not in the FSM).
func (a *admin) audit(ctx context.Context, action, target string, detail map[string]string) {
	c := callerFrom(ctx)
	if _, err := a.apply(ctx, c, state.CmdAudit, state.AuditAppend{Events: []state.AuditEvent{{Action: action, Target: target, Detail: detail}}}); err != nil {
		a.log.Error("audit record failed", "action", action, "target", target, "err", err)
	}
}

// SnapshotSave streams an archive of the state from one read transaction;
// commits go on while it is written.
func (a *admin) SnapshotSave(_ *api.Empty, stream grpc.ServerStreamingServer[api.SnapshotChunk]) error {
	ctx := stream.Context()
	if err := a.read(ctx, "snapshot save"); err != nil {
		return err
	}
	start := time.Now()
	// The archive is written to a private spool file first, so a slow
	// client never holds the state's read transaction (or a restore that
	// waits for it).
	spool, err := os.CreateTemp(a.scratchDir(), "save-*.archive")
	if err != nil {
		a.log.Error("snapshot save failed: spool", "actor", callerFrom(ctx).Actor, "err", err)
		return status.Errorf(codes.Internal, "snapshot: %v", err)
	}
	defer a.discardSpool(spool)
	bw := bufio.NewWriterSize(spool, 1<<20)
	meta, err := a.state.WriteArchive(bw, a.nodeID, time.Now())
	if err == nil {
		err = bw.Flush()
	}
	if err == nil {
		_, err = spool.Seek(0, io.SeekStart)
	}
	// The save stops when its context ends (the admin's certificate
	// expired, or the client left).
	w := &chunkWriter{send: func(b []byte) error {
		if err := ctx.Err(); err != nil {
			return err
		}
		return stream.Send(&api.SnapshotChunk{Data: b})
	}, h: sha256.New()}
	if err == nil {
		_, err = io.Copy(w, bufio.NewReaderSize(spool, 1<<20))
	}
	if err == nil {
		err = w.flush()
	}
	if err != nil {
		a.log.Warn("snapshot save failed", "actor", callerFrom(ctx).Actor, "err", err)
		return status.Errorf(codes.Internal, "snapshot: %v", err)
	}
	sum := hex.EncodeToString(w.h.Sum(nil))
	a.log.Info("snapshot saved", "actor", callerFrom(ctx).Actor, "index", meta.Index, "bytes", meta.Size,
		"audit_records", meta.AuditRecords, "seconds", time.Since(start).Seconds())
	return stream.Send(&api.SnapshotChunk{Meta: &meta, SHA256: sum})
}

// chunkWriter cuts a stream into messages of api.SnapshotChunkSize.
type chunkWriter struct {
	send func([]byte) error
	buf  []byte
	h    hash.Hash
}

func (w *chunkWriter) Write(p []byte) (int, error) {
	w.h.Write(p)
	n := len(p)
	for len(p) > 0 {
		take := min(len(p), api.SnapshotChunkSize-len(w.buf))
		w.buf = append(w.buf, p[:take]...)
		p = p[take:]
		if len(w.buf) == api.SnapshotChunkSize {
			if err := w.flush(); err != nil {
				return 0, err
			}
		}
	}
	return n, nil
}

func (w *chunkWriter) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	err := w.send(w.buf)
	w.buf = make([]byte, 0, api.SnapshotChunkSize)
	return err
}

// MaxArchiveSize bounds an uploaded archive (spooled to the data
// directory before it is checked).
const MaxArchiveSize = 16 << 30

// SnapshotRestore spools the uploaded archive to a private file, checks it
// completely (checksum, layout, trust domain, every record, the audit
// chain) and proposes the restore; the state machine then checks it
// against the current state (history, bundle, agents, tokens). A bad
// archive changes nothing.
func (a *admin) SnapshotRestore(stream grpc.ClientStreamingServer[api.SnapshotChunk, api.SnapshotArchive]) error {
	ctx := stream.Context()
	c := callerFrom(ctx)
	f, err := os.CreateTemp(a.scratchDir(), "restore-*.archive")
	if err != nil {
		a.log.Error("snapshot restore failed: spool", "actor", c.Actor, "err", err)
		return status.Errorf(codes.Internal, "spool archive: %v", err)
	}
	defer a.discardSpool(f)
	var size int64
	for {
		ch, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return err
		}
		if size += int64(len(ch.Data)); size > MaxArchiveSize {
			a.log.Warn("snapshot restore refused: archive too large", "actor", c.Actor, "bytes", size)
			return status.Errorf(codes.InvalidArgument, "archive exceeds %d bytes", int64(MaxArchiveSize))
		}
		if _, err := f.Write(ch.Data); err != nil {
			a.log.Error("snapshot restore failed: spool", "actor", c.Actor, "bytes", size, "err", err)
			return status.Errorf(codes.Internal, "spool archive: %v", err)
		}
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		a.log.Error("snapshot restore failed: spool", "actor", c.Actor, "err", err)
		return status.Errorf(codes.Internal, "spool archive: %v", err)
	}
	p, meta, sum, err := a.state.ReadArchive(bufio.NewReaderSize(f, 1<<20), a.scratchDir())
	if err != nil {
		a.log.Warn("snapshot restore refused", "actor", c.Actor, "reason", err.Error())
		return status.Error(codes.InvalidArgument, err.Error())
	}
	if _, err := write[api.Empty](ctx, a, state.CmdStateRestore, p); err != nil {
		return err
	}
	a.log.Info("snapshot restored", "actor", c.Actor, "archive_sha256", sum, "index", meta.Index, "entries", meta.Entries)
	return stream.SendAndClose(&api.SnapshotArchive{Meta: meta, SHA256: sum})
}

// AuditExport streams every record after r.After: first the ones this node
// exported to segment files when they were pruned, then the retained log.
func (a *admin) AuditExport(r *api.AuditRequest, stream grpc.ServerStreamingServer[api.AuditList]) error {
	ctx := stream.Context()
	if r.Filter != nil || r.NewestFirst || r.Before != 0 {
		return status.Error(codes.InvalidArgument, "audit export streams every record in order: filters and newest-first apply to audit list")
	}
	if err := a.read(ctx, "audit export"); err != nil {
		return err
	}
	head, _ := a.state.AuditHead()
	page := &api.AuditList{Head: head, First: a.state.AuditFirst()}
	err := a.state.ExportAudit(r.After, func(rec *state.AuditRecord) error {
		page.Records = append(page.Records, *rec)
		if len(page.Records) < 1000 {
			return ctx.Err()
		}
		err := stream.Send(page)
		page.Records = page.Records[:0]
		return err
	})
	if err == nil && len(page.Records) > 0 {
		err = stream.Send(page)
	}
	if err != nil {
		a.log.Warn("audit export failed", "actor", callerFrom(ctx).Actor, "err", err)
		if status.Code(err) == codes.Unknown {
			return status.Errorf(codes.Internal, "audit export: %v", err)
		}
		return err
	}
	return nil
}

func (a *admin) AuditList(ctx context.Context, r *api.AuditRequest) (*api.AuditList, error) {
	if err := a.read(ctx, "audit list"); err != nil {
		return nil, err
	}
	head, _ := a.state.AuditHead()
	if r.Filter != nil || r.NewestFirst || r.Before != 0 {
		return a.auditSelect(ctx, r, head)
	}
	return &api.AuditList{Records: a.state.Audit(r.After, r.Limit), Head: head, First: a.state.AuditFirst()}, nil
}

// auditListBytes bounds the records one filtered answer carries (records
// may hold up to about 35 KB of detail each, so r.Limit alone could build
// more than api.MaxResponseSize before the send fails).
const auditListBytes = api.MaxResponseSize / 2

// auditRecordSize estimates a record's JSON size from what varies.
func auditRecordSize(r *state.AuditRecord) int {
	n := 512 + len(r.Actor) + len(r.Action) + len(r.Target)
	for k, v := range r.Detail {
		n += len(k) + len(v) + 8
	}
	return n
}

// auditSelect serves a filtered or newest-first audit list: it reads at
// most api.MaxAuditScan records and keeps at most r.Limit (and about
// auditListBytes), so a request costs the same whatever the log holds; it
// stops early when the caller gives up. Next says where to go on.
func (a *admin) auditSelect(ctx context.Context, r *api.AuditRequest, head uint64) (*api.AuditList, error) {
	if r.Before != 0 && !r.NewestFirst {
		return nil, status.Error(codes.InvalidArgument, "before applies to a newest-first list only")
	}
	if f := r.Filter; f != nil && !f.Since.IsZero() && !f.Until.IsZero() && f.Until.Before(f.Since) {
		return nil, status.Errorf(codes.InvalidArgument, "until %s is before since %s", f.Until.Format(time.RFC3339), f.Since.Format(time.RFC3339))
	}
	limit := r.Limit
	if limit <= 0 || limit > state.MaxAuditList {
		limit = state.MaxAuditList
	}
	out := &api.AuditList{Records: []api.AuditRecord{}, Head: head, First: a.state.AuditFirst()}
	size := 0
	last, end := a.state.AuditScan(r.After, r.Before, r.NewestFirst, api.MaxAuditScan, func(rec *state.AuditRecord) bool {
		if r.Filter.Match(rec) {
			out.Records = append(out.Records, *rec)
			size += auditRecordSize(rec)
		}
		return len(out.Records) < limit && size < auditListBytes && ctx.Err() == nil
	})
	if err := ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	if !end {
		out.Next = last
	}
	return out, nil
}

// AuditVerify walks the retained chain and checks every checkpoint's HSM
// signature against the roots this node was configured with.
func (a *admin) AuditVerify(ctx context.Context, _ *api.Empty) (*api.AuditVerify, error) {
	if err := a.read(ctx, "audit verify"); err != nil {
		return nil, err
	}
	rep := a.state.VerifyAuditLog(a.auditRoots())
	return &api.AuditVerify{Records: rep.To, Intact: rep.Intact, FirstBad: rep.FirstBad, Error: rep.Error,
		From: rep.From, To: rep.To, Checkpoints: rep.Checkpoints, LastCheckpoint: rep.LastCheckpoint}, nil
}

// auditRoots are the roots checkpoints may chain to: the bundle's, the
// roots earlier rotations retired (history signed under them stays
// verifiable) and the configured ones.
func (a *admin) auditRoots() []*x509.Certificate {
	out := slices.Clone(a.roots)
	add := func(der []byte) {
		if c, err := x509.ParseCertificate(der); err == nil && !slices.ContainsFunc(out, c.Equal) {
			out = append(out, c)
		}
	}
	for _, d := range a.state.Bundle().Roots {
		add(d)
	}
	for _, r := range a.state.RetiredRoots() {
		add(r.DER)
	}
	return out
}

func (a *admin) BundleShow(ctx context.Context, _ *api.Empty) (*api.BundleResponse, error) {
	if err := a.read(ctx, "bundle show"); err != nil {
		return nil, err
	}
	b := a.state.Bundle()
	doc, err := SPIFFEBundle(a.td, b)
	if err != nil {
		a.log.Error("bundle show failed", "actor", callerFrom(ctx).Actor, "err", err)
		return nil, status.Errorf(codes.Internal, "bundle: %v", err)
	}
	return &api.BundleResponse{Bundle: apiBundle(b), SPIFFE: doc}, nil
}

// SPIFFEBundle renders the trust bundle as a SPIFFE bundle document.
func SPIFFEBundle(td spiffeid.TrustDomain, b state.Bundle) ([]byte, error) {
	return spiffeBundleDoc(td, b, 0)
}

// spiffeBundleDoc is SPIFFEBundle with a spiffe_refresh_hint (0: none),
// as the bundle endpoint serves it to federated trust domains.
func spiffeBundleDoc(td spiffeid.TrustDomain, b state.Bundle, hint time.Duration) ([]byte, error) {
	sb := spiffebundle.New(td)
	for _, der := range b.Roots {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, err
		}
		sb.AddX509Authority(c)
	}
	for _, k := range b.JWTKeys {
		pub, err := x509.ParsePKIXPublicKey(k.PublicKey)
		if err != nil {
			return nil, err
		}
		if err := sb.AddJWTAuthority(k.KID, pub); err != nil {
			return nil, err
		}
	}
	sb.SetSequenceNumber(b.Sequence)
	if hint > 0 {
		sb.SetRefreshHint(hint)
	}
	return sb.Marshal()
}

// AdminCertIssue certifies an admin's own key (from its CSR) as
// spiffe://<td>/sigil/admin/<name>. Who may have what: root on a node's
// local socket any name and role; an admin-issuer certificate any name and
// role; a plain admin certificate (or one the state has no record of) only
// its own name as a plain admin (its renewal). The role is that of the
// calling certificate, not of its name. That is
// checked before anything is signed (a refusal is audited and nothing else
// is recorded) and again by the state machine when the issuance is
// recorded, in log order. The issuance is recorded (serial, role, signing
// node) before the certificate is returned: no record, no certificate.
func (a *admin) AdminCertIssue(ctx context.Context, r *api.AdminCertRequest) (*api.CertChain, error) {
	c := callerFrom(ctx)
	if !state.AdminNameRE.MatchString(r.Name) {
		return nil, status.Errorf(codes.InvalidArgument, "admin name %q: want %s", shownID(r.Name), state.AdminNameRE)
	}
	if r.Role != "" && r.Role != state.RoleAdmin && r.Role != state.RoleAdminIssuer {
		return nil, status.Errorf(codes.InvalidArgument, "admin role %q: want %s or %s", shownID(r.Role), state.RoleAdmin, state.RoleAdminIssuer)
	}
	csr, err := x509.ParseCertificateRequest(r.CSR)
	if err != nil {
		a.log.Warn("admin certificate refused: malformed CSR", "actor", c.Actor, "err", err)
		return nil, status.Errorf(codes.InvalidArgument, "malformed CSR: %v", err)
	}
	if err := csr.CheckSignature(); err != nil {
		a.log.Warn("admin certificate refused: CSR signature", "actor", c.Actor, "err", err)
		return nil, status.Errorf(codes.InvalidArgument, "CSR signature does not verify: %v", err)
	}
	ttl := r.TTL.Duration()
	if ttl <= 0 {
		ttl = 8 * time.Hour
	}
	if max := a.maxCertTTL; ttl > max {
		return nil, status.Errorf(codes.InvalidArgument, "TTL %v exceeds this node's admin-cert-max-ttl %v", ttl, max)
	}
	id := spiffeid.RequireFromPath(a.td, "/sigil/admin/"+r.Name)
	if !c.Local {
		// Checked on a current replica so that nothing is signed for a
		// caller who may not have it; the state machine checks again when
		// the issuance is recorded.
		if err := a.read(ctx, "admin cert issue"); err != nil {
			return nil, err
		}
		admins, err := a.state.Admins()
		if err != nil {
			a.log.Error("admin request failed: admin table", "request", "admin cert issue", "actor", c.Actor, "err", err)
			return nil, status.Errorf(codes.Internal, "the admin table cannot be read: %v", err)
		}
		callerRole := state.AdminCertRole(admins, c.Peer.Name, c.Serial)
		role := state.ResolveAdminRoleBy(state.FindAdmin(admins, r.Name), r.Role, c.Peer.Name, callerRole, r.Name)
		if err := state.MayIssueAdmin(c.Peer.Name, callerRole, r.Name, role); err != nil {
			return nil, a.refuseAdmin(ctx, "admin.cert.refuse", id.String(), role, err)
		}
	}
	chain, err := a.ca.SignAdmin(ca.Leaf{ID: id, PublicKey: csr.PublicKey, TTL: ttl, Subject: pkix.Name{CommonName: r.Name}})
	if err != nil {
		// The operator may see the HSM's answer (key and token labels, the
		// PKCS#11 return value): keystore errors never carry a PIN.
		a.log.Error("admin certificate not issued: signing", "actor", c.Actor, "admin", id.String(), "err", err)
		return nil, status.Errorf(codes.Internal, "sign: %v", err)
	}
	rec, err := a.apply(ctx, c, state.CmdAdminIssue, state.AdminIssue{Name: r.Name, Role: r.Role,
		Serial: chain[0].SerialNumber.Text(16), Node: a.nodeID, NotAfter: chain[0].NotAfter})
	if err != nil {
		if refused(err) && !strings.Contains(err.Error(), state.AdminRevokedMarker) {
			return nil, a.refuseAdmin(ctx, "admin.cert.refuse", id.String(), r.Role, err)
		}
		return nil, a.fail("admin cert record", c, err)
	}
	var stored state.AdminRecord
	if json.Unmarshal(rec, &stored) != nil {
		stored.Role = r.Role
	}
	a.log.Info("admin certificate issued", "actor", c.Actor, "admin", id.String(), "role", stored.Role,
		"serial", chain[0].SerialNumber.Text(16), "not_after", chain[0].NotAfter)
	out := &api.CertChain{}
	for _, x := range chain {
		out.Chain = append(out.Chain, x.Raw)
	}
	return out, nil
}

// refuseAdmin audits and logs a refused admin request of an authenticated
// admin and returns its error. The refusal is all that is recorded.
func (a *admin) refuseAdmin(ctx context.Context, action, target, role string, err error) error {
	c := callerFrom(ctx)
	reason := auditReason(strings.TrimPrefix(err.Error(), state.ErrRefused.Error()+": "))
	a.log.Warn("admin request refused", "action", action, "actor", c.Actor, "target", target, "role", role, "reason", reason)
	a.audit(ctx, action, target, map[string]string{"role": role, "reason": reason})
	return status.Error(codes.PermissionDenied, reason)
}

// AdminRevoke revokes every certificate issued so far for an admin name,
// recorded or not: from then on only certificates issued after it act for
// the name. An issuer (or root on a node) may revoke any name, an admin its
// own.
func (a *admin) AdminRevoke(ctx context.Context, r *api.AdminRevokeRequest) (*api.AdminRecord, error) {
	c := callerFrom(ctx)
	if !state.AdminNameRE.MatchString(r.Name) {
		return nil, status.Errorf(codes.InvalidArgument, "admin name %q: want %s", shownID(r.Name), state.AdminNameRE)
	}
	target := spiffeid.RequireFromPath(a.td, "/sigil/admin/"+r.Name).String()
	if !c.Local {
		admins, err := a.state.Admins()
		if err != nil {
			a.log.Error("admin request failed: admin table", "request", "admin revoke", "actor", c.Actor, "err", err)
			return nil, status.Errorf(codes.Internal, "the admin table cannot be read: %v", err)
		}
		if err := state.MayRevokeAdmin(c.Peer.Name, state.AdminCertRole(admins, c.Peer.Name, c.Serial), r.Name); err != nil {
			return nil, a.refuseAdmin(ctx, "admin.revoke.refuse", target, "", err)
		}
	}
	rec, err := write[state.AdminRecord](ctx, a, state.CmdAdminRevoke, state.AdminRevoke{Name: r.Name})
	if err != nil {
		return nil, err
	}
	a.log.Warn("admin revoked", "actor", c.Actor, "admin", target)
	out := apiAdmin(a.td, *rec)
	return &out, nil
}

// AdminList lists the admin names the appliance has recorded (issued or
// revoked), with their roles and unexpired certificates.
func (a *admin) AdminList(ctx context.Context, _ *api.Empty) (*api.AdminList, error) {
	if err := a.read(ctx, "admin list"); err != nil {
		return nil, err
	}
	admins, err := a.state.Admins()
	if err != nil {
		a.log.Error("admin request failed: admin table", "request", "admin list", "actor", callerFrom(ctx).Actor, "err", err)
		return nil, status.Errorf(codes.Internal, "the admin table cannot be read: %v", err)
	}
	out := &api.AdminList{Admins: make([]api.AdminRecord, 0, len(admins))}
	for _, r := range admins {
		out.Admins = append(out.Admins, apiAdmin(a.td, r))
	}
	return out, nil
}

func apiAdmin(td spiffeid.TrustDomain, r state.AdminRecord) api.AdminRecord {
	return api.AdminRecord{Name: r.Name, ID: spiffeid.RequireFromPath(td, "/sigil/admin/"+r.Name).String(), Role: r.Role,
		IssuedBy: r.IssuedBy, IssuedAt: r.IssuedAt, RevokedAt: r.RevokedAt, RevokedBy: r.RevokedBy, Revision: r.Revision,
		Certs: convertAll(r.Certs, func(c state.AdminCert) api.AdminCert {
			return api.AdminCert{Serial: c.Serial, Node: c.Node, Role: c.Role, NotAfter: c.NotAfter}
		})}
}

// PCRPolicySet sets the PCR values a joining TPM must quote.
func (a *admin) PCRPolicySet(ctx context.Context, r *api.PCRPolicyRequest) (*api.Empty, error) {
	return write[api.Empty](ctx, a, state.CmdPCRPolicySet, state.PCRPolicySet{Policy: statePCRPolicy(r.Policy)})
}

// SVIDRevoke revokes an X.509-SVID by serial. The issuance audit record
// says which node's issuing CA signed it and until when, so that node's CRL
// lists it.
func (a *admin) SVIDRevoke(ctx context.Context, r *api.RevokeRequest) (*api.Empty, error) {
	if err := a.read(ctx, "svid revoke"); err != nil {
		return nil, err
	}
	serial := strings.ToLower(strings.TrimLeft(r.Serial, "0"))
	svid, ok := a.state.IssuedSVID(serial)
	if !ok {
		return nil, status.Errorf(codes.NotFound, "no X.509-SVID with serial %.64s was issued, or it has expired", serial)
	}
	return write[api.Empty](ctx, a, state.CmdRevoke, state.Revoke{Serial: serial, Node: svid.Node, NotAfter: svid.NotAfter})
}

func newID() string {
	b := make([]byte, 16)
	rand.Read(b)
	h := hex.EncodeToString(b)
	return h[:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// scratchDir is where uploaded archives are checked (0700, inside the data
// directory).
// discardSpool closes and removes a spool file. The file is only read
// back after it is written, so a failed Close loses nothing; but it holds
// a whole state archive, so one that cannot be removed is logged.
func (a *admin) discardSpool(f *os.File) {
	_ = f.Close()
	if err := os.Remove(f.Name()); err != nil {
		a.log.Warn("spool file not removed", "path", f.Name(), "err", err)
	}
}

func (a *admin) scratchDir() string {
	d := filepath.Join(a.dataDir, "scratch")
	if err := os.MkdirAll(d, 0o700); err != nil {
		a.log.Warn("scratch dir", "err", err)
	}
	return d
}

// PCRPolicyShow answers with the PCR policy in force (nil: none).
func (a *admin) PCRPolicyShow(ctx context.Context, _ *api.Empty) (*api.PCRPolicyResponse, error) {
	if err := a.read(ctx, "pcr policy show"); err != nil {
		return nil, err
	}
	return &api.PCRPolicyResponse{Policy: apiPCRPolicy(a.state.Policy().PCRPolicy)}, nil
}

// TokenList lists the join tokens the state holds, by ID (the token's
// hash): the tokens themselves were never stored.
func (a *admin) TokenList(ctx context.Context, _ *api.Empty) (*api.TokenList, error) {
	if err := a.read(ctx, "token list"); err != nil {
		return nil, err
	}
	out := &api.TokenList{Tokens: []api.JoinToken{}}
	for _, t := range a.state.Tokens() {
		out.Tokens = append(out.Tokens, apiJoinToken(t))
	}
	return out, nil
}

// minTokenPrefix is the shortest token ID prefix TokenRevoke accepts: what
// token create and token list show.
const minTokenPrefix = 12

// TokenRevoke revokes an unused join token, named by its ID or an
// unambiguous prefix of it.
func (a *admin) TokenRevoke(ctx context.Context, r *api.IDRequest) (*api.JoinToken, error) {
	id := strings.ToLower(r.ID)
	if len(id) < minTokenPrefix || len(id) > 64 || strings.Trim(id, "0123456789abcdef") != "" {
		return nil, status.Errorf(codes.InvalidArgument, "token id %q: want the token's ID (hex SHA-256) or at least its first %d hex digits, as token list shows", shownID(r.ID), minTokenPrefix)
	}
	if err := a.read(ctx, "token revoke"); err != nil {
		return nil, err
	}
	var matches []string
	for _, t := range a.state.Tokens() {
		if strings.HasPrefix(t.ID, id) {
			matches = append(matches, t.ID)
		}
	}
	switch len(matches) {
	case 0:
		return nil, status.Errorf(codes.NotFound, "no join token %s (expired tokens are dropped; see sigilctl token list)", id)
	case 1:
	default:
		return nil, status.Errorf(codes.InvalidArgument, "token id %s matches %d tokens: give more of it", id, len(matches))
	}
	t, err := write[state.JoinToken](ctx, a, state.CmdTokenRevoke, state.TokenRevoke{ID: matches[0]})
	if err != nil {
		return nil, err
	}
	out := apiJoinToken(*t)
	return &out, nil
}

func apiJoinToken(t state.JoinToken) api.JoinToken {
	return api.JoinToken{ID: t.ID, CreatedBy: t.CreatedBy, CreatedAt: t.CreatedAt, ExpiresAt: t.ExpiresAt,
		UsedBy: t.UsedBy, UsedAt: t.UsedAt, RevokedBy: t.RevokedBy, RevokedAt: t.RevokedAt}
}

// AgentRemove deletes an agent's record (state.AgentRemove says what
// happens to the entries it is the parent of). The certificate it holds
// stays valid until it expires, but it no longer renews, and no workload
// SVID is issued through it. Removing is not banning: an agent whose
// attestation the join policy still admits can join again.
func (a *admin) AgentRemove(ctx context.Context, r *api.AgentRemoveRequest) (*api.AgentRemoved, error) {
	res, err := write[state.AgentRemoved](ctx, a, state.CmdAgentRemove, state.AgentRemove{ID: r.ID, Force: r.Force})
	if err != nil {
		return nil, err
	}
	if a.seen != nil { // this node's view; the others forget it at their next agent list
		a.seen.prune(func(id string) bool { return id != res.ID })
	}
	return &api.AgentRemoved{ID: res.ID, KeptEntries: res.KeptEntries}, nil
}

// apiPCRPolicy is the stored PCR policy as the API serves it; nil stays
// nil.
func apiPCRPolicy(p *state.PCRPolicy) *api.PCRPolicy {
	if p == nil {
		return nil
	}
	return &api.PCRPolicy{Bank: p.Bank, PCRs: maps.Clone(p.PCRs)}
}

// auditJWTRotate records who asked for a JWT key rotation, and the kid it
// will have, before the key is made. The key's publication that follows
// is bundle.jwt.add, whose actor is the node (only a node publishes its
// own keys), as for a scheduled rotation; a bundle.jwt.rotate without a
// bundle.jwt.add of its kid is a rotation that failed after it was asked
// for (the node logs why).
const auditJWTRotate = "bundle.jwt.rotate"

// JWTKeyRotate rotates this node's own JWT signing key now: every node
// signs with keys in its own HSM, so the node asked is the node rotated.
// The request is audited in the caller's name (the state machine checks
// at commit that the caller's certificate may still act) before the key
// is made, and refused while this node has api.MaxNodeJWTKeys keys in the
// bundle (ca.JWTKeys.RotateOnDemand).
func (a *admin) JWTKeyRotate(ctx context.Context, _ *api.Empty) (*api.JWTKeyRotated, error) {
	const what = "jwt key rotate"
	c := callerFrom(ctx)
	if err := a.read(ctx, what); err != nil {
		return nil, err
	}
	asked := ""
	kid, err := a.jwt.RotateOnDemand(ctx, ca.OnDemand{
		MaxKeys: api.MaxNodeJWTKeys,
		Sync:    a.member.readIndex,
		Record: func(ctx context.Context, kid string) error {
			ev := state.AuditEvent{Action: auditJWTRotate, Target: kid, Detail: map[string]string{"node": a.nodeID}}
			if _, err := a.apply(ctx, c, state.CmdAudit, state.AuditAppend{Events: []state.AuditEvent{ev}}); err != nil {
				return err
			}
			asked = kid
			return nil
		},
	})
	switch {
	case errors.Is(err, ca.ErrTooManyJWTKeys):
		a.log.Warn("admin request refused", "request", what, "actor", c.Actor, "reason", err.Error())
		return nil, status.Error(codes.ResourceExhausted, err.Error())
	case err != nil && asked != "":
		a.log.Error("JWT key rotation failed after it was recorded", "actor", c.Actor, "kid", asked, "err", err)
		return nil, a.fail(what, c, err)
	case err != nil:
		return nil, a.fail(what, c, err)
	}
	a.log.Info("JWT key rotated on demand", "actor", c.Actor, "kid", kid)
	return &api.JWTKeyRotated{KID: kid, Node: a.nodeID}, nil
}
