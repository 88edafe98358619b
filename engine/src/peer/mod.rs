//! One WireGuard peer: boringtun's `Tunn` plus what the protocol core leaves
//! to the device: the endpoint (with roaming), persistent keepalive, the
//! handshake flood guard, and counters.
//!
//! No I/O here. Every call takes the caller's output buffer and returns a
//! [`PeerOutput`] saying what to write where; the runtime does the writing
//! after the peer's lock is released, so no lock is held across a syscall.

mod path;
mod stats;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use parking_lot::Mutex;

pub use path::{relay_endpoint, relay_index, PeerPath};
pub use stats::{DropReason, PeerCounters, PeerStats};

use crate::config::{PeerConfig, PresharedKey, PrivateKey, PublicKey};
use crate::wire::MessageKind;

/// First byte of a cookie reply message.
const COOKIE_REPLY_TYPE: u8 = 3;

/// Initiations from one peer closer together than this are dropped before
/// any cryptography: the kernel's `INITIATIONS_PER_SECOND` (50) flood guard
/// (drivers/net/wireguard/noise.c, `wg_noise_handshake_consume_initiation`).
pub const MIN_INITIATION_INTERVAL: Duration = Duration::from_millis(1000 / 50);

/// The extra room an encrypted datagram needs over its plaintext, and the
/// smallest buffer boringtun accepts (a handshake initiation).
pub const fn output_buffer_len(inner: usize) -> usize {
    let n = inner + crate::wire::message::DATA_OVERHEAD;
    if n < crate::wire::message::HANDSHAKE_INITIATION_LEN {
        crate::wire::message::HANDSHAKE_INITIATION_LEN
    } else {
        n
    }
}

/// What the caller must do with its output buffer after a peer call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerOutput {
    /// Nothing to write.
    Done,
    /// Send `out[..len]` as a UDP datagram to `to`.
    ToNetwork { len: usize, to: SocketAddr },
    /// `out[..len]` is a decrypted IP packet whose source is `src`; the
    /// caller must check `src` against this peer's AllowedIPs.
    ToHost { len: usize, src: IpAddr },
    /// Dropped, and counted on this peer.
    Dropped(DropReason),
}

struct PeerState {
    tunn: Tunn,
    endpoint: Option<SocketAddr>,
    preshared_key: Option<PresharedKey>,
    persistent_keepalive: Option<u16>,
    last_sent: Option<Instant>,
    last_initiation: Option<Instant>,
}

/// A configured peer. Shared between threads; its protocol state sits behind
/// one lock so packets for different peers proceed in parallel.
pub struct Peer {
    public_key: PublicKey,
    /// The 24-bit index boringtun puts in the top of our session indices.
    index: u32,
    state: Mutex<PeerState>,
    counters: PeerCounters,
}

fn new_tunn(
    private_key: &PrivateKey,
    cfg_key: PublicKey,
    psk: Option<&PresharedKey>,
    index: u32,
    limiter: Arc<RateLimiter>,
) -> Tunn {
    // Persistent keepalive is ours (see `update_timers`), so it can change
    // without tearing down the session; boringtun gets `None`.
    Tunn::new(
        private_key.to_x25519(),
        cfg_key.to_x25519(),
        psk.map(|k| *k.as_bytes()),
        None,
        index,
        Some(limiter),
    )
}

impl Peer {
    pub fn new(
        private_key: &PrivateKey,
        cfg: &PeerConfig,
        index: u32,
        limiter: Arc<RateLimiter>,
    ) -> Peer {
        let tunn = new_tunn(
            private_key,
            cfg.public_key,
            cfg.preshared_key.as_ref(),
            index,
            limiter,
        );
        Peer {
            public_key: cfg.public_key,
            index,
            state: Mutex::new(PeerState {
                tunn,
                endpoint: cfg.endpoint,
                preshared_key: cfg.preshared_key.clone(),
                persistent_keepalive: cfg.persistent_keepalive.filter(|&k| k > 0),
                last_sent: None,
                last_initiation: None,
            }),
            counters: PeerCounters::default(),
        }
    }

    pub fn public_key(&self) -> PublicKey {
        self.public_key
    }

    pub fn index(&self) -> u32 {
        self.index
    }

    pub fn counters(&self) -> &PeerCounters {
        &self.counters
    }

    pub fn endpoint(&self) -> Option<SocketAddr> {
        self.state.lock().endpoint
    }

    pub fn set_endpoint(&self, endpoint: SocketAddr) {
        self.state.lock().endpoint = Some(endpoint);
    }

    pub fn persistent_keepalive(&self) -> Option<u16> {
        self.state.lock().persistent_keepalive
    }

    pub fn set_persistent_keepalive(&self, seconds: Option<u16>) {
        self.state.lock().persistent_keepalive = seconds.filter(|&k| k > 0);
    }

