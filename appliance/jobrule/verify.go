package jobrule

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// Reason says why a token was refused.
type Reason string

// The reasons Verify refuses a token for. All but ReasonKeysUnavailable
// are the token's fault.
const (
	ReasonMalformed       Reason = "malformed"
	ReasonAlgorithm       Reason = "algorithm"
	ReasonUnknownKey      Reason = "unknown-key"
	ReasonBadSignature    Reason = "bad-signature"
	ReasonWrongIssuer     Reason = "wrong-issuer"
	ReasonWrongAudience   Reason = "wrong-audience"
	ReasonExpired         Reason = "expired"
	ReasonNotYetValid     Reason = "not-yet-valid"
	ReasonTooOld          Reason = "too-old"
	ReasonClaimMismatch   Reason = "claim-mismatch"
	ReasonUnsafeValue     Reason = "unsafe-value"
	ReasonKeysUnavailable Reason = "keys-unavailable"
)

// Leeway is the clock skew allowed between the issuer and the appliance
// for exp, nbf and iat.
const Leeway = 60 * time.Second

// MaxAuditValueBytes bounds each audit claim value in Verified.Claims.
const MaxAuditValueBytes = 256

// Refusal is Verify's error for a token it does not accept. Err never
// holds the token.
type Refusal struct {
	Reason Reason
	Err    error
}

func (r *Refusal) Error() string {
	if r.Err == nil {
		return string(r.Reason)
	}
	return string(r.Reason) + ": " + r.Err.Error()
}
func (r *Refusal) Unwrap() error { return r.Err }

func refuse(r Reason, format string, args ...any) *Refusal {
	return &Refusal{Reason: r, Err: fmt.Errorf(format, args...)}
}

// Verified is what an accepted token says about its run.
type Verified struct {
	Path string // the run's SPIFFE ID path
	Run  string // the run's name, one path segment
	// Claims are the rule's audit claims the token has (flattened
	// names), each value cut to MaxAuditValueBytes.
	Claims  map[string]string
	Subject string
	// ReplayKey is hex SHA-256 of issuer+"\x00"+jti, or of the token when
	// it has no jti: the caller admits each key once.
	ReplayKey string
	// ReplayUntil is when the caller may forget ReplayKey: after it the
	// token is refused as expired or too old anyway.
	ReplayUntil      time.Time
	IssuedAt, Expiry time.Time
}

