package jobrule_test

import (
	"context"
	"errors"
	"testing"

	"github.com/go-jose/go-jose/v4"
	"github.com/sigil-appliance/sigil/appliance/jobrule"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
)

// FuzzVerifyPayload: whatever JSON the issuer signs, Verify answers with
// a result or a Refusal, and never panics.
func FuzzVerifyPayload(f *testing.F) {
	for _, seed := range []string{
		`{}`, `[]`, `null`, `{"a":{"b":{"c":{"d":{"e":{"f":1}}}}}}`, `{"aud":[["x"]],"iat":1e400}`,
		`{"iss":"x","iss":"x"}`, `{"exp":-1,"iat":"1","nbf":true}`, `{"a":[{"b":[{"c":1}]}]}`,
		`{"n":123456789012345678901234567890,"f":1.5,"e":1e3}`, "{\"\\u0000\":\"\\ud800\"}",
	} {
		f.Add([]byte(seed))
	}
	iss := jobruletest.NewIssuer(f)
	s := jobrule.Spec{Name: "f", Preset: "oidc", Issuer: iss.URL(), SPIFFEIDTemplate: "/x/{{sub}}", TTL: 3600e9, MaxTokenAge: 3600e9}
	if err := s.ApplyPreset(td); err != nil {
		f.Fatal(err)
	}
	keys, err := jobrule.NewStaticKeys(iss.JWKS())
	if err != nil {
		f.Fatal(err)
	}
	k := iss.Current(string(jose.ES256))
	f.Fuzz(func(t *testing.T, payload []byte) {
		tok := jobruletest.SignBytes(t, k, payload)
		v, err := jobrule.Verify(context.Background(), s, keys, tok, now)
		var r *jobrule.Refusal
		if err != nil && !errors.As(err, &r) {
			t.Fatalf("not a refusal: %v", err)
		}
		if err == nil && v.Path == "" {
			t.Fatal("accepted without a path")
		}
	})
}

// FuzzVerifyToken: whatever string arrives as a token, Verify refuses it
// without panicking (nothing but the issuer's key makes a valid one).
func FuzzVerifyToken(f *testing.F) {
	iss := jobruletest.NewIssuer(f)
	s := jobrule.Spec{Name: "f", Preset: "github-actions", Issuer: iss.URL(), TTL: 3600e9, MaxTokenAge: 3600e9}
	if err := s.ApplyPreset(td); err != nil {
		f.Fatal(err)
	}
	good := iss.Sign(f, jobruletest.GitHubClaims(iss.URL(), aud, now))
	for _, seed := range []string{"", ".", "..", "a.b.c", good, good[:len(good)-3], "eyJhbGciOiJSUzI1NiJ9..",
		jobruletest.None(f, iss.Current("RS256").KID, map[string]any{"iss": iss.URL()})} {
		f.Add(seed)
	}
	keys, err := jobrule.NewStaticKeys(iss.JWKS())
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, tok string) {
		if tok == good {
			return
		}
		_, err := jobrule.Verify(context.Background(), s, keys, tok, now)
		var r *jobrule.Refusal
		if !errors.As(err, &r) {
			t.Fatalf("not a refusal: %v", err)
		}
	})
}
