package pkcs11

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/sigil-appliance/sigil/keystore"
)

// token is one logged-in token with a pool of sessions. PKCS#11 sessions are
// single-threaded, so each concurrent signer needs its own; logging in once
// logs in every session of the application on that token.
type token struct {
	mod       *module
	slot      uint
	label     string
	pinSource string
	pinFunc   func(ctx context.Context, token string) ([]byte, error)
	log       *slog.Logger

	mu       sync.Mutex // guards gen and open
	createMu sync.Mutex // serializes key creation: check-then-generate
	gen      uint64     // bumped on every re-login; older sessions are discarded
	open     int        // sessions open, idle or in use

	idle     chan session
	max      int
	readOnly bool
}

type session struct {
	h   pkcs11.SessionHandle
	gen uint64
}

func openToken(ctx context.Context, u *URI, opts Options, log *slog.Logger) (*token, error) {
	mod, err := acquireModule(u.ModulePath)
	if err != nil {
		return nil, err
	}
	slot, label, err := findSlot(mod, u)
	if err != nil {
		mod.release()
		return nil, err
	}
	t := &token{mod: mod, slot: slot, label: label, pinSource: u.PINSource, pinFunc: opts.PIN, log: log,
		idle: make(chan session, opts.SessionsPerToken), max: opts.SessionsPerToken, readOnly: opts.ReadOnly}
	s, err := t.newSession()
	if err != nil {
		mod.release()
		return nil, err
	}
	if err := t.login(ctx, s.h); err != nil {
		_ = mod.ctx.CloseSession(s.h) // the module is released next, which ends it anyway
		mod.release()
		return nil, err
	}
	t.open = 1
	t.idle <- s
	return t, nil
}

func findSlot(mod *module, u *URI) (uint, string, error) {
	slots, err := mod.ctx.GetSlotList(true)
	if err != nil {
		return 0, "", fmt.Errorf("%w: list slots of %s: %v", keystore.ErrUnavailable, mod.path, err)
	}
	var found []uint
	var label string
	var seen []string
	for _, s := range slots {
		ti, err := mod.ctx.GetTokenInfo(s)
		if err != nil || ti.Flags&pkcs11.CKF_TOKEN_INITIALIZED == 0 {
			continue
		}
		l := strings.TrimRight(ti.Label, " \x00")
		seen = append(seen, strconv.Quote(l))
		if u.Token != "" && l != u.Token ||
			u.Serial != "" && strings.TrimRight(ti.SerialNumber, " \x00") != u.Serial ||
			u.Manufacturer != "" && strings.TrimRight(ti.ManufacturerID, " \x00") != u.Manufacturer ||
			u.Model != "" && strings.TrimRight(ti.Model, " \x00") != u.Model {
			continue
		}
		found = append(found, s)
		label = l
	}
	switch len(found) {
	case 0:
		tokens := "no initialized tokens"
		if len(seen) > 0 {
			tokens = "tokens " + strings.Join(seen, ", ")
		}
		return 0, "", fmt.Errorf("%w: no token matching %s in module %s (it lists %s%s)", keystore.ErrTokenNotFound, tokenDesc(u), mod.path, tokens, moduleConfig(mod.path))
	case 1:
		return found[0], label, nil
	}
	return 0, "", fmt.Errorf("%w: %d tokens match %s in module %s; add serial= to the URI", keystore.ErrInvalidURI, len(found), tokenDesc(u), mod.path)
}

