package pkcs11

import (
	"errors"
	"fmt"
	"sync"

	"github.com/miekg/pkcs11"

	"github.com/sigil-appliance/sigil/keystore"
)

// A PKCS#11 library may be initialized once per process, and C_Finalize
// tears down every session of every user in the process. Independent
// KeyStores in one process (three in-process test nodes, the ceremony's root
// and node tokens) must therefore share one initialized context per library
// path. This registry is the package's only shared state, and it exists
// because the library itself is process-global.
var modules = struct {
	sync.Mutex
	m map[string]*module
}{m: map[string]*module{}}

type module struct {
	path string
	ctx  *pkcs11.Ctx
	refs int
}

func acquireModule(path string) (*module, error) {
	modules.Lock()
	defer modules.Unlock()
	if m, ok := modules.m[path]; ok {
		m.refs++
		return m, nil
	}
	ctx := pkcs11.New(path)
	if ctx == nil {
		return nil, fmt.Errorf("%w: cannot load PKCS#11 module %s", keystore.ErrUnavailable, path)
	}
	if err := ctx.Initialize(); err != nil && !isRV(err, pkcs11.CKR_CRYPTOKI_ALREADY_INITIALIZED) {
		ctx.Destroy()
		return nil, fmt.Errorf("%w: initialize PKCS#11 module %s: %v", keystore.ErrUnavailable, path, err)
	}
	m := &module{path: path, ctx: ctx, refs: 1}
	modules.m[path] = m
	return m, nil
}

func (m *module) release() {
	modules.Lock()
	defer modules.Unlock()
	m.refs--
	if m.refs > 0 {
		return
	}
	delete(modules.m, m.path)
	// The library is unloaded next whatever Finalize answers, and the
	// last user has gone: there is no one left to act on its error.
	_ = m.ctx.Finalize()
	m.ctx.Destroy()
}

func isRV(err error, rv uint) bool {
	var e pkcs11.Error
	return errors.As(err, &e) && uint(e) == rv
}

// sessionLost reports errors after which a session or login is gone: the
// token was reset or removed, or all sessions were closed under us.
func sessionLost(err error) bool {
	for _, rv := range []uint{
		pkcs11.CKR_SESSION_HANDLE_INVALID,
		pkcs11.CKR_SESSION_CLOSED,
		pkcs11.CKR_USER_NOT_LOGGED_IN,
		pkcs11.CKR_TOKEN_NOT_PRESENT,
		pkcs11.CKR_DEVICE_REMOVED,
		pkcs11.CKR_OBJECT_HANDLE_INVALID,
		pkcs11.CKR_KEY_HANDLE_INVALID,
		pkcs11.CKR_DEVICE_ERROR,
	} {
		if isRV(err, rv) {
			return true
		}
	}
	return false
}
