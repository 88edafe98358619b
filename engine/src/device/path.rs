//! The path policy, as a pure function of one peer's state: when a peer
//! moves from UDP to the relay, and when it is probed back over UDP.
//!
//! ```text
//!   on UDP:   UNANSWERED_INITIATIONS initiations sent with nothing
//!             authenticated received since (one REKEY_TIMEOUT unanswered)
//!             -> ToRelay (endpoint := relay, handshake now)
//!   on relay: every probe_interval -> Probe(last UDP endpoint): a handshake
//!             initiation over UDP whose answer moves the peer back (roaming)
//!   liveness: on UDP, sending data and nothing received for LIVENESS_QUIET
//!             -> Probe(the path itself); LIVENESS_MISSES unanswered in a
//!             row (LIVENESS_TIMEOUT each) -> ToRelay, or without a relay
//!             the candidates are probed again
//! ```
//!
//! NAT traversal adds the peer's **candidates** (UDP addresses it sent
//! through the relay, see `relay::protocol::Candidates`). While the peer is
//! not on a direct path, [`PathState::candidate_round`] asks for probing
//! rounds: ONE handshake initiation sent to every candidate at once
//! ([`super::Device::probe_many`]), so the first authenticated answer from
//! any of them moves the peer there (the roaming rule: WireGuard's own
//! authenticated packets are the proof, as in Tailscale's magicsock).
//!
//! ```text
//!   candidates arrive -> rounds at +0, +1, +2, +4, +8 s (PROBE_BURST_ROUNDS),
//!                        then every REPROBE_INTERVAL while not direct
//!   direct path fails (ToRelay) -> next round after FLAP_HOLDDOWN << flaps,
//!                        flaps counting fallbacks of paths that lived less
//!                        than STABLE_DIRECT (hysteresis: a flaky path is
//!                        tried ever more rarely, never more than every 80 s)
//!   every round: only to candidates and the last UDP endpoint, at most
//!                MAX_CANDIDATES + 1 datagrams, within the device-wide
//!                ProbeBudget (PROBES_PER_SECOND in any second; rounds and
//!                measurements leave LIVENESS_RESERVE_PERCENT of it to the
//!                liveness probes, which are charged to it too)
//! ```
//!
//! [`Device::path_tick`] runs the whole sequence for one peer; the
//! engine's path thread and the simulation both call it.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Device, DeviceIo};
use crate::config::PublicKey;
use crate::peer::{Endpoint, Peer, PeerPath, PeerStats};
use crate::relay::protocol::{Candidates, MAX_CANDIDATES};

/// The second probing round after candidates arrive; each later round of
/// the burst waits twice as long.
pub const PROBE_FIRST_RETRY: Duration = Duration::from_secs(1);
/// Rounds in a burst (at +0, +1, +2, +4, +8 s): enough to meet the other
/// side's rounds when both NATs filter until each has sent.
pub const PROBE_BURST_ROUNDS: u32 = 5;
/// Between rounds once a burst is over, while the peer is not direct: a
/// peer on the relay upgrades when the NAT situation changes.
pub const REPROBE_INTERVAL: Duration = Duration::from_secs(30);
/// A new burst starts at most this often per peer, however often its
/// candidates arrive (a peer cannot make us probe faster by resending).
pub const MIN_BURST_GAP: Duration = Duration::from_secs(10);
/// After a direct path failed, the wait before probing again, doubled for
/// each recent failure ([`STABLE_DIRECT`]), up to `<< MAX_FLAP_SHIFT`.
pub const FLAP_HOLDDOWN: Duration = Duration::from_secs(5);
pub const MAX_FLAP_SHIFT: u32 = 4;
/// A direct path that lasted this long was no flap: the holddown resets.
pub const STABLE_DIRECT: Duration = Duration::from_secs(60);
/// Probe datagrams per second the whole device sends, all peers together:
/// probing rounds, measurements and liveness probes (beyond it a probe
/// waits for the next second).
pub const PROBES_PER_SECOND: u32 = 200;
/// The share of [`PROBES_PER_SECOND`] (in percent) that only liveness
/// probes may use: rounds and measurements never take it, so however many
/// peers probe candidates, a path that carries data now is still checked.
/// Liveness probes may use the whole allowance.
pub const LIVENESS_RESERVE_PERCENT: u32 = 25;

/// The device-wide bound on probe datagrams: at most `per_second` in ANY
/// second (a sliding window: a log of the last second's takes, at most
/// `per_second` entries since each takes one datagram or more; a fixed
/// window would let twice the allowance through across its edge), with a
/// reserve only liveness probes reach ([`LIVENESS_RESERVE_PERCENT`]).
#[derive(Debug, Clone)]
pub struct ProbeBudget {
    per_second: u32,
    /// Takes of the last second: when, and how many datagrams.
    log: VecDeque<(Instant, u32)>,
    used: u32,
    /// Probes (rounds, measurements, liveness probes) put off because the
    /// last second's allowance was spent.
    pub deferred: u64,
}

impl ProbeBudget {
    pub fn new(per_second: u32) -> ProbeBudget {
        ProbeBudget {
            per_second,
            log: VecDeque::new(),
            used: 0,
            deferred: 0,
        }
    }

    /// Takes `n` datagrams of a probing round or a measurement from the
    /// last second's allowance less the liveness reserve, all or none.
    pub fn take(&mut self, now: Instant, n: u32) -> bool {
        let reserve = self.per_second * LIVENESS_RESERVE_PERCENT / 100;
        self.take_up_to(now, n, self.per_second - reserve)
    }

    /// Takes one liveness probe from the last second's whole allowance.
    ///
    /// Liveness before candidates: a liveness probe checks a path that
    /// carries the peer's data now (while it is dark, data is lost until
    /// the path is given up), and costs one datagram; a probing round
    /// looks for a better path for a peer that has one (the relay), costs
    /// up to `MAX_CANDIDATES + 1` datagrams and is retried on its own
    /// schedule anyway.
    pub fn take_liveness(&mut self, now: Instant) -> bool {
        self.take_up_to(now, 1, self.per_second)
    }

