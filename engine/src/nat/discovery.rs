//! The STUN client: Binding transactions to configured servers, their
//! retransmission (RFC 8489 section 6.2.1) and the validation of answers.
//!
//! An answer is accepted only when it comes from the exact address of a
//! configured server AND carries the transaction ID of that server's
//! outstanding request (96 random bits, compared in constant time). An
//! off-path attacker would have to guess the ID; everything else is
//! counted and dropped.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use subtle::ConstantTimeEq;

use crate::wire::stun::{
    encode_binding_request, is_stun, Class, StunMessage, TransactionId, METHOD_BINDING,
};

/// RFC 8489's initial retransmission timeout (section 6.2.1).
pub const STUN_RTO: Duration = Duration::from_millis(500);
/// Rc: transmissions of one request, the first included (RFC 8489's
/// default).
pub const STUN_MAX_TRANSMITS: u32 = 7;
/// Rm: after the last transmission the client waits this many initial
/// RTOs for an answer (RFC 8489: 16, so a transaction fails after 39.5 s).
pub const STUN_FINAL_WAIT_FACTOR: u32 = 16;
/// Servers one `Discovery` probes; also the bound on its outstanding
/// transactions (one per server at a time).
pub const MAX_SERVERS: usize = 8;
/// The length of every request this client sends: header and FINGERPRINT
/// (no SOFTWARE: nothing a server needs).
pub const REQUEST_LEN: usize = 28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiscoveryConfig {
    /// Initial retransmission timeout, doubled after each retransmission.
    pub rto: Duration,
    /// Transmissions per request (at least 1).
    pub max_transmits: u32,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            rto: STUN_RTO,
            max_transmits: STUN_MAX_TRANSMITS,
        }
    }
}

/// Counters; everything dropped is counted under one reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DiscoveryStats {
    pub requests: u64,
    pub retransmits: u64,
    pub answers: u64,
    pub error_responses: u64,
    pub timeouts: u64,
    pub not_stun: u64,
    pub malformed: u64,
    pub unknown_source: u64,
    pub unknown_transaction: u64,
}

/// What the caller does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Send the first `len` bytes of the buffer given to `poll` to `to`.
    Transmit { to: SocketAddr, len: usize },
    /// The server never answered this round's request.
    TimedOut { server: SocketAddr },
    /// Nothing to do before this instant (`None`: nothing outstanding).
    Wait(Option<Instant>),
}

/// An accepted answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discovered {
    /// The server saw us at `reflexive`; `changed` when that differs from
    /// what the same server said last time (or it is the first answer).
    Reflexive {
        server: SocketAddr,
        reflexive: SocketAddr,
        changed: bool,
    },
    /// The server answered with a Binding error response.
    Error { server: SocketAddr, code: u16 },
}

/// Why a datagram was dropped (each reason has its counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    NotStun,
    Malformed,
    UnknownSource,
    UnknownTransaction,
}

/// What the servers together say about our NAT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Fewer than two servers answered.
    Unknown,
    /// Every server saw the same address: one mapping for all
    /// destinations, which hole punching can use.
    EndpointIndependent(SocketAddr),
    /// Servers saw different addresses: a symmetric NAT, a new mapping per
    /// destination; peers cannot reach us at any address we learn here.
    EndpointDependent,
}

#[derive(Debug, Clone)]
struct Transaction {
    id: TransactionId,
    transmits: u32,
    next_at: Instant,
    rto: Duration,
}

#[derive(Debug, Clone)]
struct Server {
    addr: SocketAddr,
    outstanding: Option<Transaction>,
    reflexive: Option<SocketAddr>,
}

/// Discovery of this node's server-reflexive address against up to
/// [`MAX_SERVERS`] STUN servers. Sans-IO: [`start`](Self::start) a round,
/// [`poll`](Self::poll) for datagrams to send and deadlines, feed every
/// datagram that [`is_stun`] to [`handle`](Self::handle).
#[derive(Debug, Clone)]
pub struct Discovery {
    config: DiscoveryConfig,
    servers: Vec<Server>,
    stats: DiscoveryStats,
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is, so a dual-stack
/// socket's source addresses compare equal to configured IPv4 servers.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// 96 bits from the system's CSPRNG (ring), RFC 8489's "uniformly and
/// randomly chosen" transaction ID.
pub fn random_transaction_id() -> TransactionId {
    use ring::rand::SecureRandom;
    let mut id = [0u8; 12];
    ring::rand::SystemRandom::new()
        .fill(&mut id)
        .expect("the system's random source failed");
    id
}

impl Discovery {
    /// Servers beyond [`MAX_SERVERS`] and duplicates are refused.
    pub fn new(servers: &[SocketAddr], config: DiscoveryConfig) -> Result<Self, String> {
        if servers.is_empty() || servers.len() > MAX_SERVERS {
            return Err(format!(
                "{} STUN servers: give 1 to {MAX_SERVERS}",
                servers.len()
            ));
        }
        let mut list: Vec<Server> = Vec::with_capacity(servers.len());
        for &s in servers {
            let addr = canonical(s);
            if list.iter().any(|x| x.addr == addr) {
                return Err(format!("STUN server {addr} given twice"));
            }
            list.push(Server {
                addr,
                outstanding: None,
                reflexive: None,
            });
        }
        Ok(Discovery {
            config: DiscoveryConfig {
                max_transmits: config.max_transmits.max(1),
                ..config
            },
            servers: list,
            stats: DiscoveryStats::default(),
        })
    }

