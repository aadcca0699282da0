package jobrule_test

import (
	"context"
	"crypto/elliptic"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"strings"
	"testing"
	"time"

	"github.com/sigil-appliance/sigil/appliance/jobrule"
	"github.com/sigil-appliance/sigil/appliance/jobrule/jobruletest"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

var (
	td  = spiffeid.RequireTrustDomainFromString("example.org")
	aud = "spiffe://example.org"
	// now is fixed: tokens and checks agree on it, whatever the machine's clock.
	now = time.Date(2026, 12, 3, 12, 0, 0, 0, time.UTC)
)

// rule is a checked rule for iss with preset, keys by discovery.
func rule(t *testing.T, iss *jobruletest.Issuer, preset string, edit ...func(*jobrule.Spec)) jobrule.Spec {
	t.Helper()
	s := jobrule.Spec{
		Name: "ci", Preset: preset, Issuer: iss.URL(), IssuerCA: iss.CAPEM(),
		TTL: time.Hour, MaxTokenAge: 10 * time.Minute,
	}
	switch preset {
	case jobrule.PresetOIDC, "":
		s.SPIFFEIDTemplate = "/svc/{{service}}"
	case jobrule.PresetGitHubActions:
		s.Conditions = []jobrule.Condition{{Claim: "repository_owner", Pattern: "octo-org"}}
	case jobrule.PresetGitLabCI:
		s.Conditions = []jobrule.Condition{{Claim: "namespace_path", Pattern: "my-group"}}
	}
	for _, e := range edit {
		e(&s)
	}
	if err := s.ApplyPreset(td); err != nil {
		t.Fatal(err)
	}
	if err := s.Validate(); err != nil {
		t.Fatalf("rule refused: %v", err)
	}
	return s
}

func discovery(t *testing.T, iss *jobruletest.Issuer, opts jobrule.DiscoveryOptions) *jobrule.Discovery {
	t.Helper()
	roots, err := jobrule.ParseRoots(iss.CAPEM())
	if err != nil {
		t.Fatal(err)
	}
	return jobrule.NewDiscovery(iss.URL(), roots, opts)
}

func static(t *testing.T, iss *jobruletest.Issuer) *jobrule.StaticKeys {
	t.Helper()
	k, err := jobrule.NewStaticKeys(iss.JWKS())
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustVerify(t *testing.T, s jobrule.Spec, keys jobrule.KeySource, tok string) *jobrule.Verified {
	t.Helper()
	v, err := jobrule.Verify(context.Background(), s, keys, tok, now)
	if err != nil {
		t.Fatalf("refused: %v", err)
	}
	return v
}

// refused checks that tok is refused for want, and that the message
// holds none of the token's parts. It returns the message.
func refused(t *testing.T, s jobrule.Spec, keys jobrule.KeySource, tok string, want jobrule.Reason, msg string) string {
	t.Helper()
	v, err := jobrule.Verify(context.Background(), s, keys, tok, now)
	if err == nil {
		t.Fatalf("accepted (path %s), want %s", v.Path, want)
	}
	var r *jobrule.Refusal
	if !errors.As(err, &r) {
		t.Fatalf("error %v is not a Refusal", err)
	}
	if r.Reason != want {
		t.Fatalf("reason %s (%v), want %s", r.Reason, err, want)
	}
	if !strings.HasPrefix(err.Error(), string(want)+": ") {
		t.Errorf("message %q does not start with the reason", err)
	}
	if msg != "" && !strings.Contains(err.Error(), msg) {
		t.Errorf("message %q does not say %q", err, msg)
	}
	for _, part := range strings.Split(tok, ".") {
		if len(part) >= 16 && strings.Contains(err.Error(), part) {
			t.Errorf("message %q echoes the token", err)
		}
	}
	return err.Error()
}

func sha(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

func TestGitHubActionsByDiscovery(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	if s.Audience != aud {
		t.Errorf("audience %q, want the trust domain's ID", s.Audience)
	}
	keys := discovery(t, iss, jobrule.DiscoveryOptions{})
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	for _, alg := range []string{"RS256", "ES256"} {
		v := mustVerify(t, s, keys, iss.SignWith(t, alg, c))
		if v.Path != "/ci/github/octo-org/octo-repo" || v.Run != "1234567-1" {
			t.Errorf("%s: path %q run %q", alg, v.Path, v.Run)
		}
		if v.Subject != "repo:octo-org/octo-repo:environment:prod" {
			t.Errorf("subject %q", v.Subject)
		}
		if v.Claims["repository"] != "octo-org/octo-repo" || v.Claims["run_attempt"] != "1" ||
			v.Claims["workflow_ref"] != c["workflow_ref"] || len(v.Claims) != 11 {
			t.Errorf("audit claims %v", v.Claims)
		}
		if _, ok := v.Claims["repository_owner_id"]; ok {
			t.Error("a claim outside the audit list was kept")
		}
		if v.ReplayKey != sha(iss.URL()+"\x00"+c["jti"].(string)) {
			t.Errorf("replay key %s", v.ReplayKey)
		}
		iat := time.Unix(c["iat"].(int64), 0)
		exp := time.Unix(c["exp"].(int64), 0)
		if !v.IssuedAt.Equal(iat) || !v.Expiry.Equal(exp) {
			t.Errorf("issued %v expires %v", v.IssuedAt, v.Expiry)
		}
		// exp (5 min) comes before iat + MaxTokenAge (10 min).
		if want := exp.Add(jobrule.Leeway); !v.ReplayUntil.Equal(want) {
			t.Errorf("replay until %v, want %v", v.ReplayUntil, want)
		}
	}
	if n := iss.Fetches(); n != 1 {
		t.Errorf("%d key set fetches for two tokens, want 1", n)
	}

	// A long-lived token: iat + the longest maximum age any rule may
	// have bounds the replay window (not this rule's: a rule of the same
	// issuer with a longer one must still find the token used).
	c["exp"] = now.Add(48 * time.Hour).Unix()
	v := mustVerify(t, s, keys, iss.Sign(t, c))
	if want := time.Unix(c["iat"].(int64), 0).Add(jobrule.MaxMaxTokenAge + jobrule.Leeway); !v.ReplayUntil.Equal(want) {
		t.Errorf("replay until %v, want %v", v.ReplayUntil, want)
	}
}

func TestGitLabCI(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitLabCI)
	v := mustVerify(t, s, static(t, iss), iss.Sign(t, jobruletest.GitLabClaims(iss.URL(), aud, now)))
	if v.Path != "/ci/gitlab/my-group/my-project" || v.Run != "302" {
		t.Errorf("path %q run %q", v.Path, v.Run)
	}
	if v.Claims["project_path"] != "my-group/my-project" || v.Claims["pipeline_id"] != "1212" || v.Claims["user_login"] != "jdoe" {
		t.Errorf("audit claims %v", v.Claims)
	}
}

func TestKubernetes(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetKubernetes, func(s *jobrule.Spec) {
		s.Conditions = []jobrule.Condition{{Claim: "kubernetes.io.namespace", Pattern: "ci"}}
	})
	c := jobruletest.KubernetesClaims(iss.URL(), aud, now)
	v := mustVerify(t, s, discovery(t, iss, jobrule.DiscoveryOptions{}), iss.SignWith(t, "ES256", c))
	if v.Path != "/k8s/ns/ci/sa/builder" || v.Run != "9d2c4e6f-1a3b-4c5d-8e7f-0a1b2c3d4e5f" {
		t.Errorf("path %q run %q", v.Path, v.Run)
	}
	want := map[string]string{"namespace": "ci", "serviceaccount": "builder", "pod": "runner-7d9f",
		"pod_uid": "9d2c4e6f-1a3b-4c5d-8e7f-0a1b2c3d4e5f", "sub": "system:serviceaccount:ci:builder"}
	if fmt.Sprint(v.Claims) != fmt.Sprint(want) {
		t.Errorf("audit claims %v, want %v", v.Claims, want)
	}
}

// TestAttackShadowedAlias: a top-level claim named like a preset's alias
// must not stand in for the claim the alias means.
func TestAttackShadowedAlias(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetKubernetes)
	c := jobruletest.KubernetesClaims(iss.URL(), aud, now)
	c["namespace"] = "kube-system"
	if v := mustVerify(t, s, static(t, iss), iss.Sign(t, c)); v.Path != "/k8s/ns/ci/sa/builder" {
		t.Errorf("path %q", v.Path)
	}
	delete(c["kubernetes.io"].(map[string]any), "namespace")
	refused(t, s, static(t, iss), iss.Sign(t, c), jobrule.ReasonUnsafeValue, "claim namespace is missing")
}

