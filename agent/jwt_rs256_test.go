package agent_test

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/sigil-appliance/sigil/appliance/node"
)

// A node with jwt.key-type rsa-2048 and jwt.issuer signs RS256 JWT-SVIDs
// that carry iss: a workload fetches one through the agent's Workload
// API, and the agent validates it against the bundle it synced
// (ValidateJWTSVID), as does go-spiffe with the JWT bundle the agent
// serves. A token for another audience or with a forged signature is
// refused.
func TestWorkloadJWTSVIDRS256(t *testing.T) {
	const issuer = "https://sigil.example.org"
	e := newAgentEnvWith(t, "rs", func(c *node.Config) { c.JWT.KeyType, c.JWT.Issuer = node.JWTKeyRSA2048, issuer }, nil)
	ctx := context.Background()
	e.entry(t, "/test/root", 60, "", "unix:uid:0")
	c := e.client(t)
	svid, err := c.FetchJWTSVID(ctx, jwtsvid.Params{Audience: "sts.amazonaws.com"})
	if err != nil {
		t.Fatal(err)
	}
	tok := svid.Marshal()
	hdr, _ := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[0])
	if !strings.Contains(string(hdr), `"alg":"RS256"`) {
		t.Fatalf("header %s, want RS256", hdr)
	}
	if iss, _ := svid.Claims["iss"].(string); iss != issuer {
		t.Fatalf("iss %v, want %s", svid.Claims["iss"], issuer)
	}
	v, err := c.ValidateJWTSVID(ctx, tok, "sts.amazonaws.com")
	if err != nil || v.ID.String() != e.td+"/test/root" {
		t.Fatalf("ValidateJWTSVID: %v %v", v, err)
	}
	bundles, err := c.FetchJWTBundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if s, err := jwtsvid.ParseAndValidate(tok, bundles, []string{"sts.amazonaws.com"}); err != nil || s.ID.String() != e.td+"/test/root" {
		t.Fatalf("through the agent's JWT bundle: %v %v", s, err)
	}
	if _, err := c.ValidateJWTSVID(ctx, tok, "svc-other"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("wrong audience: %v", err)
	}
	if _, err := c.ValidateJWTSVID(ctx, tok[:len(tok)-6]+"AAAAAA", "sts.amazonaws.com"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("forged signature: %v", err)
	}
}
