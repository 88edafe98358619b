//! One WireGuard peer: boringtun's `Tunn` plus what the protocol core leaves
//! to the device: the endpoint (with roaming), persistent keepalive, the
//! handshake flood guard, and counters.
//!
//! No I/O and no clock here. Every call takes the time (`now`) and the
//! caller's output buffer and returns a [`PeerOutput`] saying what to write
//! where; the caller does the writing after the peer's lock is released, so
//! no lock is held across a syscall.

mod budget;
mod path;
mod stats;

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use boringtun::noise::rate_limiter::RateLimiter;
use boringtun::noise::{Tunn, TunnResult};
use parking_lot::Mutex;

pub use budget::{BufferBudget, DEFAULT_BUFFER_LIMIT};
pub use path::{relay_endpoint, relay_index, Endpoint, PeerPath};
pub use stats::{DropReason, PathTraffic, PathUse, PeerCounters, PeerStats};

use crate::config::{PeerConfig, PresharedKey, PrivateKey, PublicKey};
use crate::wire::MessageKind;

/// First byte of a cookie reply message.
const COOKIE_REPLY_TYPE: u8 = 3;

/// Initiations from one peer closer together than this are dropped: the
/// kernel's `INITIATIONS_PER_SECOND` (50) flood guard
/// (drivers/net/wireguard/noise.c, `wg_noise_handshake_consume_initiation`).
/// As there, the interval runs from the last initiation that authenticated
/// as the peer, so one that claims the peer's key and fails to decrypt
/// cannot shut the real peer out (see [`Peer::decapsulate`]).
pub const MIN_INITIATION_INTERVAL: Duration = Duration::from_millis(1000 / 50);

/// Packets boringtun queues per peer behind a handshake (its
/// `MAX_QUEUE_DEPTH`); more are dropped.
pub const HANDSHAKE_QUEUE_PACKETS: usize = 256;

/// How long handshake attempts go on before the peer gives up and its
/// queue is cleared: REKEY_ATTEMPT_TIME in the WireGuard paper, section 6.1.
const REKEY_ATTEMPT_TIME: Duration = Duration::from_secs(90);

/// How long packets wait for the session made by an initiation we answered
/// before we start a handshake of our own. The initiator confirms that
/// session with its first data or keepalive one round trip after our
/// response, so waiting avoids two handshakes crossing: they cost a
/// Diffie-Hellman each and, against wireguard-go, can leave its side with a
/// session it cannot receive on (its two handshake workers race on one
/// peer's state) until its 15-second retry.
pub const CONFIRM_WAIT: Duration = Duration::from_secs(1);

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
    /// Send `out[..len]` as a datagram to `to`.
    ToNetwork { len: usize, to: Endpoint },
    /// `out[..len]` is a decrypted IP packet whose source is `src`; the
    /// caller must check `src` against this peer's AllowedIPs.
    ToHost { len: usize, src: IpAddr },
    /// Dropped, and counted on this peer.
    Dropped(DropReason),
}