    fn take_up_to(&mut self, now: Instant, n: u32, limit: u32) -> bool {
        while let Some(&(t, k)) = self.log.front() {
            if now.saturating_duration_since(t) < Duration::from_secs(1) {
                break;
            }
            self.log.pop_front();
            self.used -= k;
        }
        if n == 0 || self.used.saturating_add(n) > limit {
            self.deferred += u64::from(n > 0);
            return n == 0;
        }
        self.used += n;
        self.log.push_back((now, n));
        true
    }
}

impl Default for ProbeBudget {
    fn default() -> Self {
        ProbeBudget::new(PROBES_PER_SECOND)
    }
}

/// While the peer is on a path it has candidates besides, one
/// measurement probe (a handshake initiation to ONE other path, so its
/// answer times that path alone) goes out this often, in turn to the
/// current path, each candidate and the relay.
pub const MEASURE_GAP: Duration = Duration::from_secs(10);
/// A measurement unanswered this long marks its path as not working (the
/// handshake's own REKEY_TIMEOUT).
pub const MEASURE_TIMEOUT: Duration = Duration::from_secs(5);
/// A round trip older than this is forgotten (a path not measured again
/// is no longer compared).
pub const RTT_MAX_AGE: Duration = Duration::from_secs(120);
/// Hysteresis: another path must be faster by this share of the current
/// path's round trip (and at least [`SWITCH_MARGIN_MIN`]) ...
pub const SWITCH_MARGIN_PERCENT: u32 = 10;
pub const SWITCH_MARGIN_MIN: Duration = Duration::from_millis(2);
/// ... and stay so for this long, confirmed by a second measurement of it,
/// before the peer moves (Tailscale's magicsock likewise keeps a chosen address for a
/// trust time and moves only to a clearly better one, `betterAddr`).
pub const SWITCH_DWELL: Duration = Duration::from_secs(20);
/// After the policy moves the peer (or measures a path), how long a move
/// back to a path it knows is taken for datagrams still in flight there.
pub const SETTLE: Duration = Duration::from_secs(2);
/// A hold on the endpoint (a measurement out, [`SETTLE`]) yields to the
/// peer's own authenticated packets from another path once the endpoint
/// has left what we sent it unanswered this long: the round trip the
/// liveness check allows a path ([`LIVENESS_TIMEOUT`]). The hold guards
/// against datagrams of a round trip or so (in flight on a path just left,
/// or sent by the peer after our measurement moved it); past that it only
/// keeps us sending to a dead path (`crate::peer::Peer::hold_endpoint`).
pub const HOLD_YIELD: Duration = LIVENESS_TIMEOUT;
/// Paths with a round trip remembered per peer: the candidates, the last
/// UDP endpoint and the relay.
const MAX_TIMED_PATHS: usize = MAX_CANDIDATES + 2;

/// Initiations sent without anything authenticated coming back before a
/// peer moves to the relay: the first and its retry after REKEY_TIMEOUT
/// (5 s, WireGuard paper section 6.4).
pub const UNANSWERED_INITIATIONS: u64 = 2;

/// Liveness of the direct path while traffic flows: nothing authenticated
/// received for this long while we keep sending on it, and the path is
/// probed (one handshake initiation to it) ...
pub const LIVENESS_QUIET: Duration = Duration::from_secs(3);
/// ... a probe unanswered this long is one miss, and the next probe goes
/// at once ...
pub const LIVENESS_TIMEOUT: Duration = Duration::from_secs(1);
/// ... and this many misses in a row (anything authenticated received
/// resets them: one lost probe is not death) give the path up: to the
/// relay if one is up, otherwise back to probing the candidates. About
/// 6 s from the last datagram received, as Tailscale's magicsock trusts
/// a path for 6.5 s after its last pong; WireGuard's own timers take 15
/// to 20 s.
pub const LIVENESS_MISSES: u32 = 3;

/// What the policy asks for one peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathAction {
    Stay,
    /// Move the peer to the relay and start a handshake there.
    ToRelay,
    /// Send a handshake initiation to this UDP endpoint, endpoint unchanged.
    Probe(SocketAddr),
}