// TestAttackDerivedClaim: repository_name comes from repository only
// when it is under repository_owner; a token's own repository_name is
// never used.
func TestAttackDerivedClaim(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	c["repository"] = "other-org/octo-repo"
	c["repository_name"] = "octo-repo"
	refused(t, s, static(t, iss), iss.Sign(t, c), jobrule.ReasonUnsafeValue, "claim repository_name is missing")
}

func TestGenericOIDC(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, "")
	if s.Preset != jobrule.PresetOIDC || s.RunTemplate != "{{token_id}}" {
		t.Fatalf("preset %q run template %q", s.Preset, s.RunTemplate)
	}
	c := map[string]any{"iss": iss.URL(), "aud": []string{"other", aud}, "sub": "deploy",
		"service": "billing", "jti": "run-77", "iat": now.Unix(), "exp": now.Add(time.Minute).Unix(),
		"flag": true, "n": 12.0, "big": 1e3, "frac": 1.5,
		"nested": map[string]any{"a": map[string]any{"b": "deep"}}, "list": []any{"x", map[string]any{"y": 1}}}
	s.Conditions = []jobrule.Condition{{Claim: "flag", Pattern: "true"}, {Claim: "n", Pattern: "12"},
		{Claim: "big", Pattern: "1000"}, {Claim: "nested.a.b", Pattern: "deep"}}
	s.AuditClaims = []string{"sub", "frac", "list", "nested.a.b"}
	tok := iss.Sign(t, c)
	v := mustVerify(t, s, static(t, iss), tok)
	if v.Path != "/svc/billing" || v.Run != "run-77" {
		t.Errorf("path %q run %q", v.Path, v.Run)
	}
	if fmt.Sprint(v.Claims) != "map[nested.a.b:deep sub:deploy]" {
		t.Errorf("audit claims %v: fractions and arrays are not claims", v.Claims)
	}

	// No usable jti: the run is named by the token's hash, and so is
	// its replay key.
	c["jti"] = "a/b"
	tok = iss.Sign(t, c)
	v = mustVerify(t, s, static(t, iss), tok)
	if v.Run != signedSHA(t, iss.URL(), tok)[:32] {
		t.Errorf("run %q, want the signed payload's hash", v.Run)
	}
	if v.ReplayKey != sha(iss.URL()+"\x00a/b") {
		t.Errorf("replay key %s", v.ReplayKey)
	}
	delete(c, "jti")
	tok = iss.Sign(t, c)
	if v = mustVerify(t, s, static(t, iss), tok); v.ReplayKey != signedSHA(t, iss.URL(), tok) {
		t.Errorf("replay key %s, want the signed payload's hash", v.ReplayKey)
	}
}

