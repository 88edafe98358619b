//! Hostile cases against the UAPI socket of a real `meshvpn -f IFNAME`
//! daemon (TUN and root needed: skipped, saying why, without them).

use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use meshvpn_engine::config::uapi::parse_get;
use meshvpn_engine::wg::{MAX_CONNECTIONS, UAPI_CLOSE_WITHIN, UAPI_WRITE_TIMEOUT};
use meshvpn_engine::{PublicKey, UapiServer};

use crate::common::{Ceilings, Daemon, Sampler, TempDir};

/// Peers configured on the daemon: a `get=1` reply of about 0.8 MB, far
/// more than a unix socket buffers.
const PEERS: u32 = 6000;
/// Clients that ask and never read; fewer than the connection cap, so
/// that the legitimate client has a slot.
const STALLED: usize = MAX_CONNECTIONS / 2;
/// From SIGTERM to exit: the signal is looked at every 200 ms, then the
/// UAPI server closes (its documented bound) and the engine stops.
const EXIT_WITHIN: Duration = Duration::from_secs(3);

/// Why this machine cannot run a `meshvpn` interface, if it cannot.
fn no_tun() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root".into());
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
    {
        Ok(_) => None,
        Err(e) => Some(format!("/dev/net/tun: {e}")),
    }
}

/// A `meshvpn -f IFNAME` and its UAPI socket.
struct Interface {
    daemon: Daemon,
    socket: PathBuf,
    _dir: TempDir,
}

impl Interface {
    fn start() -> Interface {
        let dir = TempDir::new("uapi");
        let name = format!("mvh{}", std::process::id() % 100_000);
        let socket = UapiServer::socket_path(&name);
        let mut daemon = Daemon::spawn(
            &["-f".to_string(), name.clone()],
            dir.path().join("daemon.log"),
        );
        let t = Instant::now();
        while UnixStream::connect(&socket).is_err() {
            assert!(
                daemon.alive() && t.elapsed() < Duration::from_secs(10),
                "meshvpn -f {name} did not come up: {}",
                daemon.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Interface {
            daemon,
            socket,
            _dir: dir,
        }
    }

    /// Configures `n` peers (keys made without Diffie-Hellman) through
    /// the socket, as `wg setconf` would.
    fn set_peers(&self, n: u32) {
        let mut request = String::from("set=1\n");
        request.push_str(&format!(
            "private_key={}\n",
            meshvpn_engine::PrivateKey::generate().to_hex()
        ));
        for i in 0..n {
            let mut raw = [0u8; 32];
            raw[..4].copy_from_slice(&i.to_le_bytes());
            raw[31] = 0x40;
            raw[5] = 9;
            request.push_str(&format!(
                "public_key={}\nendpoint=127.0.0.{}:{}\nallowed_ip=10.{}.{}.0/24\n",
                PublicKey::from_bytes(raw).to_hex(),
                i % 250 + 2,
                10000 + i % 50000,
                i >> 8,
                i & 0xff
            ));
        }
        request.push('\n');
        let s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        (&s).write_all(request.as_bytes()).expect("send set");
        let mut line = String::new();
        BufReader::new(&s).read_line(&mut line).expect("set reply");
        assert_eq!(line, "errno=0\n", "set of {n} peers");
    }

    /// A client that asks for `get=1` and never reads a byte.
    fn stalled(&self) -> UnixStream {
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.write_all(b"get=1\n\n").expect("send get");
        s
    }

    /// A legitimate `get=1`: the whole reply, within `within`.
    fn get_answers(&self, within: Duration) -> Result<(usize, Duration), String> {
        let t = Instant::now();
        let s = UnixStream::connect(&self.socket).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(within)).unwrap();
        (&s).write_all(b"get=1\n\n").map_err(|e| e.to_string())?;
        let mut reply = String::new();
        let mut r = BufReader::new(&s);
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return Err(format!("closed after {} bytes", reply.len())),
                Ok(_) => {}
                Err(e) => return Err(format!("{e} after {} bytes", reply.len())),
            }
            reply.push_str(&line);
            if line == "\n" {
                break;
            }
        }
        let peers = parse_get(&reply).map_err(|e| e.to_string())?.peers.len();
        Ok((peers, t.elapsed()))
    }
}

/// Whether the server closed its end: asked for no events, poll fails
/// only on the hang-up, which shows even with unread data queued.
fn hung_up(s: &UnixStream) -> bool {
    matches!(
        meshvpn_engine::io::poll(s.as_raw_fd(), 0, Duration::ZERO),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe
    )
}

fn wait_until(within: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < within {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

/// Clients that ask for the 6,000-peer `get=1` reply and never read it:
/// a legitimate client is still answered meanwhile, the server drops them
/// after the write deadline, and SIGTERM with such clients connected ends
/// the daemon within its bound (before the fix it hung for good).
#[test]
#[ignore = "hostile suite: run by `.ci/test-all` suite hostile"]
fn uapi_clients_that_never_read() {
    if let Some(why) = no_tun() {
        println!("hostile uapi_clients_that_never_read: skipped: {why}");
        return;
    }
    let mut iface = Interface::start();
    iface.set_peers(PEERS);
    let before = iface.daemon.usage();
    let sampler = Sampler::start(iface.daemon.pid());

    // During: the stalled clients hold their replies; another client is
    // answered in full.
    let stalled: Vec<UnixStream> = (0..STALLED).map(|_| iface.stalled()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let (peers, took) = iface
        .get_answers(Duration::from_secs(10))
        .expect("legitimate get=1 during the attack");
    assert_eq!(peers, PEERS as usize);
    println!("uapi: get=1 answered during the attack in {took:?}");

    // The write deadline frees their slots: each is closed by the server.
    assert!(
        wait_until(UAPI_WRITE_TIMEOUT + Duration::from_secs(5), || stalled
            .iter()
            .all(hung_up)),
        "{} of {STALLED} clients that never read still connected after {:?}",
        stalled.iter().filter(|s| !hung_up(s)).count(),
        UAPI_WRITE_TIMEOUT + Duration::from_secs(5)
    );
    drop(stalled);
    let (peers, took) = iface
        .get_answers(Duration::from_secs(10))
        .expect("legitimate get=1 after the attack");
    assert_eq!(peers, PEERS as usize);
    println!("uapi: get=1 answered after the attack in {took:?}");

    // SIGTERM while clients are stalled again: the daemon still exits.
    let stalled: Vec<UnixStream> = (0..STALLED).map(|_| iface.stalled()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let peak = sampler.finish();
    let exited = iface.daemon.signal_and_wait(libc::SIGTERM, EXIT_WITHIN);
    drop(stalled);
    let exited = exited.unwrap_or_else(|| {
        panic!(
            "meshvpn did not exit within {EXIT_WITHIN:?} of SIGTERM while {STALLED} UAPI \
             clients did not read (UAPI close bound {UAPI_CLOSE_WITHIN:?}); log: {}",
            iface.daemon.log_text()
        )
    });
    println!("uapi: exited {exited:?} after SIGTERM");
    assert!(!Path::new(&iface.socket).exists(), "socket removed on exit");
    // Seen: about 30 MiB, 12 threads, 20 fds. Threads: the engine's 8
    // plus one per UAPI connection (capped at MAX_CONNECTIONS); fds: the
    // engine's, plus two per connection.
    Ceilings {
        rss_mib: 48,
        threads: 8 + MAX_CONNECTIONS as u64 + 4,
        fds: 16 + 2 * MAX_CONNECTIONS as u64,
    }
    .check("uapi_clients_that_never_read", before, peak);
}
