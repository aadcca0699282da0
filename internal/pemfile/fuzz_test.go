package pemfile

import (
	"bytes"
	"encoding/pem"
	"testing"
)

// FuzzDecode: any bytes give blocks of the asked-for type and nothing but
// whitespace after them, or an error naming the input; never a panic.
func FuzzDecode(f *testing.F) {
	blk := pem.EncodeToMemory(&pem.Block{Type: Certificate, Bytes: []byte{1, 2, 3}})
	f.Add(blk)
	f.Add(append([]byte("dump\n"), blk...))
	f.Add(append(append([]byte{}, blk...), "junk"...))
	f.Add(blk[:len(blk)-10])
	f.Fuzz(func(t *testing.T, b []byte) {
		ders, err := Decode("input.pem", b, Certificate)
		if err != nil {
			if !bytes.HasPrefix([]byte(err.Error()), []byte("input.pem")) {
				t.Fatalf("error does not name the input: %v", err)
			}
			return
		}
		if len(ders) == 0 {
			t.Fatal("no blocks and no error")
		}
	})
}
