//! The engine's relay path: a [`RelayClient`] registered under the engine's
//! key, and a thread that moves peers between UDP and the relay.
//!
//! ```text
//!   send: Peer -> ToNetwork{to} --to is [100::index]:0--> RelayClient::send(peer key)
//!                              \--otherwise-----------> UDP
//!   recv: relay [src key][datagram] -> handle_datagram(from [100::index of src]:0)
//!         (authenticates like any datagram; roaming then points the peer at the relay)
//!   path thread, every PATH_TICK, per peer:
//!     on UDP:   2 initiations sent with nothing authenticated received since
//!               (one REKEY_TIMEOUT unanswered) -> endpoint := relay, handshake now
//!     on relay: every probe_interval, a handshake initiation over UDP to the last
//!               UDP endpoint; the answer over UDP moves the peer back (roaming)
//! ```
//!
//! Both peers need no coordination: the first datagram that authenticates
//! through the relay moves the other side's endpoint to the relay too.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use boringtun::x25519::StaticSecret;
use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::{Mutex, RwLock};

use super::{bump, Engine, RxBurst, Shared};
use crate::config::PublicKey;
use crate::io::udp::MAX_DATAGRAM;
use crate::peer::{output_buffer_len, relay_endpoint, relay_index, PeerPath};
use crate::relay::protocol::KEY_LEN;
use crate::relay::{RelayClient, RelayConfig, RelayStatus};
use crate::wire::WireMessage;
use crate::ws::TunnelError;

/// How often the path thread looks at the peers.
const PATH_TICK: Duration = Duration::from_millis(250);
/// Initiations sent without anything authenticated coming back before a
/// peer moves to the relay: the first and its retry after REKEY_TIMEOUT
/// (5 s, WireGuard paper section 6.4).
const UNANSWERED_INITIATIONS: u64 = 2;

/// The engine's relay, when one runs.
#[derive(Default)]
pub(super) struct RelaySlot {
    active: RwLock<Option<Arc<ActiveRelay>>>,
    /// Datagrams for the relay with no client or no session to take them.
    unsent: AtomicU64,
}

