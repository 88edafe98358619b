//! The wg-quick parser on arbitrary text: an error or a config, never a
//! panic; and whatever parses must survive emit -> parse unchanged. Names
//! in `Endpoint =` go to a resolver that answers from the name itself,
//! so the fuzzer never touches DNS.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshvpn_engine::config::{emit_wg_quick, parse_wg_quick_with};

fn fake_resolve(host: &str) -> Option<std::net::SocketAddr> {
    let (name, port) = host.rsplit_once(':')?;
    let port: u16 = port.parse().ok()?;
    let n = name.bytes().fold(0u8, |a, b| a.wrapping_add(b));
    Some(std::net::SocketAddr::from(([192, 0, 2, n], port)))
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = parse_wg_quick_with(text, &mut fake_resolve) else {
        return;
    };
    let emitted = emit_wg_quick(&cfg);
    let again = parse_wg_quick_with(&emitted, &mut |_| None)
        .unwrap_or_else(|e| panic!("emitted config does not parse: {e}\n{emitted}"));
    assert_eq!(cfg, again, "emit -> parse changed the config:\n{emitted}");
});
