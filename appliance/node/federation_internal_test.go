package node

import (
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"
)

// What a foreign endpoint sends (a status line, names in its
// certificate) reaches admins' terminals through FederationShow: control
// characters never do, and the text is bounded.
func TestAttackFederationErrorEscapes(t *testing.T) {
	got := printableText("bundle endpoint answered 500 \x1b]0;pwned\a\x1b[2J", 512)
	if strings.ContainsFunc(got, unicode.IsControl) || !strings.HasPrefix(got, "bundle endpoint answered 500 ?]0;pwned??[2J") {
		t.Fatalf("stored error %q", got)
	}
	if got := printableText(strings.Repeat("é", 400), 512); len(got) > 512+len("…") || !utf8.ValidString(got) {
		t.Fatalf("bounded error: %d bytes, valid %v", len(got), utf8.ValidString(got))
	}
}