// signedSHA is the hash that names a token without a usable jti: of its
// issuer and the payload its issuer signed.
func signedSHA(t *testing.T, issuer, tok string) string {
	t.Helper()
	payload, err := base64.RawURLEncoding.DecodeString(strings.Split(tok, ".")[1])
	if err != nil {
		t.Fatal(err)
	}
	return sha(issuer + "\x00payload\x00" + string(payload))
}

// A token without jti, used once, comes back re-spelled: spare bits of a
// part's last base64url character changed (the decoded bytes, and so the
// signature check, unchanged), or an ES256 signature swapped for its
// other valid form (s -> n-s). Neither may count as a new token: the
// first is refused as malformed, the second has the same replay key.
func TestAttackRespelledToken(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	c := jobruletest.GitHubClaims(iss.URL(), s.Audience, now)
	delete(c, "jti")
	for _, alg := range []string{"RS256", "ES256"} {
		tok := iss.SignWith(t, alg, c)
		v := mustVerify(t, s, static(t, iss), tok)
		parts := strings.Split(tok, ".")
		for i := range parts {
			re := respell(parts[i])
			if re == parts[i] {
				continue
			}
			alt := append([]string(nil), parts...)
			alt[i] = re
			refused(t, s, static(t, iss), strings.Join(alt, "."), jobrule.ReasonMalformed, "canonical")
		}
		if alg == "ES256" {
			sig, _ := base64.RawURLEncoding.DecodeString(parts[2])
			r, sv := new(big.Int).SetBytes(sig[:32]), new(big.Int).SetBytes(sig[32:])
			sv.Sub(elliptic.P256().Params().N, sv)
			twin := make([]byte, 64)
			r.FillBytes(twin[:32])
			sv.FillBytes(twin[32:])
			alt := parts[0] + "." + parts[1] + "." + base64.RawURLEncoding.EncodeToString(twin)
			v2, err := jobrule.Verify(context.Background(), s, static(t, iss), alt, now)
			if err == nil && v2.ReplayKey != v.ReplayKey {
				t.Errorf("the ES256 twin signature has another replay key: %s vs %s", v2.ReplayKey, v.ReplayKey)
			}
		}
	}
}

