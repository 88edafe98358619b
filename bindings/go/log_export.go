package meshvpn

// #include <meshvpn.h>
import "C"

import (
	"context"
	"unsafe"
)

// meshvpnGoLog receives every log record the library passes on (see
// SetLogger); it runs on the library's threads.
//
//export meshvpnGoLog
func meshvpnGoLog(_ unsafe.Pointer, record *C.meshvpn_log_record) {
	l := logger.Load()
	if l == nil || record == nil {
		return
	}
	l.Log(context.Background(), slogLevel(record.level), C.GoString(record.message),
		"target", C.GoString(record.target))
}
