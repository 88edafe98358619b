//! Engines with userspace stacks attached, and byte streams to push through
//! them with a hash check.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use meshvpn_engine::netstack::TcpStream;
use meshvpn_engine::{IpPrefix, Netstack, NetstackConfig};
use ring::digest::{Context, SHA256};

use super::{mesh, Node};

pub struct StackNode {
    pub stack: Netstack,
    pub node: Node,
}

impl StackNode {
    pub fn addr(&self, v6: bool) -> IpAddr {
        if v6 {
            self.node.v6
        } else {
            self.node.v4
        }
    }
}

/// Attaches a stack owning the node's mesh addresses.
pub fn attach(node: Node, config: NetstackConfig) -> StackNode {
    node.engine
        .set_addresses(vec![IpPrefix::host(node.v4), IpPrefix::host(node.v6)]);
    let stack = Netstack::attach(&node.engine, config).expect("stack attaches");
    StackNode { stack, node }
}

/// `n` meshed engines on loopback, each with a stack.
pub fn stack_mesh(n: usize, config: NetstackConfig) -> Vec<StackNode> {
    mesh(n, false)
        .into_iter()
        .map(|node| attach(node, config.clone()))
        .collect()
}

/// Bytes a bulk test moves each way: `MESHVPN_TEST_MB` megabytes, 100 by
/// default (what CI runs, in release).
pub fn bulk_bytes() -> u64 {
    let mb: u64 = std::env::var("MESHVPN_TEST_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    mb << 20
}

/// A reproducible byte stream (xorshift64*), cheap enough not to be what
/// a bulk test measures.
pub struct Pattern(u64);

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        Pattern(seed | 1)
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            let v = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// Writes `total` pattern bytes and shuts down writing; returns their
/// SHA-256. Gives up at `deadline`.
pub fn send_pattern(s: &TcpStream, total: u64, seed: u64, deadline: Instant) -> [u8; 32] {
    try_send_pattern(s, total, seed, deadline, None).unwrap_or_else(|e| panic!("sender: {e}"))
}

/// [`send_pattern`] that returns what ended it, sleeping `pace` after
/// each 64 KiB write when given (a stream that lasts).
pub fn try_send_pattern(
    mut s: &TcpStream,
    total: u64,
    seed: u64,
    deadline: Instant,
    pace: Option<Duration>,
) -> Result<[u8; 32], String> {
    let mut pat = Pattern::new(seed);
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 << 10];
    let mut left = total;
    s.set_write_timeout(Some(Duration::from_secs(30)));
    while left > 0 {
        if Instant::now() >= deadline {
            return Err(format!("ran out of time with {left} bytes left"));
        }
        let n = left.min(buf.len() as u64) as usize;
        pat.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).map_err(|e| format!("write: {e}"))?;
        hash.update(&buf[..n]);
        left -= n as u64;
        if let Some(pace) = pace {
            std::thread::sleep(pace);
        }
    }
    s.shutdown_write().map_err(|e| format!("shutdown: {e}"))?;
    Ok(hash.finish().as_ref().try_into().unwrap())
}

/// Reads to the end of the stream; returns (bytes, SHA-256).
pub fn recv_all(s: &TcpStream, deadline: Instant) -> (u64, [u8; 32]) {
    try_recv_all(s, deadline).unwrap_or_else(|e| panic!("receiver: {e}"))
}

/// [`recv_all`] that returns what ended it.
pub fn try_recv_all(mut s: &TcpStream, deadline: Instant) -> Result<(u64, [u8; 32]), String> {
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    s.set_read_timeout(Some(Duration::from_secs(30)));
    loop {
        if Instant::now() >= deadline {
            return Err(format!("ran out of time after {total} bytes"));
        }
        let n = s
            .read(&mut buf)
            .map_err(|e| format!("read after {total} bytes: {e}"))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
    Ok((total, hash.finish().as_ref().try_into().unwrap()))
}

/// Moves `bytes` each way at once over one connection from `a` to a
/// listener on `b`, and checks both streams arrive whole.
pub fn transfer_both_ways(a: &StackNode, b: &StackNode, v6: bool, bytes: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    let listener = b
        .stack
        .tcp_listen(SocketAddr::new(b.addr(v6), 5001), 4)
        .unwrap();
    let remote = SocketAddr::new(b.addr(v6), 5001);
    std::thread::scope(|scope| {
        let server = scope.spawn(|| {
            let (conn, peer) = listener
                .accept_timeout(Some(Duration::from_secs(60)))
                .expect("accept");
            assert_eq!(peer.ip(), a.addr(v6));
            std::thread::scope(|inner| {
                let tx = inner.spawn(|| send_pattern(&conn, bytes, 2, deadline));
                let rx = recv_all(&conn, deadline);
                (tx.join().unwrap(), rx)
            })
        });
        let conn = a
            .stack
            .tcp_connect(remote, Some(Duration::from_secs(60)))
            .expect("connect");
        assert_eq!(conn.peer_addr(), remote);
        assert_eq!(conn.local_addr().ip(), a.addr(v6));
        let (sent_ab, got_ba) = std::thread::scope(|inner| {
            let tx = inner.spawn(|| send_pattern(&conn, bytes, 1, deadline));
            let rx = recv_all(&conn, deadline);
            (tx.join().unwrap(), rx)
        });
        let (sent_ba, got_ab) = server.join().unwrap();
        assert_eq!(got_ab.0, bytes, "a->b byte count");
        assert_eq!(got_ba.0, bytes, "b->a byte count");
        assert_eq!(got_ab.1, sent_ab, "a->b stream hash");
        assert_eq!(got_ba.1, sent_ba, "b->a stream hash");
    });
}