// respell changes the unused low bits of a base64url part's last
// character, if it has any.
func respell(seg string) string {
	spare := map[int]int{2: 4, 3: 2}[len(seg)%4] // unused bits in the last character
	if spare == 0 {
		return seg
	}
	const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
	i := strings.IndexByte(alphabet, seg[len(seg)-1])
	return seg[:len(seg)-1] + string(alphabet[i^1])
}

func TestAuditValuesTruncated(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	c["workflow"] = strings.Repeat("w", 300)
	v := mustVerify(t, s, static(t, iss), iss.Sign(t, c))
	if len(v.Claims["workflow"]) != jobrule.MaxAuditValueBytes {
		t.Errorf("workflow kept %d bytes", len(v.Claims["workflow"]))
	}
}

// TestStaticKeysNoNetwork: a rule with its own key set verifies with the
// issuer's server never asked.
func TestStaticKeysNoNetwork(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions, func(s *jobrule.Spec) {
		s.JWKS, s.IssuerCA = iss.JWKS(), nil
	})
	keys, err := jobrule.KeysFor(s, jobrule.DiscoveryOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := keys.(*jobrule.StaticKeys); !ok {
		t.Fatalf("KeysFor gave %T for a rule with a JWKS", keys)
	}
	v := mustVerify(t, s, keys, iss.SignWith(t, "ES256", jobruletest.GitHubClaims(iss.URL(), aud, now)))
	if v.Path != "/ci/github/octo-org/octo-repo" {
		t.Errorf("path %q", v.Path)
	}
	if iss.Fetches() != 0 {
		t.Error("static keys fetched the key set")
	}
}

func TestAttackForgedSignature(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	for _, alg := range []string{"RS256", "ES256"} {
		forger := jobruletest.NewKey(t, alg, iss.Current(alg).KID) // the real kid, another key
		refused(t, s, static(t, iss), jobruletest.SignWithKey(t, forger, c), jobrule.ReasonBadSignature, "does not verify")
	}
	// A real signature over other claims: swap the payload.
	good := strings.Split(iss.Sign(t, c), ".")
	c["repository_owner"] = "evil-org"
	c["repository"] = "evil-org/octo-repo"
	other := strings.Split(iss.Sign(t, c), ".")
	refused(t, s, static(t, iss), good[0]+"."+other[1]+"."+good[2], jobrule.ReasonBadSignature, "")
}

