//! The STUN codec (`wire::stun`), the server's answer and the discovery
//! client on hostile datagrams. Invariants:
//! - parsing never panics; a parsed message is `is_stun`, and nothing that
//!   frames as WireGuard is;
//! - a parsed message's address re-encodes to bytes that parse to the same
//!   transaction, class and address (FINGERPRINT kept or not);
//! - the server's answer, when there is one, parses, carries the request's
//!   transaction ID and (on success) exactly the source address;
//! - the client accepts only answers carrying its outstanding transaction
//!   ID from its server's address, and reports what they carried.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Instant;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::nat::{Discovered, Discovery, DiscoveryConfig, Output};
use meshvpn_engine::wire::stun::{
    answer_binding, encode_binding_success, is_stun, Class, StunMessage,
};
use meshvpn_engine::wire::WireMessage;

/// The transaction ID of the client's one request (seeds carry it).
const ID: [u8; 12] = [0x42; 12];
const SERVER: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)), 3478);

#[derive(Arbitrary, Debug)]
struct Input {
    /// Datagram source: the configured server, or another address.
    from_server: bool,
    v6: bool,
    port: u16,
    data: Vec<u8>,
}

fuzz_target!(|input: Input| {
    let data = &input.data[..];
    let from = if input.from_server {
        SERVER
    } else if input.v6 {
        SocketAddr::new(
            IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1)),
            input.port,
        )
    } else {
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), input.port)
    };
    if WireMessage::new_checked(data).is_ok() {
        assert!(!is_stun(data));
    }
    let parsed = StunMessage::new_checked(data);
    if let Ok(m) = &parsed {
        assert!(is_stun(data));
        let _ = m.software();
        let _ = m.error_code();
        for a in m.attributes() {
            let _ = a.unwrap();
        }
        if let Ok(Some(addr)) = m.mapped_address() {
            let mut out = [0u8; 128];
            let n =
                encode_binding_success(&m.transaction_id, addr, None, m.has_fingerprint, &mut out)
                    .unwrap();
            let again = StunMessage::new_checked(&out[..n]).unwrap();
            assert_eq!(again.transaction_id, m.transaction_id);
            assert_eq!(again.class, Class::Success);
            assert_eq!(again.has_fingerprint, m.has_fingerprint);
            assert_eq!(again.mapped_address(), Ok(Some(addr)));
        }
    }

    let mut out = [0u8; 128];
    if let Ok(Some(n)) = answer_binding(data, from, &mut out) {
        let request = parsed
            .as_ref()
            .map(|m| m.transaction_id)
            .unwrap_or_else(|_| {
                let mut id = [0u8; 12];
                id.copy_from_slice(&data[8..20]);
                id
            });
        let a = StunMessage::new_checked(&out[..n]).unwrap();
        assert_eq!(a.transaction_id, request);
        match a.class {
            Class::Success => assert_eq!(
                a.mapped_address(),
                Ok(Some(SocketAddr::new(from.ip().to_canonical(), from.port())))
            ),
            Class::Error => assert_eq!(a.error_code().map(|e| e.0), Some(420)),
            c => panic!("answered with {c:?}"),
        }
    }

    let t0 = Instant::now();
    let mut d = Discovery::new(&[SERVER], DiscoveryConfig::default()).unwrap();
    d.start(t0, &mut || ID);
    let mut buf = [0u8; 64];
    assert!(matches!(d.poll(t0, &mut buf), Output::Transmit { .. }));
    if let Ok(got) = d.handle(from, data) {
        let m = parsed.expect("accepted a datagram that does not parse");
        assert_eq!(m.transaction_id, ID);
        assert_eq!(from, SERVER);
        match got {
            Discovered::Reflexive {
                reflexive, changed, ..
            } => {
                assert!(changed);
                assert_eq!(m.class, Class::Success);
                assert_eq!(
                    m.mapped_address()
                        .map(|a| a.map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))),
                    Ok(Some(reflexive))
                );
            }
            Discovered::Error { .. } => assert_eq!(m.class, Class::Error),
        }
    }
});
