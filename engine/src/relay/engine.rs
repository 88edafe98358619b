//! Plugs the websocket relay client into the WireGuard engine from above:
//! the client is one [`RelayTransport`] of the engine, and the engine's
//! [`RelayInbox`] is the client's owner. The engine's data path knows
//! nothing of websockets; this module is the only place both meet.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use boringtun::x25519::StaticSecret;

use super::client::{RelayClient, RelayConfig, RelayOwner, RelayStatus};
use super::protocol::KEY_LEN;
use crate::config::PublicKey;
use crate::peer::Endpoint;
use crate::wg::{Engine, RelayInbox, RelayTransport, Transport, Unsent};
use crate::ws::TunnelError;

impl RelayOwner for RelayInbox {
    fn static_secret(&self) -> Option<StaticSecret> {
        RelayInbox::static_secret(self)
    }

    fn deliver(&self, source: &[u8; KEY_LEN], datagram: &[u8]) {
        RelayInbox::deliver(self, &PublicKey::from_bytes(*source), datagram);
    }

    fn observed(&self, address: std::net::SocketAddr) {
        RelayInbox::observed(self, address);
    }
}

impl Transport for RelayClient {
    /// Frames each datagram of the batch for the relay, one by one (the
    /// websocket carries one datagram per frame).
    fn send_batch(&self, batch: &[u8], segment: usize, to: &Endpoint) -> Result<(), Unsent> {
        let Endpoint::Relay(key) = to else {
            return Err(Unsent::all(batch.len(), segment));
        };
        let unsent = batch
            .chunks(segment.max(1))
            .filter(|d| !RelayClient::send(self, key.as_bytes(), d))
            .count();
        if unsent == 0 {
            Ok(())
        } else {
            Err(Unsent(unsent))
        }
    }
}

impl RelayTransport for RelayClient {
    fn is_up(&self) -> bool {
        self.status().connected
    }

    fn rekeyed(&self) {
        self.reconnect();
    }

    fn reconnect(&self) {
        RelayClient::reconnect(self);
    }

    fn check(&self) {
        RelayClient::check(self);
    }

    fn sessions(&self) -> u64 {
        self.status().sessions
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl Engine {
    /// Connects to a relay (replacing a running one) and lets peers whose
    /// UDP handshakes go unanswered move to it. Registration waits until
    /// the engine has a private key; a key change registers again.
    pub fn start_relay(&self, config: RelayConfig) -> Result<(), TunnelError> {
        if self.is_closed() {
            return Err(TunnelError::Config("the engine is closed".into()));
        }
        self.stop_relay();
        let probe = config.probe_interval;
        let client = RelayClient::start(config, Arc::new(self.relay_inbox()))?;
        self.attach_relay(Arc::new(client), probe)
            .map_err(|e| TunnelError::Config(e.to_string()))
    }

    /// Disconnects from the relay; peers on it go back to their last UDP
    /// endpoint. Idempotent.
    pub fn stop_relay(&self) {
        // The client disconnects when its last reference goes (here).
        drop(self.detach_relay());
    }

    /// Ends the relay session and connects again at once (call it when the
    /// host's addresses change: a websocket from an address that went away
    /// is otherwise noticed only by the 60 s idle timeout). False when no
    /// relay is attached.
    pub fn reconnect_relay(&self) -> bool {
        self.relay_transport().map(|t| t.reconnect()).is_some()
    }

    /// The relay client's state, when a relay is configured.
    pub fn relay_status(&self) -> Option<RelayStatus> {
        let transport = self.relay_transport()?;
        let mut s = transport.as_any().downcast_ref::<RelayClient>()?.status();
        s.frames_dropped += self.relay_unsent();
        Some(s)
    }

    /// Waits until the relay client is registered (`true`) or `timeout` passes.
    pub fn wait_relay_connected(&self, timeout: Duration) -> bool {
        self.relay_transport().is_some_and(|t| {
            t.as_any()
                .downcast_ref::<RelayClient>()
                .is_some_and(|c| c.wait_connected(timeout))
        })
    }
}
