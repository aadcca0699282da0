package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
)

// TestJWTKeySign: tokens validate with go-spiffe's JWT-SVID parser, carry
// exactly alg, kid and typ in their header, and hold aud as an array.
func TestJWTKeySign(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("example.org")
	for _, tc := range []struct {
		curve elliptic.Curve
		alg   string
	}{{elliptic.P256(), "ES256"}, {elliptic.P384(), "ES384"}} {
		t.Run(tc.alg, func(t *testing.T) {
			key, err := ecdsa.GenerateKey(tc.curve, rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			k, err := newJWTKey("node-1-abc", key, time.Now().Add(time.Hour))
			if err != nil {
				t.Fatal(err)
			}
			now := time.Now().Truncate(time.Second)
			tok, err := k.Sign(JWTClaims{Subject: "spiffe://example.org/web", Audience: []string{"db"},
				IssuedAt: now, Expiry: now.Add(5 * time.Minute), ID: "j1"})
			if err != nil {
				t.Fatal(err)
			}
			parts := strings.Split(tok, ".")
			if len(parts) != 3 {
				t.Fatalf("token has %d parts, want 3 (JWS compact)", len(parts))
			}
			hdr, _ := base64.RawURLEncoding.DecodeString(parts[0])
			if want := `{"alg":"` + tc.alg + `","kid":"node-1-abc","typ":"JWT"}`; string(hdr) != want {
				t.Errorf("header %s, want %s", hdr, want)
			}
			claims, _ := base64.RawURLEncoding.DecodeString(parts[1])
			if !strings.Contains(string(claims), `"aud":["db"]`) {
				t.Errorf("claims %s: want aud as an array", claims)
			}
			b := jwtbundle.New(td)
			if err := b.AddJWTAuthority("node-1-abc", key.Public()); err != nil {
				t.Fatal(err)
			}
			svid, err := jwtsvid.ParseAndValidate(tok, b, []string{"db"})
			if err != nil {
				t.Fatal(err)
			}
			if svid.ID.String() != "spiffe://example.org/web" || !svid.Expiry.Equal(now.Add(5*time.Minute)) {
				t.Errorf("parsed %s expiring %v", svid.ID, svid.Expiry)
			}
			other, _ := ecdsa.GenerateKey(tc.curve, rand.Reader)
			b.SetJWTAuthorities(map[string]crypto.PublicKey{"node-1-abc": other.Public()})
			if _, err := jwtsvid.ParseAndValidate(tok, b, []string{"db"}); err == nil {
				t.Error("token validated with another key")
			}
		})
	}
}

// TestJWTKeyRefusesRSA: only ECDSA P-256 and P-384 keys sign JWT-SVIDs.
func TestJWTKeyRefusesRSA(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := newJWTKey("k", key, time.Now().Add(time.Hour)); err == nil || !strings.Contains(err.Error(), "not ECDSA") {
		t.Fatalf("RSA key: %v, want a refusal", err)
	}
}