// moduleConfig says where a module looked for its tokens, for "token not
// found" errors: SoftHSM reads its token directory from the file named by
// SOFTHSM2_CONF in the environment of the process when it initializes (a
// default file when unset), so a node started without the variable its
// tokens were made with sees another directory and none of them.
func moduleConfig(modulePath string) string {
	if !strings.Contains(strings.ToLower(filepath.Base(modulePath)), "softhsm") {
		return ""
	}
	conf, set := os.LookupEnv("SOFTHSM2_CONF")
	var s string
	if !set || conf == "" {
		conf = "/etc/softhsm/softhsm2.conf"
		s = "; SOFTHSM2_CONF is not set in this process's environment, so SoftHSM read " + conf
	} else {
		s = "; SoftHSM read its configuration from SOFTHSM2_CONF=" + conf
	}
	b, err := os.ReadFile(conf)
	if err != nil {
		return s + fmt.Sprintf(" (%v)", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if ok && strings.TrimSpace(k) == "directories.tokendir" {
			return s + ", token directory " + strings.TrimSpace(v)
		}
	}
	return s
}

func tokenDesc(u *URI) string {
	var parts []string
	if u.Token != "" {
		parts = append(parts, "token="+u.Token)
	}
	if u.Serial != "" {
		parts = append(parts, "serial="+u.Serial)
	}
	return strings.Join(parts, ";")
}

func (t *token) newSession() (session, error) {
	flags := uint(pkcs11.CKF_SERIAL_SESSION | pkcs11.CKF_RW_SESSION)
	if t.readOnly {
		flags = pkcs11.CKF_SERIAL_SESSION
	}
	h, err := t.mod.ctx.OpenSession(t.slot, flags)
	if err != nil {
		if isRV(err, pkcs11.CKR_TOKEN_NOT_PRESENT) || isRV(err, pkcs11.CKR_SLOT_ID_INVALID) {
			return session{}, fmt.Errorf("%w: token %q is gone: %v", keystore.ErrTokenNotFound, t.label, err)
		}
		return session{}, fmt.Errorf("%w: open session on token %q: %v", keystore.ErrUnavailable, t.label, err)
	}
	t.mu.Lock()
	gen := t.gen
	t.mu.Unlock()
	return session{h: h, gen: gen}, nil
}

// login reads the PIN only now and drops it after the call.
func (t *token) login(ctx context.Context, h pkcs11.SessionHandle) error {
	var pin []byte
	var err error
	if t.pinSource != "" {
		pin, err = readPIN(t.pinSource)
	} else {
		pin, err = t.pinFunc(ctx, t.label)
		if err != nil {
			err = fmt.Errorf("%w: %v", keystore.ErrPINSource, err)
		}
	}
	if err != nil {
		return err
	}
	err = t.mod.ctx.Login(h, pkcs11.CKU_USER, string(pin))
	clear(pin)
	switch {
	case err == nil, isRV(err, pkcs11.CKR_USER_ALREADY_LOGGED_IN):
		return nil
	case isRV(err, pkcs11.CKR_PIN_INCORRECT):
		t.log.Warn("pkcs11 login refused: wrong PIN", "token", t.label)
		return fmt.Errorf("%w for token %q", keystore.ErrWrongPIN, t.label)
	case isRV(err, pkcs11.CKR_PIN_LOCKED):
		t.log.Error("pkcs11 login refused: PIN locked", "token", t.label)
		return fmt.Errorf("%w for token %q", keystore.ErrPINLocked, t.label)
	case isRV(err, pkcs11.CKR_USER_PIN_NOT_INITIALIZED):
		return fmt.Errorf("%w: token %q has no user PIN", keystore.ErrWrongPIN, t.label)
	}
	return fmt.Errorf("%w: login to token %q: %v", keystore.ErrUnavailable, t.label, err)
}

// get returns a session of the current login generation, opening one if the
// pool is not yet full, else waiting for one.
func (t *token) get(ctx context.Context) (session, error) {
	for {
		select {
		case s := <-t.idle:
			if t.current(s) {
				return s, nil
			}
			t.discard(s)
			continue
		default:
		}
		t.mu.Lock()
		if t.open < t.max {
			t.open++
			t.mu.Unlock()
			s, err := t.newSession()
			if err != nil {
				t.mu.Lock()
				t.open--
				t.mu.Unlock()
				return session{}, err
			}
			return s, nil
		}
		t.mu.Unlock()
		select {
		case s := <-t.idle:
			if t.current(s) {
				return s, nil
			}
			t.discard(s)
		case <-ctx.Done():
			return session{}, ctx.Err()
		}
	}
}

func (t *token) put(s session) {
	if !t.current(s) {
		t.discard(s)
		return
	}
	t.idle <- s
}

func (t *token) current(s session) bool {
	t.mu.Lock()
	defer t.mu.Unlock()
	return s.gen == t.gen
}

func (t *token) discard(s session) {
	_ = t.mod.ctx.CloseSession(s.h) // may already be invalid: that is why it goes
	t.mu.Lock()
	t.open--
	t.mu.Unlock()
}

// recover is called after an operation failed because the session or the
// login was lost (token reset, sessions closed). It retires every session of
// that generation and logs in again on a fresh one. Only the first caller of
// a generation does the work.
func (t *token) recover(ctx context.Context, failed session) error {
	t.mu.Lock()
	if failed.gen != t.gen {
		t.mu.Unlock()
		t.discard(failed)
		return nil
	}
	t.gen++
	t.mu.Unlock()
	t.discard(failed)
	s, err := t.newSession()
	if err != nil {
		return err
	}
	t.mu.Lock()
	t.open++
	t.mu.Unlock()
	if err := t.login(ctx, s.h); err != nil {
		t.discard(s)
		return err
	}
	t.log.Warn("pkcs11 session lost; logged in again", "token", t.label)
	t.put(s)
	return nil
}

// do runs op on a pooled session, recovering once from a lost session.
func (t *token) do(ctx context.Context, op func(pkcs11.SessionHandle) error) error {
	for attempt := 0; ; attempt++ {
		s, err := t.get(ctx)
		if err != nil {
			return err
		}
		err = op(s.h)
		if err != nil && sessionLost(err) && attempt == 0 {
			if rerr := t.recover(ctx, s); rerr != nil {
				return fmt.Errorf("%v; re-login failed: %w", err, rerr)
			}
			continue
		}
		t.put(s)
		return err
	}
}

func (t *token) close() {
	t.mu.Lock()
	t.gen++ // sessions still in use are closed when they come back
	t.mu.Unlock()
	for {
		select {
		case s := <-t.idle:
			// Finalize on release ends every session whatever this says.
			_ = t.mod.ctx.CloseSession(s.h)
		default:
			t.mod.release()
			return
		}
	}
}
