//go:build meshvpn_pkgconfig

package meshvpn

// With -tags meshvpn_pkgconfig, header and library come from an install
// made by ffi/install.sh PREFIX, found through pkg-config (set
// PKG_CONFIG_PATH=PREFIX/lib/pkgconfig). pkg-config names -lmeshvpn, which
// the linker resolves to the shared library when PREFIX/lib has both;
// remove libmeshvpn.so* there (or keep the default build) for one binary.

// #cgo pkg-config: --static meshvpn
import "C"
