package jobrule

import (
	"errors"
	"fmt"
	"strings"
	"unicode/utf8"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxValueBytes bounds one claim value put into a template.
const MaxValueBytes = 255

// part is a template piece: a literal, or (name != "") a placeholder.
type part struct{ lit, name string }

func parseTemplate(t string) ([]part, error) {
	var parts []part
	for rest := t; rest != ""; {
		i := strings.Index(rest, "{{")
		j := strings.Index(rest, "}}")
		if i < 0 {
			if j >= 0 {
				return nil, errors.New(`"}}" without "{{"`)
			}
			parts = append(parts, part{lit: rest})
			break
		}
		if j >= 0 && j < i {
			return nil, errors.New(`"}}" without "{{"`)
		}
		if i > 0 {
			parts = append(parts, part{lit: rest[:i]})
		}
		rest = rest[i+2:]
		j = strings.Index(rest, "}}")
		if j < 0 {
			return nil, errors.New(`"{{" without "}}"`)
		}
		name := rest[:j]
		if err := checkClaimName(name); err != nil {
			return nil, fmt.Errorf("placeholder {{%s}}: %v", clip(name, 64), err)
		}
		parts = append(parts, part{name: name})
		rest = rest[j+2:]
	}
	return parts, nil
}

// checkTemplate checks a template's literal parts by rendering it with a
// stand-in value: what comes out must be a valid SPIFFE ID path (or, for
// a run template, one valid segment).
func checkTemplate(t string, segment bool) error {
	limit := MaxPathBytes
	if segment {
		limit = MaxRunBytes
	}
	if len(t) > limit {
		return fmt.Errorf("longer than %d bytes", limit)
	}
	parts, err := parseTemplate(t)
	if err != nil {
		return err
	}
	var b strings.Builder
	for _, p := range parts {
		if p.name != "" {
			b.WriteString("x")
			continue
		}
		b.WriteString(p.lit)
	}
	s := b.String()
	if segment {
		if strings.Contains(s, "/") {
			return fmt.Errorf("%q must be one path segment (no '/')", clip(t, 128))
		}
		s = "/" + s
	} else if !strings.HasPrefix(s, "/") {
		return fmt.Errorf("%q must start with '/'", clip(t, 128))
	}
	if err := spiffeid.ValidatePath(s); err != nil {
		return fmt.Errorf("%q is not a valid SPIFFE ID path: %v", clip(t, 128), err)
	}
	return nil
}

// render fills t from claims. Every value must be safe: one path part of
// [A-Za-z0-9._-] that is not "." or "..", so no claim can add, climb or
// escape path segments whatever the issuer put in it.
func render(t string, claims map[string]string) (string, error) {
	parts, err := parseTemplate(t)
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, p := range parts {
		if p.name == "" {
			b.WriteString(p.lit)
			continue
		}
		v, ok := claims[p.name]
		if !ok {
			return "", fmt.Errorf("claim %s is missing", p.name)
		}
		if err := safeValue(v); err != nil {
			return "", fmt.Errorf("claim %s %v", p.name, err)
		}
		b.WriteString(v)
	}
	return b.String(), nil
}

func safeValue(v string) error {
	switch {
	case v == "":
		return errors.New("is empty")
	case len(v) > MaxValueBytes:
		return fmt.Errorf("is longer than %d bytes", MaxValueBytes)
	case v == "." || strings.Contains(v, ".."):
		return fmt.Errorf("%q holds a dot segment", clip(v, 64))
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '.' || c == '_' || c == '-') {
			what := fmt.Sprintf("%q", rune(c))
			if c >= utf8.RuneSelf {
				what = "a non-ASCII character"
			}
			return fmt.Errorf("%q holds %s at byte %d (only A-Z, a-z, 0-9, '.', '_' and '-')", clip(v, 64), what, i)
		}
	}
	return nil
}