/// What the policy remembers of one peer.
#[derive(Debug, Clone)]
pub struct PathState {
    /// The last UDP endpoint the peer had: where probes go.
    pub udp: Option<SocketAddr>,
    pub path: PeerPath,
    /// Initiations sent when something authenticated last arrived.
    initiations_at_rx: u64,
    rx_bytes: u64,
    last_probe: Instant,
    /// The peer's NAT-traversal candidates (usable, distinct, bounded).
    candidates: Vec<SocketAddr>,
    next_round: Option<Instant>,
    /// Rounds of the current burst so far.
    rounds: u32,
    burst_started: Option<Instant>,
    /// Recent fallbacks of short-lived direct paths (hysteresis).
    flaps: u32,
    direct_since: Option<Instant>,
    /// Probing rounds sent and the datagrams they took.
    pub probe_rounds: u64,
    pub probes_sent: u64,
    /// Times a direct path was given up for the relay.
    pub fallbacks: u64,
    /// When anything authenticated last arrived, our data bytes sent, and
    /// when they last moved (the liveness check runs while we send data
    /// and hear nothing).
    rx_at: Instant,
    tx_bytes: u64,
    tx_at: Option<Instant>,
    /// The liveness probe in flight, when it left; misses in a row.
    alive_probe: Option<Instant>,
    alive_misses: u32,
    /// Liveness probes sent (also in `probes_sent`), and those sent since
    /// something authenticated last arrived (not the path's own
    /// unanswered initiations).
    pub liveness_probes: u64,
    liveness_at_rx: u64,
    /// No relay was up when the direct path died: it is probed again with
    /// the candidates, as if not direct, until something arrives.
    direct_dead: bool,
    /// The last round trip measured per path (`None`: its measurement went
    /// unanswered), and when.
    rtts: Vec<(Endpoint, Option<Duration>, Instant)>,
    /// The path the policy chose: where the peer is put back after a
    /// measurement moved it (roaming) to a path that is not better.
    chosen: Option<Endpoint>,
    /// The relay was chosen for its round trip, not as a fallback: no
    /// candidate rounds then, measurements instead.
    relay_by_rtt: bool,
    /// The measurement in flight: its path and when it left.
    measuring: Option<(Endpoint, Instant)>,
    /// The path the last answered measurement timed, and when.
    measured: Option<(Endpoint, Instant)>,
    next_measure: Option<Instant>,
    cursor: usize,
    /// A path better than the chosen one by the margin, since when.
    better: Option<(Endpoint, Instant)>,
    /// Measurement probes sent (also in `probes_sent`), and those sent
    /// since something authenticated last arrived (they do not count as
    /// unanswered initiations of the current path).
    pub measures_sent: u64,
    measures_at_rx: u64,
    /// Times the policy moved the peer for a lower round trip.
    pub rtt_switches: u64,
    /// This side measures and chooses; the other follows (roaming).
    controlling: bool,
    /// Until then, a move to a path the policy knows is datagrams still
    /// in flight on a path just left or measured: the peer is put back.
    settle_until: Option<Instant>,
    /// A measurement of another path was answered: the other side, moved
    /// there by our initiation, must be called back to the chosen path.
    recall: bool,
}

/// One peer's path policy as status pages show it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PathSummary {
    /// The path chosen (`None` until the peer has one).
    pub chosen: Option<Endpoint>,
    /// The peer's candidates as last received.
    pub candidates: Vec<SocketAddr>,
    /// Probe datagrams sent (rounds and measurements), rounds, measurements.
    pub probes_sent: u64,
    pub probe_rounds: u64,
    pub measures_sent: u64,
    /// Moves for a lower round trip; direct paths given up for the relay.
    pub rtt_switches: u64,
    pub fallbacks: u64,
    /// The last round trip per path (`None`: its measurement went unanswered).
    pub rtts: Vec<(Endpoint, Option<Duration>)>,
}

/// A move [`PathState::choose`] asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathMove {
    pub to: Endpoint,
    /// Start a handshake there (`Device::switch_path`): the other side
    /// must see an authenticated packet from the path to move too.
    /// Otherwise only our endpoint goes back (`Peer::set_endpoint`).
    pub handshake: bool,
}

impl PathState {
    pub fn new(stats: &PeerStats, now: Instant) -> PathState {
        PathState {
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
            candidates: Vec::new(),
            next_round: None,
            rounds: 0,
            burst_started: None,
            flaps: 0,
            direct_since: None,
            probe_rounds: 0,
            probes_sent: 0,
            fallbacks: 0,
            rx_at: now,
            tx_bytes: stats.tx_inner_bytes,
            tx_at: None,
            alive_probe: None,
            alive_misses: 0,
            liveness_probes: 0,
            liveness_at_rx: 0,
            direct_dead: false,
            rtts: Vec::new(),
            chosen: None,
            relay_by_rtt: false,
            measuring: None,
            measured: None,
            next_measure: None,
            cursor: 0,
            better: None,
            measures_sent: 0,
            measures_at_rx: 0,
            rtt_switches: 0,
            controlling: true,
            settle_until: None,
            recall: false,
        }
    }

    /// Until when the peer's endpoint must not roam ([`crate::peer::Peer::hold_endpoint`]):
    /// while a measurement is out and for [`SETTLE`] after the policy moved
    /// the peer. `None` on the side that follows.
    pub fn hold_until(&self) -> Option<Instant> {
        self.settle_until.filter(|_| self.controlling)
    }

    /// The peer's endpoint left `left` although a hold was on
    /// ([`crate::peer::Peer::take_hold_yield`]): `left` had stopped
    /// answering while the peer's own packets came from another path (its
    /// NAT took a new address, and it gave the dead path up for the
    /// relay). The policy follows: no settling back onto `left`, the
    /// measurement in flight is moot (its path is not where the peer is),
    /// and `left` is timed as unanswered, so [`PathState::choose`] does not
    /// return to it by its last good round trip (until the peer roams back
    /// onto it, which forgets the verdict).
    pub fn hold_yielded(&mut self, left: Endpoint, now: Instant) {
        self.settle_until = None;
        self.measuring = None;
        self.measured = None;
        self.alive_probe = None;
        self.alive_misses = 0;
        self.record(left, None, now);
    }

    /// A path the policy times: a candidate, the last UDP endpoint, the relay.
    fn known(&self, path: &Endpoint) -> bool {
        match path {
            Endpoint::Relay(_) => true,
            Endpoint::Udp(a) => self.candidates.contains(a) || self.udp == Some(*a),
        }
    }

    /// Which side of the pair chooses the path by round trip: the one with
    /// the lower public key (ICE's controlling agent, RFC 8445 section
    /// 6.1.1, nominates; here by key order, which both sides know without
    /// a message). The other side measures nothing and follows where the
    /// chooser's authenticated packets come from (roaming), so the two
    /// never pull the peer apart. Both sides keep the fallback to the relay.
    pub fn set_role(&mut self, ours: &PublicKey, theirs: &PublicKey) {
        self.controlling = ours.as_bytes() < theirs.as_bytes();
    }

    pub fn summary(&self) -> PathSummary {
        PathSummary {
            chosen: self.chosen,
            candidates: self.candidates.clone(),
            probes_sent: self.probes_sent,
            probe_rounds: self.probe_rounds,
            measures_sent: self.measures_sent,
            rtt_switches: self.rtt_switches,
            fallbacks: self.fallbacks,
            rtts: self.rtts.iter().map(|r| (r.0, r.1)).collect(),
        }
    }

