//! The Rust variant of `benches/netstack_compare.sh`: two engines in this
//! process on loopback UDP, each with a userspace stack, and `--streams`
//! TCP connections from one to the other moving `--bytes` in all. The Go
//! variants (`bindings/go/interop/cmd/nsbench`) move the same bytes the
//! same way, so the figures compare.
//!
//!   netstack_xfer [--streams N] [--bytes TOTAL] [--timeout SECONDS]
//!                 [--tcp-buffer BYTES] [--duplex 1]
//!
//! `--duplex 1` lays the threads out as `meshvpn forward` does: each
//! sending connection also has a thread blocked in `read` on it (the copy
//! of the other direction, which has nothing to carry), so a wake meant
//! for the writer that also reaches the reader shows in the figures.
//!
//! The timeout bounds the whole transfer (default 300 s). `--tcp-buffer`
//! sets both stacks' TCP receive and send buffers (default: the
//! `NetstackConfig` default), the window a stream can have in flight.
//!
//! Each connection starts with a 16-byte header (stream index, length,
//! little-endian) and then carries the deterministic pattern of
//! [`pattern`] for that index; the receiver compares every byte with the
//! pattern and counts them, so a broken transfer fails (exit 1) instead of
//! printing a figure. On success one line:
//!
//!   RESULT variant=rust streams=N bytes=B secs=S cpu_s=C
//!
//! `secs` is the wall time from the first write to the last verified byte,
//! `cpu_s` the process's user+system CPU time over the same window (from
//! /proc/self/stat; NSB_CLK_TCK gives the tick rate, 100 by default).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::process::exit;
use std::time::{Duration, Instant};

use meshvpn_benches::engine_pair;
use meshvpn_engine::netstack::TcpStream;
use meshvpn_engine::{Netstack, NetstackConfig};

/// The pattern's period: a prime, so that it never lines up with segment
/// or buffer sizes and a misplaced segment shows as a mismatch.
const PERIOD: usize = 65521;
/// Bytes per write and per read.
const IO: usize = 128 << 10;
const PORT: u16 = 5201;

/// The bytes of stream `index`, one period plus one write long so that any
/// offset's next `IO` bytes are one slice: byte `o` of the stream is
/// `pattern[o % PERIOD]`. The Go variants build the same bytes.
fn pattern(index: u64) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ index.wrapping_add(1);
    let period: Vec<u8> = (0..PERIOD)
        .map(|_| {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    period.iter().copied().cycle().take(PERIOD + IO).collect()
}

fn die(msg: String) -> ! {
    eprintln!("netstack_xfer: {msg}");
    exit(1)
}

/// User+system CPU seconds of this process, all threads.
fn cpu_seconds() -> f64 {
    let tck: f64 = std::env::var("NSB_CLK_TCK")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100.0);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name, which may hold spaces: utime and
    // stime are the 12th and 13th of them.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / tck
}

fn send(s: &TcpStream, index: u64, len: u64) -> Result<(), String> {
    let p = pattern(index);
    let mut head = [0u8; 16];
    head[..8].copy_from_slice(&index.to_le_bytes());
    head[8..].copy_from_slice(&len.to_le_bytes());
    let mut w = s;
    w.write_all(&head)
        .map_err(|e| format!("stream {index}: write: {e}"))?;
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(IO as u64) as usize;
        let at = (off % PERIOD as u64) as usize;
        w.write_all(&p[at..at + n])
            .map_err(|e| format!("stream {index}: write at {off}: {e}"))?;
        off += n as u64;
    }
    Ok(())
}

/// Reads one stream to its announced length, comparing every byte.
/// Returns the bytes verified.
fn receive(s: &TcpStream, streams: u64, expect_len: u64) -> Result<u64, String> {
    let mut r = s;
    let mut head = [0u8; 16];
    r.read_exact(&mut head)
        .map_err(|e| format!("read header: {e}"))?;
    let index = u64::from_le_bytes(head[..8].try_into().unwrap());
    let len = u64::from_le_bytes(head[8..].try_into().unwrap());
    if index >= streams || len != expect_len {
        return Err(format!(
            "bad header: stream {index} of {streams}, length {len}"
        ));
    }
    let p = pattern(index);
    let mut buf = vec![0u8; IO];
    let mut got = 0u64;
    while got < len {
        let want = (len - got).min(IO as u64) as usize;
        let n = r
            .read(&mut buf[..want])
            .map_err(|e| format!("stream {index}: read at {got}: {e}"))?;
        if n == 0 {
            return Err(format!("stream {index}: ended after {got} of {len} bytes"));
        }
        let at = (got % PERIOD as u64) as usize;
        if buf[..n] != p[at..at + n] {
            return Err(format!(
                "stream {index}: wrong bytes in {got}..{}",
                got + n as u64
            ));
        }
        got += n as u64;
    }
    Ok(got)
}

