package meshvpn

// #include <meshvpn.h>
//
// extern void meshvpnGoLog(void *userdata, meshvpn_log_record *record);
//
// static void mv_log_trampoline(void *userdata, const meshvpn_log_record *record) {
//     meshvpnGoLog(userdata, (meshvpn_log_record *)record);
// }
//
// static meshvpn_result mv_set_log(uint32_t level) {
//     return meshvpn_set_log_callback(level ? mv_log_trampoline : NULL, NULL, level);
// }
import "C"

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
)

// LevelTrace is the slog level of the library's trace records (more
// verbose than slog.LevelDebug).
const LevelTrace = slog.LevelDebug - 4

var (
	logger  atomic.Pointer[slog.Logger]
	logLock sync.Mutex
)

// SetLogger sends the library's log records (from every engine, and from
// boringtun inside it) to l, at the most verbose level l is enabled for
// (LevelTrace, slog.LevelDebug, Info, Warn or Error). Each record carries
// the attribute "target", the Rust module it comes from. Records never
// contain private or preshared keys. SetLogger(nil) stops logging.
//
// Records come from the library's own threads; l must be safe for
// concurrent use (every slog handler in the standard library is).
func SetLogger(l *slog.Logger) error {
	logLock.Lock()
	defer logLock.Unlock()
	level := C.uint32_t(C.MESHVPN_LOG_OFF)
	if l != nil {
		ctx := context.Background()
		for _, c := range []struct {
			slog slog.Level
			c    C.uint32_t
		}{
			{LevelTrace, C.MESHVPN_LOG_TRACE},
			{slog.LevelDebug, C.MESHVPN_LOG_DEBUG},
			{slog.LevelInfo, C.MESHVPN_LOG_INFO},
			{slog.LevelWarn, C.MESHVPN_LOG_WARN},
			{slog.LevelError, C.MESHVPN_LOG_ERROR},
		} {
			if l.Enabled(ctx, c.slog) {
				level = c.c
				break
			}
		}
	}
	logger.Store(l)
	return call("SetLogger", func() C.meshvpn_result { return C.mv_set_log(level) })
}

func slogLevel(l C.meshvpn_log_level) slog.Level {
	switch l {
	case C.MESHVPN_LOG_ERROR:
		return slog.LevelError
	case C.MESHVPN_LOG_WARN:
		return slog.LevelWarn
	case C.MESHVPN_LOG_INFO:
		return slog.LevelInfo
	case C.MESHVPN_LOG_DEBUG:
		return slog.LevelDebug
	default:
		return LevelTrace
	}
}
