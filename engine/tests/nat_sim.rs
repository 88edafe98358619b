//! NAT traversal in the deterministic simulation (`common/sim.rs`): nodes
//! behind simulated NAT routers (conntrack-style masquerade), candidates
//! exchanged as relay candidate messages, and the path policy
//! (`device::PathState`) probing them on simulated time. Each test names
//! what would break.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use common::link::seed;
use common::sim::{NatBox, Net, Sim};
use meshvpn_engine::device::{
    Endpoint, PathAction, PathState, ProbeBudget, HOLD_YIELD, LIVENESS_MISSES, LIVENESS_QUIET,
    LIVENESS_TIMEOUT, MIN_BURST_GAP, PROBES_PER_SECOND, PROBE_BURST_ROUNDS, REPROBE_INTERVAL,
};
use meshvpn_engine::peer::PeerPath;
use meshvpn_engine::relay::protocol::Candidates;

/// Where the simulated STUN server is (the NAT maps towards it).
const STUN: &str = "192.0.2.250:3478";
/// How often the policy looks at the peers (as the engine's path thread).
const PATH_TICK: Duration = Duration::from_millis(250);

/// Each node's path policy for each peer, and each node's probe budget.
struct Driver {
    states: HashMap<(usize, usize), PathState>,
    budgets: Vec<ProbeBudget>,
    /// (time in ms, node, peer, new path) for every change seen.
    changes: Vec<(u64, usize, usize, PeerPath)>,
    /// (time in ms, node, peer, path) each time the chosen path changed.
    chosen: Vec<(u64, usize, usize, Endpoint)>,
    /// (time in ms, node, peer) of each fallback the policy reported (the
    /// engine counts it and starts a discovery round).
    fell_back: Vec<(u64, usize, usize)>,
    /// (time in ms, node, peer, path) of each measurement probe sent.
    measured: Vec<(u64, usize, usize, Endpoint)>,
    /// A relay is up to fall back to (and to measure).
    relay_up: bool,
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Two nodes that know no UDP endpoint of each other, each behind a NAT
/// (`Some(random)`) or public (`None`), with a session over the relay.
fn two_nodes(seed: u64, nats: [Option<bool>; 2]) -> (Sim, Driver) {
    two_nodes_with(seed, nats, 0)
}

/// As [`two_nodes`]; `same_nat`: both behind ONE endpoint-independent
/// NAT, so each has two direct paths to the other (their LAN, and the
/// NAT's public mapping, hairpinned); relayed datagrams take
/// `relay_delay` ticks.
fn two_nodes_with(seed: u64, nats: [Option<bool>; 2], relay_delay: u64) -> (Sim, Driver) {
    let mut sim = Sim::new(seed, Net::default());
    sim.relay_delay_ticks = relay_delay;
    for i in 0..2 {
        sim.add_node(i);
    }
    sim.introduce(0, 1, false);
    sim.introduce(1, 0, false);
    if relay_delay > 0 {
        sim.nats.push(NatBox::new(sa("203.0.113.1:0").ip(), false));
        for i in 0..2 {
            sim.put_behind(i, 0, SocketAddr::from(([172, 16, i as u8, 2], 51820)));
        }
    }
    for (i, nat) in nats.iter().enumerate() {
        if let Some(random) = nat {
            let public = [sa("203.0.113.1:0"), sa("198.51.100.1:0")][i].ip();
            sim.nats.push(NatBox::new(public, *random));
            let n = sim.nats.len() - 1;
            sim.put_behind(i, n, SocketAddr::from(([172, 16, i as u8, 2], 51820)));
        }
    }
    for (i, j) in [(0, 1), (1, 0)] {
        let key = sim.nodes[j].public();
        sim.peer(i, j).set_endpoint(Endpoint::Relay(key));
    }
    assert!(sim.establish(0, 1, 5), "no session over the relay");
    let mut states = HashMap::new();
    for (i, j) in [(0, 1), (1, 0)] {
        states.insert((i, j), PathState::new(&sim.peer(i, j).stats(), sim.now()));
    }
    let d = Driver {
        states,
        budgets: vec![ProbeBudget::default(), ProbeBudget::default()],
        changes: Vec::new(),
        chosen: Vec::new(),
        fell_back: Vec::new(),
        measured: Vec::new(),
        relay_up: true,
    };
    (sim, d)
}

/// What node `i` announces: its local address and, behind a NAT, the
/// address a STUN server sees.
fn candidates_of(sim: &mut Sim, i: usize) -> Vec<SocketAddr> {
    let mut c = vec![sim.nodes[i].addr];
    if let Some(&n) = sim.behind.get(&i) {
        c.push(sim.nats[n].reflexive(i, sa(STUN)));
    }
    c
}

/// Node `i`'s candidates reach node `j` as a relay candidate message.
fn announce(sim: &mut Sim, d: &mut Driver, i: usize, j: usize) {
    let wire = Candidates(candidates_of(sim, i)).encode();
    let got = Candidates::decode(&wire).expect("our own message parses");
    let now = sim.now();
    d.states
        .get_mut(&(j, i))
        .unwrap()
        .set_candidates(&got.0, now);
}

/// Both nodes' candidates announced to each other, then the simulation
/// run until both are direct (at most `within`), which it asserts.
fn until_direct(sim: &mut Sim, d: &mut Driver, within: Duration, what: &str) {
    announce(sim, d, 0, 1);
    announce(sim, d, 1, 0);
    run(sim, d, within, |sim, _| {
        direct(sim, 0, 1) && direct(sim, 1, 0)
    });
    assert!(direct(sim, 0, 1) && direct(sim, 1, 0), "{what}");
}

/// One look of the policy at every peer: the engine's path thread's own
/// per-peer sequence (`Device::path_tick`), with each node's budget.
fn policy(sim: &mut Sim, d: &mut Driver) {
    for (i, j) in [(0, 1), (1, 0)] {
        let peer = sim.peer(i, j);
        let st = d.states.get_mut(&(i, j)).unwrap();
        let budget = &mut d.budgets[i];
        let relay_up = d.relay_up;
        let mut t = None;
        sim.with_device(i, |dev, now, out, io| {
            t = Some(dev.path_tick(
                now,
                &peer,
                st,
                relay_up,
                Duration::from_secs(5),
                budget,
                out,
                io,
            ));
        });
        let t = t.expect("the policy ran");
        if let Some(after) = t.path_changed {
            d.changes.push((sim.ticks(), i, j, after));
        }
        if t.action == PathAction::ToRelay {
            d.changes.push((sim.ticks(), i, j, PeerPath::Relay));
        }
        if t.fell_back {
            d.fell_back.push((sim.ticks(), i, j));
        }
        if let Some(to) = t.measured {
            d.measured.push((sim.ticks(), i, j, to));
        }
        if let Some(c) = d.states[&(i, j)].chosen() {
            if d.chosen.last().is_none_or(|l| (l.1, l.2, l.3) != (i, j, c))
                && d.chosen
                    .iter()
                    .rev()
                    .find(|l| (l.1, l.2) == (i, j))
                    .is_none_or(|l| l.3 != c)
            {
                d.chosen.push((sim.ticks(), i, j, c));
            }
        }
    }
}

/// Runs the network, the timers and the policy for `d`; `each` runs every
/// PATH_TICK first (to send traffic, say) and can stop the run early.
fn run(
    sim: &mut Sim,
    d: &mut Driver,
    dur: Duration,
    mut each: impl FnMut(&mut Sim, &mut Driver) -> bool,
) {
    let steps = dur.as_millis() / PATH_TICK.as_millis();
    for _ in 0..steps {
        if each(sim, d) {
            return;
        }
        sim.timers(0);
        sim.timers(1);
        policy(sim, d);
        sim.advance(PATH_TICK);
    }
}

fn direct(sim: &Sim, i: usize, j: usize) -> bool {
    matches!(sim.endpoint(i, j), Some(Endpoint::Udp(_)))
}

/// Every UDP datagram node `i` sent went to one of `allowed`.
fn only_to(sim: &Sim, i: usize, allowed: &[SocketAddr]) -> usize {
    let sent: Vec<_> = sim.udp_log.iter().filter(|(n, _)| *n == i).collect();
    for (_, to) in &sent {
        assert!(
            allowed.contains(to),
            "node {i} sent to {to}, not a candidate: {allowed:?}"
        );
    }
    sent.len()
}

#[test]
fn two_endpoint_independent_nats_upgrade_from_relay_to_direct() {
    let (mut sim, mut d) = two_nodes(seed(21), [Some(false), Some(false)]);
    let start = sim.ticks();
    announce(&mut sim, &mut d, 0, 1);
    announce(&mut sim, &mut d, 1, 0);
    let mut upgraded_at = None;
    run(&mut sim, &mut d, Duration::from_secs(20), |sim, _| {
        if direct(sim, 0, 1) && direct(sim, 1, 0) {
            upgraded_at = Some(sim.ticks() - start);
            return true;
        }
        false
    });
    let ms = upgraded_at.expect("no direct path within 20 s");
    eprintln!("direct path after {ms} ms of simulated time");
    assert!(ms <= 3000, "direct path only after {ms} ms");
    // Each side reached the other's NAT mapping, never its private address.
    let c0 = candidates_of(&mut sim, 0);
    let c1 = candidates_of(&mut sim, 1);
    assert_eq!(sim.endpoint(0, 1), Some(Endpoint::Udp(c1[1])));
    assert_eq!(sim.endpoint(1, 0), Some(Endpoint::Udp(c0[1])));
    // Probes went to candidates only; the first one hit a closed NAT.
    let p0 = only_to(&sim, 0, &c1);
    let p1 = only_to(&sim, 1, &c0);
    assert!(
        sim.stats.nat_filtered >= 1,
        "no NAT filtered anything: the test proves nothing"
    );
    eprintln!("probe datagrams: node 0 {p0}, node 1 {p1}");
    // Traffic now moves directly: the relay carries none of it.
    let relayed = sim.stats.relayed;
    for s in 0..20u8 {
        sim.send(0, 1, s);
        sim.send(1, 0, s);
    }
    sim.settle(100);
    assert_eq!(sim.nodes[1].received.len(), 20);
    assert_eq!(sim.nodes[0].received.len(), 20);
    assert_eq!(sim.stats.relayed, relayed, "data still took the relay");
}

#[test]
fn behind_a_random_port_nat_the_peer_stays_on_the_relay_with_bounded_probes() {
    let (mut sim, mut d) = two_nodes(seed(22), [Some(false), Some(true)]);
    announce(&mut sim, &mut d, 0, 1);
    announce(&mut sim, &mut d, 1, 0);
    let dur = Duration::from_secs(120);
    let mut sent = 0u8;
    run(&mut sim, &mut d, dur, |sim, _| {
        sim.send(0, 1, sent);
        sent = sent.wrapping_add(1);
        false
    });
    assert!(
        !direct(&sim, 0, 1) && !direct(&sim, 1, 0),
        "a direct path through a symmetric NAT?"
    );
    assert!(
        sim.nodes[1].received.len() >= 470,
        "traffic over the relay stalled: {}",
        sim.nodes[1].received.len()
    );
    let c0 = candidates_of(&mut sim, 0);
    let c1 = candidates_of(&mut sim, 1);
    let p0 = only_to(&sim, 0, &c1) as u64;
    let p1 = only_to(&sim, 1, &c0) as u64;
    // One burst, then a round every REPROBE_INTERVAL, two candidates each.
    let bursts = u64::from(PROBE_BURST_ROUNDS);
    let later = (dur.as_secs() / REPROBE_INTERVAL.as_secs()) + 1;
    let bound = (bursts + later) * 2;
    eprintln!(
        "in {} s: probe datagrams node 0 {p0}, node 1 {p1} (bound {bound})",
        dur.as_secs()
    );
    for (i, p) in [(0, p0), (1, p1)] {
        let st = &d.states[&(i, 1 - i)];
        assert_eq!(
            st.probes_sent, p,
            "node {i}'s count differs from the datagrams sent"
        );
        assert!(
            p <= bound,
            "node {i} sent {p} probes in 120 s, bound {bound}"
        );
        assert!(p >= bursts * 2, "node {i} did not probe its burst: {p}");
    }
}

#[test]
fn a_peer_resending_candidates_cannot_speed_up_probing() {
    let (mut sim, mut d) = two_nodes(seed(23), [Some(false), Some(true)]);
    let dur = Duration::from_secs(60);
    run(&mut sim, &mut d, dur, |sim, d| {
        // Node 1 announces on every tick (a buggy or hostile peer).
        announce(sim, d, 1, 0);
        false
    });
    let c1 = candidates_of(&mut sim, 1);
    let p0 = only_to(&sim, 0, &c1) as u64;
    // At most a burst per MIN_BURST_GAP.
    let bound = (dur.as_secs() / MIN_BURST_GAP.as_secs() + 1) * u64::from(PROBE_BURST_ROUNDS) * 2;
    eprintln!(
        "node 0 sent {p0} probes in 60 s while node 1 announced every 250 ms (bound {bound})"
    );
    assert!(p0 <= bound, "{p0} probes, bound {bound}");
}

#[test]
fn a_failed_direct_path_falls_back_to_the_relay_and_returns() {
    let (mut sim, mut d) = two_nodes(seed(24), [Some(false), Some(false)]);
    until_direct(
        &mut sim,
        &mut d,
        Duration::from_secs(10),
        "no direct path to start from",
    );
    // Both NATs lose their mappings (a reboot, a new public port) mid-transfer.
    for n in &mut sim.nats {
        n.expire();
    }
    let expired_at = sim.ticks();
    let mut n = 0u8;
    let mut fell_back = false;
    let mut announced = false;
    let (mut at_relay, mut returned) = (0usize, false);
    run(&mut sim, &mut d, Duration::from_secs(120), |sim, d| {
        sim.send(0, 1, n);
        sim.send(1, 0, n);
        n = n.wrapping_add(1);
        // boringtun's own timers run on the real clock, not the
        // simulation's: its retries (a handshake 15 s after data went
        // unanswered, again 5 s later) are made here, on simulated time.
        let since = sim.ticks() - expired_at;
        if since == 15_000 || since == 20_000 {
            for (i, j) in [(0, 1), (1, 0)] {
                let peer = sim.peer(i, j);
                if let Some(to @ Endpoint::Udp(_)) = peer.endpoint() {
                    sim.with_device(i, |dev, now, out, io| {
                        dev.switch_path(now, &peer, to, out, io)
                    });
                }
            }
        }
        if !fell_back && !direct(sim, 0, 1) && !direct(sim, 1, 0) {
            fell_back = true;
            at_relay = sim.nodes[1].received.len();
        }
        if fell_back && !announced {
            // Discovery runs again and each side announces its new mapping.
            announce(sim, d, 0, 1);
            announce(sim, d, 1, 0);
            announced = true;
        }
        if fell_back && direct(sim, 0, 1) && direct(sim, 1, 0) {
            returned = true;
            return true;
        }
        false
    });
    assert!(fell_back, "the dead direct path was kept");
    assert!(returned, "never returned to a direct path");
    assert!(
        sim.nodes[1].received.len() > at_relay,
        "no traffic moved over the relay while direct was down"
    );
    let relayed = sim.stats.relayed;
    for s in 0..10u8 {
        sim.send(0, 1, s);
    }
    sim.settle(100);
    assert_eq!(
        sim.stats.relayed, relayed,
        "data still took the relay after the return"
    );
    let st = &d.states[&(0, 1)];
    assert!(st.fallbacks >= 1 || d.states[&(1, 0)].fallbacks >= 1);
}

// ---- Path choice by round trip (device::PathState::choose) ----

const LAN: [&str; 2] = ["172.16.0.2:51820", "172.16.1.2:51820"];
const NAT_IP: &str = "203.0.113.1";

/// Both nodes behind one NAT: LAN datagrams take `lan` ticks each way,
/// hairpinned ones through the NAT's public address `public`, the relay
/// 60. Returns the simulation once node 0 is direct to node 1.
fn same_nat_pair(seed: u64, lan: u64, public: u64) -> (Sim, Driver) {
    let (mut sim, mut d) = two_nodes_with(seed, [None, None], 60);
    set_delays(&mut sim, lan, public);
    until_direct(&mut sim, &mut d, Duration::from_secs(20), "no direct path");
    (sim, d)
}

fn set_delays(sim: &mut Sim, lan: u64, public: u64) {
    for l in LAN {
        sim.udp_delay_to.insert(sa(l).ip(), lan);
    }
    sim.udp_delay_to.insert(
        format!("{NAT_IP}:0").parse::<SocketAddr>().unwrap().ip(),
        public,
    );
}

fn on_lan(sim: &Sim, i: usize, j: usize) -> bool {
    sim.endpoint(i, j) == Some(Endpoint::Udp(sa(LAN[j])))
}

fn on_public(sim: &Sim, i: usize, j: usize) -> bool {
    matches!(sim.endpoint(i, j), Some(Endpoint::Udp(a)) if a.ip().to_string() == NAT_IP)
}

/// Traffic both ways, one packet each per PATH_TICK.
fn traffic(sim: &mut Sim, n: &mut u8) {
    sim.send(0, 1, *n);
    sim.send(1, 0, *n);
    *n = n.wrapping_add(1);
}

#[test]
fn of_two_direct_paths_the_faster_wins() {
    // LAN 30 ms each way, the NAT's public mapping 5 ms. The first probing
    // race is won by the LAN: the public mapping filters until both sides
    // have sent through it, so the path taken first is the slower one.
    let (mut sim, mut d) = same_nat_pair(seed(25), 30, 5);
    assert!(on_lan(&sim, 0, 1), "the race did not take the LAN first");
    let start = sim.ticks();
    let mut n = 0u8;
    let mut at = None;
    run(&mut sim, &mut d, Duration::from_secs(180), |sim, _| {
        traffic(sim, &mut n);
        if at.is_none() && on_public(sim, 0, 1) && on_public(sim, 1, 0) {
            at = Some(sim.ticks() - start);
        }
        false
    });
    for (k, st) in &d.states {
        eprintln!(
            "{k:?}: chosen {:?} measures {} switches {} lan {:?} relay {:?}",
            st.chosen(),
            st.measures_sent,
            st.rtt_switches,
            st.rtt_of(&Endpoint::Udp(sa(LAN[1 - k.0]))),
            st.rtt_of(&Endpoint::Relay(sim.nodes[k.1].public())),
        );
    }
    eprintln!("chosen: {:?} endpoint {:?}", d.chosen, sim.endpoint(0, 1));
    let ms = at.expect("the faster public path was never chosen in 180 s");
    let st = &d.states[&(0, 1)];
    eprintln!(
        "public path chosen after {ms} ms; rtt lan {:?}, now on {:?}, {} measurements",
        st.rtt_of(&Endpoint::Udp(sa(LAN[1]))),
        sim.endpoint(0, 1),
        st.measures_sent
    );
    // Each path measured in turn (3 paths x MEASURE_GAP), then confirmed
    // by a second measurement after the dwell.
    assert!(ms <= 90_000, "switched only after {ms} ms");
    assert!(
        on_public(&sim, 0, 1) && on_public(&sim, 1, 0),
        "not on the faster path at the end"
    );
    let switches: u64 = d.states.values().map(|s| s.rtt_switches).sum();
    assert!(switches >= 1, "no switch for round trip");
    // Data moves on the faster path: the LAN carries none of it.
    let lan = |sim: &Sim| {
        sim.udp_log
            .iter()
            .filter(|(_, a)| LAN.contains(&a.to_string().as_str()))
            .count()
    };
    let before = lan(&sim);
    for s in 0..10u8 {
        sim.send(0, 1, s);
        sim.send(1, 0, s);
    }
    sim.settle(200);
    assert_eq!(lan(&sim), before, "data still took the slower LAN");
}

#[test]
fn two_close_paths_do_not_flap() {
    // 20 and 21 ms each way: within the margin of each other.
    let (mut sim, mut d) = same_nat_pair(seed(26), 20, 21);
    let start_paths = (sim.endpoint(0, 1), sim.endpoint(1, 0));
    let chosen_before = d.chosen.len();
    let mut n = 0u8;
    // Ten minutes of simulated time, with traffic.
    run(&mut sim, &mut d, Duration::from_secs(600), |sim, _| {
        traffic(sim, &mut n);
        false
    });
    let switches: u64 = d.states.values().map(|s| s.rtt_switches).sum();
    let measures: u64 = d.states.values().map(|s| s.measures_sent).sum();
    // The side that measures is the one that chooses; the other follows
    // every authenticated packet (its measurements' included).
    let chooser = if d.states[&(0, 1)].measures_sent > 0 {
        0
    } else {
        1
    };
    let changes: Vec<_> = d.chosen[chosen_before..]
        .iter()
        .filter(|c| c.1 == chooser)
        .collect();
    eprintln!(
        "10 min: {measures} measurements, {switches} switches for round trip, chosen-path changes {changes:?}"
    );
    assert!(measures >= 50, "paths were hardly measured: {measures}");
    assert_eq!(switches, 0, "the policy moved between two close paths");
    assert!(
        changes.len() <= 1,
        "the chosen path changed {} times: {changes:?}",
        changes.len()
    );
    // The run can end while a measurement has moved the peer for a moment
    // (to the relay, say); the policy puts it back on the chosen path
    // within one measurement's timeout, with traffic going on.
    run(&mut sim, &mut d, Duration::from_secs(30), |sim, _| {
        traffic(sim, &mut n);
        (sim.endpoint(0, 1), sim.endpoint(1, 0)) == start_paths
    });
    assert_eq!(
        (sim.endpoint(0, 1), sim.endpoint(1, 0)),
        start_paths,
        "the peers ended on other paths"
    );
    let after: u64 = d.states.values().map(|s| s.rtt_switches).sum();
    assert_eq!(after, 0, "the policy moved between two close paths");
}

#[test]
fn when_the_faster_path_dies_the_peer_moves_to_the_other_in_bounded_time() {
    let (mut sim, mut d) = same_nat_pair(seed(27), 2, 30);
    assert!(
        on_lan(&sim, 0, 1) && on_lan(&sim, 1, 0),
        "not on the LAN first"
    );
    let mut n = 0u8;
    // Both paths measured at least once.
    run(&mut sim, &mut d, Duration::from_secs(60), |sim, _| {
        traffic(sim, &mut n);
        false
    });
    for l in LAN {
        sim.udp_dead_to.insert(sa(l).ip());
    }
    let died = sim.ticks();
    let got = sim.nodes[1].received.len();
    let mut at = None;
    run(&mut sim, &mut d, Duration::from_secs(120), |sim, _| {
        traffic(sim, &mut n);
        if on_public(sim, 0, 1) && on_public(sim, 1, 0) {
            at = Some(sim.ticks() - died);
            return true;
        }
        false
    });
    let ms = at.expect("still not on the public path 120 s after the LAN died");
    eprintln!("on the public path {ms} ms after the LAN died");
    // Every path is measured within (paths x MEASURE_GAP); the dead one
    // is known MEASURE_TIMEOUT later.
    assert!(ms <= 40_000, "took {ms} ms");
    run(&mut sim, &mut d, Duration::from_secs(5), |sim, _| {
        traffic(sim, &mut n);
        false
    });
    assert!(
        sim.nodes[1].received.len() > got + 10,
        "no traffic on the remaining path"
    );
}

// ---- Liveness of the direct path (device::PathState::step) ----

/// Both NATs lose their mappings while both sides send: the direct path
/// is dark both ways. The liveness probes (nothing received for
/// LIVENESS_QUIET while sending, then LIVENESS_MISSES probes unanswered
/// for LIVENESS_TIMEOUT each) give it up for the relay within seconds, on
/// simulated time and with no help from WireGuard's own timers (15-20 s,
/// which the simulation does not run: without the probes the dead path
/// was kept for good).
#[test]
fn a_dead_direct_path_under_traffic_falls_back_to_the_relay_within_seconds() {
    let (mut sim, mut d) = two_nodes(seed(25), [Some(false), Some(false)]);
    until_direct(&mut sim, &mut d, Duration::from_secs(10), "no direct path");
    let mut n = 0u8;
    run(&mut sim, &mut d, Duration::from_secs(5), |sim, _| {
        traffic(sim, &mut n);
        false
    });
    for nat in &mut sim.nats {
        nat.expire();
    }
    let dark_at = sim.ticks();
    let mut gap = None;
    let received = sim.nodes[1].received.len();
    run(&mut sim, &mut d, Duration::from_secs(40), |sim, _| {
        traffic(sim, &mut n);
        if !direct(sim, 0, 1) && !direct(sim, 1, 0) && sim.nodes[1].received.len() > received {
            gap = Some(sim.ticks() - dark_at);
            return true;
        }
        false
    });
    let gap = gap.expect("the dead direct path was kept (no traffic over the relay in 40 s)");
    let bound = (LIVENESS_QUIET + LIVENESS_TIMEOUT * LIVENESS_MISSES).as_millis() as u64 + 1_000;
    println!("direct path dark: traffic over the relay {gap} ms later (bound {bound} ms)");
    assert!(gap <= bound, "{gap} ms to the relay, bound {bound} ms");
    let fallbacks = d.states[&(0, 1)].fallbacks + d.states[&(1, 0)].fallbacks;
    assert!(fallbacks >= 1, "not counted as a fallback");
    // What the engine counts (and starts a discovery round on): once each.
    assert_eq!(
        d.fell_back.len() as u64,
        fallbacks,
        "fallbacks reported: {:?}",
        d.fell_back
    );
}

/// A lossy but working direct path is not given up: 5 % of datagrams
/// lost each way, node 0 sending one packet per tick and node 1 sending
/// nothing back (so only the liveness probes' answers tell node 0 the path
/// works, the worst case for them), 10 minutes. Each probe's round trip
/// fails about one time in ten; LIVENESS_MISSES in a row are needed.
#[test]
fn a_lossy_direct_path_with_one_way_traffic_does_not_flap() {
    let (mut sim, mut d) = two_nodes(seed(26), [Some(false), Some(false)]);
    until_direct(&mut sim, &mut d, Duration::from_secs(10), "no direct path");
    sim.net.loss = 50;
    let mut n = 0u8;
    let mut off_direct = 0u32;
    run(&mut sim, &mut d, Duration::from_secs(600), |sim, _| {
        sim.send(0, 1, n);
        n = n.wrapping_add(1);
        if !direct(sim, 0, 1) {
            off_direct += 1;
        }
        false
    });
    let st = &d.states[&(0, 1)];
    println!(
        "10 min at 5 % loss, one-way traffic: {} liveness probes, {} fallbacks, \
         {} ticks off direct",
        st.liveness_probes, st.fallbacks, off_direct
    );
    assert!(
        st.liveness_probes >= 100,
        "the liveness check did not run: {}",
        st.liveness_probes
    );
    // (Ticks off direct are the round-trip measurements of the relay,
    // which move the peer there for a moment by design.)
    assert_eq!(st.fallbacks, 0, "a working lossy path was given up");
    assert_eq!(d.states[&(1, 0)].fallbacks, 0);
}

// ---- Liveness probes within the device-wide probe budget ----

/// Node 0 and `n` spokes (nodes 1..=n), each a peer of node 0 only, with
/// UDP endpoints and a session each; node 0's policy state per spoke.
fn hub(n: usize, seed: u64) -> (Sim, HashMap<usize, PathState>) {
    let mut sim = Sim::new(seed, Net::default());
    for i in 0..=n {
        sim.add_node(i);
    }
    let mut states = HashMap::new();
    for j in 1..=n {
        sim.introduce(0, j, true);
        sim.introduce(j, 0, true);
        assert!(sim.establish(0, j, 5), "no session with spoke {j}");
        // Within the hub's handshake limiter (HANDSHAKES_PER_SECOND).
        sim.advance(Duration::from_millis(20));
        states.insert(j, PathState::new(&sim.peer(0, j).stats(), sim.now()));
    }
    (sim, states)
}

/// One look of node 0's policy at the spokes in `order`, with node 0's
/// one budget; returns the spokes that fell back.
fn hub_policy(
    sim: &mut Sim,
    states: &mut HashMap<usize, PathState>,
    order: &[usize],
    budget: &mut ProbeBudget,
) -> Vec<usize> {
    let mut fell = Vec::new();
    for &j in order {
        let peer = sim.peer(0, j);
        let st = states.get_mut(&j).unwrap();
        let mut t = None;
        sim.with_device(0, |dev, now, out, io| {
            t = Some(dev.path_tick(
                now,
                &peer,
                st,
                true,
                Duration::from_secs(5),
                budget,
                out,
                io,
            ));
        });
        if t.expect("the policy ran").fell_back {
            fell.push(j);
        }
    }
    fell
}

/// The most handshake initiations node 0 sent over UDP in any 1 s of
/// simulated time from `from` on (read off the wire).
fn peak_initiations_per_second(sim: &Sim, from: u64) -> usize {
    let at: Vec<u64> = sim
        .udp_initiations
        .iter()
        .filter(|(t, n)| *n == 0 && *t >= from)
        .map(|(t, _)| *t)
        .collect();
    let mut peak = 0;
    let mut lo = 0;
    for hi in 0..at.len() {
        while at[hi] - at[lo] >= 1000 {
            lo += 1;
        }
        peak = peak.max(hi - lo + 1);
    }
    peak
}

/// The attack: 240 peers (more than PROBES_PER_SECOND) take data from
/// node 0 one way, and every direct path goes dark at the same moment, so
/// every peer wants its liveness probes in the same second. Node 0's probe
/// datagrams stay within its device-wide budget in every second (they were
/// bounded per peer only: 240 in one second), the rest wait, and every
/// peer still gives its dead path up, later by the wait.
#[test]
fn liveness_probes_of_many_peers_stay_within_the_probe_budget() {
    const N: usize = 240;
    let (mut sim, mut states) = hub(N, seed(28));
    let order: Vec<usize> = (1..=N).collect();
    let mut budget = ProbeBudget::default();
    for j in 1..=N {
        sim.udp_cut.insert((0, j));
    }
    let dark_at = sim.ticks();
    let mut gave_up: HashMap<usize, u64> = HashMap::new();
    // Bounded: 30 s of simulated time.
    for _ in 0..(30_000 / PATH_TICK.as_millis() as u64) {
        for j in 1..=N {
            sim.send(0, j, 1);
        }
        for j in hub_policy(&mut sim, &mut states, &order, &mut budget) {
            gave_up.entry(j).or_insert(sim.ticks() - dark_at);
        }
        sim.advance(PATH_TICK);
    }
    let peak = peak_initiations_per_second(&sim, dark_at);
    let liveness: u64 = states.values().map(|s| s.liveness_probes).sum();
    let last = gave_up.values().max().copied();
    println!(
        "{N} peers, dead direct paths, one-way traffic: peak {peak} probe datagrams in 1 s \
         (budget {PROBES_PER_SECOND}), {liveness} liveness probes, {} probes deferred, \
         {} of {N} gave up, the last {last:?} ms after the paths died",
        budget.deferred,
        gave_up.len()
    );
    assert!(
        peak <= PROBES_PER_SECOND as usize,
        "{peak} probe datagrams in one second, budget {PROBES_PER_SECOND}"
    );
    assert!(
        budget.deferred > 0,
        "the budget was never spent: the test proves nothing"
    );
    assert_eq!(gave_up.len(), N, "peers kept their dead direct path");
    // Each peer needs LIVENESS_MISSES probes; ceil(N / budget) peers'
    // worth of them share each second.
    let turns = N.div_ceil(PROBES_PER_SECOND as usize) as u32;
    let bound =
        (LIVENESS_QUIET + LIVENESS_TIMEOUT * LIVENESS_MISSES * turns).as_millis() as u64 + 1_000;
    let last = last.unwrap();
    assert!(
        last <= bound,
        "the last give-up {last} ms, bound {bound} ms"
    );
}

/// Liveness before candidates: 60 peers on the relay probe 8 candidates
/// each (their bursts want about 2400 datagrams in 8 s, more than the
/// rounds' share of the budget), and ONE peer's direct path dies under
/// one-way traffic, looked at last in every tick. Its liveness probes take
/// the reserve the rounds may not use, so it gives the path up within the
/// bound of a lone peer; the whole device stays within its budget.
#[test]
fn a_dead_path_is_given_up_in_bounded_time_while_probing_rounds_spend_the_budget() {
    const ROUNDS: usize = 60;
    let (mut sim, mut states) = hub(ROUNDS + 1, seed(29));
    // Spoke 1 is direct; the others are on the relay with candidates
    // nobody answers (the probes' answers would stop their rounds).
    let now = sim.now();
    for j in 2..=ROUNDS + 1 {
        let peer = sim.peer(0, j);
        peer.set_endpoint(Endpoint::Relay(sim.nodes[j].public()));
        let cands: Vec<SocketAddr> = (1..=8)
            .map(|k| SocketAddr::from(([198, 18, j as u8, k], 51820)))
            .collect();
        let st = states.get_mut(&j).unwrap();
        *st = PathState::new(&peer.stats(), now);
        st.set_candidates(&cands, now);
    }
    let mut order: Vec<usize> = (2..=ROUNDS + 1).collect();
    order.push(1);
    let mut budget = ProbeBudget::default();
    sim.udp_cut.insert((0, 1));
    let dark_at = sim.ticks();
    let mut gave_up = None;
    // Bounded: 20 s of simulated time.
    for _ in 0..(20_000 / PATH_TICK.as_millis() as u64) {
        sim.send(0, 1, 1);
        if hub_policy(&mut sim, &mut states, &order, &mut budget).contains(&1) {
            gave_up.get_or_insert(sim.ticks() - dark_at);
        }
        sim.advance(PATH_TICK);
    }
    let peak = peak_initiations_per_second(&sim, dark_at);
    let rounds: u64 = states.values().map(|s| s.probe_rounds).sum();
    println!(
        "1 dead path among {ROUNDS} peers probing candidates: given up after {gave_up:?} ms; \
         {rounds} rounds, {} deferred, peak {peak} probe datagrams in 1 s",
        budget.deferred
    );
    assert!(
        budget.deferred > 0,
        "the rounds never spent the budget: the test proves nothing"
    );
    assert!(peak <= PROBES_PER_SECOND as usize, "peak {peak}");
    let gave_up = gave_up.expect("the dead direct path was kept for 20 s");
    let bound = (LIVENESS_QUIET + LIVENESS_TIMEOUT * LIVENESS_MISSES).as_millis() as u64 + 1_000;
    assert!(
        gave_up <= bound,
        "given up after {gave_up} ms, bound {bound} ms"
    );
    assert_eq!(
        sim.endpoint(0, 1),
        Some(Endpoint::Relay(sim.nodes[1].public()))
    );
}

// ---- A peer restarted on a new port (no relay) ----

/// Node `a` sends to node `b` one way with no relay; `b` restarts on a new
/// UDP port of the same IP (a new device with the same key: no session),
/// and `a`'s map brings `b`'s new address a second later. `a`'s liveness
/// probes give the old port up, and with no relay a probing round goes at
/// once to the candidates (the new port): `a` finds `b` again within the
/// liveness bound. Before that (a round only after the flap holddown,
/// 5 s doubled per recent fallback) it took 10 s more. Returns the time
/// from the restart until `b` got `a`'s data again.
fn restart_on_a_new_port(seed: u64, restart_controlling: bool) -> u64 {
    let mut sim = Sim::full_mesh(2, seed, Net::default());
    assert!(sim.establish(0, 1, 5), "no session over UDP");
    // The side that measures and chooses has the lower key.
    let low = usize::from(sim.nodes[1].public().as_bytes() < sim.nodes[0].public().as_bytes());
    let b = if restart_controlling { low } else { 1 - low };
    let a = 1 - b;
    let mut d = Driver {
        states: HashMap::new(),
        budgets: vec![ProbeBudget::default(), ProbeBudget::default()],
        changes: Vec::new(),
        chosen: Vec::new(),
        fell_back: Vec::new(),
        measured: Vec::new(),
        relay_up: false,
    };
    let now = sim.now();
    for (i, j) in [(0, 1), (1, 0)] {
        let mut st = PathState::new(&sim.peer(i, j).stats(), now);
        // The map's candidates: each node's UDP address.
        st.set_candidates(&[sim.nodes[j].addr], now);
        d.states.insert((i, j), st);
    }
    let mut n = 0u8;
    run(&mut sim, &mut d, Duration::from_secs(30), |sim, _| {
        sim.send(a, b, n);
        n = n.wrapping_add(1);
        false
    });
    let old = sim.nodes[b].addr;
    assert_eq!(sim.endpoint(a, b), Some(Endpoint::Udp(old)), "not direct");
    assert!(sim.nodes[b].received.len() >= 100, "no traffic before");

    let new = SocketAddr::new(old.ip(), old.port() + 1);
    sim.restart(b, new);
    sim.introduce(b, a, true);
    let now = sim.now();
    let mut st = PathState::new(&sim.peer(b, a).stats(), now);
    st.set_candidates(&[sim.nodes[a].addr], now);
    d.states.insert((b, a), st);
    let restarted = sim.ticks();
    let mut found = None;
    // Bounded: 40 s of simulated time.
    run(&mut sim, &mut d, Duration::from_secs(40), |sim, d| {
        if sim.ticks() - restarted == 1_000 {
            let now = sim.now();
            d.states
                .get_mut(&(a, b))
                .unwrap()
                .set_candidates(&[new], now);
        }
        if sim.endpoint(a, b) == Some(Endpoint::Udp(new)) && !sim.nodes[b].received.is_empty() {
            found = Some(sim.ticks() - restarted);
            return true;
        }
        sim.send(a, b, n);
        n = n.wrapping_add(1);
        false
    });
    let st = &d.states[&(a, b)];
    println!(
        "node {b} restarted on a new port ({}controlling): node {a} found it after {found:?} ms; \
         {} liveness probes, {} rounds, {} fallbacks reported",
        if restart_controlling { "" } else { "not " },
        st.liveness_probes,
        st.probe_rounds,
        d.fell_back.len()
    );
    let found = found.expect("the restarted peer was not found again in 40 s");
    assert!(
        d.fell_back.iter().any(|f| (f.1, f.2) == (a, b)),
        "the old port's give-up was not reported as a fallback"
    );
    found
}

#[test]
fn a_peer_restarted_on_a_new_port_is_found_again_without_a_relay() {
    // Nothing heard for LIVENESS_QUIET, LIVENESS_MISSES probes (a
    // measurement in flight may hold them off for its MEASURE_TIMEOUT,
    // one miss), then one round trip.
    let bound = (LIVENESS_QUIET + LIVENESS_TIMEOUT * LIVENESS_MISSES).as_millis() as u64 + 2_000;
    for (s, controlling) in [(30, false), (31, true)] {
        let ms = restart_on_a_new_port(seed(s), controlling);
        assert!(ms <= bound, "found again after {ms} ms, bound {bound} ms");
    }
}

/// Node `i`'s NAT gets a new public address (a new DHCP lease, as in
/// `nat_pairs.sh`'s address change): every mapping goes, and `i`'s relay
/// session, made from the old address, is dead until its liveness check
/// reconnects it 5.5 s later, before the direct path is given up (about
/// 6 s). Node `i` pings (one packet per tick), the other answers each
/// ping it gets and sends nothing else, so only node `i` gives the path
/// up. `chooser` is the side with the lower key (it measures and
/// chooses). With `after_measure`, the address changes that many ms after
/// a measurement probe of the chooser's left (so the next one, and the
/// endpoint hold it brings, falls at a chosen moment of the change).
struct AddressChange {
    /// Both sides direct to the new address (and staying so for 10 s),
    /// this many ms after the change.
    back: Option<u64>,
    /// Fallbacks node `i` reported, and when (ms after the change).
    fell: Vec<u64>,
    /// The first ping answered after the change reached node `i` then (ms).
    first_answer: Option<u64>,
}

fn address_change(s: u64, i: usize, chooser: usize, after_measure: Option<u64>) -> AddressChange {
    // Keys are random: new pairs until `chooser` has the lower key (each
    // try is even odds; 64 tries fail one time in 2^64).
    let (mut sim, mut d) = (0..64)
        .map(|_| two_nodes(seed(s), [Some(false), Some(false)]))
        .find(|(sim, _)| {
            let low =
                usize::from(sim.nodes[1].public().as_bytes() < sim.nodes[0].public().as_bytes());
            low == chooser
        })
        .expect("a pair with the wanted side choosing");
    let j = 1 - i;
    until_direct(&mut sim, &mut d, Duration::from_secs(10), "no direct path");
    let mut n = 0u8;
    let mut answered = sim.nodes[j].received.len();
    let mut ping = move |sim: &mut Sim| {
        sim.send(i, j, n);
        n = n.wrapping_add(1);
        if sim.nodes[j].received.len() > answered {
            answered = sim.nodes[j].received.len();
            sim.send(j, i, n);
        }
    };
    // Long enough for the direct path to count as stable (no holddown).
    run(&mut sim, &mut d, Duration::from_secs(70), |sim, _| {
        ping(sim);
        false
    });
    if let Some(wait) = after_measure {
        let o = 1 - chooser;
        let before = d.measured.len();
        let mut at = None;
        // A measurement goes every MEASURE_GAP (10 s); wait for the next.
        run(&mut sim, &mut d, Duration::from_secs(30), |sim, d| {
            if at.is_none()
                && d.measured[before..]
                    .iter()
                    .any(|m| (m.1, m.2) == (chooser, o))
            {
                at = Some(sim.ticks());
            }
            if at.is_some_and(|t| sim.ticks() - t >= wait) {
                return true;
            }
            ping(sim);
            false
        });
        assert!(at.is_some(), "the chooser measured nothing in 30 s");
    }
    let nat = sim.behind[&i];
    let new_ip = sa("203.0.113.77:0").ip();
    sim.nats[nat].public_ip = new_ip;
    sim.nats[nat].expire();
    sim.relay_dead.insert(i);
    let changed = sim.ticks();
    let fell_before = d.fell_back.len();
    let answers_before = sim.nodes[i].received.len();
    let mut first_answer = None;
    let mut announced = 0;
    let mut direct_since = None;
    let mut back = None;
    run(&mut sim, &mut d, Duration::from_secs(60), |sim, d| {
        ping(sim);
        let since = sim.ticks() - changed;
        if first_answer.is_none() && sim.nodes[i].received.len() > answers_before {
            first_answer = Some(since);
        }
        if since >= 5_500 {
            sim.relay_dead.remove(&i);
        }
        // Each fallback starts a discovery round; with the relay session
        // back, the new mapping reaches the peer (and its list ours).
        let fell = d.fell_back.len() - fell_before;
        if since >= 5_500 && fell > announced {
            announced = fell;
            announce(sim, d, i, j);
            announce(sim, d, j, i);
        }
        let on_new = matches!(sim.endpoint(j, i), Some(Endpoint::Udp(a)) if a.ip() == new_ip);
        if on_new && direct(sim, i, j) {
            let t = *direct_since.get_or_insert(since);
            if since - t >= 10_000 {
                back = Some(t);
                return true;
            }
        } else {
            direct_since = None;
        }
        false
    });
    let fell: Vec<u64> = d.fell_back[fell_before..]
        .iter()
        .filter(|f| f.1 == i)
        .map(|f| f.0 - changed)
        .collect();
    let changes: Vec<(u64, usize, &str)> = d
        .changes
        .iter()
        .filter(|c| c.0 >= changed)
        .map(|c| (c.0 - changed, c.1, c.3.name()))
        .collect();
    let measured: Vec<(u64, &str)> = d
        .measured
        .iter()
        .filter(|m| m.0 + 10_000 >= changed && m.1 == chooser)
        .map(|m| (m.0.saturating_sub(changed), m.3.path().name()))
        .collect();
    println!(
        "seed {s}: node {i}'s address changed, node {chooser} chooses, {after_measure:?} ms \
         after a measurement: first ping answered after {first_answer:?} ms; direct to the new \
         address (for 10 s) after {back:?} ms; node {i}'s fallbacks at {fell:?} ms; node \
         {chooser}'s measurements (ms, path; before the change: 0) {measured:?}; path changes \
         (ms, node, path) {changes:?}"
    );
    AddressChange {
        back,
        fell,
        first_answer,
    }
}

/// After the public address of the side that chooses changes, the pair
/// is direct again to the new address and stays so. The direct path is
/// given up for the relay (one fallback); the peer's probes to the new
/// mapping then arrive from the same address as before. That address's
/// give-up (timed as unanswered) must not outlive the authenticated
/// datagrams now coming from it: otherwise each probe's answer moved the
/// chooser there and back to the relay at once, counted a fallback each
/// time (pushing its own probing out by the growing holddown), and the
/// pair stayed on the relay (`nat_pairs.sh`: 7-8 fallbacks, not direct
/// within 40 s).
#[test]
fn after_a_public_address_change_the_pair_is_direct_again() {
    // Both orders: the policy looks at node 0's peer first in each tick.
    for (s, i) in [(40, 0), (41, 1), (42, 0), (43, 1)] {
        let r = address_change(s, i, i, None);
        let back = r
            .back
            .unwrap_or_else(|| panic!("seed {s}: not direct to the new address in 60 s"));
        assert!(
            back <= 15_000,
            "seed {s}: direct again only after {back} ms"
        );
        assert_eq!(r.fell.len(), 1, "seed {s}: fallbacks of the chooser");
    }
}

/// As above, but the side whose address changes does NOT choose: the
/// other side's round-trip measurements hold its endpoint (no roaming
/// while a measurement is out, `MEASURE_TIMEOUT` + `SETTLE`, every
/// `MEASURE_GAP`). When the changed side gives the dead path up and its
/// authenticated packets reach the chooser from another path (the
/// relay), the chooser must follow them at once, not keep answering on
/// the dead path until the hold is over (`nat_pairs.sh`: a ping gap of
/// about 12 s against 6 s in the other order). The change lands at every
/// second of the chooser's measurement cycle.
#[test]
fn after_the_address_of_the_side_that_follows_changes_a_measurement_hold_does_not_stall_it() {
    let mut worst = 0;
    for (k, wait) in [0u64, 1_000, 3_000, 4_000, 5_000, 6_000, 8_000, 9_000]
        .into_iter()
        .enumerate()
    {
        let s = 50 + k as u64;
        let (i, chooser) = if k % 2 == 0 { (0, 1) } else { (1, 0) };
        let r = address_change(s, i, chooser, Some(wait));
        let fell = *r
            .fell
            .first()
            .unwrap_or_else(|| panic!("seed {s}: node {i} never gave the dead direct path up"));
        let answer = r
            .first_answer
            .unwrap_or_else(|| panic!("seed {s}: no ping answered after the change"));
        // From the changed side's give-up, its packets reach the chooser
        // over the relay at once; the chooser's answers must follow them.
        let late = answer.saturating_sub(fell);
        worst = worst.max(late);
        assert!(
            late <= 3_000,
            "seed {s} ({wait} ms after a measurement): the first ping answered {late} ms \
             after node {i} gave the dead path up (at {fell} ms)"
        );
        let back = r
            .back
            .unwrap_or_else(|| panic!("seed {s}: not direct to the new address in 60 s"));
        assert!(
            back <= fell + 3_000,
            "seed {s} ({wait} ms after a measurement): direct again only {back} ms after \
             the change, node {i} gave the path up at {fell} ms"
        );
        assert_eq!(r.fell.len(), 1, "seed {s}: fallbacks of node {i}");
    }
    println!("longest wait for an answer after the give-up: {worst} ms");
}

/// The endpoint hold itself (`Peer::hold_endpoint`), what it still
/// guards and when it yields: node 0 holds its endpoint (node 1's UDP
/// address, C) as a measurement does, and node 1 talks over the relay.
/// - While C has nothing of ours unanswered, node 1's data over the relay
///   does not move node 0 (datagrams in flight on a path just left).
/// - Once node 0 sent to C and C is silent (the UDP path cut), node 1's
///   data still does not move it for HOLD_YIELD, nor, after it, does the
///   answer to an initiation of ours over the relay (a measurement's
///   answer times the relay; it says nothing of where the peer is).
/// - Node 1's own data over the relay after HOLD_YIELD moves node 0 to
///   the relay, and the endpoint left is handed to the policy once.
#[test]
fn an_endpoint_hold_yields_only_to_the_peers_own_packets_once_the_endpoint_is_silent() {
    let mut sim = Sim::full_mesh(2, seed(60), Net::default());
    assert!(sim.establish(0, 1, 5), "no session over UDP");
    let c = Endpoint::Udp(sim.nodes[1].addr);
    let relay0 = Endpoint::Relay(sim.nodes[0].public());
    let relay1 = Endpoint::Relay(sim.nodes[1].public());
    assert_eq!(sim.endpoint(0, 1), Some(c));
    let hold = sim.now() + Duration::from_secs(7);
    sim.peer(0, 1).hold_endpoint(Some(hold), HOLD_YIELD);
    sim.peer(1, 0).set_endpoint(relay0);
    let mut n = 0u8;
    let mut from_1 = |sim: &mut Sim| {
        let got = sim.nodes[0].received.len();
        sim.send(1, 0, n);
        n = n.wrapping_add(1);
        sim.settle(100);
        assert!(sim.nodes[0].received.len() > got, "node 1's data lost");
    };
    from_1(&mut sim);
    assert_eq!(sim.endpoint(0, 1), Some(c), "moved with nothing unanswered");
    sim.udp_cut.insert((0, 1));
    sim.send(0, 1, 0);
    sim.settle(100);
    sim.advance(HOLD_YIELD - Duration::from_millis(100));
    from_1(&mut sim);
    assert_eq!(sim.endpoint(0, 1), Some(c), "moved before HOLD_YIELD");
    sim.advance(Duration::from_millis(200));
    let peer = sim.peer(0, 1);
    sim.with_device(0, |dev, now, out, io| {
        assert!(dev.probe(now, &peer, relay1, out, io), "no initiation");
    });
    sim.settle(100);
    assert!(
        peer.take_rtt_sample().is_some_and(|(p, _)| p == relay1),
        "the initiation over the relay was not answered"
    );
    assert_eq!(sim.endpoint(0, 1), Some(c), "moved by an answer of ours");
    assert_eq!(peer.take_hold_yield(), None);
    from_1(&mut sim);
    assert_eq!(sim.endpoint(0, 1), Some(relay1), "the hold did not yield");
    assert_eq!(peer.take_hold_yield(), Some(c));
    assert_eq!(peer.take_hold_yield(), None, "handed over twice");
}
