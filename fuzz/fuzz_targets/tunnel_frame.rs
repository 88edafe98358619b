//! The remotedialer codec and session state machine on hostile frames.
//!
//! The fuzzer picks a role and a script of steps: raw frames from the peer,
//! local dials / accepts / refusals / writes / reads / closes, and clock
//! steps. Invariants:
//! - `decode` never panics; a decoded Data message re-encodes (canonical
//!   varints) to bytes that decode to the same message;
//! - the session never panics (a fatal error ends the script);
//! - every frame the session transmits decodes with the same codec;
//! - buffered bytes never exceed the session's hard cap, and live
//!   connections never exceed `max_connections` (small limits, so the
//!   fuzzer reaches them).
#![no_main]

use std::time::{Duration, Instant};

use arbitrary::Arbitrary;
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use meshvpn_engine::supervisor::message::{decode, encode, Body, MessageType};
use meshvpn_engine::supervisor::{ConnId, Event, Limits, Role, Transmit, TunnelSession};

#[derive(Arbitrary, Debug)]
enum Step {
    Frame(Vec<u8>),
    Dial(u8),
    Accept(u8),
    Refuse(u8),
    Write { conn: u8, len: u16 },
    Read { conn: u8, len: u16 },
    Close(u8),
    Release(u8),
    Advance(u16),
}

#[derive(Arbitrary, Debug)]
struct Script {
    server: bool,
    steps: Vec<Step>,
}

fn limits() -> Limits {
    Limits {
        max_connections: 6,
        recv_buffer_hard: 8 << 10,
        session_buffer_soft: 12 << 10,
        session_buffer_hard: 24 << 10,
        session_pause_floor: 1 << 10,
        send_queue: 4 << 10,
        data_chunk: 1 << 10,
        max_control_queue: 16,
        ..Limits::default()
    }
}

fn check_codec(frame: &[u8]) {
    let Ok(message) = decode(frame) else {
        return;
    };
    if let Body::Data(payload) = message.body {
        let again = encode(message.id, message.conn_id, MessageType::Data, payload);
        assert_eq!(decode(&again).expect("re-encoded Data decodes"), message);
    }
}

fuzz_target!(|script: Script| {
    let limits = limits();
    let role = if script.server {
        Role::Server
    } else {
        Role::Agent
    };
    let mut now = Instant::now();
    let mut session = TunnelSession::new(role, limits.clone(), now);
    let mut conns: Vec<ConnId> = Vec::new();
    let mut dead = false;
    let pick = |conns: &[ConnId], n: u8| conns.get(n as usize % conns.len().max(1)).copied();
    let mut buf = vec![0u8; 1 << 16];

    for step in script.steps.into_iter().take(256) {
        let result = match step {
            Step::Frame(frame) => {
                check_codec(&frame);
                session.handle_message(now, Bytes::from(frame))
            }
            Step::Dial(n) => {
                let _ = session.dial(now, "tcp", &format!("127.0.0.1:{}", 10000 + n as u16));
                Ok(())
            }
            Step::Accept(n) => {
                if let Some(id) = pick(&conns, n) {
                    let _ = session.accept(id);
                }
                Ok(())
            }
            Step::Refuse(n) => {
                if let Some(id) = pick(&conns, n) {
                    session.refuse(id, "refused by the fuzzer");
                }
                Ok(())
            }
            Step::Write { conn, len } => {
                if let Some(id) = pick(&conns, conn) {
                    let data = vec![0x5a; len as usize];
                    let _ = session.send(id, &data);
                }
                Ok(())
            }
            Step::Read { conn, len } => {
                if let Some(id) = pick(&conns, conn) {
                    let n = (len as usize).min(buf.len());
                    let _ = session.recv(id, &mut buf[..n]);
                }
                Ok(())
            }
            Step::Close(n) => {
                if let Some(id) = pick(&conns, n) {
                    session.close(id, None);
                }
                Ok(())
            }
            Step::Release(n) => {
                if let Some(id) = pick(&conns, n) {
                    session.release(id);
                }
                Ok(())
            }
            Step::Advance(ms) => {
                now += Duration::from_millis(ms as u64 * 16);
                session.handle_timeout(now)
            }
        };
        if result.is_err() {
            dead = true;
        }
        while let Some(t) = session.poll_transmit() {
            if let Transmit::Message(frame) = t {
                decode(&frame).expect("the session transmitted a frame its own codec rejects");
            }
        }
        while let Some(event) = session.poll_event() {
            match event {
                Event::Incoming { conn, .. } => conns.push(conn),
                Event::Readable(c) | Event::Writable(c) | Event::Closed(c) => {
                    if !conns.contains(&c) {
                        conns.push(c);
                    }
                }
            }
        }
        conns.truncate(64);
        assert!(
            session.buffered() <= limits.session_buffer_hard,
            "buffered {} over the hard cap",
            session.buffered()
        );
        assert!(
            session.live_ids().len() <= limits.max_connections,
            "{} live connections over the cap",
            session.live_ids().len()
        );
        if dead {
            break;
        }
    }
});