    pub fn preshared_key(&self) -> Option<PresharedKey> {
        self.state.lock().preshared_key.clone()
    }

    /// A new preshared key applies to the next handshake; like the kernel,
    /// current sessions are cleared so that one happens now.
    pub fn set_preshared_key(
        &self,
        key: Option<PresharedKey>,
        private_key: &PrivateKey,
        limiter: Arc<RateLimiter>,
    ) {
        let mut st = self.state.lock();
        if st.preshared_key == key {
            return;
        }
        st.tunn = new_tunn(
            private_key,
            self.public_key,
            key.as_ref(),
            self.index,
            limiter,
        );
        st.preshared_key = key;
    }

    /// Our private key changed: sessions are dropped, handshakes restart.
    pub fn set_private_key(&self, private_key: &PrivateKey, limiter: Arc<RateLimiter>) {
        let mut st = self.state.lock();
        let psk = st.preshared_key.clone();
        st.tunn = new_tunn(
            private_key,
            self.public_key,
            psk.as_ref(),
            self.index,
            limiter,
        );
    }

    /// Encrypts one IP packet for this peer into `out` (at least
    /// [`output_buffer_len`] of the packet). Before a session exists the
    /// packet is queued and a handshake initiation is returned instead.
    pub fn encapsulate(&self, packet: &[u8], out: &mut [u8]) -> PeerOutput {
        let mut st = self.state.lock();
        let Some(to) = st.endpoint else {
            drop(st);
            return self.drop_for(DropReason::NoEndpoint);
        };
        let result = match st.tunn.encapsulate(packet, out) {
            TunnResult::WriteToNetwork(d) => {
                st.last_sent = Some(Instant::now());
                PeerOutput::ToNetwork { len: d.len(), to }
            }
            TunnResult::Err(e) => PeerOutput::Dropped(DropReason::from_error(&e)),
            // Queued behind a handshake already in flight.
            _ => PeerOutput::Done,
        };
        drop(st);
        self.account(result, out, packet.len())
    }

    /// Handles one datagram from `src` that framing routed to this peer.
    /// After a `ToNetwork` result for a handshake, call [`Peer::flush_queued`]
    /// until it returns `Done`: packets queued before the session existed
    /// go out then.
    pub fn decapsulate(
        &self,
        src: SocketAddr,
        kind: MessageKind,
        datagram: &[u8],
        out: &mut [u8],
    ) -> PeerOutput {
        // boringtun checks the replay window with `counter + window`, which
        // overflows for counters near 2^64; the kernel refuses those first.
        if kind == MessageKind::Data
            && crate::wire::message::data_counter(datagram)
                .is_some_and(|c| c >= crate::wire::message::REJECT_AFTER_MESSAGES)
        {
            return self.drop_for(DropReason::Replay);
        }
        let mut st = self.state.lock();
        if kind == MessageKind::HandshakeInitiation {
            let now = Instant::now();
            if st
                .last_initiation
                .is_some_and(|t| now.duration_since(t) < MIN_INITIATION_INTERVAL)
            {
                drop(st);
                return self.drop_for(DropReason::HandshakeFlood);
            }
            st.last_initiation = Some(now);
        }
        let result = match st.tunn.decapsulate(Some(src.ip()), datagram, out) {
            TunnResult::WriteToNetwork(d) => {
                st.last_sent = Some(Instant::now());
                PeerOutput::ToNetwork {
                    len: d.len(),
                    to: src,
                }
            }
            TunnResult::WriteToTunnelV4(d, a) => PeerOutput::ToHost {
                len: d.len(),
                src: IpAddr::V4(a),
            },
            TunnResult::WriteToTunnelV6(d, a) => PeerOutput::ToHost {
                len: d.len(),
                src: IpAddr::V6(a),
            },
            TunnResult::Done => PeerOutput::Done,
            TunnResult::Err(e) => PeerOutput::Dropped(DropReason::from_error(&e)),
        };
        // Roaming: only a message that authenticated as this peer moves its
        // endpoint (an initiation or response we answered, or any data
        // message, keepalives included). Cookie replies are not
        // authenticated by the peer's static key and never move it.
        let answered_with_cookie = matches!(result, PeerOutput::ToNetwork { .. })
            && out.first() == Some(&COOKIE_REPLY_TYPE);
        let authenticated = !matches!(result, PeerOutput::Dropped(_))
            && kind != MessageKind::CookieReply
            && !answered_with_cookie;
        if authenticated {
            st.endpoint = Some(src);
        }
        drop(st);
        if authenticated {
            self.counters.received_datagram(kind, datagram.len());
        }
        // A decrypted packet is counted when the runtime delivers it, after
        // the AllowedIPs source check (`Peer::delivered`).
        if let PeerOutput::Dropped(reason) = result {
            self.counters.dropped(reason);
        }
        if let PeerOutput::ToNetwork { len, .. } = result {
            self.counters.sent_datagram(&out[..len], 0);
        }
        result
    }

