//! NAT traversal in the running engine over loopback: STUN from the
//! WireGuard socket itself (answers demultiplexed from WireGuard traffic,
//! spoofed ones ignored), and candidate messages through the relay path
//! (taken from the relay's key, bounded, malformed ones counted).

mod common;

use std::any::Any;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use common::{mesh, send_and_receive, udp_packet, wait_until};
use meshvpn_engine::peer::Endpoint;
use meshvpn_engine::relay::protocol::Candidates;
use meshvpn_engine::wg::stun::StunServer;
use meshvpn_engine::wg::{RelayTransport, Transport, Unsent};
use meshvpn_engine::wire::stun::encode_binding_success;
use meshvpn_engine::{PrivateKey, PublicKey};
use parking_lot::Mutex;

#[test]
fn stun_from_the_wireguard_socket_finds_its_port_and_ignores_spoofed_answers() {
    let nodes = mesh(2, false);
    let e = &nodes[0].engine;
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    let me: SocketAddr = format!("127.0.0.1:{}", e.listen_port()).parse().unwrap();
    e.set_stun_servers(&[stun.local_addr()]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || e.nat_status().reflexive
            == Some(me)),
        "the STUN server never told the WireGuard socket its address: {:?}",
        e.nat_status()
    );
    // An answer from elsewhere, with a made-up transaction: dropped, counted.
    let spoofer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut buf = [0u8; 64];
    let n = encode_binding_success(
        &[7; 12],
        "203.0.113.9:1".parse().unwrap(),
        None,
        true,
        &mut buf,
    )
    .unwrap();
    for _ in 0..5 {
        spoofer.send_to(&buf[..n], me).unwrap();
    }
    assert!(wait_until(Duration::from_secs(5), || {
        e.nat_status().discovery.unknown_source >= 5
    }));
    assert_eq!(
        e.nat_status().reflexive,
        Some(me),
        "a spoofed answer moved the address"
    );
    assert_eq!(
        e.stats().rx_malformed,
        0,
        "STUN reached the WireGuard framing"
    );
    // WireGuard traffic on the same socket is untouched.
    let p = udp_packet(nodes[0].v4, nodes[1].v4, 64, 1);
    assert!(send_and_receive(e, &nodes[1].engine, &p).is_some());
    assert!(
        stun.stats()
            .answered
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
}

/// A relay that records what the engine sends through it.
#[derive(Default)]
struct Recorder(Mutex<Vec<(PublicKey, Vec<u8>)>>);

impl Transport for Recorder {
    fn send_batch(&self, batch: &[u8], segment: usize, to: &Endpoint) -> Result<(), Unsent> {
        let Endpoint::Relay(key) = to else {
            return Err(Unsent::all(batch.len(), segment));
        };
        let mut sent = self.0.lock();
        sent.extend(batch.chunks(segment).map(|d| (*key, d.to_vec())));
        Ok(())
    }
}

impl RelayTransport for Recorder {
    fn is_up(&self) -> bool {
        true
    }
    fn rekeyed(&self) {}
    fn reconnect(&self) {}
    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[test]
fn candidates_arrive_through_the_relay_from_its_key_and_get_an_answer() {
    let nodes = mesh(2, false);
    let e = &nodes[1].engine;
    let stun = StunServer::bind("127.0.0.1:0".parse().unwrap(), Default::default()).unwrap();
    e.set_stun_servers(&[stun.local_addr()]).unwrap();
    let relay = Arc::new(Recorder::default());
    e.attach_relay(relay.clone(), Duration::from_secs(5))
        .unwrap();
    let inbox = e.relay_inbox();
    let peer = nodes[0].key.public_key();
    let list: Vec<SocketAddr> = vec!["192.0.2.7:51820".parse().unwrap()];
    inbox.deliver(&peer, &Candidates(list.clone()).encode());
    // From a key that is no peer, malformed, another version: counted, dropped.
    let stranger = PrivateKey::generate().public_key();
    inbox.deliver(&stranger, &Candidates(list.clone()).encode());
    inbox.deliver(&peer, &[0x80, 1, 9]);
    inbox.deliver(&peer, &[0x80, 2, 0]);
    let s = e.nat_stats();
    assert_eq!(
        (
            s.candidates_received,
            s.candidates_unknown_peer,
            s.candidates_malformed,
            s.candidates_unsupported
        ),
        (1, 1, 1, 1)
    );
    let status = e.nat_status();
    assert_eq!(status.peer_candidates, vec![(peer, list)]);
    assert_eq!(
        e.stats().rx_malformed,
        0,
        "a candidate message reached WireGuard"
    );
    // Ours go back to that peer through the relay, as a candidate message.
    assert!(wait_until(Duration::from_secs(5), || {
        relay
            .0
            .lock()
            .iter()
            .any(|(to, m)| *to == peer && Candidates::decode(m).is_ok())
    }));
    // The peer is on a working direct path (loopback): no probing rounds.
    assert_eq!(e.nat_stats().probe_rounds, 0);
    e.detach_relay();
}
