//! The one way the engine moves an encrypted datagram to an [`Endpoint`]:
//! a [`Transport`]. UDP ([`UdpTransport`]) and the websocket relay (the
//! relay client, through [`super::RelayTransport`]) both implement it, and
//! the runtime hands every datagram it sends to one of them, chosen by the
//! endpoint's kind.
//!
//! Shaped after wireguard-go's `conn.Bind.Send(bufs, endpoint)`, which
//! Tailscale's magicsock implements to put DERP behind WireGuard. Like
//! `Send`, a call carries a batch: here a GSO run (datagrams of one
//! segment size back to back, the last one maybe shorter), the form the
//! send batch builds anyway, so UDP keeps one `sendmsg` per run and nothing
//! is copied or allocated per datagram. UDP is called directly (no dynamic
//! dispatch on the hot path); the relay, plugged in from above, through
//! `dyn RelayTransport`, as before.

use crate::io::udp::UdpTransport;
use crate::peer::Endpoint;

/// How many datagrams of a batch a transport could not send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsent(pub usize);

impl Unsent {
    /// All datagrams of a `len`-byte batch of `segment`-byte datagrams.
    pub fn all(len: usize, segment: usize) -> Unsent {
        Unsent(len.div_ceil(segment.max(1)))
    }
}

/// Something that carries encrypted datagrams to endpoints.
pub trait Transport: Send + Sync {
    /// Sends `batch` to `to`: datagrams of `segment` bytes back to back,
    /// the last one maybe shorter. All of them or none leave on UDP (one
    /// GSO send); a transport that sends them one by one reports how many
    /// it could not. An endpoint of a kind this transport does not carry
    /// is all unsent. Loss is the protocol's to recover from: callers
    /// only count it.
    fn send_batch(&self, batch: &[u8], segment: usize, to: &Endpoint) -> Result<(), Unsent>;
}

impl Transport for UdpTransport {
    fn send_batch(&self, batch: &[u8], segment: usize, to: &Endpoint) -> Result<(), Unsent> {
        let Endpoint::Udp(addr) = to else {
            return Err(Unsent::all(batch.len(), segment));
        };
        // A lone datagram goes without the GSO option (`BoundSocket::send`).
        self.send(batch, Some(segment), *addr)
            .map_err(|_| Unsent::all(batch.len(), segment))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PublicKey;
    use std::net::UdpSocket;
    use std::time::Duration;

    #[test]
    fn udp_sends_a_run_as_its_datagrams_and_refuses_the_relay() {
        let t = UdpTransport::bind(0, None).unwrap();
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let to = Endpoint::Udp(rx.local_addr().unwrap());
        // Two 100-byte datagrams and a 40-byte one in one call.
        let mut batch = vec![1u8; 100];
        batch.extend([2u8; 100]);
        batch.extend([3u8; 40]);
        t.send_batch(&batch, 100, &to).unwrap();
        let mut buf = [0u8; 512];
        let mut got = Vec::new();
        for _ in 0..3 {
            let n = rx.recv(&mut buf).unwrap();
            got.push((n, buf[0]));
        }
        assert_eq!(got, [(100, 1), (100, 2), (40, 3)]);
        let relay = Endpoint::Relay(PublicKey::from_bytes([7; 32]));
        assert_eq!(t.send_batch(&batch, 100, &relay), Err(Unsent(3)));
    }
}
