//! The engine's relay path: a [`RelayTransport`] attached from above (the
//! websocket relay client implements it, in `relay/engine.rs`), and a thread
//! that moves peers between UDP and the relay.
//!
//! ```text
//!   send: Peer -> ToNetwork{to: Endpoint::Relay(key)} --> Transport::send_batch of the RelayTransport
//!                          {to: Endpoint::Udp(addr)}  --> Transport::send_batch of UdpTransport
//!   recv: relay [src key][datagram] -> RelayInbox::deliver -> Device::handle_datagram(from Relay(src key))
//!         (authenticates like any datagram; roaming then points the peer at the relay)
//!   path thread (one per engine, idle until a relay or a peer's candidates
//!   are there), every PATH_TICK, per peer:
//!     on UDP:   2 initiations sent with nothing authenticated received since
//!               (one REKEY_TIMEOUT unanswered) -> endpoint := relay, handshake now
//!     on relay: every probe_interval, a handshake initiation over UDP to the last
//!               UDP endpoint; the answer over UDP moves the peer back (roaming)
//!   (the per-peer sequence is `Device::path_tick`, which the simulation
//!   runs too; here: its logs, counters, and a discovery round on fallback)
//! ```
//!
//! Candidates (from the relay or a control server's map) are probed and
//! paths measured whether or not a relay is attached: two nodes with
//! public addresses and a map reach their direct path without one.
//!
//! Both peers need no coordination: the first datagram that authenticates
//! through the relay moves the other side's endpoint to the relay too. This
//! module knows nothing of websockets: like wireguard-go's `conn.Bind`,
//! which Tailscale's magicsock implements to put DERP behind WireGuard, the
//! relay is one more way to move datagrams.

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use parking_lot::{Mutex, RwLock};

use super::{Engine, EngineError, Net, RxBurst, Shared};
use crate::config::PublicKey;
use crate::device::{Endpoint, PathAction, PathState, ProbeBudget};
use crate::io::udp::UdpTransport;
use crate::io::udp::MAX_DATAGRAM;
use crate::peer::{output_buffer_len, PeerPath};
use crate::relay::protocol::Candidates;
use crate::wg::transport::{Transport, Unsent};

/// How often the path thread looks at the peers.
const PATH_TICK: Duration = Duration::from_millis(250);
/// How often a peer on the relay path is probed over UDP while no relay
/// is attached (an attached one brings its own `probe_interval`).
const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// A way to reach peers by key through a relay: what the engine needs of
/// a relay client. Datagrams go through its [`Transport`] side, to
/// [`Endpoint::Relay`] endpoints (any other endpoint is unsent).
pub trait RelayTransport: Transport + 'static {
    /// True while registered with the relay.
    fn is_up(&self) -> bool;
    /// Our key changed: register again under the new one.
    fn rekeyed(&self);
    /// The host's addresses changed: the session may ride a connection
    /// from an address that is gone, which nothing notices until the
    /// relay's idle timeout. End it and connect again now.
    fn reconnect(&self);
    /// The network may have changed under the session (a direct path was
    /// given up, the host's network changed): check it now and connect
    /// again if it is dead (the websocket client pings with a deadline).
    fn check(&self) {}
    /// Sessions (registrations) so far. A new one means what was sent on
    /// the last may be lost with its connection: candidates are announced
    /// again. Transports that cannot tell return 0.
    fn sessions(&self) -> u64 {
        0
    }
    /// The transport itself, for its owner to look at.
    fn as_any(&self) -> &dyn Any;
}

/// The engine's relay, when one is attached.
#[derive(Default)]
pub(super) struct RelaySlot {
    active: RwLock<Option<Arc<ActiveRelay>>>,
    /// The path policy's state per peer, owned by the path thread (locked
    /// once per tick); `detach_relay` takes it to put peers back on UDP
    /// before it returns.
    paths: Mutex<HashMap<PublicKey, PathState>>,
    /// Datagrams for the relay with no transport or session to take them.
    unsent: AtomicU64,
}

struct ActiveRelay {
    transport: Arc<dyn RelayTransport>,
    probe_interval: Duration,
}

