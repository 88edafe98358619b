//! `TcpStream::splice`: the stack's thread moves bytes between a mesh
//! connection and a kernel TCP socket (what `meshvpn forward` does), on
//! two real engines over loopback UDP and real kernel sockets on loopback.
//! The tests take one lock so each sees only its own threads.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener as KernelListener, TcpStream as KernelStream};
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::stacks::{recv_all, send_pattern, stack_mesh, Pattern, StackNode};
use meshvpn_engine::netstack::{Splice, TcpStream};
use meshvpn_engine::{NetstackConfig, NetstackError};
use ring::digest::{Context, SHA256};

const LONG: Duration = Duration::from_secs(60);

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A mesh connection from `a` to a listener on `b` at `port`: (a's end,
/// b's end).
fn mesh_pair(a: &StackNode, b: &StackNode, port: u16) -> (TcpStream, TcpStream) {
    let server = SocketAddr::new(b.addr(false), port);
    let listener = b.stack.tcp_listen(server, 64).unwrap();
    let near = a.stack.tcp_connect(server, Some(LONG)).unwrap();
    let (far, _) = listener.accept_timeout(Some(LONG)).unwrap();
    (near, far)
}

/// A connected pair of kernel sockets on loopback: (the one to splice,
/// the local application's).
fn kernel_pair() -> (KernelStream, KernelStream) {
    let l = KernelListener::bind("127.0.0.1:0").unwrap();
    let app = KernelStream::connect(l.local_addr().unwrap()).unwrap();
    let (spliced, _) = l.accept().unwrap();
    (spliced, app)
}

/// Writes `total` pattern bytes to a kernel socket, then shuts its write
/// side; returns their SHA-256.
fn kernel_send(mut s: &KernelStream, total: u64, seed: u64) -> [u8; 32] {
    let mut pat = Pattern::new(seed);
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 << 10];
    let mut left = total;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        pat.fill(&mut buf[..n]);
        s.write_all(&buf[..n]).unwrap();
        hash.update(&buf[..n]);
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write).unwrap();
    hash.finish().as_ref().try_into().unwrap()
}

/// Reads a kernel socket to its end: (bytes, SHA-256).
fn kernel_recv(mut s: &KernelStream) -> (u64, [u8; 32]) {
    s.set_read_timeout(Some(LONG)).unwrap();
    let mut hash = Context::new(&SHA256);
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = s.read(&mut buf).unwrap();
        if n == 0 {
            return (total, hash.finish().as_ref().try_into().unwrap());
        }
        hash.update(&buf[..n]);
        total += n as u64;
    }
}

/// `setsockopt(SOL_SOCKET, option)` with `value`.
fn set_socket_option<T>(s: &KernelStream, option: libc::c_int, value: &T) {
    // SAFETY: a valid socket, and a value of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt: {}", std::io::Error::last_os_error());
}

/// A mesh connection from a first node to a second at `port`, its first
/// end spliced to a kernel socket: (the nodes, the far end, the local
/// application's kernel socket, the splice).
fn spliced_pair(port: u16) -> (Vec<StackNode>, TcpStream, KernelStream, Splice) {
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (near, far) = mesh_pair(&nodes[0], &nodes[1], port);
    let (spliced, app) = kernel_pair();
    let splice = near.splice(spliced).unwrap();
    (nodes, far, app, splice)
}

fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|c| c.trim_end() == name)
        .count()
}

#[test]
fn bytes_cross_both_ways_and_each_end_of_stream_is_a_half_close() {
    let _g = serial();
    let (_nodes, far, app, splice) = spliced_pair(7300);
    let (up, down) = (8u64 << 20, 3u64 << 20);
    let deadline = Instant::now() + LONG;
    std::thread::scope(|s| {
        // The application sends all and shuts its write side first; the
        // far end answers after that, so the half-close must carry the
        // other direction on.
        let app_sent = s.spawn(|| kernel_send(&app, up, 1));
        let got_up = recv_all(&far, deadline);
        assert_eq!(got_up, (up, app_sent.join().unwrap()), "kernel to mesh");
        let far_sent = send_pattern(&far, down, 2, deadline);
        assert_eq!(kernel_recv(&app), (down, far_sent), "mesh to kernel");
    });
    let end = splice.wait(Some(LONG)).expect("the splice ended");
    assert_eq!((end.up, end.down, end.clean), (up, down, true));
}

/// A stack whose connections are spliced and have nothing to send runs on
/// its receive thread for each batch (no hand-off to the stack thread); a
/// stack whose received bytes go to reader threads, and a sending one,
/// keep the hand-off.
#[test]
fn a_spliced_download_runs_the_stack_on_the_receive_thread() {
    let _g = serial();
    let (nodes, far, app, splice) = spliced_pair(7306);
    let down = 16u64 << 20;
    let deadline = Instant::now() + LONG;
    std::thread::scope(|s| {
        let got = s.spawn(|| kernel_recv(&app));
        let sent = send_pattern(&far, down, 3, deadline);
        assert_eq!(got.join().unwrap(), (down, sent), "mesh to kernel");
    });
    let spliced = nodes[0].stack.stats().polls_on_receive;
    assert!(
        spliced > 0,
        "the spliced receiver never ran on its receive thread"
    );
    assert_eq!(nodes[1].stack.stats().polls_on_receive, 0, "the sender did");
    // The other way the spliced side sends and the far side reads.
    let up = 16u64 << 20;
    std::thread::scope(|s| {
        let app_sent = s.spawn(|| kernel_send(&app, up, 4));
        assert_eq!(
            recv_all(&far, deadline),
            (up, app_sent.join().unwrap()),
            "kernel to mesh"
        );
    });
    assert_eq!(
        nodes[1].stack.stats().polls_on_receive,
        0,
        "a receiver with a reader thread did"
    );
    let end = splice.wait(Some(LONG)).expect("the splice ended");
    assert_eq!((end.up, end.down, end.clean), (up, down, true));
}

