package tpm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
)

// A TPM command or response starts with tag (2 bytes), size (4) and the
// command or response code (4).
const headerSize = 10

// maxResponse bounds what we read from a socket: TPM responses are a few
// KiB at most, so a larger size field means the peer is not a TPM.
const maxResponse = 64 << 10

// udsTransport sends each command to an swtpm command socket on its own
// connection. swtpm serves one connection at a time, so holding one open
// would lock out tpm2-tools and other clients between our commands. It
// reads the whole response by the header's size, so a response split over
// several socket reads arrives intact, and unlike linuxudstpm (which goes
// through tpmutil) it does not retry by itself: retrying owns that, once.
type udsTransport struct {
	path        string
	dialTimeout time.Duration
	cmdTimeout  time.Duration
}

func (u *udsTransport) Send(cmd []byte) ([]byte, error) {
	conn, err := net.DialTimeout("unix", u.path, u.dialTimeout)
	if err != nil {
		return nil, err
	}
	// One connection per command: the answer has been read (or the command
	// failed) by the time it closes.
	defer func() { _ = conn.Close() }()
	// A wedged swtpm must not hang signers forever.
	if err := conn.SetDeadline(time.Now().Add(u.cmdTimeout)); err != nil {
		return nil, err
	}
	if _, err := conn.Write(cmd); err != nil {
		return nil, fmt.Errorf("write command: %w", err)
	}
	rsp := make([]byte, headerSize)
	if _, err := io.ReadFull(conn, rsp); err != nil {
		return nil, fmt.Errorf("read response header: %w", err)
	}
	size := binary.BigEndian.Uint32(rsp[2:6])
	if size < headerSize || size > maxResponse {
		return nil, fmt.Errorf("response size %d is not a TPM response", size)
	}
	rsp = append(rsp, make([]byte, size-headerSize)...)
	if _, err := io.ReadFull(conn, rsp[headerSize:]); err != nil {
		return nil, fmt.Errorf("read response body: %w", err)
	}
	return rsp, nil
}

func (u *udsTransport) Close() error { return nil }

// Retry policy for the TPM's "not now" answers: about 2.5 s in all, which
// covers a real TPM's self-test after power-on.
const (
	maxRetries   = 30
	firstBackoff = time.Millisecond
	maxBackoff   = 100 * time.Millisecond
)

// responseCode is the rc of a raw TPM response.
func responseCode(rsp []byte) (tpm2.TPMRC, bool) {
	if len(rsp) < headerSize {
		return 0, false
	}
	return tpm2.TPMRC(binary.BigEndian.Uint32(rsp[6:10])), true
}

// retryable reports the answers that mean the TPM did not execute the
// command and the same bytes may be sent again: go-tpm's tpm2 package
// returns them to the caller as errors, and a TPM may give them at any time
// (during self-test, after a restart, when a command is pre-empted).
func retryable(rc tpm2.TPMRC) bool {
	switch rc {
	case tpm2.TPMRCRetry, tpm2.TPMRCYielded, tpm2.TPMRCTesting:
		return true
	}
	return false
}

var errTransportClosed = errors.New("TPM connection closed")

// retrying makes the transport safe to share: one command at a time (a
// TPM without a resource manager cannot interleave them), and the "not
// now" answers are resent instead of surfacing as errors.
type retrying struct {
	mu       sync.Mutex
	inner    transport.TPMCloser
	closed   bool
	retries  atomic.Int64 // answers retried, for tests and diagnostics
	commands atomic.Int64 // commands sent (each retry counts)
}

func (r *retrying) Send(cmd []byte) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil, errTransportClosed
	}
	backoff := firstBackoff
	for attempt := 0; ; attempt++ {
		r.commands.Add(1)
		rsp, err := r.inner.Send(cmd)
		if err != nil {
			return nil, err
		}
		rc, ok := responseCode(rsp)
		if !ok || !retryable(rc) || attempt == maxRetries {
			return rsp, nil
		}
		r.retries.Add(1)
		time.Sleep(backoff)
		backoff = min(2*backoff, maxBackoff)
	}
}

func (r *retrying) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	return r.inner.Close()
}