    /// Begins a round: a new transaction for every server that has none
    /// outstanding (a server still being asked keeps its transaction, so
    /// there is never more than one per server). Returns how many began.
    pub fn start(&mut self, now: Instant, new_id: &mut dyn FnMut() -> TransactionId) -> usize {
        let mut started = 0;
        for s in self.servers.iter_mut().filter(|s| s.outstanding.is_none()) {
            s.outstanding = Some(Transaction {
                id: new_id(),
                transmits: 0,
                next_at: now,
                rto: self.config.rto,
            });
            started += 1;
        }
        started
    }

    /// The next thing to do at `now`; a request is written into `out`
    /// (at least [`REQUEST_LEN`] bytes). Call until it returns `Wait`.
    pub fn poll(&mut self, now: Instant, out: &mut [u8]) -> Output {
        let final_wait = self.config.rto * STUN_FINAL_WAIT_FACTOR;
        for s in &mut self.servers {
            let Some(t) = s.outstanding.as_mut() else {
                continue;
            };
            if t.next_at > now {
                continue;
            }
            if t.transmits >= self.config.max_transmits {
                s.outstanding = None;
                self.stats.timeouts += 1;
                return Output::TimedOut { server: s.addr };
            }
            let Ok(len) = encode_binding_request(&t.id, None, true, out) else {
                // The caller's buffer is too small: nothing can be sent.
                return Output::Wait(Some(now));
            };
            if t.transmits == 0 {
                self.stats.requests += 1;
            } else {
                self.stats.retransmits += 1;
            }
            t.transmits += 1;
            t.next_at = now
                + if t.transmits >= self.config.max_transmits {
                    final_wait
                } else {
                    t.rto
                };
            t.rto = t.rto.saturating_mul(2);
            return Output::Transmit { to: s.addr, len };
        }
        Output::Wait(
            self.servers
                .iter()
                .filter_map(|s| s.outstanding.as_ref().map(|t| t.next_at))
                .min(),
        )
    }

    /// A datagram that arrived from `from`: accepted when it answers the
    /// outstanding transaction of the server at exactly that address.
    pub fn handle(&mut self, from: SocketAddr, datagram: &[u8]) -> Result<Discovered, Dropped> {
        let from = canonical(from);
        if !is_stun(datagram) {
            self.stats.not_stun += 1;
            return Err(Dropped::NotStun);
        }
        let Ok(m) = StunMessage::new_checked(datagram) else {
            self.stats.malformed += 1;
            return Err(Dropped::Malformed);
        };
        let Some(server) = self.servers.iter_mut().find(|s| s.addr == from) else {
            self.stats.unknown_source += 1;
            return Err(Dropped::UnknownSource);
        };
        let matches = server
            .outstanding
            .as_ref()
            .is_some_and(|t| bool::from(t.id.ct_eq(&m.transaction_id)));
        if !matches || m.method != METHOD_BINDING {
            self.stats.unknown_transaction += 1;
            return Err(Dropped::UnknownTransaction);
        }
        match m.class {
            Class::Success => {}
            Class::Error => {
                server.outstanding = None;
                self.stats.error_responses += 1;
                let code = m.error_code().map_or(0, |e| e.0);
                return Ok(Discovered::Error {
                    server: server.addr,
                    code,
                });
            }
            Class::Request | Class::Indication => {
                self.stats.unknown_transaction += 1;
                return Err(Dropped::UnknownTransaction);
            }
        }
        let Ok(Some(reflexive)) = m.mapped_address() else {
            // The right server and ID but no usable address: keep
            // waiting, a retransmission may get a better answer.
            self.stats.malformed += 1;
            return Err(Dropped::Malformed);
        };
        let reflexive = canonical(reflexive);
        server.outstanding = None;
        let changed = server.reflexive != Some(reflexive);
        server.reflexive = Some(reflexive);
        self.stats.answers += 1;
        Ok(Discovered::Reflexive {
            server: server.addr,
            reflexive,
            changed,
        })
    }