    /// Sends the next packet queued while the handshake was in flight.
    pub fn flush_queued(&self, out: &mut [u8]) -> PeerOutput {
        let mut st = self.state.lock();
        let Some(to) = st.endpoint else {
            return PeerOutput::Done;
        };
        let result = match st.tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(d) => {
                st.last_sent = Some(Instant::now());
                PeerOutput::ToNetwork { len: d.len(), to }
            }
            _ => PeerOutput::Done,
        };
        drop(st);
        let inner = match result {
            PeerOutput::ToNetwork { len, .. } => len - crate::wire::message::DATA_OVERHEAD,
            _ => 0,
        };
        self.account(result, out, inner)
    }

    /// Drives the protocol timers (rekey, retry, expiry, keepalive). Call
    /// every few hundred milliseconds; repeat while it returns `ToNetwork`.
    pub fn update_timers(&self, now: Instant, out: &mut [u8]) -> PeerOutput {
        let mut st = self.state.lock();
        let endpoint = st.endpoint;
        let mut result = match st.tunn.update_timers(out) {
            TunnResult::WriteToNetwork(d) => match endpoint {
                Some(to) => PeerOutput::ToNetwork { len: d.len(), to },
                None => PeerOutput::Done,
            },
            _ => PeerOutput::Done,
        };
        if result == PeerOutput::Done {
            if let (Some(k), Some(to)) = (st.persistent_keepalive, endpoint) {
                let due = st
                    .last_sent
                    .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(k as u64));
                if due {
                    // An empty packet: a keepalive, or the handshake that
                    // must come before one.
                    if let TunnResult::WriteToNetwork(d) = st.tunn.encapsulate(&[], out) {
                        result = PeerOutput::ToNetwork { len: d.len(), to };
                    }
                }
            }
        }
        if let PeerOutput::ToNetwork { .. } = result {
            st.last_sent = Some(now);
        }
        drop(st);
        self.account(result, out, 0)
    }

    /// Starts a handshake now (if none is in flight).
    pub fn initiate_handshake(&self, out: &mut [u8]) -> PeerOutput {
        self.handshake_to_endpoint(out, false)
    }

    /// Starts a handshake now to the current endpoint, even if one is in
    /// flight (a path change: the one in flight went where nobody answers).
    pub fn force_handshake(&self, out: &mut [u8]) -> PeerOutput {
        self.handshake_to_endpoint(out, true)
    }

    fn handshake_to_endpoint(&self, out: &mut [u8], force: bool) -> PeerOutput {
        let mut st = self.state.lock();
        let Some(to) = st.endpoint else {
            return PeerOutput::Done;
        };
        let result = match st.tunn.format_handshake_initiation(out, force) {
            TunnResult::WriteToNetwork(d) => {
                st.last_sent = Some(Instant::now());
                PeerOutput::ToNetwork { len: d.len(), to }
            }
            _ => PeerOutput::Done,
        };
        drop(st);
        self.account(result, out, 0)
    }

    /// A handshake initiation to try another path with, without moving the
    /// endpoint: the answer comes back over the path the initiation took,
    /// and its authenticating moves the endpoint there (roaming). `None`
    /// while a handshake is in flight. Returns its length in `out`.
    pub fn probe(&self, out: &mut [u8]) -> Option<usize> {
        let mut st = self.state.lock();
        let len = match st.tunn.format_handshake_initiation(out, false) {
            TunnResult::WriteToNetwork(d) => d.len(),
            _ => return None,
        };
        st.last_sent = Some(Instant::now());
        drop(st);
        self.counters.sent_datagram(&out[..len], 0);
        Some(len)
    }

    /// Counts what an outgoing call produced.
    fn account(&self, result: PeerOutput, out: &[u8], inner_len: usize) -> PeerOutput {
        match result {
            PeerOutput::ToNetwork { len, .. } => {
                self.counters.sent_datagram(&out[..len], inner_len)
            }
            PeerOutput::Dropped(reason) => self.counters.dropped(reason),
            _ => {}
        }
        result
    }

    /// A snapshot for `wg show` and the stats APIs.
    pub fn stats(&self) -> PeerStats {
        let st = self.state.lock();
        let (since_handshake, _, _, _, rtt) = st.tunn.stats();
        let endpoint = st.endpoint;
        let keepalive = st.persistent_keepalive;
        drop(st);
        self.counters
            .snapshot(self.public_key, endpoint, since_handshake, rtt, keepalive)
    }

    /// Counts a decrypted packet that passed the source check and reached
    /// its sink.
    pub fn delivered(&self, len: usize) {
        self.counters.received_packet(len);
    }

    pub(crate) fn drop_for(&self, reason: DropReason) -> PeerOutput {
        self.counters.dropped(reason);
        PeerOutput::Dropped(reason)
    }
}
