package meshvpn

// #include <stdlib.h>
// #include <string.h>
// #include <meshvpn.h>
import "C"

import "unsafe"

// arena holds C memory for the arguments of one call (strings, arrays,
// keys) so that no Go pointer is stored in memory C reads; free releases
// it all, zeroing it first since it may hold keys.
type arena struct {
	blocks []block
}

type block struct {
	p unsafe.Pointer
	n C.size_t
}

func (a *arena) alloc(n int) unsafe.Pointer {
	if n == 0 {
		n = 1
	}
	p := C.calloc(1, C.size_t(n))
	if p == nil {
		panic("meshvpn: out of C memory")
	}
	a.blocks = append(a.blocks, block{p, C.size_t(n)})
	return p
}

func (a *arena) str(s string) *C.char {
	p := a.alloc(len(s) + 1)
	copy(unsafe.Slice((*byte)(p), len(s)), s)
	return (*C.char)(p)
}

// bytes returns a C copy of b and its length, or nil and 0 when b is
// empty. Like every arena block it is zeroed on free (it may hold a key).
func (a *arena) bytes(b []byte) (*C.uint8_t, C.size_t) {
	if len(b) == 0 {
		return nil, 0
	}
	p := a.alloc(len(b))
	copy(unsafe.Slice((*byte)(p), len(b)), b)
	return (*C.uint8_t)(p), C.size_t(len(b))
}

// strs returns a C array of C strings, or nil for an empty list.
func (a *arena) strs(ss []string) (**C.char, C.size_t) {
	if len(ss) == 0 {
		return nil, 0
	}
	arr := unsafe.Slice((**C.char)(a.alloc(len(ss)*int(unsafe.Sizeof((*C.char)(nil))))), len(ss))
	for i, s := range ss {
		arr[i] = a.str(s)
	}
	return &arr[0], C.size_t(len(ss))
}

func (a *arena) key(k Key) *C.meshvpn_key {
	p := (*C.meshvpn_key)(a.alloc(int(unsafe.Sizeof(C.meshvpn_key{}))))
	*p = k.c()
	return p
}

func (a *arena) free() {
	for _, b := range a.blocks {
		C.memset(b.p, 0, b.n)
		C.free(b.p)
	}
	a.blocks = nil
}
