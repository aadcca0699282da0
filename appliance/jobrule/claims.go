package jobrule

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
)

// Bounds on the work one token's claims may cost.
const (
	MaxTokenBytes  = 16 << 10
	MaxClaimDepth  = 5
	MaxClaimLeaves = 256
)

// claimSet is a token's payload, flattened: nested object names joined
// with ".", strings as they are, integral numbers as integers, booleans
// as "true"/"false". Arrays are not claims, except aud (kept apart for
// the audience check).
type claimSet struct {
	flat map[string]string
	nums map[string]float64 // top-level numbers, for exp, nbf and iat
	aud  []string
}

// flatten reads the payload as a stream so that depth, size and
// duplicate names are checked before anything is built: a duplicate or
// colliding name would let two readers of one token disagree on it.
func flatten(payload []byte) (*claimSet, error) {
	cs := &claimSet{flat: map[string]string{}, nums: map[string]float64{}}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.UseNumber()
	tok, err := dec.Token()
	if err != nil {
		return nil, fmt.Errorf("payload is not JSON: %v", err)
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("payload is not a JSON object")
	}
	leaves := 0
	if err := cs.object(dec, "", 1, &leaves); err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("payload has data after its JSON object")
	}
	return cs, nil
}

// object reads an object's members after its '{'.
func (cs *claimSet) object(dec *json.Decoder, prefix string, depth int, leaves *int) error {
	if depth > MaxClaimDepth {
		return fmt.Errorf("claims nest deeper than %d", MaxClaimDepth)
	}
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("payload: %v", err)
		}
		key, _ := tok.(string)
		if seen[key] {
			return fmt.Errorf("claim %q appears twice", clip(prefix+key, 128))
		}
		seen[key] = true
		if err := cs.value(dec, prefix+key, depth, leaves); err != nil {
			return err
		}
	}
	if _, err := dec.Token(); err != nil { // '}'
		return fmt.Errorf("payload: %v", err)
	}
	return nil
}

func (cs *claimSet) value(dec *json.Decoder, name string, depth int, leaves *int) error {
	tok, err := dec.Token()
	if err != nil {
		return fmt.Errorf("payload: %v", err)
	}
	*leaves++
	if *leaves > MaxClaimLeaves {
		return fmt.Errorf("more than %d claim values", MaxClaimLeaves)
	}
	set := func(v string) error {
		if _, dup := cs.flat[name]; dup {
			return fmt.Errorf("claim %q appears twice (flattened)", clip(name, 128))
		}
		cs.flat[name] = v
		return nil
	}
	switch v := tok.(type) {
	case json.Delim:
		if v == '{' {
			return cs.object(dec, name+".", depth+1, leaves)
		}
		// '[': arrays are not claims, but aud's strings are kept.
		return cs.array(dec, name, depth+1, leaves, depth == 1 && name == "aud")
	case string:
		if depth == 1 && name == "aud" {
			cs.aud = append(cs.aud, v)
		}
		return set(v)
	case bool:
		return set(strconv.FormatBool(v))
	case json.Number:
		f, ferr := v.Float64()
		if ferr != nil || math.IsInf(f, 0) || math.IsNaN(f) {
			return fmt.Errorf("claim %q is not a usable number", clip(name, 128))
		}
		if depth == 1 {
			cs.nums[name] = f
		}
		if i, err := v.Int64(); err == nil {
			return set(strconv.FormatInt(i, 10))
		}
		// 1e3 is integral too; beyond 2^53 a float no longer says which
		// integer it is, so such values are left out rather than guessed.
		if f == math.Trunc(f) && math.Abs(f) < 1<<53 {
			return set(strconv.FormatInt(int64(f), 10))
		}
		return nil
	case nil:
		return nil
	}
	return fmt.Errorf("claim %q has an unexpected JSON value", clip(name, 128))
}

func (cs *claimSet) array(dec *json.Decoder, name string, depth int, leaves *int, isAud bool) error {
	if depth > MaxClaimDepth {
		return fmt.Errorf("claims nest deeper than %d", MaxClaimDepth)
	}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("payload: %v", err)
		}
		*leaves++
		if *leaves > MaxClaimLeaves {
			return fmt.Errorf("more than %d claim values", MaxClaimLeaves)
		}
		switch v := tok.(type) {
		case json.Delim:
			if err := skip(dec, v, depth+1, leaves); err != nil {
				return err
			}
		case string:
			if isAud {
				cs.aud = append(cs.aud, v)
			}
		}
	}
	if _, err := dec.Token(); err != nil { // ']'
		return fmt.Errorf("payload: %v", err)
	}
	return nil
}

// skip reads past a nested value inside an array, still bounded.
func skip(dec *json.Decoder, open json.Delim, depth int, leaves *int) error {
	if depth > MaxClaimDepth {
		return fmt.Errorf("claims nest deeper than %d", MaxClaimDepth)
	}
	for dec.More() {
		if open == '{' {
			if _, err := dec.Token(); err != nil { // member name
				return fmt.Errorf("payload: %v", err)
			}
		}
		tok, err := dec.Token()
		if err != nil {
			return fmt.Errorf("payload: %v", err)
		}
		*leaves++
		if *leaves > MaxClaimLeaves {
			return fmt.Errorf("more than %d claim values", MaxClaimLeaves)
		}
		if d, ok := tok.(json.Delim); ok {
			if err := skip(dec, d, depth+1, leaves); err != nil {
				return err
			}
		}
	}
	if _, err := dec.Token(); err != nil {
		return fmt.Errorf("payload: %v", err)
	}
	return nil
}