struct PeerState {
    /// Created on first use ([`PeerState::tunn`]): an idle configured peer
    /// costs no session table and no Diffie-Hellman, so tens of thousands
    /// of them fit in a few tens of MiB. Boxed: a `Tunn` is 11 KiB, which
    /// an inline `None` would take too.
    tunn: Option<Box<Tunn>>,
    /// What the `Tunn` is made from.
    private_key: PrivateKey,
    limiter: Arc<RateLimiter>,
    endpoint: Option<Endpoint>,
    /// Time on each path kind: the finished stretches (udp, relay) and the
    /// kind of the current one with its start. Updated only when the
    /// endpoint's kind changes (`PeerState::set_endpoint`), never per packet.
    path_time: (Duration, Duration),
    path_since: Option<(PeerPath, Instant)>,
    preshared_key: Option<PresharedKey>,
    persistent_keepalive: Option<u16>,
    last_sent: Option<Instant>,
    /// When our last handshake initiation left (a probe or a handshake to
    /// the endpoint), until a response authenticates.
    initiation_sent: Option<Instant>,
    /// The round trip that response measured and the path it came back
    /// on, until the path policy takes it ([`Peer::take_rtt_sample`]).
    rtt_sample: Option<(Endpoint, Duration)>,
    /// Until then, authenticated packets do not move the endpoint (see
    /// [`Peer::hold_endpoint`]), unless the endpoint has left what we sent
    /// it unanswered for `hold_yield`.
    hold_until: Option<Instant>,
    hold_yield: Duration,
    /// The first datagram sent to the endpoint since something
    /// authenticated last came from it: the endpoint has not answered
    /// since then (a hold yields to the peer's own packets from elsewhere
    /// once that is `hold_yield` old).
    unanswered_since: Option<Instant>,
    /// The endpoint a hold yielded, until the path policy takes it
    /// ([`Peer::take_hold_yield`]).
    hold_yielded: Option<Endpoint>,
    /// When an initiation from the peer last authenticated and was
    /// answered: the start of the [`MIN_INITIATION_INTERVAL`] window.
    last_initiation: Option<Instant>,
    /// When we last answered an initiation while no session was usable:
    /// until the initiator confirms the new session (or [`CONFIRM_WAIT`]
    /// passes), packets are held in `held` rather than starting a second
    /// handshake.
    answered: Option<Instant>,
    /// Packets held meanwhile, charged to `queue`.
    held: VecDeque<Vec<u8>>,
    /// Packets waiting behind a handshake, as charged to `budget`.
    queue: HandshakeQueue,
}

/// What a peer's packets waiting for a session hold of the engine's
/// buffer budget (boringtun keeps the packets; this keeps the count).
#[derive(Default)]
struct HandshakeQueue {
    budget: Option<Arc<BufferBudget>>,
    packets: usize,
    bytes: usize,
    since: Option<Instant>,
}

impl HandshakeQueue {
    /// Charges one packet; false when it must be dropped instead.
    fn admit(&mut self, now: Instant, len: usize) -> bool {
        if self.packets >= HANDSHAKE_QUEUE_PACKETS {
            return false;
        }
        if let Some(b) = &self.budget {
            if !b.try_take(len) {
                return false;
            }
        }
        self.packets += 1;
        self.bytes += len;
        self.since.get_or_insert(now);
        true
    }

    /// The queue was sent or cleared.
    fn release(&mut self) {
        if let Some(b) = &self.budget {
            b.give_back(self.bytes);
        }
        self.packets = 0;
        self.bytes = 0;
        self.since = None;
    }
}

impl Drop for HandshakeQueue {
    fn drop(&mut self) {
        self.release();
    }
}

/// A configured peer. Shared between threads; its protocol state sits behind
/// one lock so packets for different peers proceed in parallel.
pub struct Peer {
    public_key: PublicKey,
    /// The 24-bit index boringtun puts in the top of our session indices.
    index: u32,
    state: Mutex<PeerState>,
    /// True while packets wait for a session (`PeerState::queue` is not
    /// empty); read per received packet without the lock.
    waiting: AtomicBool,
    counters: PeerCounters,
}

impl PeerState {
    /// Every change of the endpoint goes here, so the time on each path
    /// kind adds up: a change of kind closes the current stretch.
    fn set_endpoint(&mut self, endpoint: Endpoint, now: Instant) {
        if self.endpoint != Some(endpoint) {
            self.unanswered_since = None;
        }
        self.endpoint = Some(endpoint);
        let kind = endpoint.path();
        match self.path_since {
            Some((k, _)) if k == kind => {}
            Some((k, since)) => {
                *self.time_on(k) += now.saturating_duration_since(since);
                self.path_since = Some((kind, now));
            }
            None => self.path_since = Some((kind, now)),
        }
    }

    /// A datagram went to the endpoint.
    fn sent_to_endpoint(&mut self, now: Instant) {
        self.last_sent = Some(now);
        self.unanswered_since.get_or_insert(now);
    }

