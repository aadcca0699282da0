package node_test

import (
	"context"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/api"
)

// An operator rotates a follower's JWT key through the admin API, on a
// real three-node cluster with SoftHSM: the follower rotates its own key,
// the bundle as another node serves it holds the new kid under the
// follower's name, the follower's next JWT-SVID is signed with it (and an
// older token still validates), and the audit log names the admin who
// asked before the key's publication. An agent's certificate is refused.
// The bound: concurrent requests past api.MaxNodeJWTKeys are refused
// (ResourceExhausted), exactly as many succeed as fit, the bundle holds no
// more of the node's keys than the bound, and the bound is per node.
func TestJWTKeyRotateThroughAdminAPI(t *testing.T) {
	ic := newIssuer(t, "jk")
	c := ic.c
	ctx := context.Background()
	leader := c.WaitLeader(30 * time.Second)
	f := follower(c, leader)
	other := "node-1"
	for _, id := range c.Running() {
		if id != f && id != leader {
			other = id // the other follower: neither the node rotated nor the leader
		}
	}
	web := ic.entry(t, "spiffe://example.org/web", agentID)
	ag := ic.agent(t, f)
	first, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	oldKID := tokenKID(t, first.Token)

	// An agent's certificate is refused, before anything is made.
	if _, err := c.Client(f, ic.agentCert, ic.agentKey).JWTKeyRotate(ctx, &api.Empty{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("an agent asking for a rotation: %v, want PermissionDenied", err)
	}
	keysOf := func(via, node string) []api.JWTKey {
		t.Helper()
		resp, err := c.Admin(via).BundleShow(ctx, &api.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		var out []api.JWTKey
		for _, k := range resp.Bundle.JWTKeys {
			if k.Node == node {
				out = append(out, k)
			}
		}
		return out
	}
	if keys := keysOf(other, f); len(keys) != 1 || keys[0].KID != oldKID {
		t.Fatalf("%s's keys after the agent's attempt: %+v, want only %s", f, keys, oldKID)
	}

	// The admin rotates the follower's key, asking the follower.
	if st, err := c.Admin(f).ClusterStatus(ctx, &api.Empty{}); err != nil || st.State == "leader" {
		t.Logf("%s is no longer a follower (%+v, %v): the rotation is still its own", f, st, err)
	}
	r, err := c.Admin(f).JWTKeyRotate(ctx, &api.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if r.Node != f || !strings.HasPrefix(r.KID, f+"-") || r.KID == oldKID {
		t.Fatalf("rotation answered %+v; want a new kid of %s", r, f)
	}
	found := false
	for _, k := range keysOf(other, f) {
		found = found || k.KID == r.KID
	}
	if !found {
		t.Fatalf("the bundle as %s serves it lacks %s's new key %s", other, f, r.KID)
	}
	b := ic.jwtBundle(t, other)
	if _, ok := b.FindJWTAuthority(r.KID); !ok {
		t.Fatalf("the SPIFFE bundle document from %s lacks %s", other, r.KID)
	}
	second, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := tokenKID(t, second.Token); got != r.KID {
		t.Fatalf("JWT-SVID after the rotation signed with %s, want %s", got, r.KID)
	}
	for name, tok := range map[string]string{"after": second.Token, "before": first.Token} {
		if _, err := jwtsvid.ParseAndValidate(tok, b, []string{"db"}); err != nil {
			t.Fatalf("token from %s the rotation against %s's bundle: %v", name, other, err)
		}
	}

	// Audited: the admin asked for the kid, then the node published it.
	acts := auditActions(t, c, leader)
	asked, added := acts["bundle.jwt.rotate"], acts["bundle.jwt.add"]
	if len(asked) != 1 || asked[0].Actor != "spiffe://example.org/sigil/admin/test-admin" || asked[0].Target != r.KID ||
		asked[0].Detail["node"] != f || asked[0].Origin != f {
		t.Fatalf("bundle.jwt.rotate records: %+v", asked)
	}
	var pub *api.AuditRecord
	for i := range added {
		if added[i].Target == r.KID {
			pub = &added[i]
		}
	}
	if pub == nil || pub.Actor != "spiffe://example.org/sigil/node/"+f || pub.Seq <= asked[0].Seq {
		t.Fatalf("bundle.jwt.add of %s: %+v (asked at seq %d)", r.KID, pub, asked[0].Seq)
	}

	// The bound, asked concurrently: exactly the rotations that fit.
	have := len(keysOf(f, f))
	room := api.MaxNodeJWTKeys - have
	if room < 1 {
		t.Fatalf("%s already has %d keys", f, have)
	}
	const extra = 3
	var mu sync.Mutex
	var kids []string
	var refusals []error
	var wg sync.WaitGroup
	for range room + extra {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := c.Admin(f).JWTKeyRotate(ctx, &api.Empty{})
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				kids = append(kids, r.KID)
			case status.Code(err) == codes.ResourceExhausted:
				refusals = append(refusals, err)
			default:
				t.Errorf("rotation: %v", err)
			}
		}()
	}
	wg.Wait()
	if len(kids) != room || len(refusals) != extra {
		t.Fatalf("%d concurrent rotations with room for %d: %d made, %d refused", room+extra, room, len(kids), len(refusals))
	}
	msg := status.Convert(refusals[0]).Message()
	for _, want := range []string{"too many JWT keys: node " + f + " has 8 in the trust bundle", "refused from 8 on", "leaves the bundle after"} {
		if !strings.Contains(msg, want) {
			t.Fatalf("refusal %q lacks %q", msg, want)
		}
	}
	t.Logf("refused: %s", msg)
	if keys := keysOf(other, f); len(keys) != api.MaxNodeJWTKeys {
		t.Fatalf("%s has %d keys in the bundle, want %d", f, len(keys), api.MaxNodeJWTKeys)
	}
	// The last one made signs.
	third, err := ag.SignJWTSVID(ctx, &api.JWTSVIDRequest{EntryID: web.ID, Audience: []string{"db"}})
	if err != nil {
		t.Fatal(err)
	}
	if got := tokenKID(t, third.Token); !strings.HasPrefix(got, f+"-") || got == r.KID || got == oldKID {
		t.Fatalf("JWT-SVID after the burst signed with %s", got)
	}
	// Sequentially too, and a refusal records no request.
	if _, err := c.Admin(f).JWTKeyRotate(ctx, &api.Empty{}); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("rotation past the bound: %v, want ResourceExhausted", err)
	}
	if n := len(auditActions(t, c, other)["bundle.jwt.rotate"]); n != 1+room {
		t.Fatalf("%d bundle.jwt.rotate records, want %d (refusals record none)", n, 1+room)
	}
	// Per node: the leader still rotates its own key.
	lr, err := c.Admin(leader).JWTKeyRotate(ctx, &api.Empty{})
	if err != nil || lr.Node != leader || !strings.HasPrefix(lr.KID, leader+"-") {
		t.Fatalf("rotation on %s: %+v %v", leader, lr, err)
	}
}
