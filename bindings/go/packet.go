package meshvpn

// #include <stdint.h>
// #include <meshvpn.h>
import "C"

import (
	"runtime"
	"time"
	"unsafe"
)

// MaxBatch is the most packets one SendPackets or ReadPackets call takes.
const MaxBatch = C.MESHVPN_MAX_BATCH

// SendPacket sends one inner IP packet into the mesh: it goes to the peer
// whose AllowedIPs cover its destination (ErrNoRoute if none), encrypted
// on the calling goroutine's thread. Before the peer's first handshake
// completes the engine queues a bounded number of bytes; a packet past that
// returns ErrPacketDropped and counts as DropSinkFull in the peer's stats.
func (e *Engine) SendPacket(p []byte) error {
	var data *C.uint8_t
	if len(p) > 0 {
		data = (*C.uint8_t)(unsafe.Pointer(&p[0]))
	}
	err := e.do("Engine.SendPacket", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_send_packet(h, data, C.size_t(len(p)))
	})
	runtime.KeepAlive(p)
	return err
}

// SendPackets sends packets in order, MaxBatch per C call, like
// sendmmsg: it stops at the first packet that fails. It returns how many
// were sent and, when that is fewer than len(pkts), why packet n failed
// (that packet was not sent).
func (e *Engine) SendPackets(pkts [][]byte) (int, error) {
	sent := 0
	for sent < len(pkts) {
		chunk := pkts[sent:min(len(pkts), sent+MaxBatch)]
		n, err := e.sendBatch(chunk)
		sent += n
		if err != nil {
			return sent, err
		}
		if n < len(chunk) {
			return sent, err
		}
	}
	return sent, nil
}

func (e *Engine) sendBatch(pkts [][]byte) (int, error) {
	// The C array lives in Go memory and points to the packets' bytes,
	// which are pinned for the call (cgo's rule for Go pointers in memory
	// passed to C).
	var pinner runtime.Pinner
	defer pinner.Unpin()
	cp := make([]C.meshvpn_packet, len(pkts))
	for i, p := range pkts {
		if len(p) > 0 {
			pinner.Pin(&p[0])
			cp[i].data = (*C.uint8_t)(unsafe.Pointer(&p[0]))
		}
		cp[i].len = C.size_t(len(p))
	}
	var sent C.size_t
	var stopped error
	err := e.do("Engine.SendPackets", func(h *C.meshvpn_engine) C.meshvpn_result {
		r := C.meshvpn_engine_send_packets(h, &cp[0], C.size_t(len(cp)), &sent)
		if r == C.MESHVPN_OK && int(sent) < len(cp) {
			// Still on the locked thread: why packet `sent` failed.
			stopped = &Error{Op: "Engine.SendPackets", Code: Result(C.meshvpn_last_error()),
				Message: lastErrorMessage()}
		}
		return r
	})
	if err == nil {
		err = stopped
	}
	return int(sent), err
}

// ReadPackets receives decrypted packets addressed to the host: it waits
// up to timeout for the first (0: not at all; negative: no deadline), then
// takes up to len(bufs) that are already queued. Packet i is copied into
// bufs[i] and its length stored in sizes[i]; it returns how many. Every
// buffer must hold MTU() bytes (ErrBufferTooSmall otherwise, before any
// packet is taken). A timeout is an error matching os.ErrDeadlineExceeded;
// Close or Stop wakes a waiting call with an error matching
// net.ErrClosed.
func (e *Engine) ReadPackets(bufs [][]byte, sizes []int, timeout time.Duration) (int, error) {
	if len(bufs) == 0 {
		return 0, nil
	}
	n := min(len(bufs), len(sizes), MaxBatch)
	var pinner runtime.Pinner
	defer pinner.Unpin()
	cp := make([]C.meshvpn_packet, n)
	for i := range cp {
		b := bufs[i]
		if len(b) > 0 {
			pinner.Pin(&b[0])
			cp[i].data = (*C.uint8_t)(unsafe.Pointer(&b[0]))
		}
		cp[i].capacity = C.size_t(len(b))
	}
	ms := cTimeout(timeout)
	var got C.size_t
	err := e.do("Engine.ReadPackets", func(h *C.meshvpn_engine) C.meshvpn_result {
		return C.meshvpn_engine_recv_packets(h, &cp[0], C.size_t(n), ms, &got)
	})
	if err != nil {
		return 0, err
	}
	for i := 0; i < int(got); i++ {
		sizes[i] = int(cp[i].len)
	}
	return int(got), nil
}