func TestAttackUnknownKey(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	forger := jobruletest.NewKey(t, "RS256", "attacker-key")
	tok := jobruletest.SignWithKey(t, forger, jobruletest.GitHubClaims(iss.URL(), aud, now))
	refused(t, s, static(t, iss), tok, jobrule.ReasonUnknownKey, `"attacker-key"`)
	refused(t, s, discovery(t, iss, jobrule.DiscoveryOptions{}), tok, jobrule.ReasonUnknownKey, `"attacker-key"`)
}

func TestAttackAlgNone(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	for _, alg := range []string{"none", "None", "NONE", ""} {
		tok := jobruletest.Raw(t, map[string]any{"alg": alg, "kid": iss.Current("RS256").KID}, c, nil)
		refused(t, s, static(t, iss), tok, jobrule.ReasonAlgorithm, "is not RS256 or ES256")
	}
	// A real signature's header rewritten to none.
	parts := strings.Split(iss.Sign(t, c), ".")
	none := strings.Split(jobruletest.None(t, iss.Current("RS256").KID, c), ".")
	refused(t, s, static(t, iss), none[0]+"."+parts[1]+"."+parts[2], jobrule.ReasonAlgorithm, "")
}

// TestAttackAlgorithmConfusion: HS256 "signed" with the issuer's public
// RSA key as the HMAC secret, which a verifier that lets the token pick
// the algorithm would accept.
func TestAttackAlgorithmConfusion(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	kid := iss.Current("RS256").KID
	pemKey := iss.RSAPublicPEM(t)
	block, _ := pem.Decode(pemKey)
	for _, secret := range [][]byte{pemKey, block.Bytes, iss.JWKS()} {
		for _, alg := range []string{"HS256", "HS384", "HS512", "PS256", "RS384", "ES384", "EdDSA"} {
			tok := jobruletest.Raw(t, map[string]any{"alg": alg, "kid": kid}, c, nil)
			if alg == "HS256" {
				tok = jobruletest.HS256(t, secret, kid, c)
			}
			refused(t, s, static(t, iss), tok, jobrule.ReasonAlgorithm, alg)
			refused(t, s, discovery(t, iss, jobrule.DiscoveryOptions{}), tok, jobrule.ReasonAlgorithm, alg)
		}
	}
	if _, err := x509.ParsePKIXPublicKey(block.Bytes); err != nil {
		t.Fatal(err) // the secret really is the public key
	}
}

// TestAttackKeyTypeMismatch: a token whose header says ES256 but names
// the RSA key's kid (or the other way round) is refused before any
// signature check.
func TestAttackKeyTypeMismatch(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	ec := jobruletest.NewKey(t, "ES256", iss.Current("RS256").KID)
	refused(t, s, static(t, iss), jobruletest.SignWithKey(t, ec, c), jobrule.ReasonAlgorithm, "RSA key does not check ES256")
	rs := jobruletest.NewKey(t, "RS256", iss.Current("ES256").KID)
	refused(t, s, static(t, iss), jobruletest.SignWithKey(t, rs, c), jobrule.ReasonAlgorithm, "EC key does not check RS256")
}

