use std::time::Duration;

use super::*;
use crate::supervisor::message::{decode, encode, encode_sync, Body};

/// A server and an agent session wired back to back through memory.
struct Pair {
    now: Instant,
    server: TunnelSession,
    agent: TunnelSession,
    agent_events: Vec<Event>,
    server_events: Vec<Event>,
    /// Frames the agent sent, decoded type names, for assertions.
    agent_sent: Vec<Vec<u8>>,
    server_sent: Vec<Vec<u8>>,
}

impl Pair {
    fn new(limits: Limits) -> Self {
        let now = Instant::now();
        Self {
            now,
            server: TunnelSession::new(Role::Server, limits.clone(), now),
            agent: TunnelSession::new(Role::Agent, limits, now),
            agent_events: Vec::new(),
            server_events: Vec::new(),
            agent_sent: Vec::new(),
            server_sent: Vec::new(),
        }
    }

    /// Moves frames both ways until quiet.
    fn drive(&mut self) {
        loop {
            let mut moved = false;
            while let Some(t) = self.server.poll_transmit() {
                if let Transmit::Message(m) = t {
                    self.server_sent.push(m.clone());
                    self.agent.handle_message(self.now, Bytes::from(m)).unwrap();
                }
                moved = true;
            }
            while let Some(t) = self.agent.poll_transmit() {
                if let Transmit::Message(m) = t {
                    self.agent_sent.push(m.clone());
                    self.server
                        .handle_message(self.now, Bytes::from(m))
                        .unwrap();
                }
                moved = true;
            }
            while let Some(e) = self.agent.poll_event() {
                self.agent_events.push(e);
            }
            while let Some(e) = self.server.poll_event() {
                self.server_events.push(e);
            }
            if !moved {
                break;
            }
        }
    }

    fn open(&mut self, target: &str) -> (ConnId, ConnId) {
        let (proto, address) = target.split_once('/').unwrap();
        let id = self.server.dial(self.now, proto, address).unwrap();
        self.drive();
        let incoming = self.agent_events.iter().find_map(|e| match e {
            Event::Incoming {
                conn,
                proto: p,
                address: a,
            } if *conn == id => Some((p.clone(), a.clone())),
            _ => None,
        });
        assert_eq!(incoming, Some((proto.to_owned(), address.to_owned())));
        self.agent.accept(id).unwrap();
        (id, id)
    }
}

fn read_all(s: &mut TunnelSession, id: ConnId) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.recv(id, &mut buf) {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn kinds(frames: &[Vec<u8>], conn: i64) -> Vec<&'static str> {
    frames
        .iter()
        .filter_map(|f| {
            let m = decode(f).unwrap();
            if m.conn_id != conn {
                return None;
            }
            Some(match m.body {
                Body::Data(_) => "data",
                Body::Connect { .. } => "connect",
                Body::Error(_) => "error",
                Body::Pause => "pause",
                Body::Resume => "resume",
                Body::SyncConnections(_) => "sync",
                _ => "other",
            })
        })
        .collect()
}

#[test]
fn dial_data_both_ways_then_clean_close() {
    let mut p = Pair::new(Limits::default());
    let (s, a) = p.open("tcp/127.0.0.1:10250");
    assert_eq!(s, ConnId(2), "server numbers connections from 2, like Go");
    assert_eq!(p.server.send(s, b"GET / HTTP/1.1\r\n\r\n").unwrap(), 18);
    p.drive();
    assert!(p.agent_events.contains(&Event::Readable(a)));
    assert_eq!(read_all(&mut p.agent, a), b"GET / HTTP/1.1\r\n\r\n");
    p.agent.send(a, b"HTTP/1.1 200 OK\r\n\r\n").unwrap();
    p.agent.close(a, None);
    p.drive();
    // Data first, then EOF: the reader sees all bytes, then end of stream.
    assert_eq!(read_all(&mut p.server, s), b"HTTP/1.1 200 OK\r\n\r\n");
    assert_eq!(p.server.recv(s, &mut [0; 8]), Ok(0));
    assert_eq!(kinds(&p.agent_sent, a.0), ["data", "error"]);
    // The server echoes the Error as Go does; the agent ignores it (no ping-pong).
    assert_eq!(kinds(&p.server_sent, s.0), ["connect", "data", "error"]);
    p.server.release(s);
    p.agent.release(a);
    p.drive();
    assert_eq!(p.server.connection_count(), 0);
    assert_eq!(p.agent.connection_count(), 0);
    assert_eq!(p.server.buffered() + p.agent.buffered(), 0);
}

