// Package pinshare splits an HSM PIN into M-of-N shares for key ceremonies
// and rebuilds it, in memory only, from any M of them.
//
// The PIN itself is not what is shared: a random Ristretto255 scalar K is
// split with Shamir's scheme (github.com/cloudflare/circl/secretsharing) and
// the PIN is sealed with AES-256-GCM under a key derived from K. Every share
// carries the sealed PIN and Feldman commitments to the sharing polynomial,
// so that
//   - a damaged or foreign share is detected on its own (Feldman check),
//   - a wrong set of shares cannot yield a wrong PIN silently (GCM), and
//     the HSM never sees a login attempt with a bad PIN, and
//   - nothing in a share helps brute-force a short PIN: the commitments
//     bind K, which is uniformly random, not the PIN.
package pinshare

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"

	"github.com/cloudflare/circl/group"
	"github.com/cloudflare/circl/secretsharing"
)

// Format identifies share files.
const Format = "sigil-pin-share/v1"

var (
	ErrTooFewShares = errors.New("pinshare: too few shares")
	ErrWrongShare   = errors.New("pinshare: wrong share")
	ErrMixedShares  = errors.New("pinshare: shares from different splits")
	ErrMalformed    = errors.New("pinshare: malformed share")
)

// Share is one share file's content. It is not secret on its own, but M of
// them are the PIN: keep each with a different officer, 0600.
type Share struct {
	Format      string   `json:"format"`
	Split       string   `json:"split"` // random ID common to one split
	Token       string   `json:"token"` // the token whose PIN this is
	Threshold   int      `json:"threshold"`
	Count       int      `json:"count"`
	Index       int      `json:"index"` // 1..Count
	Value       string   `json:"value"` // the Shamir share of K
	Commitments []string `json:"commitments"`
	Nonce       string   `json:"nonce"`
	Sealed      string   `json:"sealed"` // AES-GCM(PIN)
}

var g = group.Ristretto255

// Split seals pin and splits the key into count shares, any threshold of
// which rebuild it.
func Split(pin []byte, token string, threshold, count int) ([]Share, error) {
	switch {
	case len(pin) == 0:
		return nil, errors.New("pinshare: empty PIN")
	case threshold < 2:
		return nil, fmt.Errorf("pinshare: threshold %d: at least 2 shares must be needed, or there is nothing to split", threshold)
	case count < threshold:
		return nil, fmt.Errorf("pinshare: %d shares cannot meet threshold %d", count, threshold)
	case count > 255:
		return nil, fmt.Errorf("pinshare: %d shares is more than 255", count)
	case token == "":
		return nil, errors.New("pinshare: token label is required")
	}
	splitID := make([]byte, 16)
	rand.Read(splitID)
	k := g.RandomScalar(rand.Reader)
	ss := secretsharing.New(rand.Reader, uint(threshold-1), k)
	commit := ss.CommitSecret()
	commitments := make([]string, len(commit))
	for i, c := range commit {
		b, err := c.MarshalBinaryCompress()
		if err != nil {
			return nil, err
		}
		commitments[i] = base64.StdEncoding.EncodeToString(b)
	}
	hdr := Share{Format: Format, Split: hex.EncodeToString(splitID), Token: token,
		Threshold: threshold, Count: count, Commitments: commitments}
	aead, err := sealKey(k, hdr)
	if err != nil {
		return nil, err
	}
	nonce := make([]byte, aead.NonceSize())
	rand.Read(nonce)
	hdr.Nonce = base64.StdEncoding.EncodeToString(nonce)
	hdr.Sealed = base64.StdEncoding.EncodeToString(aead.Seal(nil, nonce, pin, aad(hdr)))

	out := make([]Share, count)
	for i, s := range ss.Share(uint(count)) {
		v, err := s.Value.MarshalBinary()
		if err != nil {
			return nil, err
		}
		out[i] = hdr
		out[i].Commitments = append([]string(nil), commitments...)
		out[i].Index = i + 1
		out[i].Value = base64.StdEncoding.EncodeToString(v)
	}
	return out, nil
}

