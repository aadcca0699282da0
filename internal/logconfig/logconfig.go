// Package logconfig owns the `log` section that sigild's and sigil-agent's
// YAML configurations share (level and format) and the slog logger it
// describes, so both daemons accept the same values and log alike.
package logconfig

import (
	"fmt"
	"io"
	"log/slog"
	"strings"
)

// Config is slog's level and format.
type Config struct {
	Level  string `yaml:"level"`  // debug, info (default), warn, error
	Format string `yaml:"format"` // json (default) or text
}

// Problems lists what is wrong with c, each as "log.<field> <reason>",
// the form the daemons' config errors use.
func (c Config) Problems() []string {
	var out []string
	switch strings.ToLower(c.Level) {
	case "", "debug", "info", "warn", "error":
	default:
		out = append(out, fmt.Sprintf("log.level must be debug, info, warn or error (got %q)", c.Level))
	}
	switch c.Format {
	case "", "json", "text":
	default:
		out = append(out, fmt.Sprintf("log.format must be json or text (got %q)", c.Format))
	}
	return out
}

// New returns a logger writing to w as c says. It assumes c has no
// Problems (an unknown level logs at info, an unknown format as JSON).
func (c Config) New(w io.Writer) *slog.Logger {
	var level slog.Level
	if c.Level != "" {
		// An unknown level leaves level at its zero value, info.
		_ = level.UnmarshalText([]byte(strings.ToUpper(c.Level)))
	}
	opts := &slog.HandlerOptions{Level: level}
	if c.Format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}
