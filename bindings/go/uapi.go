package meshvpn

// #include <stdlib.h>
// #include <string.h>
// #include <meshvpn.h>
import "C"

import (
	"strconv"
	"syscall"
	"unsafe"
)

// UAPIGet returns the engine's reply to a UAPI `get=1` request, as
// wireguard-go sends it over its socket (`private_key=...`,
// `listen_port=...`, `public_key=...` lines), without the closing
// `errno=0` line. The text holds the private key: treat it as a secret.
func (e *Engine) UAPIGet() (string, error) {
	for {
		var needed C.size_t
		if err := e.do("Engine.UAPIGet", func(h *C.meshvpn_engine) C.meshvpn_result {
			return C.meshvpn_engine_uapi_get(h, nil, 0, &needed)
		}); err != nil {
			return "", err
		}
		buf := (*C.char)(C.malloc(needed))
		var n C.size_t
		err := e.do("Engine.UAPIGet", func(h *C.meshvpn_engine) C.meshvpn_result {
			return C.meshvpn_engine_uapi_get(h, buf, needed, &n)
		})
		var text string
		if err == nil {
			text = C.GoStringN(buf, C.int(n))
		}
		C.memset(unsafe.Pointer(buf), 0, needed)
		C.free(unsafe.Pointer(buf))
		if code, _ := codeOf(err); code == ErrBufferTooSmall {
			continue // the reply grew between the two calls
		}
		return text, err
	}
}

// UAPIError is what UAPISet returns when the engine refuses a request:
// the library's error (ErrUAPIInvalid or ErrUAPIRejected, with the line
// and key) and the errno a UAPI socket would have answered.
type UAPIError struct {
	Err   *Error
	Errno syscall.Errno
}

func (e *UAPIError) Error() string {
	return e.Err.Error() + " (errno=" + strconv.Itoa(int(e.Errno)) + ")"
}

// Unwrap returns the library's error, so errors.Is(err, ErrUAPIInvalid) works.
func (e *UAPIError) Unwrap() error { return e.Err }

// UAPISet applies a UAPI `set=1` request (key=value lines, with or
// without the `set=1` line and the closing blank line) with
// wireguard-go's meaning. Malformed text changes nothing.
func (e *Engine) UAPISet(text string) error {
	var a arena
	defer a.free()
	t := a.str(text)
	var errno C.int32_t = -1
	err := e.do("Engine.UAPISet", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_uapi_set(h, t, &errno)
	})
	if err != nil && errno > 0 {
		return &UAPIError{Err: err.(*Error), Errno: syscall.Errno(errno)}
	}
	return err
}