    /// Whether an authenticated datagram of `kind` from `src` moves the
    /// endpoint there. Always, unless a hold is on ([`Peer::hold_endpoint`]);
    /// then only when the hold has nothing left to guard: the endpoint
    /// left what we sent it unanswered for `hold_yield` (a datagram in
    /// flight on a path just left, or the peer following our measurement
    /// for a round trip, is over well within it), and the datagram is the
    /// peer's own (data, a keepalive, its initiation), not the answer to an
    /// initiation of ours (a measurement's answer times its path and says
    /// nothing of where the peer is).
    fn roams_to(&self, src: Endpoint, kind: MessageKind, now: Instant) -> bool {
        if self.hold_until.is_none_or(|t| now >= t) {
            return true;
        }
        self.endpoint != Some(src)
            && kind != MessageKind::HandshakeResponse
            && self
                .unanswered_since
                .is_some_and(|t| now.saturating_duration_since(t) >= self.hold_yield)
    }

    fn time_on(&mut self, kind: PeerPath) -> &mut Duration {
        match kind {
            PeerPath::Udp => &mut self.path_time.0,
            PeerPath::Relay => &mut self.path_time.1,
        }
    }

    /// The protocol state, made now if this is its first use.
    fn tunn(&mut self, public_key: PublicKey, index: u32) -> &mut Tunn {
        let (key, psk, limiter) = (&self.private_key, &self.preshared_key, &self.limiter);
        self.tunn.get_or_insert_with(|| {
            // Persistent keepalive is ours (see `update_timers`), so it can
            // change without tearing down the session; boringtun gets `None`.
            Box::new(Tunn::new(
                key.to_x25519(),
                public_key.to_x25519(),
                psk.as_ref().map(|k| *k.as_bytes()),
                None,
                index,
                Some(limiter.clone()),
            ))
        })
    }
}

