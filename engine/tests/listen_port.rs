//! Binding the listen port when another socket still holds part of it: a
//! daemon restarted right after `kill -9` binds the port its predecessor
//! held, and the kernel releases the dead process's sockets one file at a
//! time while it tears the process down.

use std::net::{Ipv6Addr, SocketAddrV6, UdpSocket};

use meshvpn_engine::{Config, Engine, EngineError, InterfaceConfig, PrivateKey};
use socket2::{Domain, Protocol, Socket, Type};

fn engine_on_port_0() -> Engine {
    Engine::new(&Config {
        interface: InterfaceConfig {
            private_key: Some(PrivateKey::generate()),
            listen_port: Some(0),
            ..Default::default()
        },
        peers: Vec::new(),
    })
    .unwrap()
}

fn v6_only_socket(port: u16) -> std::io::Result<Socket> {
    let s = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
    s.set_only_v6(true)?;
    s.bind(&SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0).into())?;
    Ok(s)
}

fn assert_port_in_use(r: Result<u16, EngineError>, port: u16, half: &str) {
    match r {
        Err(EngineError::Bind { port: p, source }) => {
            assert_eq!(p, port);
            assert_eq!(source.kind(), std::io::ErrorKind::AddrInUse, "{source}");
        }
        other => panic!(
            "set_listen_port({port}) with its {half} half held elsewhere returned {other:?}: \
             the engine would serve the port on one family only and {half} UDP would be dead"
        ),
    }
}

#[test]
fn a_port_whose_ipv4_half_is_taken_is_refused_not_bound_on_ipv6_alone() {
    let engine = engine_on_port_0();
    let before = engine.listen_port();
    // Another port than the engine's own, whose IPv6 half is free.
    let holder = (0..100)
        .map(|_| UdpSocket::bind("0.0.0.0:0").unwrap())
        .find(|h| {
            let port = h.local_addr().unwrap().port();
            port != before && v6_only_socket(port).is_ok()
        })
        .expect("no port free on IPv6 among 100 taken on IPv4");
    let port = holder.local_addr().unwrap().port();
    assert_port_in_use(engine.set_listen_port(port), port, "IPv4");
    assert_eq!(engine.listen_port(), before, "the old sockets stay");
    drop(holder);
    assert_eq!(engine.set_listen_port(port).unwrap(), port);
    assert_eq!(engine.listen_port(), port);
    engine.close();
}

#[test]
fn a_port_whose_ipv6_half_is_taken_is_refused_not_bound_on_ipv4_alone() {
    let engine = engine_on_port_0();
    let before = engine.listen_port();
    let (holder, port) = (0..100)
        .map(|_| {
            let h = v6_only_socket(0).unwrap();
            let port = h.local_addr().unwrap().as_socket().unwrap().port();
            (h, port)
        })
        .find(|&(_, port)| port != before && UdpSocket::bind(("0.0.0.0", port)).is_ok())
        .expect("no port free on IPv4 among 100 taken on IPv6");
    assert_port_in_use(engine.set_listen_port(port), port, "IPv6");
    assert_eq!(engine.listen_port(), before);
    drop(holder);
    assert_eq!(engine.set_listen_port(port).unwrap(), port);
    engine.close();
}
