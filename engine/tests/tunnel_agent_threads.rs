//! The threads a server can make an agent start: two per stream the agent
//! pumps to a target, capped by `Limits::max_agent_streams`. Alone in its
//! test binary so the thread count from /proc is this test's own.

mod tunnel_support;

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshvpn_engine::supervisor::{
    Agent, AgentConfig, AllowList, DialedTarget, TargetDialer, TunnelServer,
};
use parking_lot::{Condvar, Mutex};
use tunnel_support::*;

const WAIT: Duration = Duration::from_secs(20);

/// An in-memory echo target: what is written comes back on read; no sockets,
/// so the test measures the agent's threads and not the target's fds.
#[derive(Default)]
struct Echo {
    state: Mutex<(VecDeque<u8>, bool)>,
    changed: Condvar,
}

struct EchoReader(Arc<Echo>);
struct EchoWriter(Arc<Echo>);

impl Read for EchoReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut st = self.0.state.lock();
        loop {
            if !st.0.is_empty() {
                let n = buf.len().min(st.0.len());
                for (b, v) in buf.iter_mut().zip(st.0.drain(..n)) {
                    *b = v;
                }
                return Ok(n);
            }
            if st.1 {
                return Ok(0);
            }
            self.0.changed.wait(&mut st);
        }
    }
}

impl Write for EchoWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut st = self.0.state.lock();
        if st.1 {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        st.0.extend(buf);
        self.0.changed.notify_all();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

struct EchoDialer;

impl TargetDialer for EchoDialer {
    fn dial(&self, _proto: &str, _address: &str) -> io::Result<DialedTarget> {
        let echo = Arc::new(Echo::default());
        let closer = echo.clone();
        Ok(DialedTarget {
            reader: Box::new(EchoReader(echo.clone())),
            writer: Box::new(EchoWriter(echo)),
            shutdown: Box::new(move || {
                closer.state.lock().1 = true;
                closer.changed.notify_all();
            }),
        })
    }
}

/// Threads of this process the agent starts for streams.
fn stream_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| matches!(name.trim(), "tunnel-dial" | "tunnel-pump"))
        .count()
}

#[test]
fn a_server_dialing_2000_streams_cannot_make_the_agent_start_more_than_its_cap() {
    const STREAMS: usize = 2000;
    const CAP: usize = 64;
    let pki = pki();
    let server = TunnelServer::bind(loopback(), server_config(&pki, &[])).unwrap();
    let mut config: AgentConfig = agent_config(&pki, server.local_addr(), &[]);
    config.limits.max_agent_streams = CAP;
    config.policy = Arc::new(AllowList(vec!["tcp/*:*".parse().unwrap()]));
    config.dialer = Arc::new(EchoDialer);
    let agent = Agent::start(config).unwrap();
    assert!(server.wait_for_client(NODE, WAIT));

    let started = Instant::now();
    let mut streams = Vec::with_capacity(STREAMS);
    let mut peak = 0;
    // A dial past the cap can be refused before its first write: the
    // refusal is then the write's error, kept as that stream's answer.
    let mut write_errors = Vec::with_capacity(STREAMS);
    for i in 0..STREAMS {
        let s = server.dial(NODE, "tcp", "127.0.0.1:1").unwrap();
        write_errors.push(
            (&s).write_all(format!("{i:06}").as_bytes())
                .err()
                .map(|e| e.to_string()),
        );
        streams.push(s);
        if i % 50 == 0 {
            peak = peak.max(stream_threads());
        }
        assert!(started.elapsed() < WAIT * 3, "dialing took too long");
    }
    // Every stream answers: an echo, or a refusal.
    let deadline = Instant::now() + WAIT;
    let (mut echoed, mut refused) = (0, 0);
    for (i, s) in streams.iter().enumerate() {
        let mut back = [0u8; 6];
        let mut got = 0;
        let mut error = write_errors[i].take();
        while error.is_none() && got < back.len() {
            match s.read_until(&mut back[got..], Some(deadline)) {
                Ok(0) => panic!("stream {i}: closed without an answer"),
                Ok(n) => got += n,
                Err(e) => {
                    error = Some(e.to_string());
                    break;
                }
            }
        }
        if i % 50 == 0 {
            peak = peak.max(stream_threads());
        }
        match error {
            None => {
                assert_eq!(&back, format!("{i:06}").as_bytes(), "stream {i}");
                echoed += 1;
            }
            Some(e) => {
                assert!(e.contains("too many streams"), "stream {i}: {e}");
                refused += 1;
            }
        }
    }
    println!(
        "{STREAMS} dials: {echoed} echoed, {refused} refused; peak {peak} stream threads; {:?}",
        agent.status()
    );
    assert!(
        peak <= 2 * CAP,
        "the agent ran {peak} stream threads, over 2 per stream for a cap of {CAP} streams"
    );
    assert_eq!(echoed, CAP, "the streams within the cap all work");
    assert_eq!(refused, STREAMS - CAP);
    assert_eq!(
        agent.status().streams_refused_at_cap,
        (STREAMS - CAP) as u64,
        "refusals counted"
    );
    // Closed streams give their slots back: new dials work again.
    drop(streams);
    let deadline = Instant::now() + WAIT;
    while agent.status().streams_active > 0 {
        assert!(Instant::now() < deadline, "{:?}", agent.status());
        std::thread::sleep(Duration::from_millis(10));
    }
    let s = server.dial(NODE, "tcp", "127.0.0.1:1").unwrap();
    assert_eq!(round_trip(&s, b"again").unwrap(), b"again");
    drop(agent);
}