struct ActiveRelay {
    client: RelayClient,
    /// Dropped to stop the path thread.
    stop: Mutex<Option<Sender<()>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl ActiveRelay {
    fn stop(&self) {
        self.stop.lock().take();
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

thread_local! {
    /// The relay thread's receive burst (no allocation per datagram).
    static RELAY_RX: std::cell::RefCell<RxBurst> = std::cell::RefCell::new(RxBurst::new());
}

/// What the relay client sees of the engine; weak, so a client never keeps
/// a closed engine alive.
struct EngineSide(Weak<Shared>);

impl crate::relay::RelayOwner for EngineSide {
    fn static_secret(&self) -> Option<StaticSecret> {
        self.0.upgrade()?.identity.read().secret.clone()
    }

    fn deliver(&self, source: &[u8; KEY_LEN], datagram: &[u8]) {
        let Some(shared) = self.0.upgrade() else {
            return;
        };
        let peer = shared
            .peers
            .read()
            .by_key
            .get(&PublicKey::from_bytes(*source))
            .map(|p| p.index());
        let Some(index) = peer else {
            bump(&shared.counters.rx_unknown_peer);
            return;
        };
        // A message for one of our sessions must be for the sender's: the
        // relay's source key is what points replies back through it.
        if let Ok(msg) = WireMessage::new_checked(datagram) {
            if msg.receiver_index.is_some_and(|i| i >> 8 != index) {
                bump(&shared.counters.rx_unknown_index);
                return;
            }
        }
        // Relayed datagrams arrive one at a time: each is its own burst.
        RELAY_RX.with_borrow_mut(|rx| {
            shared.handle_datagram(relay_endpoint(index), datagram, rx);
            rx.deliver(&shared);
        });
    }
}

impl Shared {
    /// Sends one encrypted datagram: over UDP, or through the relay when
    /// `to` is a relay endpoint.
    pub(super) fn send_datagram(&self, datagram: &[u8], to: SocketAddr) {
        match relay_index(to) {
            None => {
                let transport = self.transport.read().clone();
                if transport.send_to(datagram, to).is_err() {
                    bump(&self.counters.udp_send_errors);
                    bump(&self.counters.udp_send_dropped);
                }
            }
            Some(index) => {
                let key = self
                    .peers
                    .read()
                    .by_index
                    .get(&index)
                    .map(|p| p.public_key());
                match key {
                    Some(k) => self.send_relay(&k, datagram),
                    None => bump(&self.relay.unsent),
                }
            }
        }
    }

    /// Sends one encrypted datagram to `peer` through the relay.
    pub(super) fn send_relay(&self, peer: &PublicKey, datagram: &[u8]) {
        let sent = self
            .relay
            .active
            .read()
            .as_ref()
            .is_some_and(|r| r.client.send(peer.as_bytes(), datagram));
        if !sent {
            bump(&self.relay.unsent);
        }
    }
}

impl Engine {
    /// Connects to a relay (replacing a running one) and lets peers whose
    /// UDP handshakes go unanswered move to it. Registration waits until
    /// the engine has a private key; a key change registers again.
    pub fn start_relay(&self, config: RelayConfig) -> Result<(), TunnelError> {
        if self.is_closed() {
            return Err(TunnelError::Config("the engine is closed".into()));
        }
        self.stop_relay();
        let probe = config.probe_interval;
        let client =
            RelayClient::start(config, Arc::new(EngineSide(Arc::downgrade(&self.shared))))?;
        let (stop_tx, stop_rx) = bounded(0);
        let active = Arc::new(ActiveRelay {
            client,
            stop: Mutex::new(Some(stop_tx)),
            thread: Mutex::new(None),
        });
        let shared = Arc::downgrade(&self.shared);
        let thread = std::thread::Builder::new()
            .name("meshvpn-relay-path".into())
            .spawn(move || path_loop(shared, stop_rx, probe))?;
        *active.thread.lock() = Some(thread);
        *self.shared.relay.active.write() = Some(active);
        Ok(())
    }

    /// Disconnects from the relay; peers on it go back to their last UDP
    /// endpoint. Idempotent.
    pub fn stop_relay(&self) {
        let active = self.shared.relay.active.write().take();
        if let Some(a) = active {
            a.stop();
            // `a.client` disconnects when the last reference goes (here).
        }
    }

    /// The relay client's state, when a relay is configured.
    pub fn relay_status(&self) -> Option<RelayStatus> {
        let active = self.shared.relay.active.read().clone()?;
        let mut s = active.client.status();
        s.frames_dropped += self
            .shared
            .relay
            .unsent
            .load(std::sync::atomic::Ordering::Relaxed);
        Some(s)
    }

    /// Waits until the relay client is registered (`true`) or `timeout` passes.
    pub fn wait_relay_connected(&self, timeout: Duration) -> bool {
        let active = self.shared.relay.active.read().clone();
        active.is_some_and(|a| a.client.wait_connected(timeout))
    }
}

/// What the path thread remembers of one peer.
struct PathState {
    /// The last UDP endpoint the peer had: where probes go.
    udp: Option<SocketAddr>,
    path: PeerPath,
    /// Initiations sent when something authenticated last arrived.
    initiations_at_rx: u64,
    rx_bytes: u64,
    last_probe: Instant,
}

fn path_loop(shared: Weak<Shared>, stop: Receiver<()>, probe_interval: Duration) {
    let mut peers: HashMap<PublicKey, PathState> = HashMap::new();
    let mut own_key = None;
    let mut out = vec![0u8; output_buffer_len(MAX_DATAGRAM)];
    while let Err(RecvTimeoutError::Timeout) = stop.recv_timeout(PATH_TICK) {
        let Some(shared) = shared.upgrade() else {
            break;
        };
        let Some(active) = shared.relay.active.read().clone() else {
            continue;
        };
        let key = shared.identity.read().public;
        if own_key.is_some() && key != own_key {
            // New key: register it (peers' sessions restart anyway).
            active.client.reconnect();
        }
        own_key = key;
        let relay_up = active.client.status().connected;
        tick(&shared, &mut peers, relay_up, probe_interval, &mut out);
    }
    // Relay gone: peers on it go back to their last UDP endpoint.
    if let Some(shared) = shared.upgrade() {
        let table = shared.peers.read();
        for (key, st) in &peers {
            if let (Some(peer), PeerPath::Relay, Some(udp)) =
                (table.by_key.get(key), st.path, st.udp)
            {
                if PeerPath::of(peer.endpoint()) == PeerPath::Relay {
                    peer.set_endpoint(udp);
                }
            }
        }
    }
}

fn tick(
    shared: &Shared,
    states: &mut HashMap<PublicKey, PathState>,
    relay_up: bool,
    probe_interval: Duration,
    out: &mut [u8],
) {
    let now = Instant::now();
    let peers: Vec<_> = shared.peers.read().by_key.values().cloned().collect();
    states.retain(|k, _| peers.iter().any(|p| p.public_key() == *k));
    for peer in peers {
        let stats = peer.stats();
        let st = states.entry(peer.public_key()).or_insert(PathState {
            udp: None,
            path: PeerPath::Udp,
            // A peer that never answered: every initiation so far counts
            // (a relay started after the peers waits for no new ones).
            initiations_at_rx: if stats.rx_bytes == 0 {
                0
            } else {
                stats.handshakes_initiated
            },
            rx_bytes: stats.rx_bytes,
            last_probe: now,
        });
        if stats.rx_bytes != st.rx_bytes {
            st.rx_bytes = stats.rx_bytes;
            st.initiations_at_rx = stats.handshakes_initiated;
        }
        if stats.path != st.path {
            tracing::info!(peer = %peer.public_key(), path = stats.path.name(), "peer path changed");
            st.path = stats.path;
            st.initiations_at_rx = stats.handshakes_initiated;
            st.last_probe = now;
        }
        match (stats.path, stats.endpoint) {
            (PeerPath::Udp, Some(udp)) => {
                st.udp = Some(udp);
                let unanswered = stats
                    .handshakes_initiated
                    .saturating_sub(st.initiations_at_rx);
                if relay_up && unanswered >= UNANSWERED_INITIATIONS {
                    tracing::info!(peer = %peer.public_key(), %udp, unanswered, "UDP handshakes unanswered; moving the peer to the relay");
                    peer.set_endpoint(relay_endpoint(peer.index()));
                    st.path = PeerPath::Relay;
                    st.last_probe = now;
                    let r = peer.force_handshake(out);
                    shared.emit(&peer, r, out);
                }
            }
            (PeerPath::Relay, _) => {
                let Some(udp) = st.udp else { continue };
                if now.duration_since(st.last_probe) < probe_interval {
                    continue;
                }
                st.last_probe = now;
                if let Some(len) = peer.probe(out) {
                    tracing::debug!(peer = %peer.public_key(), %udp, "probing UDP");
                    shared.send_datagram(&out[..len], udp);
                }
            }
            (PeerPath::Udp, None) => {}
        }
    }
}