    /// The path the policy chose for the peer (`None` until it has one).
    pub fn chosen(&self) -> Option<Endpoint> {
        self.chosen
    }

    /// The last round trip measured on `path` (`Some(None)`: unanswered).
    pub fn rtt_of(&self, path: &Endpoint) -> Option<Option<Duration>> {
        self.rtts.iter().find(|r| r.0 == *path).map(|r| r.1)
    }

    /// A round trip measured from authenticated packets (the peer's
    /// [`crate::peer::Peer::take_rtt_sample`]: initiation sent, response
    /// authenticated), on the path the response came back on.
    pub fn observe_rtt(&mut self, path: Endpoint, rtt: Duration, now: Instant) {
        if let Endpoint::Udp(a) = path {
            let a = SocketAddr::new(a.ip().to_canonical(), a.port());
            // Only paths the policy knows are remembered: the table stays
            // bounded whatever addresses the peer roams from.
            if !self.candidates.contains(&a) && self.udp != Some(a) && self.chosen != Some(path) {
                return;
            }
        }
        if self.measuring.is_some_and(|(p, _)| p == path) {
            self.measuring = None;
            self.measured = Some((path, now));
            // The other side moved to the measured path on our initiation.
            self.recall = self.chosen.is_some_and(|c| c != path);
        }
        self.record(path, Some(rtt), now);
    }

    fn record(&mut self, path: Endpoint, rtt: Option<Duration>, now: Instant) {
        if let Some(r) = self.rtts.iter_mut().find(|r| r.0 == path) {
            *r = (path, rtt, now);
            return;
        }
        if self.rtts.len() >= MAX_TIMED_PATHS {
            // The oldest goes.
            if let Some(i) = (0..self.rtts.len()).min_by_key(|&i| self.rtts[i].2) {
                self.rtts.swap_remove(i);
            }
        }
        self.rtts.push((path, rtt, now));
    }

    /// Where a measurement probe goes now, if one is due: the peer is on a
    /// chosen direct path (or on the relay for its round trip) and has
    /// other paths to compare; one path per [`MEASURE_GAP`], in turn.
    /// `relay`: the relay endpoint if a relay is up. Send ONE initiation
    /// there ([`super::Device::probe`]); its answer moves the peer there
    /// for a moment (roaming), and [`PathState::choose`] puts it back
    /// unless that path is better.
    pub fn measure_round(
        &mut self,
        stats: &PeerStats,
        relay: Option<Endpoint>,
        now: Instant,
        budget: &mut ProbeBudget,
    ) -> Option<Endpoint> {
        if !self.controlling {
            return None;
        }
        let on_chosen = current(stats).is_some_and(|c| Some(c) == self.chosen);
        let direct = stats.path == PeerPath::Udp && stats.endpoint.is_some();
        if !on_chosen || !(direct || self.relay_by_rtt) || self.candidates.is_empty() {
            self.next_measure = None;
            return None;
        }
        // One initiation in flight at a time: a newer one cancels the older.
        if self.measuring.is_some() || self.alive_probe.is_some() {
            return None;
        }
        let next = *self.next_measure.get_or_insert(now + MEASURE_GAP);
        if next > now {
            return None;
        }
        let mut targets: Vec<Endpoint> = self.chosen.into_iter().collect();
        for c in &self.candidates {
            if !targets.contains(&Endpoint::Udp(*c)) {
                targets.push(Endpoint::Udp(*c));
            }
        }
        if let Some(r) = relay.filter(|r| !targets.contains(r)) {
            targets.push(r);
        }
        if !budget.take(now, 1) {
            return None;
        }
        let target = targets[self.cursor % targets.len()];
        self.cursor = self.cursor.wrapping_add(1);
        self.next_measure = Some(now + MEASURE_GAP);
        self.settle_until = Some(now + MEASURE_TIMEOUT + SETTLE);
        self.measuring = Some((target, now));
        self.measures_sent += 1;
        self.probes_sent += 1;
        Some(target)
    }

