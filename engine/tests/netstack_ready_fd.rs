//! `ready_fd`: the eventfds a caller polls instead of blocking a thread in
//! a read, write or receive of the userspace stack (what the C ABI's
//! `meshvpn_conn_wait_fds` and the Go binding's netpoller waits are built
//! on). Each direction's descriptor wakes only after a call in that
//! direction found nothing to do, and again on every such call after it.

mod common;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use common::stacks::stack_mesh;
use meshvpn_engine::netstack::{Direction, TcpStream};
use meshvpn_engine::{NetstackConfig, NetstackError};

const LONG: Duration = Duration::from_secs(30);
const NOW: Option<Duration> = Some(Duration::ZERO);

/// Whether `fd` turns readable within `within`.
fn readable(fd: &OwnedFd, within: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = within.as_millis() as libc::c_int;
    // SAFETY: one valid pollfd and a count of 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    assert!(rc >= 0, "poll: {}", std::io::Error::last_os_error());
    rc > 0
}

/// Writes into `stream` until its send buffer and the peer's window are
/// full (bounded: both are 256 KiB) and stay so: each time it fills, the
/// bytes in flight are acknowledged and make room, which wakes `wfd`, so
/// it writes again until a write that found no room is followed by 200 ms
/// without a wake. Returns the bytes queued; `wfd` is left armed and
/// drained.
fn fill(stream: &TcpStream, wfd: &OwnedFd) -> usize {
    let chunk = vec![0u8; 64 << 10];
    let mut queued = 0usize;
    loop {
        match stream.write_timeout(&chunk, NOW) {
            Ok(n) => queued += n,
            Err(NetstackError::TimedOut) if !readable(wfd, Duration::from_millis(200)) => {
                return queued
            }
            Err(NetstackError::TimedOut) => {}
            Err(e) => panic!("write: {e}"),
        }
        assert!(queued < 64 << 20, "the send buffer never filled");
    }
}

#[test]
fn each_direction_wakes_after_a_call_that_found_nothing() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let server = SocketAddr::new(b.addr(false), 7100);
    let listener = b.stack.tcp_listen(server, 1).unwrap();
    let client = a.stack.tcp_connect(server, Some(LONG)).unwrap();
    let (accepted, _) = listener.accept_timeout(Some(LONG)).unwrap();
    let rfd = accepted.ready_fd(Direction::Read).unwrap();
    let wfd = accepted.ready_fd(Direction::Write).unwrap();
    let mut buf = vec![0u8; 64 << 10];

    // A read that finds nothing arms it; the next bytes wake it; the
    // write direction, never armed, stays quiet.
    assert_eq!(
        accepted.read_timeout(&mut buf, NOW),
        Err(NetstackError::TimedOut)
    );
    assert!(!readable(&rfd, Duration::from_millis(50)));
    client.write_timeout(b"ping", Some(LONG)).unwrap();
    assert!(readable(&rfd, LONG), "the read direction woke");
    assert!(
        !readable(&wfd, Duration::ZERO),
        "the write direction did not"
    );
    let n = accepted.read_timeout(&mut buf, NOW).unwrap();
    assert_eq!(&buf[..n], b"ping");
    // The next read that finds nothing resets it.
    assert_eq!(
        accepted.read_timeout(&mut buf, NOW),
        Err(NetstackError::TimedOut)
    );
    assert!(!readable(&rfd, Duration::ZERO), "arming drained it");

    // The write direction: fill the send buffer and the peer's window,
    // then the peer reads and it wakes.
    let queued = fill(&accepted, &wfd);
    let mut got = 0usize;
    while !readable(&wfd, Duration::ZERO) && got < queued {
        got += client.read_timeout(&mut buf, Some(LONG)).unwrap();
    }
    assert!(readable(&wfd, LONG), "room in the send buffer woke it");
    assert!(accepted.write_timeout(b"more", NOW).unwrap() > 0);

    // The peer's FIN wakes an armed read, and a close wakes an armed
    // write (armed and drained by a full buffer that stays full).
    while accepted.read_timeout(&mut buf, NOW).is_ok() {}
    assert!(!readable(&rfd, Duration::ZERO));
    drop(client);
    assert!(readable(&rfd, LONG), "the FIN woke it");
    let wfd2 = accepted.ready_fd(Direction::Write).unwrap();
    fill(&accepted, &wfd2);
    assert!(!readable(&wfd, Duration::ZERO));
    accepted.close();
    assert!(readable(&wfd2, LONG), "closing woke the write direction");
    assert!(
        readable(&wfd, Duration::ZERO),
        "every copy is the same eventfd"
    );
}

#[test]
fn a_udp_receive_wakes_after_one_that_found_nothing() {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (a, b) = (&nodes[0], &nodes[1]);
    let rx = b
        .stack
        .udp_bind(SocketAddr::new(b.addr(false), 7101))
        .unwrap();
    let tx = a.stack.udp_bind(SocketAddr::new(a.addr(false), 0)).unwrap();
    let rfd = rx.ready_fd(Direction::Read).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        rx.recv_from_timeout(&mut buf, NOW).map(|_| ()),
        Err(NetstackError::TimedOut)
    );
    tx.send_to(b"datagram", rx.local_addr()).unwrap();
    assert!(readable(&rfd, LONG), "the datagram woke it");
    let (n, from) = rx.recv_from_timeout(&mut buf, NOW).unwrap();
    assert_eq!((&buf[..n], from), (&b"datagram"[..], tx.local_addr()));
}
