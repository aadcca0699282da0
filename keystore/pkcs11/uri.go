package pkcs11

import (
	"encoding/hex"
	"fmt"
	"os"
	"strings"

	"github.com/sigil-appliance/sigil/keystore"
)

// URI is the subset of an RFC 7512 PKCS#11 URI that addresses a key:
//
//	pkcs11:token=sigil-node-1;object=issuing-ca;id=%01%02?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/sigil/hsm.pin
//
// The PIN never appears in the URI: pin-value is refused, and pin-source
// names a file (file:/path or an absolute path) or, as an extension, an
// environment variable (env:NAME). A URI without pin-source needs a key
// store with a PIN provider (Options.PIN).
type URI struct {
	// Token selection (path attributes). At least one of Token and Serial.
	Token        string
	Serial       string
	Manufacturer string
	Model        string
	// Object selection.
	Object string
	ID     []byte
	// Query attributes.
	ModulePath string
	PINSource  string
}

// ParseURI parses and validates a pkcs11: URI. Errors wrap
// keystore.ErrInvalidURI and name the offending attribute.
func ParseURI(raw string) (*URI, error) {
	bad := func(format string, a ...any) (*URI, error) {
		return nil, fmt.Errorf("%w: %s", keystore.ErrInvalidURI, fmt.Sprintf(format, a...))
	}
	rest, ok := strings.CutPrefix(raw, "pkcs11:")
	if !ok {
		return bad("%q does not start with pkcs11:", redactURI(raw))
	}
	path, query, _ := strings.Cut(rest, "?")
	u := &URI{}
	seen := map[string]bool{}
	for _, part := range splitNonEmpty(path, ";") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return bad("path attribute %q has no '='", part)
		}
		if seen[k] {
			return bad("path attribute %q given twice", k)
		}
		seen[k] = true
		dv, err := pctDecode(v)
		if err != nil {
			return bad("attribute %s: %v", k, err)
		}
		switch k {
		case "token":
			u.Token = string(dv)
		case "serial":
			u.Serial = string(dv)
		case "manufacturer":
			u.Manufacturer = string(dv)
		case "model":
			u.Model = string(dv)
		case "object":
			u.Object = string(dv)
		case "id":
			u.ID = dv
		case "type":
			if s := string(dv); s != "private" && s != "public" {
				return bad("type=%s: only private and public keys are addressed", s)
			}
		case "library-manufacturer", "library-description", "library-version", "slot-description", "slot-manufacturer", "slot-id":
			// Accepted by RFC 7512; we select tokens by label/serial only.
		case "pin-value":
			return bad("pin-value is not allowed: give the PIN through pin-source")
		default:
			return bad("unknown path attribute %q", k)
		}
	}
	for _, part := range splitNonEmpty(query, "&") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return bad("query attribute %q has no '='", part)
		}
		if seen["?"+k] {
			return bad("query attribute %q given twice", k)
		}
		seen["?"+k] = true
		dv, err := pctDecode(v)
		if err != nil {
			return bad("attribute %s: %v", k, err)
		}
		switch k {
		case "module-path":
			u.ModulePath = string(dv)
		case "pin-source":
			u.PINSource = string(dv)
		case "pin-value":
			return bad("pin-value is not allowed: give the PIN through pin-source")
		case "module-name":
			return bad("module-name is not supported: give module-path")
		default:
			return bad("unknown query attribute %q", k)
		}
	}
	if u.Token == "" && u.Serial == "" {
		return bad("no token or serial attribute: the token must be named")
	}
	if u.ModulePath == "" {
		return bad("no module-path query attribute")
	}
	if !strings.HasPrefix(u.ModulePath, "/") {
		return bad("module-path %q is not absolute", u.ModulePath)
	}
	if u.PINSource != "" {
		if _, _, err := pinLocation(u.PINSource); err != nil {
			return nil, err
		}
	}
	return u, nil
}

// keyURI checks that a URI names one key object.
func (u *URI) requireObject() error {
	if u.Object == "" && len(u.ID) == 0 {
		return fmt.Errorf("%w: no object or id attribute: the key must be named", keystore.ErrInvalidURI)
	}
	return nil
}

// String renders the URI in canonical form (it never holds a secret).
func (u *URI) String() string {
	var path []string
	add := func(k, v string) {
		if v != "" {
			path = append(path, k+"="+pctEncode([]byte(v)))
		}
	}
	add("token", u.Token)
	add("serial", u.Serial)
	add("manufacturer", u.Manufacturer)
	add("model", u.Model)
	add("object", u.Object)
	if len(u.ID) > 0 {
		var b strings.Builder
		for _, c := range u.ID {
			fmt.Fprintf(&b, "%%%02x", c)
		}
		path = append(path, "id="+b.String())
	}
	s := "pkcs11:" + strings.Join(path, ";")
	var q []string
	if u.ModulePath != "" {
		q = append(q, "module-path="+pctEncode([]byte(u.ModulePath)))
	}
	if u.PINSource != "" {
		q = append(q, "pin-source="+pctEncode([]byte(u.PINSource)))
	}
	if len(q) > 0 {
		s += "?" + strings.Join(q, "&")
	}
	return s
}

