package pkcs11

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/sigil-appliance/sigil/keystore"
)

func TestParseURI(t *testing.T) {
	const mod = "module-path=/usr/lib/softhsm/libsofthsm2.so"
	u, err := ParseURI("pkcs11:token=sigil%20root;object=root-key;id=%01%ff?" + mod + "&pin-source=file:/etc/sigil/root.pin")
	if err != nil {
		t.Fatal(err)
	}
	if u.Token != "sigil root" || u.Object != "root-key" || !bytes.Equal(u.ID, []byte{1, 0xff}) ||
		u.ModulePath != "/usr/lib/softhsm/libsofthsm2.so" || u.PINSource != "file:/etc/sigil/root.pin" {
		t.Fatalf("parsed %+v", u)
	}
	again, err := ParseURI(u.String())
	if err != nil {
		t.Fatalf("round trip of %s: %v", u, err)
	}
	if again.String() != u.String() {
		t.Fatalf("round trip changed %s to %s", u, again)
	}

	for _, tc := range []struct{ uri, want string }{
		{"pkcs12:token=a?" + mod + "&pin-source=/p", "does not start with pkcs11:"},
		{"pkcs11:object=a?" + mod + "&pin-source=/p", "token must be named"},
		{"pkcs11:token=a;object=b", "no module-path"},
		{"pkcs11:token=a?module-path=lib.so&pin-source=/p", "not absolute"},
		{"pkcs11:token=a;pin-value=1234?" + mod + "&pin-source=/p", "pin-value is not allowed"},
		{"pkcs11:token=a?" + mod + "&pin-value=1234", "pin-value is not allowed"},
		{"pkcs11:token=a?" + mod + "&pin-source=relative/file", "must be file:/absolute/path or env:NAME"},
		{"pkcs11:token=a;token=b?" + mod + "&pin-source=/p", "given twice"},
		{"pkcs11:token=a;colour=red?" + mod + "&pin-source=/p", "unknown path attribute"},
		{"pkcs11:token=a;id=%0?" + mod + "&pin-source=/p", "truncated percent-escape"},
		{"pkcs11:token=a;id=%zz?" + mod + "&pin-source=/p", "bad percent-escape"},
		{"pkcs11:token=a b?" + mod + "&pin-source=/p", "must be percent-encoded"},
		{"pkcs11:token=a;objectb?" + mod + "&pin-source=/p", "has no '='"},
	} {
		_, err := ParseURI(tc.uri)
		if !errors.Is(err, keystore.ErrInvalidURI) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("ParseURI(%q) = %v, want ErrInvalidURI containing %q", tc.uri, err, tc.want)
		}
		if err != nil && strings.Contains(err.Error(), "1234") {
			t.Errorf("error for %q echoes the PIN: %v", tc.uri, err)
		}
	}
}