// Verify checks token against the rule s (ApplyPreset applied, Validate
// passed) with the issuer's keys, at now. A token it does not accept is
// a *Refusal; an error that is not one means s itself is unusable.
func Verify(ctx context.Context, s Spec, keys KeySource, token string, now time.Time) (*Verified, error) {
	p, ok := presetFor(s.Preset)
	if !ok {
		return nil, fmt.Errorf("rule %q: unknown preset %q", s.Name, s.Preset)
	}
	// An empty issuer or audience would match tokens that lack the claim.
	if s.Issuer == "" || s.Audience == "" || s.SPIFFEIDTemplate == "" || s.RunTemplate == "" || s.MaxTokenAge <= 0 {
		return nil, fmt.Errorf("rule %q: issuer, audience, templates and max token age are required", s.Name)
	}
	if keys == nil {
		return nil, fmt.Errorf("rule %q: no key source", s.Name)
	}

	if token == "" {
		return nil, refuse(ReasonMalformed, "empty token")
	}
	if len(token) > MaxTokenBytes {
		return nil, refuse(ReasonMalformed, "token of %d bytes, at most %d", len(token), MaxTokenBytes)
	}
	segs := strings.Split(token, ".")
	if len(segs) != 3 {
		return nil, refuse(ReasonMalformed, "not a compact JWS (%d parts, want 3)", len(segs))
	}
	// Only the canonical base64url form of each part is accepted: the
	// verifier checks the decoded bytes, so spare bits in a part's last
	// character would otherwise give one signed token many spellings.
	for i, seg := range segs {
		if b, err := base64.RawURLEncoding.Strict().DecodeString(seg); err != nil || base64.RawURLEncoding.EncodeToString(b) != seg {
			return nil, refuse(ReasonMalformed, "part %d is not canonical base64url", i+1)
		}
	}
	// The header is read before the signature is checked only to choose
	// the algorithm and key; it is trusted for nothing else.
	hdrJSON, err := base64.RawURLEncoding.DecodeString(segs[0])
	if err != nil {
		return nil, refuse(ReasonMalformed, "header is not base64url")
	}
	var hdr struct {
		Alg string `json:"alg"`
		Kid string `json:"kid"`
	}
	if err := json.Unmarshal(hdrJSON, &hdr); err != nil {
		return nil, refuse(ReasonMalformed, "header is not a JSON object")
	}
	var alg jose.SignatureAlgorithm
	switch hdr.Alg {
	case string(jose.RS256), string(jose.ES256):
		alg = jose.SignatureAlgorithm(hdr.Alg)
	default:
		return nil, refuse(ReasonAlgorithm, "alg %q is not RS256 or ES256", clip(hdr.Alg, 32))
	}
	if hdr.Kid == "" {
		return nil, refuse(ReasonMalformed, "header has no kid")
	}
	key, err := keys.Key(ctx, hdr.Kid)
	if errors.Is(err, ErrUnknownKey) {
		return nil, refuse(ReasonUnknownKey, "kid %q: %v", clip(hdr.Kid, 64), err)
	} else if err != nil {
		return nil, &Refusal{Reason: ReasonKeysUnavailable, Err: fmt.Errorf("keys of %s: %w", s.Issuer, err)}
	}
	// A key is for one algorithm: an RSA key never checks an ES256
	// signature, whatever the header claims.
	if err := keyFits(alg, key); err != nil {
		return nil, refuse(ReasonAlgorithm, "kid %q: %v", clip(hdr.Kid, 64), err)
	}
	jws, err := jose.ParseSignedCompact(token, []jose.SignatureAlgorithm{alg})
	if err != nil {
		return nil, refuse(ReasonMalformed, "not a valid JWS: %v", err)
	}
	payload, err := jws.Verify(key)
	if errors.Is(err, jose.ErrUnsupportedCriticalHeader) {
		return nil, refuse(ReasonMalformed, "header marks as critical a parameter this verifier does not know")
	} else if err != nil {
		return nil, refuse(ReasonBadSignature, "signature does not verify with kid %q", clip(hdr.Kid, 64))
	}

	cs, err := flatten(payload)
	if err != nil {
		return nil, refuse(ReasonMalformed, "%v", err)
	}
	if iss, ok := cs.flat["iss"]; !ok || iss != s.Issuer {
		return nil, refuse(ReasonWrongIssuer, "iss %q, want %q", clip(cs.flat["iss"], 128), s.Issuer)
	}
	if !slices.Contains(cs.aud, s.Audience) {
		return nil, refuse(ReasonWrongAudience, "aud %q does not hold %q", clipAll(cs.aud), s.Audience)
	}
	exp, ok := cs.time("exp")
	if !ok {
		return nil, refuse(ReasonMalformed, "exp missing or not a valid time")
	}
	if !now.Before(exp.Add(Leeway)) {
		return nil, refuse(ReasonExpired, "expired at %v", exp.UTC().Format(time.RFC3339))
	}
	if nbf, ok := cs.time("nbf"); ok && now.Add(Leeway).Before(nbf) {
		return nil, refuse(ReasonNotYetValid, "not valid before %v", nbf.UTC().Format(time.RFC3339))
	} else if !ok {
		if _, present := cs.flat["nbf"]; present {
			return nil, refuse(ReasonMalformed, "nbf is not a valid time")
		}
	}
	iat, ok := cs.time("iat")
	if !ok {
		// Without iat a token's age is unknown, and only age bounds how
		// long a leaked long-lived token stays usable.
		return nil, refuse(ReasonTooOld, "iat missing or not a valid time: the token's age is unknown")
	}
	if now.Add(Leeway).Before(iat) {
		return nil, refuse(ReasonNotYetValid, "issued in the future (%v)", iat.UTC().Format(time.RFC3339))
	}
	if now.Sub(iat) > s.MaxTokenAge+Leeway {
		return nil, refuse(ReasonTooOld, "issued %v ago, the rule allows %v", now.Sub(iat).Round(time.Second), s.MaxTokenAge)
	}

	claims := cs.flat
	// What identifies the token is what its issuer signed (the payload),
	// not how it is spelled: an ES256 signature has two valid forms.
	signed := sha256Hex(s.Issuer + "\x00payload\x00" + string(payload))
	derive(p, claims, signed)
	for _, c := range s.Conditions {
		v, ok := claims[c.Claim]
		if !ok {
			return nil, refuse(ReasonClaimMismatch, "claim %s is missing (condition %q)", c.Claim, c.Pattern)
		}
		if m, err := path.Match(c.Pattern, v); err != nil || !m {
			return nil, refuse(ReasonClaimMismatch, "claim %s is %q, the rule wants %q", c.Claim, clip(v, 64), c.Pattern)
		}
	}
	idPath, err := render(s.SPIFFEIDTemplate, claims)
	if err != nil {
		return nil, refuse(ReasonUnsafeValue, "spiffe_id_template: %v", err)
	}
	if len(idPath) > MaxPathBytes {
		return nil, refuse(ReasonUnsafeValue, "spiffe_id_template renders %d bytes, at most %d", len(idPath), MaxPathBytes)
	}
	run, err := render(s.RunTemplate, claims)
	if err != nil {
		return nil, refuse(ReasonUnsafeValue, "run_template: %v", err)
	}
	if len(run) > MaxRunBytes || run == "." || strings.Contains(run, "..") {
		return nil, refuse(ReasonUnsafeValue, "run_template renders %q, not one short path segment", clip(run, 64))
	}

	v := &Verified{
		Path:     idPath,
		Run:      run,
		Claims:   map[string]string{},
		Subject:  cs.flat["sub"],
		IssuedAt: iat,
		Expiry:   exp,
	}
	for _, name := range s.AuditClaims {
		if val, ok := claims[name]; ok {
			v.Claims[name] = clipBytes(val, MaxAuditValueBytes)
		}
	}
	if jti, ok := cs.flat["jti"]; ok && jti != "" {
		v.ReplayKey = sha256Hex(s.Issuer + "\x00" + jti)
	} else {
		v.ReplayKey = signed
	}
	// The window is the longest any rule of this issuer could accept the
	// token for, not this rule's: a token used on a rule with a short
	// maximum age must stay used for a rule with a longer one.
	until := exp
	if aged := iat.Add(MaxMaxTokenAge); aged.Before(until) {
		until = aged
	}
	v.ReplayUntil = until.Add(Leeway)
	return v, nil
}

