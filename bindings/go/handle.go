package meshvpn

// #include <stdint.h>
// #include <stdlib.h>
// #include <string.h>
// #include <meshvpn.h>
import "C"

import (
	"net"
	"runtime"
	"sync/atomic"
	"time"
	"unsafe"
)

// handle is how every Go type holds its library object: the handle the
// library issued, kept as an integer (it is not a pointer to memory, and Go
// must never see it as one), 0 once closed. Each C call goes through do,
// each Close through release, so a call racing with Close fails cleanly
// (a stale handle is refused by the library's generational table).
//
// The padding keeps a type that holds nothing but a handle (Engine) at 16
// bytes: Go's allocator batches smaller objects without pointers into one
// 16-byte block, and a finalizer on such an object runs only once every
// object of its block is unreachable, so the Close backstop could wait
// forever (runtime.SetFinalizer's documentation).
type handle struct {
	v atomic.Uintptr
	_ [8]byte
}

func (h *handle) set(v uintptr) { h.v.Store(v) }

// load returns the live handle, 0 after Close.
func (h *handle) load() uintptr { return h.v.Load() }

// do runs f on the live handle; after Close it fails with ErrInvalidHandle
// (what the library answers for a freed handle), which matches
// net.ErrClosed.
func (h *handle) do(op string, f func(C.uintptr_t) C.meshvpn_result) error {
	v := h.v.Load()
	if v == 0 {
		return errClosed(op)
	}
	err := call(op, func() C.meshvpn_result { return f(C.uintptr_t(v)) })
	// h points into its owner: this keeps the owner, and so its finalizer,
	// from running Close during the call.
	runtime.KeepAlive(h)
	return err
}

// release frees the handle once and reports whether this call did; if the
// free fails (Close from inside a callback), the handle stays usable.
func (h *handle) release(op string, free func(C.uintptr_t) C.meshvpn_result) (bool, error) {
	v := h.v.Swap(0)
	if v == 0 {
		return false, nil
	}
	if err := call(op, func() C.meshvpn_result { return free(C.uintptr_t(v)) }); err != nil {
		h.v.Store(v)
		return false, err
	}
	return true, nil
}

// closeSocket is Close for the types that behave as net.Conn and
// net.Listener do: the first call frees the handle, a later one fails with
// net.ErrClosed, and errors come back through wrap (the type's own
// *net.OpError). owner's finalizer is cleared once the handle is freed.
func (h *handle) closeSocket(op string, owner any, wrap func(error) error, free func(C.uintptr_t) C.meshvpn_result) error {
	freed, err := h.release(op, free)
	if err != nil {
		return wrap(err)
	}
	if !freed {
		return wrap(net.ErrClosed)
	}
	runtime.SetFinalizer(owner, nil)
	return nil
}

// closeIdempotent is Close for the types whose later Close calls return
// nil (engines, stacks, servers): it frees the handle and clears owner's
// finalizer once freed.
func (h *handle) closeIdempotent(op string, owner any, free func(C.uintptr_t) C.meshvpn_result) error {
	freed, err := h.release(op, free)
	if freed {
		runtime.SetFinalizer(owner, nil)
	}
	return err
}

// newHandle runs a C constructor that writes a handle.
func newHandle(op string, create func(out unsafe.Pointer) C.meshvpn_result) (uintptr, error) {
	// The handle lands in an integer, never in a Go pointer variable.
	var h C.uintptr_t
	err := call(op, func() C.meshvpn_result { return create(unsafe.Pointer(&h)) })
	return uintptr(h), err
}

// textOut reads text that fill writes with the library's buffer protocol
// (asked for its size first, then again while it grows). The C copy is
// zeroed before it is freed: the text may be a secret.
func (h *handle) textOut(op string, fill func(h C.uintptr_t, buf *C.char, n C.size_t, got *C.size_t) C.meshvpn_result) (string, error) {
	for {
		var n C.size_t
		if err := h.do(op, func(v C.uintptr_t) C.meshvpn_result {
			return fill(v, nil, 0, &n)
		}); err != nil {
			return "", err
		}
		buf := (*C.char)(C.calloc(1, n))
		var got C.size_t
		err := h.do(op, func(v C.uintptr_t) C.meshvpn_result {
			return fill(v, buf, n, &got)
		})
		text := ""
		if err == nil {
			text = C.GoStringN(buf, C.int(got))
		}
		C.memset(unsafe.Pointer(buf), 0, n)
		C.free(unsafe.Pointer(buf))
		if code, ok := codeOf(err); ok && code == ErrBufferTooSmall {
			continue
		}
		return text, err
	}
}

// cTimeout is the library's timeout (meshvpn_timeout_ms) for a wait of d,
// the one conversion every blocking call uses: whole milliseconds rounded
// up (a wait of 0.3 ms must not turn into a poll), at most one below
// MESHVPN_WAIT_FOREVER (about 49 days); a negative d waits forever.
func cTimeout(d time.Duration) C.meshvpn_timeout_ms {
	if d < 0 {
		return C.MESHVPN_WAIT_FOREVER
	}
	ms := int64(d / time.Millisecond)
	if d%time.Millisecond != 0 {
		ms++
	}
	return C.meshvpn_timeout_ms(min(ms, int64(C.MESHVPN_WAIT_FOREVER-1)))
}