thread_local! {
    /// The relay thread's receive burst (no allocation per datagram).
    static RELAY_RX: std::cell::RefCell<RxBurst> = std::cell::RefCell::new(RxBurst::new());
}

/// What a relay transport sees of the engine: where relayed datagrams go
/// in, and the key to register with. Weak, so a transport never keeps a
/// closed engine alive.
#[derive(Clone)]
pub struct RelayInbox(Weak<Shared>);

impl RelayInbox {
    /// The engine's static secret, `None` while it has none (or is gone).
    pub fn static_secret(&self) -> Option<StaticSecret> {
        self.0.upgrade()?.device.static_secret()
    }

    /// The address the relay sees our session come from: when its IP is
    /// not the last session's, our NAT's public address changed (and with
    /// it our UDP mapping), so discovery runs at once.
    pub fn observed(&self, address: std::net::SocketAddr) {
        if let Some(shared) = self.0.upgrade() {
            shared.relay_observed(address);
        }
    }

    /// A datagram the relay delivered from the client registered as `from`.
    pub fn deliver(&self, from: &PublicKey, datagram: &[u8]) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        if Candidates::is_candidates(datagram) {
            shared.handle_candidates(from, datagram);
            return;
        }
        // Relayed datagrams arrive one at a time: each is its own burst.
        RELAY_RX.with_borrow_mut(|rx| {
            shared.handle_datagram(Instant::now(), Endpoint::Relay(*from), datagram, rx);
            rx.deliver(&shared);
        });
    }
}

impl Shared {
    /// Sends a batch of encrypted datagrams (see [`Transport::send_batch`])
    /// through the transport of `to`'s kind, and counts what it could not
    /// send. Every datagram the engine sends passes here.
    pub(super) fn send_batch(
        &self,
        udp: &UdpTransport,
        batch: &[u8],
        segment: usize,
        to: &Endpoint,
    ) {
        match to {
            Endpoint::Udp(_) => {
                if let Err(Unsent(n)) = udp.send_batch(batch, segment, to) {
                    super::bump(&self.counters.udp_send_errors);
                    self.counters.udp_send_dropped.fetch_add(n as u64, Relaxed);
                }
            }
            Endpoint::Relay(_) => {
                let sent = match self.relay.active.read().as_ref() {
                    Some(r) => r.transport.send_batch(batch, segment, to),
                    None => Err(Unsent::all(batch.len(), segment)),
                };
                if let Err(Unsent(n)) = sent {
                    self.relay.unsent.fetch_add(n as u64, Relaxed);
                }
            }
        }
    }
}

impl Shared {
    /// Asks the attached relay transport to check its session now.
    pub(super) fn check_relay(&self) {
        if let Some(active) = self.relay.active.read().as_ref() {
            active.transport.check();
        }
    }
}

impl Engine {
    /// Where a relay transport hands relayed datagrams in.
    pub fn relay_inbox(&self) -> RelayInbox {
        RelayInbox(Arc::downgrade(&self.shared))
    }

    /// Attaches a relay (replacing an attached one) and lets peers whose
    /// UDP handshakes go unanswered move to it; a peer on it is probed over
    /// UDP every `probe_interval`.
    pub fn attach_relay(
        &self,
        transport: Arc<dyn RelayTransport>,
        probe_interval: Duration,
    ) -> Result<(), EngineError> {
        if self.is_closed() {
            return Err(EngineError::Closed);
        }
        // The engine's path thread picks it up at its next tick.
        *self.shared.relay.active.write() = Some(Arc::new(ActiveRelay {
            transport,
            probe_interval,
        }));
        Ok(())
    }

    /// Detaches the relay; peers on it are back on their last UDP
    /// endpoint when it returns. Returns the transport that was attached.
    /// Idempotent.
    pub fn detach_relay(&self) -> Option<Arc<dyn RelayTransport>> {
        let active = self.shared.relay.active.write().take()?;
        // After any tick in progress (which may still have used the relay).
        back_to_udp(&self.shared, &self.shared.relay.paths.lock());
        Some(active.transport.clone())
    }

