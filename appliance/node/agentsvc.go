package node

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
	"github.com/sigil-appliance/sigil/appliance/state"
)

// agentSvc implements api.AgentServer for joined agents: it names the
// caller (authenticated by the interceptors in auth.go) and has the issuer
// check and sign; Sync streams the agent's entries and the trust bundle.
type agentSvc struct {
	td     spiffeid.TrustDomain
	state  syncState
	issuer *issuer
	// acks lets one acknowledgement of each agent at a time be proposed
	// (rootrotation.go, BundleAck).
	acks ackGate
}

// syncState is the replica as Sync reads it.
type syncState interface {
	Agent(id string) (state.Agent, bool)
	Bundle() state.Bundle
	Index() uint64
	EntriesByParent(parent string) []state.Entry
	FederatedBundles(names []string) map[string][]byte
	AgentChanged(id string) <-chan struct{}
	Changed() <-chan struct{}
}

var _ api.AgentServer = (*agentSvc)(nil)

func (s *agentSvc) SignX509SVIDs(ctx context.Context, b *api.X509SVIDBatch) (*api.X509SVIDBatchResult, error) {
	return s.issuer.x509SVIDs(ctx, callerFrom(ctx).Actor, b)
}

func (s *agentSvc) SignJWTSVID(ctx context.Context, r *api.JWTSVIDRequest) (*api.JWTSVIDResult, error) {
	return s.issuer.jwtSVID(ctx, callerFrom(ctx).Actor, r)
}

// behindWatch bounds how long a Sync stream on a node behind the agent's
// revision re-reads its view at every apply before it waits for the
// agent's own changes only.
const behindWatch = 30 * time.Second

// Sync streams the agent's entries and the bundle: at once, then on every
// change that concerns this agent. A client resuming at the current
// revision gets the current view once more, then changes. The stream's context ends when the
// agent's SVID that its connection was opened with expires
// (authenticateStream turns that end into Unauthenticated): nothing is
// sent after it, not even a change that came at the same moment.
func (s *agentSvc) Sync(r *api.SyncRequest, stream grpc.ServerStreamingServer[api.SyncUpdate]) error {
	ctx := stream.Context()
	a, err := s.issuer.callingAgent(ctx, callerFrom(ctx).Actor, "sync")
	if err != nil {
		return err
	}
	// The last view sent is kept as its digest: a stream lives as long as
	// its agent is connected, and the view (bundle included) is KiBs.
	var last [sha256.Size]byte
	sent := r.Revision
	// The first view goes out even at the revision the agent already
	// has: it tells the agent (and its readiness) that this stream works.
	// A client resuming after a node died would otherwise hear nothing
	// until its next change. A node behind the agent's revision stays
	// quiet until it has caught up, so no view goes backwards.
	first := true
	// A node behind looks again at each apply for a while, not for ever:
	// an agent naming a revision far ahead (another cluster's, a forged
	// one) would otherwise cost a view per commit for as long as it
	// stays connected.
	behindUntil := time.Now().Add(behindWatch)
	for {
		if ctx.Err() != nil {
			return nil
		}
		changed := s.state.AgentChanged(a.ID)
		// Until the first view is sent, a node behind the agent's revision
		// (it resumed here from a node that was ahead) looks again at each
		// change it applies: its own agent's changes alone may be minutes
		// away.
		var behind <-chan struct{}
		if first && time.Now().Before(behindUntil) {
			behind = s.state.Changed()
		}
		ag, ok := s.state.Agent(a.ID)
		if !ok || ag.Banned {
			return status.Errorf(codes.PermissionDenied, "%s is banned or gone", a.ID)
		}
		b := s.state.Bundle()
		entries := s.state.EntriesByParent(a.ID)
		if je, ok := ag.JobEntry(); ok {
			entries = append(entries, je)
		}
		u := &api.SyncUpdate{Revision: s.state.Index(), Entries: apiEntries(entries), Bundle: apiBundle(b),
			Federated: s.state.FederatedBundles(federatesWith(entries))}
		view, _ := json.Marshal([]any{u.Entries, u.Bundle, u.Federated})
		// A view at the revision already sent is sent again if it differs:
		// a read between an apply's index and its refreshed bundle saw the
		// old bundle at the new revision, and the wake that follows finds
		// the same revision with the new one.
		if digest := sha256.Sum256(view); (first && u.Revision >= sent) || (u.Revision >= sent && digest != last) {
			if u.SPIFFE, err = SPIFFEBundle(s.td, b); err != nil {
				// The stored bundle does not encode: this node's fault.
				s.issuer.log.Error("sync failed: bundle", "request", "sync", "agent", a.ID, "revision", u.Revision, "err", err)
				return errInternal()
			}
			if err := stream.Send(u); err != nil {
				return err
			}
			last, sent, first = digest, u.Revision, false
		}
		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-behind:
		}
	}
}

// federatesWith is the trust domains an agent's entries federate with,
// each once. A name whose relationship was deleted finds no bundle.
func federatesWith(entries []state.Entry) []string {
	var out []string
	for _, e := range entries {
		for _, td := range e.FederatesWith {
			if !slices.Contains(out, td) {
				out = append(out, td)
			}
		}
	}
	return out
}
