//! Two peers driven in process by a fuzzer-chosen script: packets sent,
//! datagrams delivered in any order, dropped, duplicated, corrupted, sent
//! from a stranger's address, handshakes forced, and the (mock) clock
//! stepped so rekey, retry and expiry timers fire.
//!
//! Invariants: no panic; every decrypted packet is one the other side sent,
//! delivered at most once; receive counters equal what was delivered; a
//! datagram that was dropped never moves the sender's endpoint.
#![no_main]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::peer::{output_buffer_len, Peer, PeerOutput};
use meshvpn_engine::wire::WireMessage;
use meshvpn_fuzz::{ipv4_packet, key, peer};
use mock_instant::MockClock;

#[derive(Arbitrary, Debug)]
enum Op {
    Send {
        from_b: bool,
        len: u16,
    },
    Deliver {
        to_b: bool,
        pick: u8,
    },
    Duplicate {
        to_b: bool,
        pick: u8,
    },
    Drop {
        to_b: bool,
        pick: u8,
    },
    Corrupt {
        to_b: bool,
        pick: u8,
        at: u16,
        xor: u8,
    },
    FromStranger {
        to_b: bool,
        pick: u8,
    },
    Handshake {
        from_b: bool,
    },
    Tick {
        millis: u16,
        seconds: u8,
    },
}

struct Side {
    peer: Peer,
    addr: SocketAddr,
    /// Datagrams on the way to this side.
    inbox: Vec<Vec<u8>>,
    /// Packets this side sent, by sequence number, and whether delivered.
    sent: HashMap<u32, (Vec<u8>, bool)>,
    delivered: u64,
}

fn side(own: u8, other: u8, index: u32, addr: &str) -> Side {
    let p = peer(&key(own), &key(other), index, u64::MAX / 2);
    Side {
        peer: p,
        addr: addr.parse().unwrap(),
        inbox: Vec::new(),
        sent: HashMap::new(),
        delivered: 0,
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut s = [
        side(1, 2, 0x1, "192.0.2.1:1"),
        side(2, 1, 0x2, "192.0.2.2:2"),
    ];
    s[0].peer.set_endpoint(s[1].addr.into());
    s[1].peer.set_endpoint(s[0].addr.into());
    let stranger: SocketAddr = "198.51.100.7:9".parse().unwrap();
    let mut out = vec![0u8; output_buffer_len(2048)];
    let mut seq = 0u32;
    for op in ops.iter().take(256) {
        // (index of the side acting, datagram to hand it, source address)
        let mut arrival: Option<(usize, Vec<u8>, SocketAddr)> = None;
        match *op {
            Op::Send { from_b, len } => {
                let (i, j) = if from_b { (1, 0) } else { (0, 1) };
                seq += 1;
                let mut p = ipv4_packet([10, 0, 0, 1 + i as u8], 24 + len as usize % 1400, seq);
                p[20..24].copy_from_slice(&seq.to_be_bytes());
                let r = s[i].peer.encapsulate(Instant::now(), &p, &mut out);
                s[i].sent.insert(seq, (p, false));
                if let PeerOutput::ToNetwork { len, .. } = r {
                    s[j].inbox.push(out[..len].to_vec());
                }
            }
            Op::Handshake { from_b } => {
                let (i, j) = if from_b { (1, 0) } else { (0, 1) };
                if let PeerOutput::ToNetwork { len, .. } = s[i].peer.initiate_handshake(Instant::now(), &mut out) {
                    s[j].inbox.push(out[..len].to_vec());
                }
            }
            Op::Tick { millis, seconds } => {
                MockClock::advance(Duration::from_millis(
                    millis as u64 % 1000 + seconds as u64 * 1000,
                ));
                for i in 0..2 {
                    for _ in 0..4 {
                        match s[i].peer.update_timers(Instant::now(), &mut out) {
                            PeerOutput::ToNetwork { len, .. } => {
                                s[1 - i].inbox.push(out[..len].to_vec())
                            }
                            _ => break,
                        }
                    }
                }
            }
            Op::Deliver { to_b, pick } | Op::Duplicate { to_b, pick } | Op::Drop { to_b, pick } => {
                let j = to_b as usize;
                if s[j].inbox.is_empty() {
                    continue;
                }
                let k = pick as usize % s[j].inbox.len();
                let d = match op {
                    Op::Duplicate { .. } => s[j].inbox[k].clone(),
                    _ => s[j].inbox.remove(k),
                };
                if !matches!(op, Op::Drop { .. }) {
                    let from = s[1 - j].addr;
                    arrival = Some((j, d, from));
                }
            }
            Op::Corrupt {
                to_b,
                pick,
                at,
                xor,
            } => {
                let j = to_b as usize;
                if s[j].inbox.is_empty() {
                    continue;
                }
                let k = pick as usize % s[j].inbox.len();
                let mut d = s[j].inbox[k].clone();
                let n = d.len();
                d[at as usize % n] ^= xor.max(1);
                let from = s[1 - j].addr;
                arrival = Some((j, d, from));
            }
            Op::FromStranger { to_b, pick } => {
                let j = to_b as usize;
                if s[j].inbox.is_empty() {
                    continue;
                }
                let k = pick as usize % s[j].inbox.len();
                arrival = Some((j, s[j].inbox[k].clone(), stranger));
            }
        }
        let Some((j, d, from)) = arrival else {
            continue;
        };
        let Ok(msg) = WireMessage::new_checked(&d) else {
            continue;
        };
        let before = s[j].peer.endpoint();
        let r = s[j].peer.decapsulate(Instant::now(), from.into(), msg.kind, &d, &mut out);
        match r {
            PeerOutput::ToNetwork { len, .. } => {
                s[1 - j].inbox.push(out[..len].to_vec());
            }
            PeerOutput::ToHost { len, .. } => {
                let got = out[..len].to_vec();
                assert!(len >= 24, "a packet shorter than any sent");
                let id = u32::from_be_bytes(got[20..24].try_into().unwrap());
                let entry = s[1 - j]
                    .sent
                    .get_mut(&id)
                    .expect("decrypted a packet the other side never sent");
                assert_eq!(entry.0, got, "packet {id} changed in transit");
                assert!(!entry.1, "packet {id} delivered twice");
                entry.1 = true;
                s[j].peer.delivered(len);
                s[j].delivered += 1;
            }
            PeerOutput::Dropped(_) => {
                assert_eq!(
                    s[j].peer.endpoint(),
                    before,
                    "a dropped datagram moved the endpoint"
                );
            }
            PeerOutput::Done => {}
        }
        if s[j].peer.should_flush(msg.kind, r) {
            while let PeerOutput::ToNetwork { len, .. } = s[j].peer.flush_queued(Instant::now(), &mut out) {
                s[1 - j].inbox.push(out[..len].to_vec());
            }
        }
        if msg.kind == meshvpn_engine::wire::MessageKind::CookieReply {
            assert_eq!(
                s[j].peer.endpoint(),
                before,
                "a cookie reply moved the endpoint"
            );
        }
    }
    for x in &s {
        assert_eq!(x.peer.stats().rx_packets, x.delivered);
        let sent_ok = x.sent.values().filter(|v| v.1).count() as u64;
        assert!(x.peer.stats().tx_packets >= sent_ok);
    }
});
