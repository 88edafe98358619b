//! The supervisor tunnel's agent dialing mesh addresses through the
//! engine's userspace stack (`netstack::MeshDialer`): the server reaches a
//! service that lives only on another node's mesh address, with no TUN
//! device anywhere; loopback targets still go through the OS.

mod common;
mod tunnel_support;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::mesh;
use common::stacks::attach;
use meshvpn_engine::netstack::MeshDialer;
use meshvpn_engine::supervisor::Agent;
use meshvpn_engine::{IpPrefix, Netstack, NetstackConfig};
use tunnel_support::*;

const WAIT: Duration = Duration::from_secs(20);

#[test]
fn agent_dials_mesh_targets_through_the_userspace_stack() {
    let mut nodes = mesh(2, false);
    let target_node = attach(nodes.pop().unwrap(), NetstackConfig::default());
    let agent_node = nodes.pop().unwrap();
    agent_node
        .engine
        .set_addresses(vec![IpPrefix::host(agent_node.v4)]);
    let agent_stack =
        Arc::new(Netstack::attach(&agent_node.engine, NetstackConfig::default()).unwrap());

    // An echo service that exists only in the target node's userspace stack.
    let mesh_target = SocketAddr::new(target_node.node.v4, 8080);
    let listener = target_node.stack.tcp_listen(mesh_target, 4).unwrap();
    std::thread::spawn(move || {
        while let Ok((conn, _)) = listener.accept_timeout(None) {
            std::thread::spawn(move || {
                let mut buf = [0u8; 16 << 10];
                while let Ok(n) = (&conn).read(&mut buf) {
                    if n == 0 || (&conn).write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                conn.close();
            });
        }
    });
    let os_target = echo_server();

    let pki = pki();
    let server = start_server(&pki, loopback());
    let mut config = agent_config(
        &pki,
        server.local_addr(),
        &["tcp/10.77.0.0/24:*", &format!("tcp/{os_target}")],
    );
    config.dialer = Arc::new(MeshDialer::new(agent_stack.clone()));
    let _agent = Agent::start(config).unwrap();
    assert!(server.wait_for_client(NODE, WAIT), "agent never registered");

    let over_mesh = server.dial(NODE, "tcp", &mesh_target.to_string()).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(round_trip(&over_mesh, &payload).unwrap(), payload);
    let via_os = server.dial(NODE, "tcp", &os_target.to_string()).unwrap();
    assert_eq!(round_trip(&via_os, b"loopback").unwrap(), b"loopback");

    // The mesh stream really crossed WireGuard.
    let stats = agent_node
        .engine
        .peer_stats(&target_node.node.key.public_key())
        .unwrap();
    assert!(stats.last_handshake.is_some());
    assert!(stats.tx_bytes > payload.len() as u64, "{stats:?}");

    // A mesh port nobody listens on is refused, not dialed through the OS.
    let mut refused = server.dial(NODE, "tcp", "10.77.0.2:9").unwrap();
    let err = refused.read(&mut [0u8; 8]).unwrap_err();
    assert!(err.to_string().contains("over the mesh"), "{err}");
}