    /// The last address each server reported, in configuration order.
    pub fn results(&self) -> impl Iterator<Item = (SocketAddr, Option<SocketAddr>)> + '_ {
        self.servers.iter().map(|s| (s.addr, s.reflexive))
    }

    /// Whether requests are still outstanding.
    pub fn busy(&self) -> bool {
        self.servers.iter().any(|s| s.outstanding.is_some())
    }

    pub fn mapping(&self) -> Mapping {
        let mut seen = self.servers.iter().filter_map(|s| s.reflexive);
        let (Some(first), Some(_)) = (seen.next(), seen.clone().next()) else {
            return Mapping::Unknown;
        };
        if seen.all(|a| a == first) {
            Mapping::EndpointIndependent(first)
        } else {
            Mapping::EndpointDependent
        }
    }

    pub fn stats(&self) -> DiscoveryStats {
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stun::{encode_binding_error, encode_binding_success};

    fn ids() -> impl FnMut() -> TransactionId {
        let mut n = 0u8;
        move || {
            n += 1;
            [n; 12]
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    const S1: &str = "192.0.2.1:3478";
    const S2: &str = "198.51.100.2:3478";

    fn sent_id(buf: &[u8], len: usize) -> TransactionId {
        StunMessage::new_checked(&buf[..len])
            .unwrap()
            .transaction_id
    }

    fn answer(id: &TransactionId, mapped: &str) -> Vec<u8> {
        let mut b = [0u8; 64];
        let n = encode_binding_success(id, addr(mapped), None, true, &mut b).unwrap();
        b[..n].to_vec()
    }

    #[test]
    fn retransmits_with_doubling_rto_then_times_out() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[addr(S1)], DiscoveryConfig::default()).unwrap();
        let mut buf = [0u8; 64];
        assert_eq!(d.poll(t0, &mut buf), Output::Wait(None));
        assert_eq!(d.start(t0, &mut ids()), 1);
        let mut now = t0;
        let mut sends = Vec::new();
        let mut first_id = None;
        loop {
            match d.poll(now, &mut buf) {
                Output::Transmit { to, len } => {
                    assert_eq!((to, len), (addr(S1), REQUEST_LEN));
                    let id = sent_id(&buf, len);
                    // Retransmissions repeat the same transaction.
                    assert_eq!(*first_id.get_or_insert(id), id);
                    sends.push((now - t0).as_millis());
                }
                Output::TimedOut { server } => {
                    assert_eq!(server, addr(S1));
                    break;
                }
                Output::Wait(Some(at)) => now = at,
                Output::Wait(None) => panic!("lost the transaction"),
            }
        }
        // RFC 8489 6.2.1: 0, 500, 1500, 3500, 7500, 15500, 31500; fail at 39500.
        assert_eq!(sends, [0, 500, 1500, 3500, 7500, 15500, 31500]);
        assert_eq!((now - t0).as_millis(), 39500);
        let s = d.stats();
        assert_eq!((s.requests, s.retransmits, s.timeouts), (1, 6, 1));
        assert!(!d.busy());
    }

    #[test]
    fn accepts_the_matching_answer_and_reports_changes() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[addr(S1), addr(S2)], DiscoveryConfig::default()).unwrap();
        let mut buf = [0u8; 64];
        let mut new_id = ids();
        d.start(t0, &mut new_id);
        let mut sent = Vec::new();
        while let Output::Transmit { to, len } = d.poll(t0, &mut buf) {
            sent.push((to, sent_id(&buf, len)));
        }
        assert_eq!(sent.len(), 2);
        let (s1, id1) = sent[0];
        let (s2, id2) = sent[1];
        let got = d.handle(s1, &answer(&id1, "203.0.113.5:40000")).unwrap();
        assert_eq!(
            got,
            Discovered::Reflexive {
                server: s1,
                reflexive: addr("203.0.113.5:40000"),
                changed: true
            }
        );
        assert_eq!(d.mapping(), Mapping::Unknown);
        // A duplicate (a retransmission's answer) no longer matches.
        assert_eq!(
            d.handle(s1, &answer(&id1, "203.0.113.5:40000")),
            Err(Dropped::UnknownTransaction)
        );
        d.handle(s2, &answer(&id2, "203.0.113.5:40000")).unwrap();
        assert_eq!(
            d.mapping(),
            Mapping::EndpointIndependent(addr("203.0.113.5:40000"))
        );
        // Next round: same answer is not a change, a new port is.
        d.start(t0, &mut new_id);
        let mut sent = Vec::new();
        while let Output::Transmit { to, len } = d.poll(t0, &mut buf) {
            sent.push((to, sent_id(&buf, len)));
        }
        assert_ne!(sent[0].1, id1, "a new round has a new transaction ID");
        let got = d.handle(s1, &answer(&sent[0].1, "203.0.113.5:40000"));
        assert!(matches!(
            got,
            Ok(Discovered::Reflexive { changed: false, .. })
        ));
        let got = d.handle(s2, &answer(&sent[1].1, "203.0.113.5:40001"));
        assert!(matches!(
            got,
            Ok(Discovered::Reflexive { changed: true, .. })
        ));
        assert_eq!(d.mapping(), Mapping::EndpointDependent);
        assert_eq!(d.stats().answers, 4);
    }

    /// Spoofed answers: a wrong transaction ID from the right server, the
    /// right ID from an address that is not a configured server (another
    /// port of the same host included), non-STUN and malformed bytes,
    /// requests instead of responses. All counted and dropped, and the
    /// real answer still accepted afterwards.
    #[test]
    fn spoofed_and_foreign_answers_are_dropped() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[addr(S1)], DiscoveryConfig::default()).unwrap();
        let mut buf = [0u8; 64];
        d.start(t0, &mut ids());
        let Output::Transmit { to, len } = d.poll(t0, &mut buf) else {
            panic!()
        };
        let id = sent_id(&buf, len);
        let mut wrong = id;
        wrong[11] ^= 1;
        let spoof = "6.6.6.6:1";
        assert_eq!(
            d.handle(to, &answer(&wrong, spoof)),
            Err(Dropped::UnknownTransaction)
        );
        assert_eq!(
            d.handle(addr("192.0.2.66:3478"), &answer(&id, spoof)),
            Err(Dropped::UnknownSource)
        );
        assert_eq!(
            d.handle(addr("192.0.2.1:3479"), &answer(&id, spoof)),
            Err(Dropped::UnknownSource)
        );
        assert_eq!(d.handle(to, &[4, 0, 0, 0, 1, 2]), Err(Dropped::NotStun));
        let mut bad = answer(&id, spoof);
        let n = bad.len();
        bad[n - 1] ^= 0xff; // FINGERPRINT
        assert_eq!(d.handle(to, &bad), Err(Dropped::Malformed));
        let n = encode_binding_request(&id, None, false, &mut buf).unwrap();
        assert_eq!(d.handle(to, &buf[..n]), Err(Dropped::UnknownTransaction));
        let s = d.stats();
        assert_eq!(
            (
                s.unknown_transaction,
                s.unknown_source,
                s.not_stun,
                s.malformed,
                s.answers
            ),
            (2, 2, 1, 1, 0)
        );
        assert!(d.busy());
        // The real one, from an IPv4-mapped source (dual-stack socket).
        let got = d.handle(
            addr("[::ffff:192.0.2.1]:3478"),
            &answer(&id, "203.0.113.9:1"),
        );
        assert!(matches!(got, Ok(Discovered::Reflexive { .. })));
        assert_eq!(d.results().next().unwrap().1, Some(addr("203.0.113.9:1")));
    }

    #[test]
    fn error_responses_end_the_transaction() {
        let t0 = Instant::now();
        let mut d = Discovery::new(&[addr(S1)], DiscoveryConfig::default()).unwrap();
        let mut buf = [0u8; 64];
        d.start(t0, &mut ids());
        let Output::Transmit { to, len } = d.poll(t0, &mut buf) else {
            panic!()
        };
        let id = sent_id(&buf, len);
        let mut b = [0u8; 64];
        let n = encode_binding_error(&id, 500, "x", &[], false, &mut b).unwrap();
        assert_eq!(
            d.handle(to, &b[..n]),
            Ok(Discovered::Error {
                server: to,
                code: 500
            })
        );
        assert!(!d.busy());
        assert_eq!(d.poll(t0, &mut buf), Output::Wait(None));
    }

    #[test]
    fn outstanding_transactions_are_bounded() {
        let servers: Vec<SocketAddr> = (0..=MAX_SERVERS)
            .map(|i| SocketAddr::new([192, 0, 2, i as u8].into(), 3478))
            .collect();
        assert!(Discovery::new(&servers, DiscoveryConfig::default()).is_err());
        assert!(Discovery::new(&[addr(S1), addr(S1)], DiscoveryConfig::default()).is_err());
        let t0 = Instant::now();
        let mut d = Discovery::new(&servers[..MAX_SERVERS], DiscoveryConfig::default()).unwrap();
        let mut new_id = ids();
        assert_eq!(d.start(t0, &mut new_id), MAX_SERVERS);
        // Starting again while all are outstanding adds nothing.
        for _ in 0..100 {
            assert_eq!(d.start(t0, &mut new_id), 0);
        }
        let mut buf = [0u8; 64];
        let mut n = 0;
        while let Output::Transmit { .. } = d.poll(t0, &mut buf) {
            n += 1;
        }
        assert_eq!(n, MAX_SERVERS);
    }
}