    /// The attached relay transport.
    pub fn relay_transport(&self) -> Option<Arc<dyn RelayTransport>> {
        let active = self.shared.relay.active.read().clone()?;
        Some(active.transport.clone())
    }

    /// Datagrams for the relay that no transport or session took.
    pub fn relay_unsent(&self) -> u64 {
        self.shared.relay.unsent.load(Relaxed)
    }
}

/// The engine's path thread (started with the engine): the path policy
/// for every peer while a relay is attached or any peer has candidates
/// (from the relay or a control server's map); idle otherwise.
pub(super) fn path_loop(shared: Arc<Shared>, stop: Receiver<()>) {
    let mut nat = NatTick::default();
    let mut own_key = None;
    let mut had_relay = false;
    let mut out = vec![0u8; output_buffer_len(MAX_DATAGRAM)];
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(PATH_TICK) {
        if shared.closed.load(Relaxed) {
            break;
        }
        let active = shared.relay.active.read().clone();
        let mut paths = shared.relay.paths.lock();
        let peers = &mut *paths;
        let key = shared.device.public_key();
        if let Some(a) = &active {
            if own_key.is_some() && key != own_key {
                // New key: register it (peers' sessions restart anyway).
                a.transport.rekeyed();
            }
        }
        own_key = key;
        if had_relay && active.is_none() {
            back_to_udp(&shared, peers);
        }
        had_relay = active.is_some();
        if active.is_none() && !shared.has_peer_candidates() {
            // Nothing to choose between: no state kept, as before a relay.
            peers.clear();
            continue;
        }
        let relay_up = active.as_ref().is_some_and(|a| a.transport.is_up());
        let probe_interval = active
            .as_ref()
            .map_or(DEFAULT_PROBE_INTERVAL, |a| a.probe_interval);
        let relay = active.as_deref().filter(|_| relay_up);
        // Candidates in (and ours out) first, then the policy per peer.
        nat.exchange(&shared, relay, peers);
        tick(&shared, peers, relay_up, probe_interval, &mut nat, &mut out);
        // One entry per peer: `tick` keeps `peers` to the device's peers.
        shared.nat.inner.lock().paths = peers.iter().map(|(k, st)| (*k, st.summary())).collect();
    }
}

/// The relay went away: peers on it go back to their last UDP endpoint.
fn back_to_udp(shared: &Shared, peers: &HashMap<PublicKey, PathState>) {
    for (key, st) in peers {
        if let (Some(peer), PeerPath::Relay, Some(udp)) = (shared.device.peer(key), st.path, st.udp)
        {
            if peer.endpoint().map(|e| e.path()) == Some(PeerPath::Relay) {
                peer.set_endpoint(Endpoint::Udp(udp));
            }
        }
    }
}

/// One look of the path policy at every peer ([`crate::device::Device::path_tick`],
/// the same per-peer sequence the simulation runs), and what the engine
/// does with what it reports: logs, counters, a discovery round after a
/// fallback.
fn tick(
    shared: &Shared,
    states: &mut HashMap<PublicKey, PathState>,
    relay_up: bool,
    probe_interval: Duration,
    nat: &mut NatTick,
    out: &mut [u8],
) {
    let now = Instant::now();
    let peers = shared.device.peers();
    states.retain(|k, _| peers.iter().any(|p| p.public_key() == *k));
    // Each tick starts at another peer: with the probe budget spent, the
    // same peers do not take it first every second.
    nat.turn = nat.turn.wrapping_add(1);
    let start = if peers.is_empty() {
        0
    } else {
        nat.turn % peers.len()
    };
    let mut net = Net(shared);
    for peer in peers[start..].iter().chain(&peers[..start]) {
        let key = peer.public_key();
        let st = states
            .entry(key)
            .or_insert_with(|| PathState::new(&peer.stats(), now));
        let deferred = nat.budget.deferred;
        let t = shared.device.path_tick(
            now,
            peer,
            st,
            relay_up,
            probe_interval,
            &mut nat.budget,
            out,
            &mut net,
        );
        shared
            .nat
            .deferred
            .fetch_add(nat.budget.deferred - deferred, Relaxed);
        if let Some(path) = t.path_changed {
            tracing::info!(peer = %key, path = path.name(), "peer path changed");
        }
        match t.action {
            PathAction::Stay => {}
            PathAction::ToRelay => {
                tracing::info!(peer = %key, "UDP handshakes unanswered; moving the peer to the relay");
            }
            PathAction::Probe(udp) => {
                if t.probed {
                    tracing::debug!(peer = %key, %udp, "probing UDP");
                }
            }
        }
        if let Some(mv) = t.moved.filter(|m| m.handshake) {
            tracing::debug!(peer = %key, to = ?mv.to, "path chosen by round trip");
        }
        // Perhaps our NAT moved us: learn the new mapping now, and the
        // peer gets it (and probes it) within seconds.
        if t.fell_back {
            shared.nat.fallbacks.fetch_add(1, Relaxed);
            shared.rediscover();
        }
        if t.round_probes > 0 {
            shared.nat.rounds.fetch_add(1, Relaxed);
            shared.nat.probes.fetch_add(t.round_probes as u64, Relaxed);
            tracing::debug!(peer = %key, probes = t.round_probes, "probing candidates");
        }
        if let Some(to) = t.measured {
            shared.nat.probes.fetch_add(1, Relaxed);
            tracing::debug!(peer = %key, ?to, "measuring a path's round trip");
        }
    }
}