    /// Path choice by round trip, after [`PathState::step`]: returns the
    /// path to move the peer to (with `Device::switch_path`), if any.
    ///
    /// - A move the policy did not make by measuring (the first direct
    ///   path, a fallback to the relay, the peer roaming) is followed.
    /// - The chosen path's measurement unanswered while another path
    ///   answered: move there at once.
    /// - Another path faster by the margin ([`SWITCH_MARGIN_PERCENT`],
    ///   [`SWITCH_MARGIN_MIN`]) in every measurement for [`SWITCH_DWELL`]:
    ///   move there. Otherwise, after a measurement moved the peer, back
    ///   to the chosen path.
    pub fn choose(&mut self, stats: &PeerStats, now: Instant) -> Option<PathMove> {
        if let Some((p, t)) = self.measuring {
            if now.saturating_duration_since(t) >= MEASURE_TIMEOUT {
                self.measuring = None;
                if matches!(p, Endpoint::Udp(_)) && self.chosen == Some(p) {
                    // The chosen direct path: one lost datagram is not
                    // death. Something received since it left proves the
                    // path; otherwise it is a liveness miss, and the
                    // liveness probes (`step`) judge the path.
                    if self.rx_at <= t {
                        self.alive_misses += 1;
                    }
                } else {
                    self.record(p, None, now);
                }
            }
        }
        self.rtts
            .retain(|r| now.saturating_duration_since(r.2) < RTT_MAX_AGE);
        let cur = current(stats)?;
        // The peer sits on the path the last measurement timed: that
        // measurement moved it, not a change of the network.
        let moved_by_measure = self.measured.is_some_and(|(p, _)| p == cur)
            || self.measuring.is_some_and(|(p, _)| p == cur);
        // Authenticated datagrams still in flight on a path just left (the
        // slower one, typically) move the peer back by roaming.
        let stale =
            self.controlling && self.settle_until.is_some_and(|t| now < t) && self.known(&cur);
        let before = self.chosen;
        match self.chosen {
            Some(c) if c == cur || moved_by_measure || stale => {}
            _ => {
                self.chosen = Some(cur);
                self.relay_by_rtt = false;
                self.better = None;
                self.measured = None;
                // The peer roamed here on an authenticated datagram from
                // this path: a verdict of "unanswered" from before (the
                // path given up, a measurement lost) is older than that
                // proof. Kept, it moved the peer straight back to the
                // relay and counted a fallback each time the other side's
                // probes came in on the path again (after our public
                // address changed, say), pushing our own probing out by
                // the holddown each time. Whether the path carries our
                // data is judged by the liveness probes (`step`).
                self.rtts.retain(|r| r.0 != cur || r.1.is_some());
            }
        }
        let chosen = self.chosen?;
        // The moment our measurement moved the peer is this call's only.
        self.measured = None;
        if !self.controlling {
            return None;
        }
        let best = self
            .rtts
            .iter()
            .filter(|r| r.0 != chosen)
            .filter_map(|r| r.1.map(|rtt| (r.0, rtt)))
            .min_by_key(|r| r.1);
        match (self.rtt_of(&chosen), best) {
            // The chosen path stopped answering; another answers: no
            // dwell. To the relay, it is a fallback (holddown, rounds).
            (Some(None), Some((b, _))) => {
                self.chosen = Some(b);
                self.relay_by_rtt = false;
                self.better = None;
                if matches!(b, Endpoint::Relay(_)) {
                    self.fell_back(now);
                }
            }
            (Some(Some(c_rtt)), Some((b, b_rtt))) => {
                let margin = (c_rtt * SWITCH_MARGIN_PERCENT / 100).max(SWITCH_MARGIN_MIN);
                if b_rtt + margin <= c_rtt {
                    match self.better {
                        // A second measurement of it, after the dwell, confirms.
                        Some((p, since)) if p == b => {
                            let confirmed = self.rtts.iter().any(|r| r.0 == b && r.2 > since);
                            if confirmed && now.saturating_duration_since(since) >= SWITCH_DWELL {
                                self.move_to(b);
                            }
                        }
                        _ => self.better = Some((b, now)),
                    }
                } else {
                    self.better = None;
                }
            }
            _ => self.better = None,
        }
        let chosen = self.chosen?;
        let recall = std::mem::take(&mut self.recall);
        if cur == chosen && !recall {
            return None;
        }
        self.settle_until = Some(now + SETTLE);
        Some(PathMove {
            to: chosen,
            handshake: recall || moved_by_measure || before != Some(chosen),
        })
    }

    fn move_to(&mut self, to: Endpoint) {
        self.chosen = Some(to);
        self.relay_by_rtt = matches!(to, Endpoint::Relay(_));
        self.better = None;
        self.rtt_switches += 1;
    }

    /// The peer's candidates as last received.
    pub fn candidates(&self) -> &[SocketAddr] {
        &self.candidates
    }

    /// Candidates the peer sent (through the relay, so from its proven
    /// key). Unusable ones and those past [`MAX_CANDIDATES`] are left out.
    /// Starts a probing burst unless one started within [`MIN_BURST_GAP`]
    /// or a fallback's holddown is running (then the list is only updated).
    pub fn set_candidates(&mut self, list: &[SocketAddr], now: Instant) {
        self.candidates.clear();
        for a in list {
            let a = SocketAddr::new(a.ip().to_canonical(), a.port());
            if self.candidates.len() < MAX_CANDIDATES
                && Candidates::usable(&a)
                && !self.candidates.contains(&a)
            {
                self.candidates.push(a);
            }
        }
        if self.candidates.is_empty() {
            self.next_round = None;
            return;
        }
        let burst_recent = self
            .burst_started
            .is_some_and(|t| now.saturating_duration_since(t) < MIN_BURST_GAP);
        let held = self.next_round.is_some_and(|t| t > now) && self.flaps > 0;
        if !burst_recent && !held {
            self.rounds = 0;
            self.burst_started = Some(now);
            self.next_round = Some(now);
        } else if self.next_round.is_none() {
            self.next_round = Some(now + PROBE_FIRST_RETRY);
        }
    }

    /// The direct path's liveness while traffic flows ([`LIVENESS_QUIET`],
    /// [`LIVENESS_TIMEOUT`], [`LIVENESS_MISSES`]): a probe when we send
    /// and hear nothing, the next at once when one goes unanswered, and
    /// the path given up after the misses. Probes are handshake
    /// initiations to the path itself; their answers are round trips too.
    fn liveness(
        &mut self,
        udp: SocketAddr,
        relay_up: bool,
        now: Instant,
        budget: &mut ProbeBudget,
    ) -> PathAction {
        if let Some(sent) = self.alive_probe {
            if now.saturating_duration_since(sent) < LIVENESS_TIMEOUT {
                return PathAction::Stay;
            }
            self.alive_probe = None;
            self.alive_misses += 1;
            if self.alive_misses >= LIVENESS_MISSES {
                self.alive_misses = 0;
                // Timed as unanswered, so `choose` leaves it for any path
                // that answers (a candidate the peer moved to, the relay)
                // instead of holding it by its last good round trip.
                self.record(Endpoint::Udp(udp), None, now);
                if relay_up {
                    self.path = PeerPath::Relay;
                    self.fell_back(now);
                    return PathAction::ToRelay;
                }
                // Nowhere to go: probe the candidates again (the peer's
                // address may have changed; a new map brings new ones).
                if !self.direct_dead {
                    self.direct_dead = true;
                    self.fell_back(now);
                    // No relay to hold down against: a new burst at once
                    // (a peer restarted on a new port answers there).
                    self.rounds = 0;
                    self.next_round = Some(now);
                }
                return PathAction::Stay;
            }
        }
        let sending = self.tx_at.is_some_and(|t| t > self.rx_at);
        let quiet = now.saturating_duration_since(self.rx_at) >= LIVENESS_QUIET;
        let due = self.alive_misses > 0 || (sending && quiet);
        // A measurement in flight is an initiation too: a second would
        // cancel it. A dead path with no relay is left to the rounds.
        if !due || self.measuring.is_some() || self.direct_dead {
            return PathAction::Stay;
        }
        // Beyond the device-wide budget the probe waits for the next tick:
        // a probe not sent is no miss, so a spent budget delays the
        // give-up, never hastens it.
        if !budget.take_liveness(now) {
            return PathAction::Stay;
        }
        self.alive_probe = Some(now);
        self.liveness_probes += 1;
        self.probes_sent += 1;
        PathAction::Probe(udp)
    }

