package pinshare

import (
	"bytes"
	"encoding/base64"
	"errors"
	"testing"
)

func TestSplitCombine(t *testing.T) {
	pin := []byte("correct horse battery staple")
	shares, err := Split(pin, "sigil-root", 3, 5)
	if err != nil {
		t.Fatal(err)
	}
	// Every 3-subset rebuilds the PIN.
	for a := 0; a < 5; a++ {
		for b := a + 1; b < 5; b++ {
			for c := b + 1; c < 5; c++ {
				got, err := Combine([]Share{shares[c], shares[a], shares[b]})
				if err != nil || !bytes.Equal(got, pin) {
					t.Fatalf("shares %d,%d,%d: %q, %v", a, b, c, got, err)
				}
			}
		}
	}
	// Files round-trip.
	parsed, err := Parse(shares[0].Marshal())
	if err != nil {
		t.Fatal(err)
	}
	if got, err := Combine([]Share{parsed, shares[1], shares[2]}); err != nil || !bytes.Equal(got, pin) {
		t.Fatalf("after parse: %v", err)
	}
}

func TestCombineRefuses(t *testing.T) {
	pin := []byte("12345678")
	shares, _ := Split(pin, "tok", 3, 5)
	other, _ := Split(pin, "tok", 3, 5)

	altered := shares[2]
	v, _ := base64.StdEncoding.DecodeString(altered.Value)
	v[3] ^= 1
	altered.Value = base64.StdEncoding.EncodeToString(v)

	relabelled := make([]Share, 3)
	copy(relabelled, shares[:3])
	for i := range relabelled {
		relabelled[i].Token = "other-token"
	}
	resealed := make([]Share, 3)
	copy(resealed, shares[:3])
	for i := range resealed {
		resealed[i].Sealed = other[0].Sealed
	}

	for _, tc := range []struct {
		name   string
		shares []Share
		want   error
	}{
		{"too few", shares[:2], ErrTooFewShares},
		{"duplicate", []Share{shares[0], shares[0], shares[1]}, ErrTooFewShares},
		{"none", nil, ErrTooFewShares},
		{"altered value", []Share{shares[0], shares[1], altered}, ErrWrongShare},
		{"from another split", []Share{shares[0], shares[1], other[2]}, ErrMixedShares},
		{"relabelled token", relabelled, ErrWrongShare},
		{"swapped sealed PIN", resealed, ErrWrongShare},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Combine(tc.shares)
			if !errors.Is(err, tc.want) {
				t.Fatalf("Combine = %q, %v; want %v", got, err, tc.want)
			}
		})
	}

	for _, bad := range []string{`{"format":"x"}`, `{"unknown":1}`, `not json`, string(shares[0].Marshal()) + `{}`} {
		if _, err := Parse([]byte(bad)); !errors.Is(err, ErrMalformed) {
			t.Errorf("Parse(%.30q) = %v, want ErrMalformed", bad, err)
		}
	}
	for _, tc := range []struct{ m, n int }{{1, 3}, {4, 3}, {2, 256}} {
		if _, err := Split(pin, "tok", tc.m, tc.n); err == nil {
			t.Errorf("Split %d of %d accepted", tc.m, tc.n)
		}
	}
}
