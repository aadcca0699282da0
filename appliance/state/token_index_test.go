package state

import (
	"bytes"
	"fmt"
	"testing"
	"time"

	bolt "go.etcd.io/bbolt"
)

// tokenIDs lists the tokens and the token expiry index of f.
func tokenIDs(t *testing.T, f *FSM) (tokens, indexed map[string]bool) {
	t.Helper()
	tokens, indexed = map[string]bool{}, map[string]bool{}
	err := f.db.View(func(tx *bolt.Tx) error {
		if err := tx.Bucket(bTokens).ForEach(func(k, _ []byte) error { tokens[string(k)] = true; return nil }); err != nil {
			return err
		}
		return tx.Bucket(bTokensByExpiry).ForEach(func(k, _ []byte) error { indexed[string(k[8:])] = true; return nil })
	})
	if err != nil {
		t.Fatal(err)
	}
	return tokens, indexed
}

func tokenID(i int) string { return fmt.Sprintf("%064x", i+1) }

// Token creation drops the tokens that have expired by then through the
// expiry index (it used to decode every token each time: a fleet's
// rollout of N tokens cost N² decodes). Expiry is to the nanosecond, as
// before: a token expiring later in the same second stays.
func TestTokenExpiryIndex(t *testing.T) {
	a := newApplier(t)
	create := func(i int, at time.Time, ttl time.Duration) {
		t.Helper()
		if _, err := a.apply(CmdTokenCreate, at, TokenCreate{ID: tokenID(i), ExpiresAt: at.Add(ttl)}); err != nil {
			t.Fatal(err)
		}
	}
	create(0, t0, 10*time.Second)
	create(1, t0, 10*time.Second+900*time.Millisecond) // same second as token 0's expiry, later in it
	create(2, t0, time.Hour)
	create(3, t0.Add(10*time.Second+500*time.Millisecond), time.Hour) // token 0 expired, token 1 not yet
	tokens, indexed := tokenIDs(t, a.fsm)
	if tokens[tokenID(0)] || !tokens[tokenID(1)] || !tokens[tokenID(2)] || !tokens[tokenID(3)] || len(tokens) != 3 {
		t.Fatalf("tokens after the third creation: %v", tokens)
	}
	if fmt.Sprint(tokens) != fmt.Sprint(indexed) {
		t.Fatalf("index %v, tokens %v", indexed, tokens)
	}
	create(4, t0.Add(11*time.Second), time.Hour) // token 1 expired now
	if tokens, indexed = tokenIDs(t, a.fsm); tokens[tokenID(1)] || len(tokens) != 3 || fmt.Sprint(tokens) != fmt.Sprint(indexed) {
		t.Fatalf("tokens %v, index %v", tokens, indexed)
	}
	// A used token keeps its index key and expires like any other.
	if _, err := a.apply(CmdTokenUse, t0.Add(12*time.Second), TokenUse{ID: tokenID(2), Agent: "spiffe://example.org/sigil/agent/join_token/x"}); err != nil {
		t.Fatal(err)
	}
	create(5, t0.Add(2*time.Hour), time.Hour)
	if tokens, indexed = tokenIDs(t, a.fsm); len(tokens) != 1 || !tokens[tokenID(5)] || fmt.Sprint(tokens) != fmt.Sprint(indexed) {
		t.Fatalf("after every other token expired: tokens %v, index %v", tokens, indexed)
	}

	// A snapshot restores the index from the tokens.
	b := newFSM(t)
	if err := b.Restore(bytes.NewReader(atkSnapshot(t, a.fsm))); err != nil {
		t.Fatal(err)
	}
	if tokens, indexed = tokenIDs(t, b); len(tokens) != 1 || fmt.Sprint(tokens) != fmt.Sprint(indexed) {
		t.Fatalf("restored: tokens %v, index %v", tokens, indexed)
	}
}