    /// Bookkeeping of a direct path given up for the relay.
    fn fell_back(&mut self, now: Instant) {
        self.last_probe = now;
        self.fallbacks += 1;
        let lived = self
            .direct_since
            .take()
            .map(|t| now.saturating_duration_since(t));
        match lived {
            Some(l) if l < STABLE_DIRECT => self.flaps = self.flaps.saturating_add(1),
            Some(_) => self.flaps = 0,
            None => {}
        }
        if !self.candidates.is_empty() {
            // Burst over: the path just failed, so the next round waits
            // out the holddown, then REPROBE_INTERVAL.
            self.rounds = PROBE_BURST_ROUNDS;
            self.next_round = Some(now + self.holddown());
        }
    }

    /// The wait after a direct path failed.
    fn holddown(&self) -> Duration {
        FLAP_HOLDDOWN * (1u32 << self.flaps.min(MAX_FLAP_SHIFT))
    }

    /// Where a probing round goes now, if one is due: the peer is not on a
    /// direct path (on the relay, or with no endpoint), it has candidates,
    /// the round's time has come and `budget` allows it. The targets are
    /// the candidates and the last UDP endpoint, nothing else; send ONE
    /// initiation to all of them ([`super::Device::probe_many`]).
    pub fn candidate_round(
        &mut self,
        stats: &PeerStats,
        now: Instant,
        budget: &mut ProbeBudget,
    ) -> Option<Vec<SocketAddr>> {
        let direct = stats.path == PeerPath::Udp && stats.endpoint.is_some() && !self.direct_dead;
        if direct
            || self.relay_by_rtt
            || self.candidates.is_empty()
            || self.next_round.is_none_or(|t| t > now)
        {
            return None;
        }
        let mut targets = self.candidates.clone();
        if let Some(u) = self.udp.filter(|u| !targets.contains(u)) {
            targets.push(u);
        }
        if !budget.take(now, targets.len() as u32) {
            return None;
        }
        self.rounds += 1;
        self.probe_rounds += 1;
        self.probes_sent += targets.len() as u64;
        self.last_probe = now;
        self.next_round = Some(
            now + if self.rounds < PROBE_BURST_ROUNDS {
                PROBE_FIRST_RETRY * (1u32 << (self.rounds - 1))
            } else {
                REPROBE_INTERVAL
            },
        );
        Some(targets)
    }

    /// One look at the peer (`stats` now). `relay_up`: a relay is there to
    /// move to. Probes it asks for are taken from `budget` (liveness
    /// probes with priority, [`ProbeBudget::take_liveness`]).
    pub fn step(
        &mut self,
        stats: &PeerStats,
        relay_up: bool,
        probe_interval: Duration,
        now: Instant,
        budget: &mut ProbeBudget,
    ) -> PathAction {
        let rx_moved = stats.rx_bytes != self.rx_bytes;
        if rx_moved {
            self.rx_bytes = stats.rx_bytes;
            self.initiations_at_rx = stats.handshakes_initiated;
            self.measures_at_rx = self.measures_sent;
            self.liveness_at_rx = self.liveness_probes;
            self.rx_at = now;
            self.alive_probe = None;
            self.alive_misses = 0;
            self.direct_dead = false;
        }
        // Data, not keepalives or handshakes (ours would keep the check
        // going on an idle path).
        if stats.tx_inner_bytes != self.tx_bytes {
            self.tx_bytes = stats.tx_inner_bytes;
            self.tx_at = Some(now);
        }
        if stats.path != self.path {
            self.path = stats.path;
            self.initiations_at_rx = stats.handshakes_initiated;
            self.last_probe = now;
            self.alive_probe = None;
            self.alive_misses = 0;
        }
        // A direct path is proven once something authenticated arrived on it.
        if stats.path != PeerPath::Udp {
            self.direct_since = None;
        } else if rx_moved && stats.endpoint.is_some() && self.direct_since.is_none() {
            self.direct_since = Some(now);
        }
        match (stats.path, stats.endpoint) {
            (PeerPath::Udp, Some(udp)) => {
                self.udp = Some(udp);
                // Measurements go to other paths: not this one's failures;
                // liveness probes are judged by their own rule below.
                let unanswered = stats
                    .handshakes_initiated
                    .saturating_sub(self.initiations_at_rx)
                    .saturating_sub(self.measures_sent - self.measures_at_rx)
                    .saturating_sub(self.liveness_probes - self.liveness_at_rx);
                if relay_up && unanswered >= UNANSWERED_INITIATIONS {
                    self.path = PeerPath::Relay;
                    self.fell_back(now);
                    return PathAction::ToRelay;
                }
                self.liveness(udp, relay_up, now, budget)
            }
            // With candidates, `candidate_round` probes (the last UDP
            // endpoint among them), on its schedule with its holddown.
            (PeerPath::Relay, _) if !self.candidates.is_empty() => PathAction::Stay,
            (PeerPath::Relay, _) => {
                let Some(udp) = self.udp else {
                    return PathAction::Stay;
                };
                if now.saturating_duration_since(self.last_probe) < probe_interval
                    || !budget.take(now, 1)
                {
                    return PathAction::Stay;
                }
                self.last_probe = now;
                PathAction::Probe(udp)
            }
            (PeerPath::Udp, None) => PathAction::Stay,
        }
    }
}

