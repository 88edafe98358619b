//! `meshvpn genkey`, `pubkey`, `genpsk`: the key tools of `wg`, same
//! input and output (base64, one key a line).

use std::io::{Read, Write};

use meshvpn_engine::{PresharedKey, PrivateKey};
use zeroize::Zeroize;

use crate::CliResult;

fn print_line(s: &str) -> CliResult {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{s}")?;
    out.flush()?;
    Ok(())
}

pub fn genkey() -> CliResult {
    let mut s = PrivateKey::generate().to_base64();
    let r = print_line(&s);
    s.zeroize();
    r
}

pub fn genpsk() -> CliResult {
    let mut s = PresharedKey::generate().to_base64();
    let r = print_line(&s);
    s.zeroize();
    r
}

pub fn pubkey() -> CliResult {
    let mut input = Vec::new();
    // A key is 44 characters; more than a line's worth is not a key.
    std::io::stdin().lock().take(1024).read_to_end(&mut input)?;
    let key = std::str::from_utf8(&input)
        .ok()
        .and_then(|s| PrivateKey::from_base64(s.trim()).ok());
    input.zeroize();
    let key = key.ok_or(
        "stdin does not hold a base64 private key; pipe one in, e.g. `meshvpn genkey | meshvpn pubkey`",
    )?;
    print_line(&key.public_key().to_base64())
}
