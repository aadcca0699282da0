package tpm

import (
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/sigil-appliance/sigil/keystore"
)

// KeyURI is the address of a TPM key blob:
//
//	tpmkey:file=/abs/path/agent.key[;pcrs=0,7,16]
//
// pcrs (sha256 bank) binds a new key to those PCRs' current values; it is
// read only by CreateKey, because the policy then lives in the blob.
type KeyURI struct {
	File string
	PCRs []uint // ascending, no duplicates
}

// String is the canonical form of the URI.
func (u *KeyURI) String() string {
	s := "tpmkey:file=" + u.File
	if len(u.PCRs) > 0 {
		ps := make([]string, len(u.PCRs))
		for i, p := range u.PCRs {
			ps[i] = strconv.FormatUint(uint64(p), 10)
		}
		s += ";pcrs=" + strings.Join(ps, ",")
	}
	return s
}

// maxPCR is the highest PCR of a PC Client TPM.
const maxPCR = 23

// ParseKeyURI parses a tpmkey: URI. Errors wrap keystore.ErrInvalidURI.
func ParseKeyURI(raw string) (*KeyURI, error) {
	bad := func(format string, a ...any) (*KeyURI, error) {
		return nil, fmt.Errorf("%w: %q: %s", keystore.ErrInvalidURI, raw, fmt.Sprintf(format, a...))
	}
	rest, ok := strings.CutPrefix(raw, "tpmkey:")
	if !ok {
		return bad("scheme is not tpmkey:")
	}
	u := &KeyURI{}
	seen := map[string]bool{}
	for _, part := range strings.Split(rest, ";") {
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			return bad("attribute %q is not name=value", part)
		}
		if seen[k] {
			// Two files would make it ambiguous which key is meant.
			return bad("attribute %q given twice", k)
		}
		seen[k] = true
		switch k {
		case "file":
			if !filepath.IsAbs(v) {
				return bad("file %q is not an absolute path", v)
			}
			if filepath.Clean(v) != v || strings.HasSuffix(v, "/") {
				return bad("file %q is not a clean path to a file (want %q)", v, filepath.Clean(v))
			}
			u.File = v
		case "pcrs":
			if v == "" {
				return bad("pcrs is empty (omit it for a key without PCR policy)")
			}
			for _, p := range strings.Split(v, ",") {
				n, err := strconv.ParseUint(p, 10, 8)
				if err != nil || n > maxPCR {
					return bad("pcr %q is not a number from 0 to %d", p, maxPCR)
				}
				if slices.Contains(u.PCRs, uint(n)) {
					return bad("pcr %d listed twice", n)
				}
				u.PCRs = append(u.PCRs, uint(n))
			}
			slices.Sort(u.PCRs)
		default:
			return bad("unknown attribute %q (want file and optionally pcrs)", k)
		}
	}
	if u.File == "" {
		return bad("no file attribute")
	}
	return u, nil
}
