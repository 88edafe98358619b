//! Cryptokey routing on receive: a decrypted packet whose inner source is
//! not in the sending peer's AllowedIPs is dropped and counted, including
//! a source that belongs to another peer (the spoofing case that matters).

mod common;

use std::time::Duration;

use common::{mesh, send_and_receive, udp_packet};
use meshvpn_engine::peer::DropReason;

#[test]
fn inner_source_outside_the_senders_allowed_ips_is_dropped() {
    let nodes = mesh(3, false);
    let (a, b, c) = (&nodes[0], &nodes[1], &nodes[2]);
    let ok = udp_packet(a.v4, b.v4, 10, 0);
    assert_eq!(
        send_and_receive(&a.engine, &b.engine, &ok).as_deref(),
        Some(&ok[..])
    );
    // a claims to be c (whom b knows, with c's own AllowedIPs), then an
    // address nobody has, in both families.
    let spoofed = [
        udp_packet(c.v4, b.v4, 10, 1),
        udp_packet(c.v6, b.v6, 10, 2),
        udp_packet("10.77.0.99".parse().unwrap(), b.v4, 10, 3),
        udp_packet("fd77::99".parse().unwrap(), b.v6, 10, 4),
    ];
    for p in &spoofed {
        a.engine.send_packet(p).unwrap();
    }
    assert!(b.engine.recv_packet(Duration::from_millis(700)).is_none());
    let from_a = b.engine.peer_stats(&a.key.public_key()).unwrap();
    assert_eq!(from_a.drops(DropReason::SourceNotAllowed), 4);
    assert_eq!(from_a.rx_packets, 1);
    let from_c = b.engine.peer_stats(&c.key.public_key()).unwrap();
    assert_eq!(from_c.rx_packets, 0, "c was credited with a's packets");
    // The genuine source still works afterwards, v6 too.
    let ok6 = udp_packet(a.v6, b.v6, 10, 5);
    assert_eq!(
        send_and_receive(&a.engine, &b.engine, &ok6).as_deref(),
        Some(&ok6[..])
    );
}