#[test]
fn a_reset_on_the_kernel_side_resets_the_mesh_connection() {
    let _g = serial();
    let (_nodes, far, app, splice) = spliced_pair(7301);
    (&app).write_all(b"hello").unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(far.read_timeout(&mut buf, Some(LONG)), Ok(5));
    // SO_LINGER 0: closing sends RST instead of FIN.
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    set_socket_option(&app, libc::SO_LINGER, &linger);
    drop(app);
    let end = splice.wait(Some(LONG)).expect("the splice ended");
    assert!(!end.clean, "a reset is not a clean end");
    assert_eq!(end.up, 5);
    // The far end sees the reset, not a FIN.
    assert_eq!(
        far.read_timeout(&mut buf, Some(LONG)),
        Err(NetstackError::Reset)
    );
}

#[test]
fn closing_the_stack_ends_every_splice_and_closes_the_kernel_side() {
    let _g = serial();
    let (nodes, _far, app, splice) = spliced_pair(7302);
    nodes[0].stack.close();
    let end = splice.wait(Some(LONG)).expect("the splice ended");
    assert!(!end.clean);
    let mut buf = [0u8; 16];
    app.set_read_timeout(Some(LONG)).unwrap();
    // FIN or RST, but not a hang.
    assert!(matches!((&app).read(&mut buf), Ok(0) | Err(_)));
}

#[test]
fn an_application_that_stops_reading_stops_the_far_sender() {
    let _g = serial();
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (near, far) = mesh_pair(&nodes[0], &nodes[1], 7303);
    let (spliced, app) = kernel_pair();
    // A fixed receive buffer: no autotuning behind the test's back.
    let rcvbuf: libc::c_int = 64 << 10;
    set_socket_option(&app, libc::SO_RCVBUF, &rcvbuf);
    let splice = near.splice(spliced).unwrap();
    // The far end writes until its writes stop being taken for a while.
    let chunk = vec![7u8; 64 << 10];
    let mut queued = 0u64;
    let mut stalled = 0;
    while stalled < 3 {
        match far.write_timeout(&chunk, Some(Duration::from_millis(300))) {
            Ok(n) => {
                queued += n as u64;
                stalled = 0;
            }
            Err(NetstackError::TimedOut) => stalled += 1,
            Err(e) => panic!("write: {e}"),
        }
        assert!(queued < 64 << 20, "the far sender was never stopped");
    }
    // What waits: the far send buffer and our receive buffer (256 KiB
    // each by default), and the two kernel sockets' buffers (the splice's
    // send side autotunes up to tcp_wmem's maximum, 4 MiB by default).
    assert!(
        queued < 12 << 20,
        "{queued} bytes were taken before the stop"
    );
    assert_eq!(splice.moved().0, 0);
    // Then the application reads: every byte arrives.
    far.shutdown_write().unwrap();
    let (n, _) = kernel_recv(&app);
    assert_eq!(n, queued);
    drop(app);
    let end = splice.wait(Some(LONG)).expect("the splice ended");
    assert_eq!(end.down, queued);
}

#[test]
fn many_splices_share_the_stacks_thread() {
    let _g = serial();
    let nodes = stack_mesh(2, NetstackConfig::default());
    let before = threads_named("meshvpn-splice");
    const N: usize = 24;
    let bytes = 1u64 << 20;
    let mut pairs = Vec::new();
    for i in 0..N {
        let (near, far) = mesh_pair(&nodes[0], &nodes[1], 7400 + i as u16);
        let (spliced, app) = kernel_pair();
        pairs.push((near.splice(spliced).unwrap(), far, app));
    }
    assert_eq!(
        threads_named("meshvpn-splice"),
        before + 1,
        "one epoll thread for the stack, none per splice"
    );
    let deadline = Instant::now() + LONG;
    std::thread::scope(|s| {
        for (i, (_, far, app)) in pairs.iter().enumerate() {
            let seed = 100 + i as u64;
            s.spawn(move || {
                let sent = kernel_send(app, bytes, seed);
                assert_eq!(recv_all(far, deadline), (bytes, sent));
            });
            s.spawn(move || {
                let sent = send_pattern(far, bytes / 2, seed + 1000, deadline);
                assert_eq!(kernel_recv(app), (bytes / 2, sent));
            });
        }
    });
    for (splice, _, _) in &pairs {
        let end = splice.wait(Some(LONG)).expect("the splice ended");
        assert_eq!((end.up, end.down, end.clean), (bytes, bytes / 2, true));
    }
}

#[test]
fn a_connection_that_cannot_send_is_refused() {
    let _g = serial();
    let nodes = stack_mesh(2, NetstackConfig::default());
    let (near, _far) = mesh_pair(&nodes[0], &nodes[1], 7304);
    near.shutdown_write().unwrap();
    let (spliced, _app) = kernel_pair();
    assert!(matches!(
        near.splice(spliced),
        Err(NetstackError::InvalidInput(_))
    ));
}