#[test]
fn refused_connect_fails_only_that_connection() {
    let mut p = Pair::new(Limits::default());
    let (good, _) = p.open("tcp/127.0.0.1:10250");
    let bad = p.server.dial(p.now, "tcp", "10.0.0.1:22").unwrap();
    p.server.send(bad, b"hello").unwrap();
    p.drive();
    p.agent.refuse(bad, "connect not allowed");
    p.drive();
    assert_eq!(
        p.server.recv(bad, &mut [0; 8]),
        Err(StreamError::Reset("connect not allowed".into()))
    );
    assert!(p.server_events.contains(&Event::Closed(bad)));
    // The other connection still works both ways.
    p.server.send(good, b"x").unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.agent, good), b"x");
    assert_eq!(
        p.agent.buffered(),
        0,
        "refused connection's early data is freed"
    );
}

#[test]
fn pause_and_resume_at_go_thresholds() {
    let mut p = Pair::new(Limits::default());
    let (s, a) = p.open("tcp/127.0.0.1:10250");
    let chunk = vec![7u8; 32 << 10];
    // Fill the agent's buffer past 2 MiB without reading.
    let mut sent = 0;
    while sent <= PAUSE_THRESHOLD + chunk.len() {
        match p.server.send(s, &chunk) {
            Ok(n) => sent += n,
            Err(StreamError::WouldBlock) => {}
            Err(e) => panic!("{e}"),
        }
        p.drive();
    }
    assert_eq!(kinds(&p.agent_sent, a.0), ["pause"], "exactly one Pause");
    assert_eq!(p.agent.stats().pauses_sent, 1);
    // The paused sender queues, then blocks.
    loop {
        match p.server.send(s, &chunk) {
            Ok(_) => p.drive(),
            Err(StreamError::WouldBlock) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let buffered = p.agent.readable_len(a);
    assert!(
        buffered > PAUSE_THRESHOLD && buffered <= PAUSE_THRESHOLD + 2 * chunk.len(),
        "{buffered}"
    );
    // Read down to just above 256 KiB: no Resume yet.
    let mut buf = vec![0u8; 4096];
    while p.agent.readable_len(a) >= RESUME_THRESHOLD + buf.len() {
        p.agent.recv(a, &mut buf).unwrap();
    }
    p.drive();
    assert_eq!(kinds(&p.agent_sent, a.0), ["pause"]);
    p.agent.recv(a, &mut buf).unwrap();
    p.drive();
    assert_eq!(kinds(&p.agent_sent, a.0), ["pause", "resume"]);
    assert!(p.server_events.contains(&Event::Writable(s)));
    // Everything sent eventually arrives in order.
    let rest = read_all(&mut p.agent, a);
    assert!(rest.iter().all(|b| *b == 7));
}

#[test]
fn paused_connection_does_not_stall_others() {
    let mut p = Pair::new(Limits::default());
    let (slow, _) = p.open("tcp/127.0.0.1:1");
    let (fast, _) = p.open("tcp/127.0.0.1:2");
    // The agent pauses `slow` (as a Go peer would after 2 MiB).
    p.agent.queue_control(slow, MessageType::Pause, &[]);
    p.drive();
    p.server.send(slow, &[1; 1000]).unwrap();
    p.server.send(fast, &[2; 1000]).unwrap();
    p.drive();
    assert_eq!(read_all(&mut p.agent, fast), vec![2; 1000]);
    assert_eq!(p.agent.readable_len(slow), 0, "paused data held back");
    p.agent.queue_control(slow, MessageType::Resume, &[]);
    p.drive();
    assert_eq!(read_all(&mut p.agent, slow), vec![1; 1000]);
}

#[test]
fn unknown_ids() {
    let now = Instant::now();
    let mut agent = TunnelSession::new(Role::Agent, Limits::default(), now);
    agent
        .handle_message(now, Bytes::from(encode(1, 99, MessageType::Data, b"x")))
        .unwrap();
    let Some(Transmit::Message(reply)) = agent.poll_transmit() else {
        panic!()
    };
    let m = decode(&reply).unwrap();
    assert_eq!(m.conn_id, 99);
    assert_eq!(m.body, Body::Error(b"connection not found client/99"));
    // Error, Pause, Resume for unknown ids: ignored, nothing sent.
    for kind in [MessageType::Error, MessageType::Pause, MessageType::Resume] {
        agent
            .handle_message(now, Bytes::from(encode(1, 98, kind, b"EOF")))
            .unwrap();
    }
    assert_eq!(agent.poll_transmit(), None);
    // Unknown types are ignored; malformed ones end the session.
    agent
        .handle_message(now, Bytes::from_static(&[0x02, 0x04, 0x7e]))
        .unwrap();
    assert!(agent
        .handle_message(now, Bytes::from_static(&[0x02, 0x04]))
        .is_err());
}

#[test]
fn unsolicited_replies_are_bounded() {
    let now = Instant::now();
    let limits = Limits {
        max_control_queue: 10,
        ..Limits::default()
    };
    let mut agent = TunnelSession::new(Role::Agent, limits, now);
    for i in 0..1000 {
        agent
            .handle_message(
                now,
                Bytes::from(encode(1, 1000 + i, MessageType::Data, b"x")),
            )
            .unwrap();
    }
    let mut n = 0;
    while agent.poll_transmit().is_some() {
        n += 1;
    }
    assert_eq!(n, 10);
    assert_eq!(agent.stats().replies_dropped, 990);
}

#[test]
fn connect_limits() {
    let now = Instant::now();
    let limits = Limits {
        max_connections: 2,
        ..Limits::default()
    };
    let mut agent = TunnelSession::new(Role::Agent, limits, now);
    let mut over = b"tcp/".to_vec();
    over.extend(std::iter::repeat_n(b'a', 300));
    agent
        .handle_message(now, Bytes::from(encode(1, 2, MessageType::Connect, &over)))
        .unwrap();
    agent
        .handle_message(
            now,
            Bytes::from(encode(1, 3, MessageType::Connect, b"noslash")),
        )
        .unwrap();
    for id in 4..8 {
        agent
            .handle_message(
                now,
                Bytes::from(encode(1, id, MessageType::Connect, b"tcp/127.0.0.1:1")),
            )
            .unwrap();
    }
    let mut replies = Vec::new();
    while let Some(Transmit::Message(m)) = agent.poll_transmit() {
        let m = decode(&m).unwrap();
        let Body::Error(text) = m.body else { panic!() };
        replies.push((m.conn_id, String::from_utf8(text.to_vec()).unwrap()));
    }
    assert_eq!(
        replies,
        [
            (2, "failed to parse connect address".to_owned()),
            (3, "failed to parse connect address".to_owned()),
            (6, "too many connections".to_owned()),
            (7, "too many connections".to_owned()),
        ]
    );
    let incoming: Vec<_> = std::iter::from_fn(|| agent.poll_event()).collect();
    assert_eq!(incoming.len(), 2);
    // A server never accepts Connects.
    let mut server = TunnelSession::new(Role::Server, Limits::default(), now);
    server
        .handle_message(
            now,
            Bytes::from(encode(1, 5, MessageType::Connect, b"tcp/127.0.0.1:1")),
        )
        .unwrap();
    assert!(server.poll_event().is_none());
    assert!(matches!(server.poll_transmit(), Some(Transmit::Message(_))));
    assert_eq!(agent.dial(now, "tcp", "x:1"), Err(DialError::NotServer));
    assert_eq!(
        server.dial(now, "tcp", &"a".repeat(300)),
        Err(DialError::TargetTooLong)
    );
}

#[test]
fn peer_ignoring_pause_gets_reset_not_memory() {
    let limits = Limits::default();
    let now = Instant::now();
    let mut agent = TunnelSession::new(Role::Agent, limits.clone(), now);
    agent
        .handle_message(
            now,
            Bytes::from(encode(1, 2, MessageType::Connect, b"tcp/127.0.0.1:1")),
        )
        .unwrap();
    agent.accept(ConnId(2)).unwrap();
    let payload = vec![0u8; 64 << 10];
    let frame = Bytes::from(encode(1, 2, MessageType::Data, &payload));
    for _ in 0..(limits.recv_buffer_hard / payload.len() + 10) {
        agent.handle_message(now, frame.clone()).unwrap();
        assert!(agent.buffered() <= limits.recv_buffer_hard);
    }
    assert_eq!(agent.stats().connections_reset_for_memory, 1);
    assert_eq!(agent.buffered(), 0);
    assert_eq!(
        agent.recv(ConnId(2), &mut [0; 4]),
        Err(StreamError::Reset("receive buffer limit exceeded".into()))
    );
}

#[test]
fn session_soft_cap_pauses_early() {
    let limits = Limits {
        session_buffer_soft: 1 << 20,
        session_pause_floor: 64 << 10,
        ..Limits::default()
    };
    let now = Instant::now();
    let mut agent = TunnelSession::new(Role::Agent, limits, now);
    for id in 2..40 {
        agent
            .handle_message(
                now,
                Bytes::from(encode(1, id, MessageType::Connect, b"tcp/127.0.0.1:1")),
            )
            .unwrap();
        agent.accept(ConnId(id)).unwrap();
        agent
            .handle_message(
                now,
                Bytes::from(encode(1, id, MessageType::Data, &[0u8; 100 << 10])),
            )
            .unwrap();
    }
    // Each stream is far under 2 MiB, yet once the session is over 1 MiB they get paused.
    assert!(agent.stats().pauses_sent >= 28, "{:?}", agent.stats());
}

#[test]
fn sync_connections_closes_stale_without_error() {
    let mut p = Pair::new(Limits::default());
    let (a, _) = p.open("tcp/127.0.0.1:1");
    let (b, _) = p.open("tcp/127.0.0.1:2");
    p.now += Duration::from_secs(30);
    let fresh = p.server.dial(p.now, "tcp", "127.0.0.1:3").unwrap();
    // The agent only knows `a` (and never saw `fresh` yet).
    p.server
        .handle_message(p.now, Bytes::from(encode_sync(5, [a.0])))
        .unwrap();
    assert_eq!(
        p.server.recv(b, &mut [0; 1]),
        Err(StreamError::Reset("sync from client".into()))
    );
    assert_eq!(p.server.recv(a, &mut [0; 1]), Err(StreamError::WouldBlock));
    assert_eq!(
        p.server.recv(fresh, &mut [0; 1]),
        Err(StreamError::WouldBlock),
        "within grace"
    );
    // No Error went out for `b`.
    let errors_for_b = std::iter::from_fn(|| p.server.poll_transmit())
        .filter_map(|t| match t {
            Transmit::Message(m) => Some(m),
            Transmit::Ping => None,
        })
        .filter(|m| decode(m).unwrap().conn_id == b.0)
        .count();
    assert_eq!(errors_for_b, 0);
}

#[test]
fn agent_timers() {
    let limits = Limits::default();
    let t0 = Instant::now();
    let mut agent = TunnelSession::new(Role::Agent, limits, t0);
    assert_eq!(agent.poll_timeout(), t0 + Duration::from_secs(5));
    agent.handle_timeout(t0 + Duration::from_secs(5)).unwrap();
    assert_eq!(agent.poll_transmit(), Some(Transmit::Ping));
    // Pongs keep the session alive past 60 s.
    let mut t = t0;
    for _ in 0..13 {
        t += Duration::from_secs(5);
        agent.handle_keepalive(t);
        agent.handle_timeout(t).unwrap();
    }
    let mut syncs = 0;
    while let Some(x) = agent.poll_transmit() {
        if let Transmit::Message(m) = x {
            assert!(matches!(decode(&m).unwrap().body, Body::SyncConnections(_)));
            syncs += 1;
        }
    }
    assert_eq!(syncs, 1, "one SyncConnections per 60 s");
    // Without anything from the peer for 60 s, the session ends.
    assert_eq!(
        agent.handle_timeout(t + Duration::from_secs(60)),
        Err(SessionError::ReadTimeout)
    );
    let server = TunnelSession::new(Role::Server, Limits::default(), t0);
    assert_eq!(
        server.poll_timeout(),
        t0 + Duration::from_secs(60),
        "servers do not ping"
    );
}

#[test]
fn session_end_fails_every_stream() {
    let mut p = Pair::new(Limits::default());
    let (a, _) = p.open("tcp/127.0.0.1:1");
    p.agent.send(a, b"last words").unwrap();
    p.drive();
    p.server.close_all("tunnel disconnect");
    // Data already received stays readable, then the error.
    assert_eq!(read_all(&mut p.server, a), b"last words");
    assert_eq!(
        p.server.recv(a, &mut [0; 1]),
        Err(StreamError::Reset("tunnel disconnect".into()))
    );
    assert_eq!(
        p.server.send(a, b"x"),
        Err(StreamError::Reset("tunnel disconnect".into()))
    );
    assert_eq!(
        p.server.dial(p.now, "tcp", "127.0.0.1:1"),
        Err(DialError::SessionClosed)
    );
    p.server.release(a);
    assert_eq!(p.server.connection_count(), 0);
}

#[test]
fn peer_error_text_reaches_reader_after_data() {
    let mut p = Pair::new(Limits::default());
    let (s, a) = p.open("tcp/127.0.0.1:1");
    p.agent.send(a, b"partial").unwrap();
    p.agent
        .close(a, Some("dial tcp 127.0.0.1:1: connection refused"));
    p.drive();
    assert_eq!(read_all(&mut p.server, s), b"partial");
    assert_eq!(
        p.server.recv(s, &mut [0; 1]),
        Err(StreamError::Reset(
            "dial tcp 127.0.0.1:1: connection refused".into()
        ))
    );
    // Late data for a finished connection is answered like Go answers it.
    p.server
        .handle_message(
            p.now,
            Bytes::from(encode(1, s.0, MessageType::Data, b"late")),
        )
        .unwrap();
    let Some(Transmit::Message(m)) = p.server.poll_transmit() else {
        panic!()
    };
    assert!(
        matches!(decode(&m).unwrap().body, Body::Error(t) if t.starts_with(b"connection not found"))
    );
}

#[test]
fn many_streams_round_robin() {
    let mut p = Pair::new(Limits::default());
    let ids: Vec<ConnId> = (0..2000)
        .map(|i| p.open(&format!("tcp/127.0.0.1:{}", 1000 + i)).0)
        .collect();
    for (i, id) in ids.iter().enumerate() {
        p.server
            .send(*id, format!("stream {i}").as_bytes())
            .unwrap();
    }
    p.drive();
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(
            read_all(&mut p.agent, *id),
            format!("stream {i}").as_bytes()
        );
    }
    for id in &ids {
        p.server.release(*id);
        p.agent.release(*id);
    }
    p.drive();
    assert_eq!(p.server.connection_count() + p.agent.connection_count(), 0);
}

/// Every frame a hostile peer can send that makes a session queue a reply,
/// for `role`'s peer: `i` picks one. None of them needs anything written back.
fn hostile_frame(role: Role, i: i64) -> Vec<u8> {
    let conn = 1_000 + i;
    match (role, i % 4) {
        // Connects to a server are never allowed.
        (Role::Server, 0 | 1) => encode(i, conn, MessageType::Connect, b"tcp/127.0.0.1:1"),
        // An agent at max_connections, or given a target it cannot parse.
        (Role::Agent, 0) => encode(i, conn, MessageType::Connect, b"tcp/127.0.0.1:1"),
        (Role::Agent, 1) => encode(i, conn, MessageType::Connect, b"noslash"),
        // Data for an id nobody opened.
        (_, 2) => encode(i, conn, MessageType::Data, b"who?"),
        // A Connect reusing an id this side holds.
        _ => encode(i, 2, MessageType::Connect, b"tcp/127.0.0.1:1"),
    }
}

/// A flood of frames that each ask for a reply, with nothing written out:
/// the outbound control queue stays within `max_control_queue` in both
/// roles, and the session tells its driver to stop reading once it is full.
#[test]
fn reply_flood_with_nothing_written_stays_bounded() {
    const FLOOD: i64 = 20_000;
    let mut over = Vec::new();
    for role in [Role::Server, Role::Agent] {
        let now = Instant::now();
        let limits = Limits {
            max_control_queue: 64,
            max_connections: 4,
            ..Limits::default()
        };
        let mut s = TunnelSession::new(role, limits.clone(), now);
        if role == Role::Server {
            assert_eq!(s.dial(now, "tcp", "127.0.0.1:1"), Ok(ConnId(2)));
        }
        let mut stop_reading_at = None;
        for i in 0..FLOOD {
            // A driver that ignored the budget: the queue still holds.
            if s.read_budget() == 0 && stop_reading_at.is_none() {
                stop_reading_at = Some(i);
            }
            s.handle_message(now, Bytes::from(hostile_frame(role, i)))
                .unwrap();
            // A driver answers every Incoming: the agent's policy refuses them.
            while let Some(e) = s.poll_event() {
                if let Event::Incoming { conn, .. } = e {
                    s.refuse(conn, "connect not allowed");
                }
            }
            assert!(s.control_queued() <= limits.max_control_queue, "{role:?}");
        }
        assert_eq!(s.read_budget(), 0, "{role:?}: a full queue stops reading");
        assert!(
            stop_reading_at.is_some_and(|i| i <= limits.max_control_queue as i64 + 1),
            "{role:?}: stop-reading signalled at message {stop_reading_at:?}"
        );
        let queued = std::iter::from_fn(|| s.poll_transmit()).count();
        if queued > limits.max_control_queue {
            over.push(format!(
                "{role:?}: {queued} frames queued for a peer that never read, over max_control_queue {}",
                limits.max_control_queue
            ));
            continue;
        }
        assert!(
            s.stats().replies_dropped >= (FLOOD as u64) - 2 * limits.max_control_queue as u64,
            "{role:?}: {:?}",
            s.stats()
        );
        // Written out: reading may resume.
        assert_eq!(s.read_budget(), limits.max_control_queue, "{role:?}");
    }
    assert!(over.is_empty(), "{over:#?}");
}

/// A driver that hands over no more than `read_budget` messages between
/// writes never makes the session drop a reply.
#[test]
fn reading_within_the_budget_drops_no_reply() {
    for role in [Role::Server, Role::Agent] {
        let now = Instant::now();
        let limits = Limits {
            max_control_queue: 32,
            max_connections: 4,
            ..Limits::default()
        };
        let mut s = TunnelSession::new(role, limits.clone(), now);
        if role == Role::Server {
            s.dial(now, "tcp", "127.0.0.1:1").unwrap();
        }
        let (mut i, mut written) = (0i64, 0usize);
        while i < 5_000 {
            let budget = s.read_budget();
            assert!(budget <= limits.max_control_queue);
            for _ in 0..budget.min(7) {
                s.handle_message(now, Bytes::from(hostile_frame(role, i)))
                    .unwrap();
                i += 1;
                while let Some(e) = s.poll_event() {
                    if let Event::Incoming { conn, .. } = e {
                        s.refuse(conn, "connect not allowed");
                    }
                }
            }
            // The socket takes a few frames at a time.
            for _ in 0..5 {
                if s.poll_transmit().is_some() {
                    written += 1;
                }
            }
        }
        written += std::iter::from_fn(|| s.poll_transmit()).count();
        assert_eq!(s.stats().replies_dropped, 0, "{role:?}");
        assert!(written >= 4_900, "{role:?}: {written} replies written");
    }
}
