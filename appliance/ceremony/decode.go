package ceremony

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"reflect"
	"regexp"
	"strconv"
	"strings"

	"go.yaml.in/yaml/v3"
)

// fieldProblem is something wrong with one field of a script, found while
// reading it: an unknown or repeated field, or a value of the wrong type.
type fieldProblem struct {
	field, msg string
	// keyOnly: the problem is a key of the section named by field, not
	// the section's value, so checks of the section still run.
	keyOnly bool
}

// decodeScript fills c from data without stopping at the first wrong
// field, so that Validate can list unknown fields and badly typed values
// together with every other problem. Only what leaves nothing to read
// stops it: YAML that does not parse, an empty file, a second document,
// or a top level that is not a mapping.
//
// The script is read into a yaml.Node tree and walked against Config's
// yaml tags; each leaf is decoded on its own, so one bad value does not
// hide the next.
func decodeScript(data []byte, c *Config) ([]fieldProblem, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, errors.New("config is empty")
		}
		return nil, fmt.Errorf("config: %w", err)
	}
	var extra yaml.Node
	if err := dec.Decode(&extra); !errors.Is(err, io.EOF) {
		return nil, errors.New("config: holds more than one YAML document; it must be exactly one")
	}
	top := &doc
	if top.Kind == yaml.DocumentNode && len(top.Content) == 1 {
		top = top.Content[0]
	}
	if top.Kind != yaml.MappingNode {
		return nil, fmt.Errorf("config: line %d: a ceremony script is a mapping of fields (kind: ..., transcript: ...), not %s", top.Line, describeNode(top))
	}
	w := &walker{}
	w.value(top, reflect.ValueOf(c).Elem(), "")
	return w.problems, nil
}

type walker struct {
	problems []fieldProblem
}

func (w *walker) add(field, format string, a ...any) {
	w.problems = append(w.problems, fieldProblem{field: field, msg: fmt.Sprintf(format, a...)})
}

func (w *walker) addKey(field, format string, a ...any) {
	w.problems = append(w.problems, fieldProblem{field: field, msg: fmt.Sprintf(format, a...), keyOnly: true})
}

var unmarshalerType = reflect.TypeFor[yaml.Unmarshaler]()

// value decodes n into v (addressable), path naming v in problems.
func (w *walker) value(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind == yaml.AliasNode && n.Alias != nil {
		n = n.Alias
	}
	if n.Kind == yaml.ScalarNode && n.Tag == "!!null" {
		return // "hsm:" with nothing after it: the field stays unset
	}
	t := v.Type()
	if t.Kind() == reflect.Pointer && t.Elem().Kind() == reflect.Struct && !reflect.PointerTo(t.Elem()).Implements(unmarshalerType) {
		v.Set(reflect.New(t.Elem()))
		w.value(n, v.Elem(), path)
		return
	}
	if t.Kind() != reflect.Struct || reflect.PointerTo(t).Implements(unmarshalerType) {
		w.leaf(n, v, path)
		return
	}
	if n.Kind != yaml.MappingNode {
		w.add(path, "must be a section of fields (%s), not %s (line %d)", strings.Join(fieldNames(t), ", "), describeNode(n), n.Line)
		return
	}
	seen := map[string]int{} // field name -> line
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			w.addKey(orTop(path), "has a key that is not a field name (line %d)", k.Line)
			continue
		}
		name := k.Value
		full := joinPath(path, name)
		if name == "<<" {
			w.addKey(orTop(path), "uses a YAML merge key (<<) at line %d; write the fields out so the witnesses read them", k.Line)
			continue
		}
		idx, ok := fieldIndex(t, name)
		if !ok {
			w.add(full, "is an unknown field (line %d); %s has: %s", k.Line, sectionName(path), strings.Join(fieldNames(t), ", "))
			continue
		}
		if line, dup := seen[name]; dup {
			w.add(full, "is given twice (lines %d and %d)", line, k.Line)
			continue
		}
		seen[name] = k.Line
		w.value(val, v.Field(idx), full)
	}
}

var lineRE = regexp.MustCompile(`^line (\d+): `)

// leaf decodes a value that is not a section: a string, number, list or a
// type with its own YAML decoding (Duration).
func (w *walker) leaf(n *yaml.Node, v reflect.Value, path string) {
	if n.Kind != yaml.ScalarNode && v.Kind() != reflect.Slice {
		w.add(path, "must be %s, not %s (line %d)", describeType(v.Type()), describeNode(n), n.Line)
		return
	}
	tmp := reflect.New(v.Type())
	err := n.Decode(tmp.Interface())
	if err == nil {
		v.Set(tmp.Elem())
		return
	}
	var te *yaml.TypeError
	if errors.As(err, &te) {
		w.add(path, "must be %s, not %s (line %d)", describeType(v.Type()), describeNode(n), n.Line)
		return
	}
	msg := err.Error()
	if m := lineRE.FindStringSubmatch(msg); m != nil {
		msg = msg[len(m[0]):]
	}
	w.add(path, "is not valid: %s (line %d)", msg, n.Line)
}

func fieldIndex(t reflect.Type, name string) (int, bool) {
	for i := range t.NumField() {
		if tag := yamlName(t.Field(i)); tag != "" && tag == name {
			return i, true
		}
	}
	return 0, false
}

func fieldNames(t reflect.Type) []string {
	var out []string
	for i := range t.NumField() {
		if tag := yamlName(t.Field(i)); tag != "" {
			out = append(out, tag)
		}
	}
	return out
}

func yamlName(f reflect.StructField) string {
	if !f.IsExported() {
		return ""
	}
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if name == "-" {
		return ""
	}
	return name
}

func joinPath(path, name string) string {
	if path == "" {
		return name
	}
	return path + "." + name
}

func orTop(path string) string {
	if path == "" {
		return "the script"
	}
	return path
}

func sectionName(path string) string {
	if path == "" {
		return "a ceremony script"
	}
	return path
}

func describeNode(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a section of fields"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return strconv.Quote(n.Value)
	}
	return "that"
}

func describeType(t reflect.Type) string {
	if t == reflect.TypeFor[Duration]() {
		return "a duration such as 90d, 1y or 36h"
	}
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "a whole number"
	case reflect.Bool:
		return "true or false"
	case reflect.String:
		return "a single value"
	case reflect.Slice:
		return "a list, e.g. [a, b]"
	case reflect.Pointer:
		return describeType(t.Elem())
	}
	return "a " + t.String()
}
