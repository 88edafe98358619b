//go:build !meshvpn_pkgconfig

package meshvpn

// The default: link the static library that `make -C bindings/go lib`
// puts in bindings/go/lib, against the header committed in include/ at
// the repository root. The Go program becomes one binary with libmeshvpn
// inside. To link an installed library instead, build with
// -tags meshvpn_pkgconfig (see link_pkgconfig.go).

// #cgo CFLAGS: -I${SRCDIR}/../../include
// #cgo LDFLAGS: ${SRCDIR}/lib/libmeshvpn.a -lgcc_s -lutil -lrt -lpthread -lm -ldl -lc
import "C"