impl Peer {
    pub fn new(
        private_key: &PrivateKey,
        cfg: &PeerConfig,
        index: u32,
        limiter: Arc<RateLimiter>,
    ) -> Peer {
        let peer = Peer {
            public_key: cfg.public_key,
            index,
            state: Mutex::new(PeerState {
                tunn: None,
                private_key: private_key.clone(),
                limiter,
                endpoint: None,
                path_time: Default::default(),
                path_since: None,
                preshared_key: cfg.preshared_key.clone(),
                persistent_keepalive: cfg.persistent_keepalive.filter(|&k| k > 0),
                last_sent: None,
                initiation_sent: None,
                rtt_sample: None,
                hold_until: None,
                hold_yield: Duration::ZERO,
                unanswered_since: None,
                hold_yielded: None,
                last_initiation: None,
                answered: None,
                held: VecDeque::new(),
                queue: HandshakeQueue::default(),
            }),
            waiting: AtomicBool::new(false),
            counters: PeerCounters::default(),
        };
        if let Some(a) = cfg.endpoint {
            peer.set_endpoint(Endpoint::from_uapi(a, cfg.public_key));
        }
        peer
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

    pub fn endpoint(&self) -> Option<Endpoint> {
        self.state.lock().endpoint
    }

    /// The endpoint as the UAPI and stats show it (see [`relay_endpoint`]).
    pub fn uapi_endpoint(&self) -> Option<std::net::SocketAddr> {
        self.endpoint().map(|e| e.to_uapi(self.index))
    }

    pub fn set_endpoint(&self, endpoint: Endpoint) {
        self.state.lock().set_endpoint(endpoint, Instant::now());
    }

    /// Bytes and time per path kind, the current stretch counted up to
    /// `now`.
    pub fn path_traffic(&self, now: Instant) -> PathTraffic {
        let st = self.state.lock();
        let (mut udp, mut relay) = st.path_time;
        if let Some((kind, since)) = st.path_since {
            let d = now.saturating_duration_since(since);
            match kind {
                PeerPath::Udp => udp += d,
                PeerPath::Relay => relay += d,
            }
        }
        drop(st);
        self.counters.path_bytes(udp, relay)
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
        self.reset_session(&mut st);
        st.private_key = private_key.clone();
        st.limiter = limiter;
        st.preshared_key = key;
    }

    /// Our private key changed: sessions are dropped, handshakes restart.
    pub fn set_private_key(&self, private_key: &PrivateKey, limiter: Arc<RateLimiter>) {
        let mut st = self.state.lock();
        self.reset_session(&mut st);
        st.private_key = private_key.clone();
        st.limiter = limiter;
    }

    /// Drops the protocol state and every packet waiting for a session.
    fn reset_session(&self, st: &mut PeerState) {
        st.tunn = None;
        st.answered = None;
        self.stop_waiting(st);
    }

    /// No packet waits for a session any more (boringtun's queue is empty
    /// or was cleared by boringtun): the held ones go and the charge ends.
    fn stop_waiting(&self, st: &mut PeerState) {
        st.held.clear();
        st.queue.release();
        self.waiting.store(false, Relaxed);
    }

    /// Charges packets queued behind a handshake to `budget` from now on.
    pub fn set_budget(&self, budget: Arc<BufferBudget>) {
        let mut st = self.state.lock();
        st.queue.release();
        st.queue.budget = Some(budget);
    }

    /// True once the peer's protocol state exists (it is made on first
    /// use: traffic, a handshake, a keepalive).
    pub fn is_active(&self) -> bool {
        self.state.lock().tunn.is_some()
    }

    /// Encrypts one IP packet for this peer into `out` (at least
    /// [`output_buffer_len`] of the packet). Before a session exists the
    /// packet is queued and a handshake initiation is returned instead.
    pub fn encapsulate(&self, now: Instant, packet: &[u8], out: &mut [u8]) -> PeerOutput {
        let mut st = self.state.lock();
        let Some(to) = st.endpoint else {
            drop(st);
            return self.drop_for(DropReason::NoEndpoint);
        };
        let tunn = st.tunn(self.public_key, self.index);
        // Without a session the packet waits: charge it first.
        let no_session = tunn.time_since_last_handshake().is_none();
        if no_session {
            if !st.queue.admit(now, packet.len()) {
                drop(st);
                return self.drop_for(DropReason::SinkFull);
            }
            self.waiting.store(true, Relaxed);
            if st
                .answered
                .is_some_and(|t| now.saturating_duration_since(t) < CONFIRM_WAIT)
            {
                st.held.push_back(packet.to_vec());
                return PeerOutput::Done;
            }
        }
        let result = match st
            .tunn(self.public_key, self.index)
            .encapsulate(packet, out)
        {
            TunnResult::WriteToNetwork(d) => {
                st.sent_to_endpoint(now);
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
    /// Then, when [`Peer::should_flush`] says so, call
    /// [`Peer::flush_queued`] until it returns `Done`: packets that waited
    /// for a session go out then.
    pub fn decapsulate(
        &self,
        now: Instant,
        src: Endpoint,
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
        // The flood window is only read here; it moves below, once boringtun
        // has authenticated the initiation. The kernel checks and sets it
        // only after the initiation's timestamp decrypted
        // (`wg_noise_handshake_consume_initiation`): moved by any message
        // naming the peer, forgeries every 20 ms (the peer's public key is
        // all they need) kept the real peer's initiations inside it. An
        // initiation inside the window of an authenticated one would be
        // refused after decrypting too, so refusing it first only saves the
        // Diffie-Hellman; forgeries themselves are capped engine-wide by
        // the rate limiter and cookies before they reach a peer.
        if kind == MessageKind::HandshakeInitiation
            && st
                .last_initiation
                .is_some_and(|t| now.saturating_duration_since(t) < MIN_INITIATION_INTERVAL)
        {
            drop(st);
            return self.drop_for(DropReason::HandshakeFlood);
        }
        // Only a handshake makes a session: data or a cookie for a peer
        // never used is answered by nothing (and allocates nothing).
        if st.tunn.is_none() && kind != MessageKind::HandshakeInitiation {
            drop(st);
            return self.drop_for(DropReason::NoSession);
        }
        let tunn = st.tunn(self.public_key, self.index);
        let result = match tunn.decapsulate(Some(src.cookie_addr()), datagram, out) {
            TunnResult::WriteToNetwork(d) => {
                st.last_sent = Some(now);
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
            if st.roams_to(src, kind, now) {
                if st.hold_until.take().is_some_and(|t| now < t) {
                    // The endpoint stopped answering while the peer talks
                    // from elsewhere: the policy follows it too.
                    st.hold_yielded = st.endpoint;
                }
                st.set_endpoint(src, now);
            }
            if st.endpoint == Some(src) {
                st.unanswered_since = None;
            }
            // Our simulated-clock-free RTT: boringtun's own handshake RTT
            // reads the real clock, so the sans-IO path policy measures
            // from `now` here, per path the response came back on.
            if kind == MessageKind::HandshakeResponse {
                if let Some(sent) = st.initiation_sent.take() {
                    st.rtt_sample = Some((src, now.saturating_duration_since(sent)));
                }
            }
            if kind == MessageKind::HandshakeInitiation {
                st.last_initiation = Some(now);
            }
        }
        // An answered initiation is remembered until a session is usable
        // (checked only then: not per data packet in steady state).
        if kind == MessageKind::HandshakeInitiation || st.answered.is_some() {
            let usable = st
                .tunn
                .as_ref()
                .is_some_and(|t| t.time_since_last_handshake().is_some());
            if usable {
                st.answered = None;
            } else if kind == MessageKind::HandshakeInitiation
                && authenticated
                && matches!(result, PeerOutput::ToNetwork { .. })
            {
                st.answered = Some(now);
            }
        }
        drop(st);
        if authenticated {
            self.counters
                .received_datagram(kind, datagram.len(), src.path());
        }
        // A decrypted packet is counted when the runtime delivers it, after
        // the AllowedIPs source check (`Peer::delivered`).
        if let PeerOutput::Dropped(reason) = result {
            self.counters.dropped(reason);
        }
        if let PeerOutput::ToNetwork { len, to } = result {
            self.counters.sent_datagram(&out[..len], 0, to.path());
        }
        result
    }

    /// True while packets wait for a session.
    pub fn is_waiting(&self) -> bool {
        self.waiting.load(Relaxed)
    }

    /// Whether, after [`Peer::decapsulate`] returned `result` for a `kind`
    /// message, packets that waited may go ([`Peer::flush_queued`] until
    /// `Done`): a handshake message was answered or completed one, or the
    /// peer's data may have confirmed a session we answered.
    pub fn should_flush(&self, kind: MessageKind, result: PeerOutput) -> bool {
        match kind {
            MessageKind::Data => self.is_waiting() && !matches!(result, PeerOutput::Dropped(_)),
            _ => matches!(result, PeerOutput::ToNetwork { .. }),
        }
    }

    /// Sends the next packet that waited for a session: queued behind a
    /// handshake of ours, or held for one we answered. `out` must hold
    /// [`output_buffer_len`] of the largest packet.
    pub fn flush_queued(&self, now: Instant, out: &mut [u8]) -> PeerOutput {
        let mut st = self.state.lock();
        let Some(to) = st.endpoint else {
            return PeerOutput::Done;
        };
        let st = &mut *st;
        let Some(tunn) = st.tunn.as_mut() else {
            return PeerOutput::Done;
        };
        // Without a session nothing can go; asking boringtun anyway would
        // start another handshake across the ones in flight.
        if tunn.time_since_last_handshake().is_none() {
            return PeerOutput::Done;
        }
        // boringtun's queue holds the older packets: it goes first.
        let sent = match tunn.decapsulate(None, &[], out) {
            TunnResult::WriteToNetwork(d) => Some(d.len()),
            _ => st
                .held
                .pop_front()
                .and_then(|packet| match tunn.encapsulate(&packet, out) {
                    TunnResult::WriteToNetwork(d) => Some(d.len()),
                    _ => None,
                }),
        };
        let result = match sent {
            Some(len) => {
                st.sent_to_endpoint(now);
                PeerOutput::ToNetwork { len, to }
            }
            None => {
                self.stop_waiting(st);
                PeerOutput::Done
            }
        };
        let inner = match result {
            PeerOutput::ToNetwork { len, .. } => len - crate::wire::message::DATA_OVERHEAD,
            _ => 0,
        };
        self.account(result, out, inner)
    }

    /// When the initiator did not confirm the session we answered within
    /// [`CONFIRM_WAIT`], the packets that waited for it join boringtun's
    /// queue and our own handshake starts (unless one is in flight). Returns
    /// its initiation.
    fn after_unconfirmed_answer(
        &self,
        st: &mut PeerState,
        now: Instant,
        out: &mut [u8],
    ) -> PeerOutput {
        match st.answered {
            Some(t) if now.saturating_duration_since(t) >= CONFIRM_WAIT => st.answered = None,
            _ => return PeerOutput::Done,
        }
        let (Some(to), Some(tunn)) = (st.endpoint, st.tunn.as_mut()) else {
            return PeerOutput::Done;
        };
        if tunn.time_since_last_handshake().is_some() || !self.is_waiting() {
            return PeerOutput::Done;
        }
        let mut initiation = None;
        // Only the first can start a handshake; the rest queue behind it.
        for packet in st.held.drain(..) {
            if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&packet, out) {
                initiation.get_or_insert(d.len());
            }
        }
        if initiation.is_none() {
            if let TunnResult::WriteToNetwork(d) = tunn.format_handshake_initiation(out, false) {
                initiation = Some(d.len());
            }
        }
        match initiation {
            Some(len) => PeerOutput::ToNetwork { len, to },
            None => PeerOutput::Done,
        }
    }

    /// Drives the protocol timers (rekey, retry, expiry, keepalive). Call
    /// every few hundred milliseconds; repeat while it returns `ToNetwork`.
    pub fn update_timers(&self, now: Instant, out: &mut [u8]) -> PeerOutput {
        let mut st = self.state.lock();
        if let r @ PeerOutput::ToNetwork { .. } = self.after_unconfirmed_answer(&mut st, now, out) {
            st.sent_to_endpoint(now);
            drop(st);
            return self.account(r, out, 0);
        }
        let endpoint = st.endpoint;
        // A peer never used has no timers to run.
        let timers = st.tunn.as_mut().map(|t| t.update_timers(out));
        // boringtun clears its queue when handshake attempts time out.
        if st
            .queue
            .since
            .is_some_and(|t| now.saturating_duration_since(t) > REKEY_ATTEMPT_TIME)
        {
            self.stop_waiting(&mut st);
        }
        let mut result = match timers {
            Some(TunnResult::WriteToNetwork(d)) => match endpoint {
                Some(to) => PeerOutput::ToNetwork { len: d.len(), to },
                None => PeerOutput::Done,
            },
            _ => PeerOutput::Done,
        };
        if result == PeerOutput::Done {
            if let (Some(k), Some(to)) = (st.persistent_keepalive, endpoint) {
                let due = st.last_sent.is_none_or(|t| {
                    now.saturating_duration_since(t) >= Duration::from_secs(k as u64)
                });
                if due {
                    // An empty packet: a keepalive, or the handshake that
                    // must come before one.
                    let tunn = st.tunn(self.public_key, self.index);
                    if let TunnResult::WriteToNetwork(d) = tunn.encapsulate(&[], out) {
                        result = PeerOutput::ToNetwork { len: d.len(), to };
                    }
                }
            }
        }
        if let PeerOutput::ToNetwork { .. } = result {
            st.sent_to_endpoint(now);
        }
        drop(st);
        self.account(result, out, 0)
    }

    /// Starts a handshake now (if none is in flight).
    pub fn initiate_handshake(&self, now: Instant, out: &mut [u8]) -> PeerOutput {
        self.handshake_to_endpoint(now, out, false)
    }

    /// Starts a handshake now to the current endpoint, even if one is in
    /// flight (a path change: the one in flight went where nobody answers).
    pub fn force_handshake(&self, now: Instant, out: &mut [u8]) -> PeerOutput {
        self.handshake_to_endpoint(now, out, true)
    }

    fn handshake_to_endpoint(&self, now: Instant, out: &mut [u8], force: bool) -> PeerOutput {
        let mut st = self.state.lock();
        let Some(to) = st.endpoint else {
            return PeerOutput::Done;
        };
        let tunn = st.tunn(self.public_key, self.index);
        let result = match tunn.format_handshake_initiation(out, force) {
            TunnResult::WriteToNetwork(d) => {
                st.sent_to_endpoint(now);
                st.initiation_sent = Some(now);
                PeerOutput::ToNetwork { len: d.len(), to }
            }
            _ => PeerOutput::Done,
        };
        drop(st);
        self.account(result, out, 0)
    }

    /// A handshake initiation to try another path with, without moving the
    /// endpoint: the answer comes back over the path the initiation took,
    /// and its authenticating moves the endpoint there (roaming). Sent even
    /// while a handshake is in flight: that one may be stuck on the path
    /// being left (a relay session that died when our address changed is
    /// retried for REKEY_ATTEMPT_TIME, 90 s); boringtun keeps it as the
    /// previous initiation, so its answer still completes. `None` only when
    /// no initiation can be made. Returns its length in `out`.
    /// `path` is the kind of path it goes out on, for the byte counts: one
    /// initiation is counted once, as `tx_bytes` counts it, however many
    /// candidates the caller sends copies to.
    pub fn probe(&self, now: Instant, out: &mut [u8], path: PeerPath) -> Option<usize> {
        let mut st = self.state.lock();
        let tunn = st.tunn(self.public_key, self.index);
        let len = match tunn.format_handshake_initiation(out, true) {
            TunnResult::WriteToNetwork(d) => d.len(),
            _ => return None,
        };
        st.last_sent = Some(now);
        st.initiation_sent = Some(now);
        drop(st);
        self.counters.sent_datagram(&out[..len], 0, path);
        Some(len)
    }

    /// Counts what an outgoing call produced.
    fn account(&self, result: PeerOutput, out: &[u8], inner_len: usize) -> PeerOutput {
        match result {
            PeerOutput::ToNetwork { len, to } => {
                self.counters
                    .sent_datagram(&out[..len], inner_len, to.path())
            }
            PeerOutput::Dropped(reason) => self.counters.dropped(reason),
            _ => {}
        }
        result
    }

    /// Keeps the endpoint where it is until `until`, whatever path
    /// authenticated packets come from: the path policy measuring another
    /// path, or datagrams still in flight on a path it just left, must not
    /// move the peer by roaming (`device::PathState::hold_until`).
    ///
    /// The hold yields once the endpoint has left what we sent it
    /// unanswered for `yield_after` while the peer's own packets come from
    /// elsewhere (see `PeerState::roams_to`): then it guards nothing but a
    /// dead path (the peer's NAT took a new address and the peer moved to
    /// the relay). The endpoint left is kept for [`Peer::take_hold_yield`].
    pub fn hold_endpoint(&self, until: Option<Instant>, yield_after: Duration) {
        let mut st = self.state.lock();
        st.hold_until = until;
        st.hold_yield = yield_after;
    }

    /// The endpoint a hold yielded since the last call (it had stopped
    /// answering and the peer's packets moved the endpoint elsewhere);
    /// taken once (`device::PathState::hold_yielded`).
    pub fn take_hold_yield(&self) -> Option<Endpoint> {
        self.state.lock().hold_yielded.take()
    }

    /// The round trip of the last handshake we initiated that completed,
    /// and the path its response came back on; taken once (see
    /// `device::PathState::observe_rtt`).
    pub fn take_rtt_sample(&self) -> Option<(Endpoint, Duration)> {
        self.state.lock().rtt_sample.take()
    }

    /// A snapshot for `wg show` and the stats APIs.
    pub fn stats(&self) -> PeerStats {
        let st = self.state.lock();
        let (since_handshake, rtt) = match &st.tunn {
            Some(t) => {
                let (since, _, _, _, rtt) = t.stats();
                (since, rtt)
            }
            None => (None, None),
        };
        let endpoint = st.endpoint.map(|e| e.to_uapi(self.index));
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