// Combine checks every share and rebuilds the PIN. The caller should clear
// the returned slice when done.
func Combine(shares []Share) ([]byte, error) {
	if len(shares) == 0 {
		return nil, fmt.Errorf("%w: none given", ErrTooFewShares)
	}
	first := shares[0]
	seen := map[int]bool{}
	var parsed []secretsharing.Share
	for _, s := range shares {
		if err := s.check(); err != nil {
			return nil, err
		}
		if s.Split != first.Split || s.Token != first.Token || s.Threshold != first.Threshold || s.Count != first.Count ||
			s.Nonce != first.Nonce || s.Sealed != first.Sealed || strings.Join(s.Commitments, ",") != strings.Join(first.Commitments, ",") {
			return nil, fmt.Errorf("%w: share %d (split %s, token %q) does not belong with share %d (split %s, token %q)",
				ErrMixedShares, s.Index, s.Split, s.Token, first.Index, first.Split, first.Token)
		}
		if seen[s.Index] {
			return nil, fmt.Errorf("%w: share %d given twice", ErrTooFewShares, s.Index)
		}
		seen[s.Index] = true
	}
	if len(seen) < first.Threshold {
		return nil, fmt.Errorf("%w: %d distinct shares given, %d needed for token %q", ErrTooFewShares, len(seen), first.Threshold, first.Token)
	}
	commit := make(secretsharing.SecretCommitment, len(first.Commitments))
	for i, c := range first.Commitments {
		b, _ := base64.StdEncoding.DecodeString(c)
		commit[i] = g.NewElement()
		if err := commit[i].UnmarshalBinary(b); err != nil {
			return nil, fmt.Errorf("%w: commitment %d: %v", ErrMalformed, i, err)
		}
	}
	for _, s := range shares {
		b, _ := base64.StdEncoding.DecodeString(s.Value)
		v := g.NewScalar()
		if err := v.UnmarshalBinary(b); err != nil {
			return nil, fmt.Errorf("%w: share %d value: %v", ErrWrongShare, s.Index, err)
		}
		sh := secretsharing.Share{ID: g.NewScalar().SetUint64(uint64(s.Index)), Value: v}
		if !secretsharing.Verify(uint(first.Threshold-1), sh, commit) {
			return nil, fmt.Errorf("%w: share %d does not match its split's commitments (damaged, altered, or from another split)", ErrWrongShare, s.Index)
		}
		parsed = append(parsed, sh)
	}
	k, err := secretsharing.Recover(uint(first.Threshold-1), parsed)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrTooFewShares, err)
	}
	aead, err := sealKey(k, first)
	if err != nil {
		return nil, err
	}
	nonce, _ := base64.StdEncoding.DecodeString(first.Nonce)
	sealed, _ := base64.StdEncoding.DecodeString(first.Sealed)
	pin, err := aead.Open(nil, nonce, sealed, aad(first))
	if err != nil {
		return nil, fmt.Errorf("%w: the shares do not open the sealed PIN", ErrWrongShare)
	}
	return pin, nil
}

// Parse reads a share file strictly.
func Parse(data []byte) (Share, error) {
	var s Share
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return Share{}, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	if dec.More() {
		return Share{}, fmt.Errorf("%w: trailing data after the share", ErrMalformed)
	}
	return s, s.check()
}

// Marshal renders a share file.
func (s Share) Marshal() []byte {
	b, _ := json.MarshalIndent(s, "", "  ")
	return append(b, '\n')
}

func (s Share) check() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: %s", ErrMalformed, fmt.Sprintf(format, a...))
	}
	switch {
	case s.Format != Format:
		return bad("format %q, want %q", s.Format, Format)
	case len(s.Split) != 32:
		return bad("split id %q", s.Split)
	case s.Threshold < 2 || s.Count < s.Threshold || s.Count > 255:
		return bad("threshold %d of %d", s.Threshold, s.Count)
	case s.Index < 1 || s.Index > s.Count:
		return bad("index %d outside 1..%d", s.Index, s.Count)
	case len(s.Commitments) != s.Threshold:
		return bad("%d commitments for threshold %d", len(s.Commitments), s.Threshold)
	}
	for name, v := range map[string]string{"value": s.Value, "nonce": s.Nonce, "sealed": s.Sealed} {
		if _, err := base64.StdEncoding.DecodeString(v); err != nil || v == "" {
			return bad("%s is not base64", name)
		}
	}
	for i, c := range s.Commitments {
		if _, err := base64.StdEncoding.DecodeString(c); err != nil {
			return bad("commitment %d is not base64", i)
		}
	}
	return nil
}

func sealKey(k group.Scalar, hdr Share) (cipher.AEAD, error) {
	kb, err := k.MarshalBinary()
	if err != nil {
		return nil, err
	}
	key, err := hkdf.Key(sha256.New, kb, []byte(hdr.Split), Format+" seal", 32)
	clear(kb)
	if err != nil {
		return nil, err
	}
	block, err := aes.NewCipher(key)
	clear(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(block)
}

// aad binds the sealed PIN to the split's public header: relabelling a share
// set for another token or threshold breaks the seal.
func aad(s Share) []byte {
	return []byte(strings.Join([]string{s.Format, s.Split, s.Token, fmt.Sprint(s.Threshold), fmt.Sprint(s.Count), strings.Join(s.Commitments, ",")}, "|"))
}
