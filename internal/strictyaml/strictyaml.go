// Package strictyaml owns how Sigil reads every operator-written YAML
// file (sigild's and sigil-agent's configs, ceremony scripts): unknown
// fields are errors, a file is exactly one YAML document, durations have
// one syntax, and validation lists every problem at once so an operator
// fixes a file in one pass.
package strictyaml

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"strings"

	"go.yaml.in/yaml/v3"
)

// Decode fills v from data strictly.
func Decode(data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("config is empty")
		}
		return fmt.Errorf("config: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return errors.New("config: holds more than one YAML document; it must be exactly one")
	}
	return nil
}

// Problems collects what is wrong with one file, field by field. The zero
// value is ready to use.
type Problems struct {
	list []string
}

// Add records that field is wrong; format and a say how.
func (p *Problems) Add(field, format string, a ...any) {
	p.list = append(p.list, field+" "+fmt.Sprintf(format, a...))
}

// AddErr records err, when not nil, as a problem as it stands (for
// checks of nested sections that name their own field).
func (p *Problems) AddErr(err error) {
	if err != nil {
		p.list = append(p.list, err.Error())
	}
}

// Len is how many problems were recorded.
func (p *Problems) Len() int { return len(p.list) }

// Err is nil when nothing was recorded, otherwise one error that lists
// every problem, one a line, under "invalid <what>:".
func (p *Problems) Err(what string) error {
	if len(p.list) == 0 {
		return nil
	}
	return fmt.Errorf("invalid %s:\n  - %s", what, strings.Join(p.list, "\n  - "))
}
