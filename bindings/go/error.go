package meshvpn

// #include <stdlib.h>
// #include <meshvpn.h>
import "C"

import (
	"net"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"unsafe"
)

// Result is a meshvpn_result code from the C library. The numbers are
// stable and never reused. A Result is an error, so callers can test an
// error for a code with errors.Is(err, meshvpn.ErrNoRoute).
type Result uint32

// The codes of include/meshvpn.h.
const (
	ErrPanic           Result = C.MESHVPN_PANIC
	ErrNullParameter   Result = C.MESHVPN_NULL_PARAMETER
	ErrInvalidHandle   Result = C.MESHVPN_INVALID_HANDLE
	ErrInvalidArgument Result = C.MESHVPN_INVALID_ARGUMENT
	ErrBufferTooSmall  Result = C.MESHVPN_BUFFER_TOO_SMALL
	ErrTimeout         Result = C.MESHVPN_TIMEOUT
	ErrWouldDeadlock   Result = C.MESHVPN_WOULD_DEADLOCK
	ErrUnsupported     Result = C.MESHVPN_UNSUPPORTED
	ErrLogUnavailable  Result = C.MESHVPN_LOG_UNAVAILABLE
	ErrKeyInvalid      Result = C.MESHVPN_KEY_INVALID
	ErrKeyLowOrder     Result = C.MESHVPN_KEY_LOW_ORDER
	ErrKeyOwn          Result = C.MESHVPN_KEY_OWN
	ErrKeyMissing      Result = C.MESHVPN_KEY_MISSING
	ErrConfigInvalid   Result = C.MESHVPN_CONFIG_INVALID
	ErrPrefixInvalid   Result = C.MESHVPN_PREFIX_INVALID
	ErrEndpointInvalid Result = C.MESHVPN_ENDPOINT_INVALID
	ErrBindFailed      Result = C.MESHVPN_BIND_FAILED
	ErrThreadFailed    Result = C.MESHVPN_THREAD_FAILED
	ErrNoSuchPeer      Result = C.MESHVPN_NO_SUCH_PEER
	ErrEngineStopped   Result = C.MESHVPN_ENGINE_STOPPED
	ErrPacketMalformed Result = C.MESHVPN_PACKET_MALFORMED
	ErrNoRoute         Result = C.MESHVPN_NO_ROUTE
	ErrPacketDropped   Result = C.MESHVPN_PACKET_DROPPED
	ErrNetwork         Result = C.MESHVPN_NETWORK_ERROR

	// The UAPI (see Engine.UAPISet).
	ErrUAPIInvalid  Result = C.MESHVPN_UAPI_INVALID
	ErrUAPIRejected Result = C.MESHVPN_UAPI_REJECTED

	// The userspace stack (see Netstack).
	ErrClosed              Result = C.MESHVPN_CLOSED
	ErrConnectionRefused   Result = C.MESHVPN_CONNECTION_REFUSED
	ErrUnreachable         Result = C.MESHVPN_UNREACHABLE
	ErrConnectionReset     Result = C.MESHVPN_CONNECTION_RESET
	ErrSocketLimit         Result = C.MESHVPN_SOCKET_LIMIT
	ErrAddressInUse        Result = C.MESHVPN_ADDRESS_IN_USE
	ErrAddressNotAvailable Result = C.MESHVPN_ADDRESS_NOT_AVAILABLE
	ErrMessageTooLarge     Result = C.MESHVPN_MESSAGE_TOO_LARGE
	ErrNoAddress           Result = C.MESHVPN_NO_ADDRESS
	ErrInterrupted         Result = C.MESHVPN_INTERRUPTED
	ErrNotConnected        Result = C.MESHVPN_NOT_CONNECTED
)

// Error returns the library's fixed text for the code.
func (r Result) Error() string {
	var buf [256]C.char
	var n C.size_t
	if C.meshvpn_result_message(C.uint32_t(r), &buf[0], C.size_t(len(buf)), &n) != C.MESHVPN_OK {
		return "meshvpn: unknown result " + strconv.FormatUint(uint64(r), 10)
	}
	return C.GoStringN(&buf[0], C.int(n))
}

// Is makes the codes that mean "this object is closed" match
// net.ErrClosed, a timeout match os.ErrDeadlineExceeded, and a refusal or
// no route match syscall.ECONNREFUSED or syscall.EHOSTUNREACH, so callers
// can use the standard library's sentinels.
func (r Result) Is(target error) bool {
	switch target {
	case net.ErrClosed:
		return r == ErrInvalidHandle || r == ErrEngineStopped || r == ErrClosed || r == ErrTunnelClosed
	case os.ErrDeadlineExceeded:
		return r == ErrTimeout
	case syscall.ECONNREFUSED:
		return r == ErrConnectionRefused
	case syscall.EHOSTUNREACH:
		return r == ErrUnreachable
	}
	return false
}

// Error is what every failing call returns: the operation, the result
// code and the library's detailed message (which field, which line).
type Error struct {
	Op      string // the method, e.g. "Engine.AddPeer"
	Code    Result
	Message string // from meshvpn_last_error_message
}

func (e *Error) Error() string {
	if e.Message == "" {
		return "meshvpn: " + e.Op + ": " + e.Code.Error()
	}
	return "meshvpn: " + e.Op + ": " + e.Message
}

// Unwrap returns the code, so errors.Is(err, meshvpn.ErrNoRoute) and
// errors.Is(err, net.ErrClosed) work.
func (e *Error) Unwrap() error { return e.Code }

// Timeout reports whether the call timed out (net.Error style).
func (e *Error) Timeout() bool { return e.Code == ErrTimeout }

// call runs one C call on a locked OS thread, so that on failure the
// thread-local last-error message read next belongs to this call.
func call(op string, f func() C.meshvpn_result) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	r := f()
	if r == C.MESHVPN_OK {
		return nil
	}
	return &Error{Op: op, Code: Result(r), Message: lastErrorMessage()}
}

func lastErrorMessage() string {
	var needed C.size_t
	if C.meshvpn_last_error_message(nil, 0, &needed) != C.MESHVPN_OK || needed == 0 {
		return ""
	}
	buf := (*C.char)(C.malloc(needed))
	defer C.free(unsafe.Pointer(buf))
	var n C.size_t
	if C.meshvpn_last_error_message(buf, needed, &n) != C.MESHVPN_OK {
		return ""
	}
	return C.GoStringN(buf, C.int(n))
}

// errClosed is returned by methods called after Close.
func errClosed(op string) error {
	return &Error{Op: op, Code: ErrInvalidHandle, Message: "closed"}
}

// testPanic makes the library panic on purpose (meshvpn_test_panic) and
// returns what the panic boundary made of it. For tests only.
func testPanic() error {
	return call("testPanic", func() C.meshvpn_result { return C.meshvpn_test_panic() })
}