/// What one look at a peer ([`Device::path_tick`]) did, for the runtime
/// to log and count; the datagrams are already handed to its `DeviceIo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathTick {
    /// The peer's path when the policy looked, if it changed since the
    /// last look (roaming: the other side moved, or our own probe's answer).
    pub path_changed: Option<PeerPath>,
    /// What [`PathState::step`] asked for, done: a move to the relay with a
    /// handshake there, or one probe (`probed`: the peer could send it).
    pub action: PathAction,
    pub probed: bool,
    /// A direct path was given up, by [`PathState::step`] (unanswered
    /// handshakes or liveness probes) or by [`PathState::choose`] (its
    /// measurement unanswered while the relay answered): counted once
    /// here. Our NAT may have moved us, so the runtime learns its mapping
    /// again now (a discovery round) and the peer gets it within seconds.
    pub fell_back: bool,
    /// The move [`PathState::choose`] asked for, done.
    pub moved: Option<PathMove>,
    /// Datagrams of the probing round sent ([`PathState::candidate_round`]).
    pub round_probes: usize,
    /// The path a measurement probe went to ([`PathState::measure_round`]).
    pub measured: Option<Endpoint>,
}

impl Device {
    /// The path policy's whole look at one peer, in its order: `step` (and
    /// what it asks: to the relay, a probe), `choose` (and its move), the
    /// fallback count, the probing round, the measurement. The engine's
    /// path thread and the simulation both run exactly this; the caller
    /// keeps `st` per peer and ONE `budget` per device. `relay_up`: a
    /// relay is there to move to (and to measure); `probe_interval`: how
    /// often a peer on the relay without candidates is probed over UDP.
    #[allow(clippy::too_many_arguments)]
    pub fn path_tick(
        &self,
        now: Instant,
        peer: &Peer,
        st: &mut PathState,
        relay_up: bool,
        probe_interval: Duration,
        budget: &mut ProbeBudget,
        out: &mut [u8],
        io: &mut dyn DeviceIo,
    ) -> PathTick {
        let key = peer.public_key();
        let stats = peer.stats();
        let before = st.path;
        if let Some(ours) = self.public_key() {
            st.set_role(&ours, &key);
        }
        if let Some(left) = peer.take_hold_yield() {
            st.hold_yielded(left, now);
        }
        if let Some((path, rtt)) = peer.take_rtt_sample() {
            st.observe_rtt(path, rtt, now);
        }
        let fell_before = st.fallbacks;
        let action = st.step(&stats, relay_up, probe_interval, now, budget);
        let path_changed = (stats.path != before).then_some(stats.path);
        let probed = match action {
            PathAction::Stay => false,
            PathAction::ToRelay => {
                self.switch_path(now, peer, Endpoint::Relay(key), out, io);
                false
            }
            PathAction::Probe(udp) => self.probe(now, peer, Endpoint::Udp(udp), out, io),
        };
        let moved = st.choose(&peer.stats(), now);
        if let Some(mv) = moved {
            if mv.handshake {
                self.switch_path(now, peer, mv.to, out, io);
            } else {
                peer.set_endpoint(mv.to);
            }
            peer.hold_endpoint(st.hold_until(), HOLD_YIELD);
        }
        let fell_back = st.fallbacks > fell_before;
        let round_probes = st
            .candidate_round(&peer.stats(), now, budget)
            .map_or(0, |targets| self.probe_many(now, peer, &targets, out, io));
        let relay = relay_up.then_some(Endpoint::Relay(key));
        let mut measured = None;
        if let Some(to) = st.measure_round(&peer.stats(), relay, now, budget) {
            peer.hold_endpoint(st.hold_until(), HOLD_YIELD);
            if self.probe(now, peer, to, out, io) {
                measured = Some(to);
            }
        }
        PathTick {
            path_changed,
            action,
            probed,
            fell_back,
            moved,
            round_probes,
            measured,
        }
    }
}

