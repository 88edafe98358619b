#!/usr/bin/env bash
# Builds libmeshvpn and installs it under PREFIX:
#
#   PREFIX/lib/libmeshvpn.a
#   PREFIX/lib/libmeshvpn.so.MAJOR.MINOR.PATCH (+ .so.MAJOR and .so links)
#   PREFIX/lib/pkgconfig/meshvpn.pc
#   PREFIX/include/meshvpn.h
#
# Usage: ffi/install.sh PREFIX
#   PROFILE=dev ffi/install.sh PREFIX     installs the (faster to build) dev build
#   NO_BUILD=1 ffi/install.sh PREFIX      installs what target/ already holds
#
# Then: cc prog.c $(PKG_CONFIG_PATH=PREFIX/lib/pkgconfig pkg-config --cflags --libs meshvpn)
# or, statically: pkg-config --static --libs meshvpn with -l:libmeshvpn.a.
set -euo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: $0 PREFIX" >&2
    exit 2
fi
root="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$1"
prefix="$(cd "$1" && pwd)"
profile="${PROFILE:-release}"
[[ "$profile" == "debug" ]] && profile=dev

if [[ -z "${NO_BUILD:-}" ]]; then
    if [[ "$profile" == "release" ]]; then
        (cd "$root" && cargo build --release -p meshvpn-ffi)
    else
        (cd "$root" && cargo build --profile "$profile" -p meshvpn-ffi)
    fi
fi
dir="$profile"
[[ "$profile" == "dev" ]] && dir=debug
target="${CARGO_TARGET_DIR:-$root/target}/$dir"

version="$(sed -n 's/^version = "\(.*\)"/\1/p' "$root/Cargo.toml" | head -1)"
major="${version%%.*}"
# What Rust's standard library needs from the system when linked
# statically (`rustc --print native-static-libs`, Linux/glibc).
libs_private="-lgcc_s -lutil -lrt -lpthread -lm -ldl -lc"

install -d "$prefix/lib/pkgconfig" "$prefix/include"
install -m 0644 "$target/libmeshvpn.a" "$prefix/lib/libmeshvpn.a"
install -m 0755 "$target/libmeshvpn.so" "$prefix/lib/libmeshvpn.so.$version"
ln -sf "libmeshvpn.so.$version" "$prefix/lib/libmeshvpn.so.$major"
ln -sf "libmeshvpn.so.$major" "$prefix/lib/libmeshvpn.so"
install -m 0644 "$root/include/meshvpn.h" "$prefix/include/meshvpn.h"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" -e "s|@LIBS_PRIVATE@|$libs_private|" \
    "$root/ffi/meshvpn.pc.in" > "$prefix/lib/pkgconfig/meshvpn.pc"
echo "installed libmeshvpn $version ($profile) under $prefix"