// derive adds the preset's derived claims. They replace any claim of the
// same name in the token, so that what a template sees under a derived
// name always comes from the derivation.
func derive(p *preset, claims map[string]string, signed string) {
	for alias, full := range p.aliases {
		if v, ok := claims[full]; ok {
			claims[alias] = v
		} else {
			delete(claims, alias)
		}
	}
	if p.child != "" {
		delete(claims, p.child)
		owner, okOwner := claims[p.owner]
		full, okFull := claims[p.full]
		if okOwner && okFull && owner != "" {
			if rest, ok := strings.CutPrefix(full, owner+"/"); ok {
				claims[p.child] = rest
			}
		}
	}
	if jti, ok := claims["jti"]; ok && safeValue(jti) == nil {
		claims["token_id"] = jti
	} else {
		claims["token_id"] = signed[:32]
	}
}

func keyFits(alg jose.SignatureAlgorithm, key crypto.PublicKey) error {
	switch k := key.(type) {
	case *rsa.PublicKey:
		if alg != jose.RS256 {
			return fmt.Errorf("an RSA key does not check %s", alg)
		}
		if k.N.BitLen() < MinRSABits {
			return fmt.Errorf("RSA key of %d bits, at least %d", k.N.BitLen(), MinRSABits)
		}
		return nil
	case *ecdsa.PublicKey:
		if alg != jose.ES256 {
			return fmt.Errorf("an EC key does not check %s", alg)
		}
		if k.Curve != elliptic.P256() {
			return errors.New("EC key is not on P-256")
		}
		return nil
	}
	return fmt.Errorf("a %T key is not usable", key)
}

// time reads a top-level NumericDate.
func (cs *claimSet) time(name string) (time.Time, bool) {
	f, ok := cs.nums[name]
	if !ok || f < 0 || f > math.MaxInt32*4 {
		return time.Time{}, false
	}
	sec, frac := math.Modf(f)
	return time.Unix(int64(sec), int64(frac*1e9)), true
}

func clipAll(list []string) []string {
	if len(list) > 4 {
		list = list[:4]
	}
	out := make([]string, len(list))
	for i, s := range list {
		out[i] = clip(s, 64)
	}
	return out
}

func sha256Hex(s string) string {
	h := sha256.Sum256([]byte(s))
	return hex.EncodeToString(h[:])
}

// UnverifiedIssuer reads a token's iss claim without checking anything:
// it only chooses which rules a token is checked against when the caller
// names none. Nothing else may rely on it.
func UnverifiedIssuer(token string) (string, error) {
	if len(token) > MaxTokenBytes {
		return "", refuse(ReasonMalformed, "token of %d bytes, at most %d", len(token), MaxTokenBytes)
	}
	segs := strings.Split(token, ".")
	if len(segs) != 3 {
		return "", refuse(ReasonMalformed, "not a compact JWS (%d parts, want 3)", len(segs))
	}
	payload, err := base64.RawURLEncoding.DecodeString(segs[1])
	if err != nil {
		return "", refuse(ReasonMalformed, "payload is not base64url")
	}
	var c struct {
		Iss string `json:"iss"`
	}
	if err := json.Unmarshal(payload, &c); err != nil || c.Iss == "" {
		return "", refuse(ReasonMalformed, "payload has no iss")
	}
	return c.Iss, nil
}
