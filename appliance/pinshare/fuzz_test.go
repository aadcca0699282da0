package pinshare

import (
	"bytes"
	"testing"
)

// FuzzCombine: shares are files officers carry on removable media. Any
// bytes parse into a checked share or an error; a set of three shares
// where one was altered never combines into a PIN other than the one
// split.
func FuzzCombine(f *testing.F) {
	pin := []byte("1234-5678")
	shares, err := Split(pin, "sigil-root", 3, 5)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(shares[0].Marshal())
	f.Add([]byte(`{"format":"x"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		s, err := Parse(b)
		if err != nil {
			return
		}
		got, err := Combine([]Share{s, shares[1], shares[2]})
		if err == nil && !bytes.Equal(got, pin) {
			t.Fatalf("a forged share combined into another PIN: %q", got)
		}
	})
}