fn main() {
    let mut streams = 1u64;
    let mut total = 1u64 << 30;
    let mut timeout = 300u64;
    let mut duplex = false;
    let mut config = NetstackConfig::default();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| die(format!("{a} takes a number")));
        match a.as_str() {
            "--streams" => streams = v,
            "--bytes" => total = v,
            "--timeout" => timeout = v,
            "--duplex" => duplex = v != 0,
            "--tcp-buffer" => {
                config.tcp_rx_buffer = v as usize;
                config.tcp_tx_buffer = v as usize;
            }
            _ => die(format!("unknown argument {a}")),
        }
    }
    if streams == 0 || streams > 64 || total < streams {
        die("--streams takes 1..64 and --bytes at least one per stream".into());
    }
    let per = total / streams;
    let limit = Some(Duration::from_secs(timeout));

    let [(ea, _), (eb, addr_b)] = engine_pair();
    let a = Netstack::attach(&ea, config.clone()).unwrap_or_else(|e| die(format!("stack a: {e}")));
    let b = Netstack::attach(&eb, config).unwrap_or_else(|e| die(format!("stack b: {e}")));
    let remote = SocketAddr::new(addr_b, PORT);
    let listener = b
        .tcp_listen(remote, streams as usize)
        .unwrap_or_else(|e| die(format!("listen: {e}")));
    let mut tx = Vec::new();
    let mut rx = Vec::new();
    for i in 0..streams {
        let s = a
            .tcp_connect(remote, Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| die(format!("connect {i}: {e}")));
        let (r, _) = listener
            .accept_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| die(format!("accept {i}: {e}")));
        s.set_write_timeout(limit);
        r.set_read_timeout(limit);
        tx.push(s);
        rx.push(r);
    }

    // The whole transfer is bounded, not only each read and write.
    std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(timeout));
        die(format!("timed out after {timeout} s"))
    });
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let result: Result<u64, String> = std::thread::scope(|scope| {
        let senders: Vec<_> = tx
            .iter()
            .enumerate()
            .map(|(i, s)| scope.spawn(move || send(s, i as u64, per)))
            .collect();
        let receivers: Vec<_> = rx
            .iter()
            .map(|r| scope.spawn(move || receive(r, streams, per)))
            .collect();
        // The other direction of a forwarder: blocked in read until the
        // transfer ends (then interrupted); it must never get a byte.
        let idle_readers: Vec<_> = tx
            .iter()
            .filter(|_| duplex)
            .map(|s| {
                scope.spawn(move || {
                    let mut buf = vec![0u8; IO];
                    match s.read_timeout(&mut buf, limit) {
                        Ok(0) | Err(_) => Ok(()),
                        Ok(n) => Err(format!("the idle direction got {n} bytes")),
                    }
                })
            })
            .collect();
        let mut moved = 0;
        let mut first_err = None;
        for h in receivers {
            // A failed receiver ends the run at once: its sender would
            // otherwise wait out the timeout on a full window.
            match h.join().unwrap_or_else(|_| Err("receiver panicked".into())) {
                Ok(n) => moved += n,
                Err(e) => die(e),
            }
        }
        for h in senders {
            if let Err(e) = h.join().unwrap_or_else(|_| Err("sender panicked".into())) {
                first_err.get_or_insert(e);
            }
        }
        for s in &tx {
            s.interrupter().interrupt();
        }
        for h in idle_readers {
            if let Err(e) = h
                .join()
                .unwrap_or_else(|_| Err("idle reader panicked".into()))
            {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(moved), Err)
    });
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    match result {
        Ok(moved) if moved == per * streams => println!(
            "RESULT variant=rust streams={streams} bytes={moved} secs={secs:.3} cpu_s={cpu:.2}"
        ),
        Ok(moved) => die(format!("moved {moved} bytes, expected {}", per * streams)),
        Err(e) => die(e),
    }
}