func TestRefusedClaims(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions, func(s *jobrule.Spec) {
		s.Conditions = []jobrule.Condition{{Claim: "ref", Pattern: "refs/heads/*"}, {Claim: "repository_owner", Pattern: "octo-org"}}
	})
	keys := static(t, iss)
	for _, tc := range []struct {
		name string
		edit func(c map[string]any)
		want jobrule.Reason
		msg  string
	}{
		{"wrong issuer", func(c map[string]any) { c["iss"] = "https://token.actions.githubusercontent.com" }, jobrule.ReasonWrongIssuer, "githubusercontent"},
		{"issuer with a slash", func(c map[string]any) { c["iss"] = iss.URL() + "/" }, jobrule.ReasonWrongIssuer, ""},
		{"no issuer", func(c map[string]any) { delete(c, "iss") }, jobrule.ReasonWrongIssuer, ""},
		{"wrong audience", func(c map[string]any) { c["aud"] = "spiffe://other.org" }, jobrule.ReasonWrongAudience, "spiffe://other.org"},
		{"audience list without ours", func(c map[string]any) { c["aud"] = []string{"a", "b"} }, jobrule.ReasonWrongAudience, ""},
		{"no audience", func(c map[string]any) { delete(c, "aud") }, jobrule.ReasonWrongAudience, ""},
		{"expired", func(c map[string]any) { c["exp"] = now.Add(-61 * time.Second).Unix() }, jobrule.ReasonExpired, "expired at"},
		{"no exp", func(c map[string]any) { delete(c, "exp") }, jobrule.ReasonMalformed, "exp missing"},
		{"nbf in the future", func(c map[string]any) { c["nbf"] = now.Add(2 * time.Minute).Unix() }, jobrule.ReasonNotYetValid, "not valid before"},
		{"iat in the future", func(c map[string]any) { c["iat"] = now.Add(2 * time.Minute).Unix() }, jobrule.ReasonNotYetValid, "issued in the future"},
		{"too old", func(c map[string]any) { c["iat"] = now.Add(-12 * time.Minute).Unix() }, jobrule.ReasonTooOld, "the rule allows 10m0s"},
		{"no iat", func(c map[string]any) { delete(c, "iat") }, jobrule.ReasonTooOld, "iat missing"},
		{"iat a string", func(c map[string]any) { c["iat"] = "1700000000" }, jobrule.ReasonTooOld, "iat missing"},
		{"condition mismatch", func(c map[string]any) { c["repository_owner"] = "evil-org"; c["repository"] = "evil-org/r" }, jobrule.ReasonClaimMismatch, `claim repository_owner is "evil-org", the rule wants "octo-org"`},
		{"glob mismatch: tag", func(c map[string]any) { c["ref"] = "refs/tags/v1" }, jobrule.ReasonClaimMismatch, "claim ref"},
		{"glob mismatch: * stays in one part", func(c map[string]any) { c["ref"] = "refs/heads/feature/x" }, jobrule.ReasonClaimMismatch, "claim ref"},
		{"condition claim missing", func(c map[string]any) { delete(c, "ref") }, jobrule.ReasonClaimMismatch, "claim ref is missing"},
		{"condition claim an array", func(c map[string]any) { c["ref"] = []string{"refs/heads/main"} }, jobrule.ReasonClaimMismatch, "claim ref is missing"},
		{"too deep", func(c map[string]any) {
			c["x"] = map[string]any{"a": map[string]any{"b": map[string]any{"c": map[string]any{"d": map[string]any{"e": 1}}}}}
		}, jobrule.ReasonMalformed, "deeper than 5"},
		{"too many values", func(c map[string]any) {
			l := make([]int, 300)
			c["x"] = l
		}, jobrule.ReasonMalformed, "more than 256"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := jobruletest.GitHubClaims(iss.URL(), aud, now)
			tc.edit(c)
			refused(t, s, keys, iss.Sign(t, c), tc.want, tc.msg)
		})
	}

	// Within the leeway: accepted.
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	c["exp"] = now.Add(-59 * time.Second).Unix()
	c["nbf"] = now.Add(59 * time.Second).Unix()
	c["ref"] = "refs/heads/release-1"
	mustVerify(t, s, keys, iss.Sign(t, c))
	c["aud"] = []string{"x", aud}
	c["iat"] = now.Add(-10*time.Minute - 59*time.Second).Unix()
	mustVerify(t, s, keys, iss.Sign(t, c))
}

