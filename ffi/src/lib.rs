//! The C ABI of libmeshvpn (see `include/meshvpn.h`).
