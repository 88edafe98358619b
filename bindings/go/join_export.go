package meshvpn

// #include <stddef.h>
// #include <stdint.h>
import "C"

import "unsafe"

// meshvpnGoNodeEvent is every node's event callback (see Node.Events): it
// runs on the node's event thread in the library, one call at a time and
// in order; sink is the cgo.Handle of the node's eventSink.
//
//export meshvpnGoNodeEvent
func meshvpnGoNodeEvent(sink C.uintptr_t, text *C.char, n C.size_t) {
	deliverEvent(uintptr(sink), C.GoBytes(unsafe.Pointer(text), C.int(n)))
}