// TestAttackPathTraversal: claim values that would add, climb or escape
// path segments are refused, not cleaned.
func TestAttackPathTraversal(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	// Scoped by the repository's ID, so that the owner's name reaches the
	// template.
	s := rule(t, iss, jobrule.PresetGitHubActions, func(s *jobrule.Spec) {
		s.Conditions = []jobrule.Condition{{Claim: "repository_id", Pattern: "74"}}
	})
	keys := static(t, iss)
	for _, owner := range []string{"a/b", "..", ".", "a..b", "%2e", "%2e%2e", " x", "x ", "é", "a\x00b", "a\\b", ""} {
		t.Run(fmt.Sprintf("%q", owner), func(t *testing.T) {
			c := jobruletest.GitHubClaims(iss.URL(), aud, now)
			c["repository_owner"] = owner
			c["repository"] = owner + "/octo-repo"
			refused(t, s, keys, iss.Sign(t, c), jobrule.ReasonUnsafeValue, "claim repository_owner")
		})
	}
	for _, runID := range []string{"../1", "1/2", "..", "1%2f2"} {
		c := jobruletest.GitHubClaims(iss.URL(), aud, now)
		c["run_id"] = runID
		refused(t, s, keys, iss.Sign(t, c), jobrule.ReasonUnsafeValue, "run_template: claim run_id")
	}
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	c["repository"] = "octo-org/" + strings.Repeat("r", 256)
	refused(t, s, keys, iss.Sign(t, c), jobrule.ReasonUnsafeValue, "longer than 255")
	// The repository name after the owner may not hold a slash either.
	c["repository"] = "octo-org/a/b"
	refused(t, s, keys, iss.Sign(t, c), jobrule.ReasonUnsafeValue, "claim repository_name")
}

func TestMalformed(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	keys := static(t, iss)
	c := jobruletest.GitHubClaims(iss.URL(), aud, now)
	good := iss.Sign(t, c)
	k := iss.Current("RS256")
	for _, tc := range []struct{ name, tok, msg string }{
		{"empty", "", "empty"},
		{"garbage", "not a token", "want 3"},
		{"two parts", "a.b", "want 3"},
		{"four parts", good + ".x", "want 3"},
		{"header not base64", "!!." + strings.SplitN(good, ".", 2)[1], "base64"},
		{"header not JSON", "bm90IGpzb24." + strings.SplitN(good, ".", 2)[1], "JSON"},
		{"too large", good + strings.Repeat("A", jobrule.MaxTokenBytes), "at most 16384"},
		{"no kid", jobruletest.Raw(t, map[string]any{"alg": "RS256"}, c, nil), "no kid"},
		{"payload not JSON", jobruletest.SignBytes(t, k, []byte("hello")), "not JSON"},
		{"payload an array", jobruletest.SignBytes(t, k, []byte(`["a"]`)), "not a JSON object"},
		{"duplicate claim", jobruletest.SignBytes(t, k, []byte(`{"iss":"x","iss":"y"}`)), `"iss" appears twice`},
		{"colliding flattened names", jobruletest.SignBytes(t, k, []byte(`{"a.b":"1","a":{"b":"2"}}`)), `"a.b" appears twice`},
		{"trailing data", jobruletest.SignBytes(t, k, []byte(`{"iss":"x"} {}`)), "after its JSON object"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			refused(t, s, keys, tc.tok, jobrule.ReasonMalformed, tc.msg)
		})
	}
}

// TestUnusableRule: a rule missing what the checks compare against is an
// error of its own, never a pass.
func TestUnusableRule(t *testing.T) {
	iss := jobruletest.NewIssuer(t)
	s := rule(t, iss, jobrule.PresetGitHubActions)
	tok := iss.Sign(t, jobruletest.GitHubClaims(iss.URL(), aud, now))
	for _, edit := range []func(*jobrule.Spec){
		func(s *jobrule.Spec) { s.Audience = "" },
		func(s *jobrule.Spec) { s.Issuer = "" },
		func(s *jobrule.Spec) { s.Preset = "jenkins" },
		func(s *jobrule.Spec) { s.MaxTokenAge = 0 },
	} {
		bad := s
		edit(&bad)
		_, err := jobrule.Verify(context.Background(), bad, static(t, iss), tok, now)
		var r *jobrule.Refusal
		if err == nil || errors.As(err, &r) {
			t.Errorf("unusable rule: %v", err)
		}
	}
}