/// The path thread's NAT traversal state: when candidates last went to
/// each peer, and the device-wide probe budget.
#[derive(Default)]
struct NatTick {
    budget: ProbeBudget,
    /// Per peer: the generation of our candidates it got last, and when.
    announced: HashMap<PublicKey, (u64, Instant)>,
    answered: HashMap<PublicKey, Instant>,
    /// The relay's session count when we last looked.
    sessions: u64,
    /// Ticks so far: where the round over the peers starts.
    turn: usize,
}

impl NatTick {
    /// The peers' candidates in, ours out. `relay`: the relay, when one
    /// is attached and up (candidates are exchanged through it); rounds
    /// and measurements ([`tick`]) run without one.
    fn exchange(
        &mut self,
        shared: &Shared,
        relay: Option<&ActiveRelay>,
        states: &mut HashMap<PublicKey, PathState>,
    ) {
        let now = Instant::now();
        if let Some(active) = relay {
            let sessions = active.transport.sessions();
            if sessions != self.sessions {
                // A new relay session: announcements sent on the last one may
                // have died with its connection, so every peer gets ours again.
                self.sessions = sessions;
                self.announced.clear();
            }
        }
        let (generation, ours) = shared.nat_candidates();
        let send = |to: &PublicKey| {
            let Some(active) = relay else {
                return;
            };
            let frame = Candidates(ours.clone()).encode();
            if active
                .transport
                .send_batch(&frame, frame.len(), &Endpoint::Relay(*to))
                .is_ok()
            {
                shared.nat.sent.fetch_add(1, Relaxed);
            }
        };
        // Their candidates in; ours back at once, so both sides probe together.
        for (key, list) in shared.take_pending_candidates() {
            let Some(peer) = shared.device.peer(&key) else {
                continue;
            };
            let st = states
                .entry(key)
                .or_insert_with(|| PathState::new(&peer.stats(), now));
            st.set_candidates(&list, now);
            let recent = self
                .answered
                .get(&key)
                .is_some_and(|t| now.saturating_duration_since(*t) < super::nat_path::ANSWER_GAP);
            if relay.is_some() && !ours.is_empty() && !recent {
                self.answered.insert(key, now);
                send(&key);
            }
        }
        let keys = shared.device.peer_keys();
        self.answered.retain(|k, _| keys.contains(k));
        self.announced.retain(|k, _| keys.contains(k));
        if relay.is_some() && !ours.is_empty() {
            // A new peer, new candidates, or ANNOUNCE_INTERVAL since.
            for key in keys {
                let due = self.announced.get(&key).is_none_or(|(g, t)| {
                    *g != generation
                        || now.saturating_duration_since(*t) >= super::nat_path::ANNOUNCE_INTERVAL
                });
                if due {
                    self.announced.insert(key, (generation, now));
                    send(&key);
                }
            }
        }
    }
}
