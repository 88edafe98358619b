//! Many engines coming up and going down at once: 50 concurrent cycles of
//! two engines with a 1 s persistent keepalive (handshake, one packet each
//! way, close). No deadlock (the whole run is bounded), and every thread
//! and socket the engines made is gone afterwards.
//!
//! Alone in its test binary: it counts the process's threads and file
//! descriptors, which other tests running beside it would change.

mod common;

use std::time::{Duration, Instant};

use common::{fd_count, mesh, send_and_receive, thread_count, udp_packet, wait_until};
use meshvpn_engine::PeerUpdate;

const CYCLES: usize = 50;

fn one_cycle(seed: u8) -> Result<(), String> {
    let nodes = mesh(2, false);
    let (a, b) = (&nodes[0], &nodes[1]);
    let keepalive = PeerUpdate {
        persistent_keepalive: Some(Some(1)),
        ..Default::default()
    };
    for (x, y) in [(a, b), (b, a)] {
        x.engine
            .update_peer(&y.key.public_key(), &keepalive, false)
            .map_err(|e| e.to_string())?;
    }
    let up = wait_until(Duration::from_secs(20), || {
        a.engine
            .peer_stats(&b.key.public_key())
            .is_some_and(|s| s.last_handshake.is_some())
    });
    if !up {
        return Err("no handshake within 20 s".into());
    }
    for (x, y) in [(a, b), (b, a)] {
        let p = udp_packet(x.v4, y.v4, 200, seed);
        if send_and_receive(&x.engine, &y.engine, &p).as_deref() != Some(&p[..]) {
            return Err("a packet did not cross".into());
        }
    }
    // Half the cycles close while the other engine still runs, half drop
    // without an explicit close (Drop must do the same work).
    if seed % 2 == 0 {
        a.engine.close();
        b.engine.close();
    }
    Ok(())
}

#[test]
fn fifty_concurrent_up_down_close_cycles_leak_nothing() {
    let threads_before = thread_count();
    let fds_before = fd_count();
    let started = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..CYCLES)
            .map(|i| s.spawn(move || one_cycle(i as u8)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    eprintln!(
        "{CYCLES} cycles in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for (i, r) in results.iter().enumerate() {
        assert!(r.is_ok(), "cycle {i}: {}", r.as_ref().unwrap_err());
    }
    assert!(
        wait_until(Duration::from_secs(10), || thread_count() <= threads_before),
        "threads: {threads_before} before, {} after every engine closed",
        thread_count()
    );
    assert!(
        wait_until(Duration::from_secs(5), || fd_count() <= fds_before),
        "file descriptors: {fds_before} before, {} after every engine closed",
        fd_count()
    );
}