/// The peer's endpoint as a path.
fn current(stats: &PeerStats) -> Option<Endpoint> {
    match (stats.path, stats.endpoint) {
        (PeerPath::Relay, _) => Some(Endpoint::Relay(stats.public_key)),
        (PeerPath::Udp, Some(a)) => Some(Endpoint::Udp(a)),
        (PeerPath::Udp, None) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PublicKey;
    use crate::peer::{relay_endpoint, PeerCounters};

    const DIRECT: &str = "198.51.100.1:40000";

    struct Peer {
        relay: bool,
        rx: u64,
        inits: u64,
    }

    impl Peer {
        fn stats(&self) -> PeerStats {
            let ep = if self.relay {
                relay_endpoint(1)
            } else {
                DIRECT.parse().unwrap()
            };
            let mut s = PeerCounters::default().snapshot(
                PublicKey::from_bytes([1; 32]),
                Some(ep),
                None,
                None,
                None,
            );
            s.rx_bytes = self.rx;
            s.handshakes_initiated = self.inits;
            s
        }
    }

    /// Runs the policy every 250 ms from `from` until `until`; returns the
    /// instants of the probing rounds.
    fn rounds(
        st: &mut PathState,
        p: &Peer,
        budget: &mut ProbeBudget,
        from: Instant,
        until: Instant,
    ) -> Vec<Duration> {
        let mut at = Vec::new();
        let mut now = from;
        while now < until {
            let s = p.stats();
            st.step(&s, true, Duration::from_secs(5), now, budget);
            if st.candidate_round(&s, now, budget).is_some() {
                at.push(now - from);
            }
            now += Duration::from_millis(250);
        }
        at
    }

    #[test]
    fn a_flapping_direct_path_is_retried_ever_more_rarely() {
        let t0 = Instant::now();
        let mut p = Peer {
            relay: true,
            rx: 100,
            inits: 1,
        };
        let mut st = PathState::new(&p.stats(), t0);
        let mut budget = ProbeBudget::default();
        st.set_candidates(&[DIRECT.parse().unwrap()], t0);
        let first = rounds(
            &mut st,
            &p,
            &mut budget,
            t0,
            t0 + Duration::from_millis(500),
        );
        assert_eq!(
            first,
            vec![Duration::ZERO],
            "no round when candidates arrived"
        );
        let mut now = t0 + Duration::from_secs(1);
        let mut waits = Vec::new();
        // Five times: direct for `lived`, then two initiations unanswered.
        for lived in [10u64, 10, 10, 10, 10, 70] {
            p.relay = false;
            p.rx += 100;
            st.step(&p.stats(), true, Duration::from_secs(5), now, &mut budget);
            now += Duration::from_secs(lived);
            p.inits += UNANSWERED_INITIATIONS;
            assert_eq!(
                st.step(&p.stats(), true, Duration::from_secs(5), now, &mut budget),
                PathAction::ToRelay
            );
            p.relay = true;
            let r = rounds(
                &mut st,
                &p,
                &mut budget,
                now,
                now + Duration::from_secs(200),
            );
            waits.push(r[0].as_secs());
            now += r[0];
        }
        // 10, 20, 40, 80 s, capped at 80; a path that lived past
        // STABLE_DIRECT starts over at FLAP_HOLDDOWN.
        assert_eq!(waits, vec![10, 20, 40, 80, 80, 5]);
        assert_eq!(st.fallbacks, 6);
    }

    #[test]
    fn probing_rounds_back_off_and_stay_within_the_budget() {
        let t0 = Instant::now();
        let p = Peer {
            relay: true,
            rx: 0,
            inits: 0,
        };
        let mut st = PathState::new(&p.stats(), t0);
        let mut budget = ProbeBudget::default();
        let cands: Vec<SocketAddr> = (1..=20)
            .map(|i| format!("192.0.2.{i}:51820").parse().unwrap())
            .chain(["127.0.0.1:1".parse().unwrap()])
            .collect();
        st.set_candidates(&cands, t0);
        assert_eq!(st.candidates().len(), MAX_CANDIDATES);
        let r = rounds(&mut st, &p, &mut budget, t0, t0 + Duration::from_secs(100));
        let secs: Vec<u64> = r.iter().map(|d| d.as_secs()).collect();
        assert_eq!(secs, vec![0, 1, 3, 7, 15, 45, 75]);
        assert_eq!(st.probes_sent, 7 * MAX_CANDIDATES as u64);
        // The device-wide budget: a second's allowance, all or nothing;
        // rounds and measurements leave the liveness reserve (a quarter:
        // 2 of 10) alone, liveness probes may take all of it.
        let mut b = ProbeBudget::new(10);
        assert!(b.take(t0, 6));
        assert!(!b.take(t0, 3));
        assert!(b.take(t0 + Duration::from_millis(999), 2));
        assert!(!b.take(t0 + Duration::from_millis(999), 1), "the reserve");
        assert!(b.take_liveness(t0 + Duration::from_millis(999)));
        assert!(b.take_liveness(t0 + Duration::from_millis(999)));
        assert!(!b.take_liveness(t0 + Duration::from_millis(999)));
        // A sliding second: at t0 + 1 s only the 6 of t0 are free again.
        assert!(!b.take(t0 + Duration::from_secs(1), 5));
        assert!(b.take(t0 + Duration::from_secs(1), 4));
        assert!(b.take_liveness(t0 + Duration::from_secs(1)));
        assert!(b.take(t0 + Duration::from_millis(1999), 3));
        assert_eq!(b.deferred, 4);
    }

    /// Liveness probes are charged to the budget: a spent allowance puts
    /// the probe off (no miss counted), and the path is still given up
    /// once probes go out again.
    #[test]
    fn a_liveness_probe_waits_for_the_budget_and_is_no_miss_until_sent() {
        let t0 = Instant::now();
        let p = Peer {
            relay: false,
            rx: 100,
            inits: 1,
        };
        let mut st = PathState::new(&p.stats(), t0);
        let mut budget = ProbeBudget::new(4);
        // Data goes out; nothing comes back.
        let mut s = p.stats();
        s.tx_inner_bytes = 1;
        st.step(&s, true, Duration::from_secs(5), t0, &mut budget);
        s.tx_inner_bytes = 2;
        let quiet = t0 + Duration::from_millis(250);
        st.step(&s, true, Duration::from_secs(5), quiet, &mut budget);
        // The whole second's allowance spent elsewhere.
        let spent = t0 + LIVENESS_QUIET;
        for _ in 0..4 {
            assert!(budget.take_liveness(spent));
        }
        let mut now = spent;
        let mut sent = Vec::new();
        while now < spent + Duration::from_secs(10) {
            match st.step(&s, true, Duration::from_secs(5), now, &mut budget) {
                PathAction::Probe(_) => sent.push(now - spent),
                PathAction::ToRelay => break,
                PathAction::Stay => {}
            }
            now += Duration::from_millis(250);
        }
        // The first probe waited for the next second; three unanswered.
        let ms: Vec<u128> = sent.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, vec![1000, 2000, 3000]);
        assert_eq!(now - spent, Duration::from_secs(4), "given up at");
        assert_eq!(st.liveness_probes, 3);
        assert!(budget.deferred >= 4, "deferred: {}", budget.deferred);
    }
}
