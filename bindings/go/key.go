package meshvpn

// #include <meshvpn.h>
import "C"

import (
	"unsafe"
)

// Key is a 32-byte WireGuard key: private, public or preshared, by use.
// String and MarshalText give base64, as wg prints keys.
type Key [32]byte

// GenerateKey returns a new random private key (as `wg genkey`).
func GenerateKey() (Key, error) {
	var k C.meshvpn_key
	err := call("GenerateKey", func() C.meshvpn_result { return C.meshvpn_key_generate(&k) })
	return fromC(&k), err
}

// GeneratePresharedKey returns a new random preshared key (`wg genpsk`).
func GeneratePresharedKey() (Key, error) {
	var k C.meshvpn_key
	err := call("GeneratePresharedKey", func() C.meshvpn_result { return C.meshvpn_key_generate_preshared(&k) })
	return fromC(&k), err
}

// PublicKey derives the public key of private key k (`wg pubkey`).
func (k Key) PublicKey() Key {
	in, out := k.c(), C.meshvpn_key{}
	// Cannot fail: both pointers are valid.
	_ = call("Key.PublicKey", func() C.meshvpn_result { return C.meshvpn_key_public(&in, &out) })
	return fromC(&out)
}

// ParseKey parses a key in base64 (44 characters).
func ParseKey(s string) (Key, error) {
	return parseKey("ParseKey", s, func(t *C.char, k *C.meshvpn_key) C.meshvpn_result {
		return C.meshvpn_key_from_base64(t, k)
	})
}

// ParseKeyHex parses a key in hex (64 digits, as the UAPI writes keys).
func ParseKeyHex(s string) (Key, error) {
	return parseKey("ParseKeyHex", s, func(t *C.char, k *C.meshvpn_key) C.meshvpn_result {
		return C.meshvpn_key_from_hex(t, k)
	})
}

func parseKey(op, s string, f func(*C.char, *C.meshvpn_key) C.meshvpn_result) (Key, error) {
	var a arena
	defer a.free()
	text := a.str(s)
	var k C.meshvpn_key
	if err := call(op, func() C.meshvpn_result { return f(text, &k) }); err != nil {
		return Key{}, err
	}
	return fromC(&k), nil
}

// String returns the key in base64.
func (k Key) String() string {
	in := k.c()
	var buf [C.MESHVPN_KEY_BASE64_LEN]C.char
	var n C.size_t
	_ = call("Key.String", func() C.meshvpn_result {
		return C.meshvpn_key_to_base64(&in, &buf[0], C.size_t(len(buf)), &n)
	})
	return C.GoStringN(&buf[0], C.int(n))
}

// Hex returns the key in lowercase hex.
func (k Key) Hex() string {
	in := k.c()
	var buf [C.MESHVPN_KEY_HEX_LEN]C.char
	var n C.size_t
	_ = call("Key.Hex", func() C.meshvpn_result {
		return C.meshvpn_key_to_hex(&in, &buf[0], C.size_t(len(buf)), &n)
	})
	return C.GoStringN(&buf[0], C.int(n))
}

// MarshalText implements encoding.TextMarshaler (base64).
func (k Key) MarshalText() ([]byte, error) { return []byte(k.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler (base64).
func (k *Key) UnmarshalText(b []byte) error {
	p, err := ParseKey(string(b))
	if err == nil {
		*k = p
	}
	return err
}

func (k Key) c() C.meshvpn_key {
	var out C.meshvpn_key
	for i, b := range k {
		out.bytes[i] = C.uint8_t(b)
	}
	return out
}

func fromC(k *C.meshvpn_key) Key {
	return *(*Key)(unsafe.Pointer(&k.bytes[0]))
}