// tokenKey identifies a token within the process.
func (u *URI) tokenKey() string {
	return strings.Join([]string{u.ModulePath, u.Token, u.Serial, u.Manufacturer, u.Model}, "\x00")
}

// pinLocation splits a pin-source into its kind ("file" or "env") and place.
func pinLocation(src string) (kind, where string, err error) {
	switch {
	case strings.HasPrefix(src, "file:"):
		where = strings.TrimPrefix(src, "file:")
		// file:///path and file:/path are both common.
		where = strings.TrimPrefix(where, "//")
		kind = "file"
	case strings.HasPrefix(src, "env:"):
		kind, where = "env", strings.TrimPrefix(src, "env:")
		if where == "" {
			return "", "", fmt.Errorf("%w: pin-source env: names no variable", keystore.ErrInvalidURI)
		}
		return kind, where, nil
	case strings.HasPrefix(src, "/"):
		kind, where = "file", src
	default:
		return "", "", fmt.Errorf("%w: pin-source %q must be file:/absolute/path or env:NAME", keystore.ErrInvalidURI, src)
	}
	if !strings.HasPrefix(where, "/") {
		return "", "", fmt.Errorf("%w: pin-source file %q is not absolute", keystore.ErrInvalidURI, where)
	}
	return kind, where, nil
}

// readPIN fetches the PIN at the moment it is needed, so it is not kept in
// memory between logins. A PIN file readable by group or others is refused:
// it has already leaked, and using it would hide that.
func readPIN(src string) ([]byte, error) {
	kind, where, err := pinLocation(src)
	if err != nil {
		return nil, err
	}
	if kind == "env" {
		v, ok := os.LookupEnv(where)
		if !ok || v == "" {
			return nil, fmt.Errorf("%w: environment variable %s is not set", keystore.ErrPINSource, where)
		}
		return []byte(v), nil
	}
	f, err := os.Open(where)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", keystore.ErrPINSource, err)
	}
	defer func() { _ = f.Close() }() // read-only
	st, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", keystore.ErrPINSource, err)
	}
	if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("%w: %s is not a regular file", keystore.ErrPINSource, where)
	}
	if st.Mode().Perm()&0o077 != 0 {
		return nil, fmt.Errorf("%w: %s has mode %v; a PIN file must not be readable by group or others (chmod 600)", keystore.ErrPINSource, where, st.Mode().Perm())
	}
	buf := make([]byte, 257)
	n, _ := f.Read(buf)
	if n > 256 {
		return nil, fmt.Errorf("%w: %s is longer than any PIN", keystore.ErrPINSource, where)
	}
	pin := []byte(strings.TrimRight(string(buf[:n]), "\r\n"))
	if len(pin) == 0 {
		return nil, fmt.Errorf("%w: %s is empty", keystore.ErrPINSource, where)
	}
	return pin, nil
}

func splitNonEmpty(s, sep string) []string {
	var out []string
	for _, p := range strings.Split(s, sep) {
		if p != "" {
			out = append(out, p)
		}
	}
	return out
}

func pctDecode(s string) ([]byte, error) {
	out := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch {
		case c == '%':
			if i+3 > len(s) {
				return nil, fmt.Errorf("truncated percent-escape at offset %d", i)
			}
			b, err := hex.DecodeString(s[i+1 : i+3])
			if err != nil {
				return nil, fmt.Errorf("bad percent-escape %q", s[i:i+3])
			}
			out = append(out, b[0])
			i += 2
		case c < 0x21 || c > 0x7e || strings.IndexByte(`"<>\^`+"`{|}", c) >= 0:
			return nil, fmt.Errorf("character %q must be percent-encoded", c)
		default:
			out = append(out, c)
		}
	}
	return out, nil
}

// pctEncode escapes everything outside RFC 7512's unreserved set plus '/'
// and ':' (which keep module paths readable).
func pctEncode(b []byte) string {
	var sb strings.Builder
	for _, c := range b {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~/:", c) >= 0 {
			sb.WriteByte(c)
		} else {
			fmt.Fprintf(&sb, "%%%02X", c)
		}
	}
	return sb.String()
}

// redactURI keeps error messages from echoing whatever follows '?'.
func redactURI(s string) string {
	if i := strings.IndexByte(s, '?'); i >= 0 {
		return s[:i] + "?…"
	}
	return s
}
