//! Gives the shared library a SONAME carrying the ABI (major) version, so
//! `libmeshvpn.so.0` can be installed next to a later `libmeshvpn.so.1`.

fn main() {
    let os = std::env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    if os == "linux" {
        let major = std::env::var("CARGO_PKG_VERSION_MAJOR").unwrap_or_else(|_| "0".into());
        println!("cargo:rustc-cdylib-link-arg=-Wl,-soname,libmeshvpn.so.{major}");
    }
}
