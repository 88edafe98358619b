//! One tunnel session: the connection table of one websocket, with its flow
//! control and timers.
//!
//! Inputs: [`TunnelSession::handle_message`] (a binary websocket message),
//! [`TunnelSession::handle_keepalive`] (a Ping or Pong arrived),
//! [`TunnelSession::handle_timeout`], and the stream operations
//! (`dial`, `accept`, `refuse`, `send`, `recv`, `close`, `release`).
//! Outputs: [`TunnelSession::poll_transmit`] (frames to write, in order),
//! [`TunnelSession::poll_event`] (what changed for which connection) and
//! [`TunnelSession::poll_timeout`] (when to call `handle_timeout`).
//! After any input, drain `poll_event` and `poll_transmit`.
//!
//! Backpressure: every message from the peer queues at most one control
//! frame here (a reply, a Pause), directly or through the `refuse` that
//! answers its `Incoming`. A driver hands over at most
//! [`TunnelSession::read_budget`] messages before writing some out, and
//! stops reading from its socket while the budget is 0; so a peer that
//! sends and never reads fills its own socket, not this side's memory. As
//! a backstop, a reply that would overfill the queue is dropped and counted
//! (`replies_dropped`).
//!
//! Ordering: control frames (Connect, Pause, Resume, replies) go before data;
//! data of different connections is sent round-robin, one chunk each, so a
//! connection its peer paused never holds up the others; a connection's
//! closing Error goes after the last of its queued data.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;

use super::error::{DialError, SessionError, StreamError};
use super::limits::{Limits, PAUSE_THRESHOLD, RESUME_THRESHOLD};
use super::message::{self, Body, MessageType, MAX_CONNECT_PAYLOAD};

/// A connection id, chosen by the dialing side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnId(pub i64);

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Which end of the websocket this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that opened the websocket (k3s agent): pings, sends
    /// SyncConnections, accepts Connects.
    Agent,
    /// The side that accepted the websocket: dials through it.
    Server,
}

/// Something to write to the websocket.
#[derive(Debug, PartialEq, Eq)]
pub enum Transmit {
    /// One binary websocket message.
    Message(Vec<u8>),
    /// A websocket Ping with an empty payload.
    Ping,
}

/// What changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The peer asks to open a connection; answer with `accept` or `refuse`.
    Incoming {
        conn: ConnId,
        proto: String,
        address: String,
    },
    /// Data arrived on a connection whose buffer was empty.
    Readable(ConnId),
    /// A connection that could not queue more data can again.
    Writable(ConnId),
    /// The connection ended (peer Error, reset, sync, session end).
    Closed(ConnId),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Incoming, waiting for `accept` / `refuse`.
    Pending,
    Open,
    /// Closed here; the Error goes out after the queued data.
    Closing {
        error: String,
    },
    /// Finished. `None` is a clean end of stream.
    Closed {
        error: Option<String>,
    },
}

#[derive(Debug)]
struct Connection {
    state: State,
    created: Instant,
    recv: VecDeque<Bytes>,
    recv_len: usize,
    /// We sent Pause and no Resume since.
    paused_by_us: bool,
    /// The peer sent Pause and no Resume since.
    paused_by_peer: bool,
    send: VecDeque<Vec<u8>>,
    send_len: usize,
    /// A writer found the queue full; tell it when there is room.
    send_blocked: bool,
    in_ready: bool,
    /// The local handle is gone; remove the entry once finished.
    released: bool,
}

impl Connection {
    fn new(state: State, now: Instant) -> Self {
        Self {
            state,
            created: now,
            recv: VecDeque::new(),
            recv_len: 0,
            paused_by_us: false,
            paused_by_peer: false,
            send: VecDeque::new(),
            send_len: 0,
            send_blocked: false,
            in_ready: false,
            released: false,
        }
    }

    fn is_live(&self) -> bool {
        matches!(
            self.state,
            State::Pending | State::Open | State::Closing { .. }
        )
    }
}

/// The protocol state of one websocket. See the module docs for the calling order.
#[derive(Debug)]
pub struct TunnelSession {
    role: Role,
    limits: Limits,
    next_message_id: i64,
    next_conn_id: i64,
    conns: HashMap<ConnId, Connection>,
    control: VecDeque<Vec<u8>>,
    ready: VecDeque<ConnId>,
    events: VecDeque<Event>,
    buffered: usize,
    ping_due: bool,
    last_rx: Instant,
    next_ping: Instant,
    next_sync: Instant,
    closed: bool,
    stats: SessionStats,
}

/// Counters a caller may log or export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub pauses_sent: u64,
    pub resumes_sent: u64,
    pub pauses_received: u64,
    pub connections_reset_for_memory: u64,
    pub replies_dropped: u64,
}

impl TunnelSession {
    pub fn new(role: Role, limits: Limits, now: Instant) -> Self {
        Self {
            role,
            next_ping: now + limits.ping_interval,
            next_sync: now + limits.sync_interval,
            limits,
            next_message_id: 0,
            // Server-side sessions number their connections from 2 upward, as Go does.
            next_conn_id: 1,
            conns: HashMap::new(),
            control: VecDeque::new(),
            ready: VecDeque::new(),
            events: VecDeque::new(),
            buffered: 0,
            ping_due: false,
            last_rx: now,
            closed: false,
            stats: SessionStats::default(),
        }
    }

    pub fn role(&self) -> Role {
        self.role
    }

    pub fn stats(&self) -> &SessionStats {
        &self.stats
    }

    /// Bytes received and not yet read, over all connections.
    pub fn buffered(&self) -> usize {
        self.buffered
    }

    /// Connections in the table (including finished ones whose handle is alive).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Live connection ids, sorted (what SyncConnections carries).
    pub fn live_ids(&self) -> Vec<i64> {
        let mut ids: Vec<i64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_live())
            .map(|(id, _)| id.0)
            .collect();
        ids.sort_unstable();
        ids
    }

    fn message_id(&mut self) -> i64 {
        self.next_message_id = self.next_message_id.wrapping_add(1);
        self.next_message_id
    }

    fn queue_control(&mut self, conn: ConnId, kind: MessageType, payload: &[u8]) {
        let id = self.message_id();
        self.control
            .push_back(message::encode(id, conn.0, kind, payload));
    }

    fn queue_error(&mut self, conn: ConnId, text: &str) {
        let text = message::truncate_error_text(text).to_owned();
        self.queue_control(conn, MessageType::Error, text.as_bytes());
    }

    /// Room for one more frame a peer's message caused.
    fn control_room(&self) -> bool {
        self.control.len() < self.limits.max_control_queue
    }

    /// An Error the peer's input asked for. Beyond `max_control_queue` it is
    /// dropped and counted: losing it is safe (the peer has already given
    /// the id up, or SyncConnections / its read deadline clears it), and a
    /// driver that respects `read_budget` never gets here.
    fn queue_reply(&mut self, conn: ConnId, text: &str) {
        if !self.control_room() {
            self.stats.replies_dropped += 1;
            return;
        }
        self.queue_error(conn, text);
    }

    /// How many more messages from the peer this session can take before
    /// its outbound control queue is full. Each message queues at most one
    /// control frame, so a driver that hands over no more than this between
    /// writes keeps the queue within `max_control_queue`; at 0 it must stop
    /// reading until `poll_transmit` has taken some out. This is the
    /// backpressure Go's remotedialer gets from writing each reply before
    /// reading the next message.
    pub fn read_budget(&self) -> usize {
        if self.closed {
            return usize::MAX;
        }
        self.limits
            .max_control_queue
            .saturating_sub(self.control.len())
    }

    /// Control frames (Connect, Pause, Resume, Error, SyncConnections)
    /// queued and not yet taken by `poll_transmit`.
    pub fn control_queued(&self) -> usize {
        self.control.len()
    }

    fn mark_ready(&mut self, id: ConnId) {
        if let Some(c) = self.conns.get_mut(&id) {
            if !c.in_ready && !c.paused_by_peer {
                c.in_ready = true;
                self.ready.push_back(id);
            }
        }
    }

    /// Ends a connection here without telling the peer: drops queued data,
    /// keeps received data readable.
    fn finish(&mut self, id: ConnId, error: Option<String>) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.send.clear();
            c.send_len = 0;
            c.state = State::Closed { error };
            if c.released {
                self.buffered -= c.recv_len;
                self.conns.remove(&id);
            } else {
                self.events.push_back(Event::Closed(id));
            }
        }
    }

    fn reap(&mut self, id: ConnId) {
        let done = self
            .conns
            .get(&id)
            .is_some_and(|c| c.released && matches!(c.state, State::Closed { .. }));
        if done {
            if let Some(c) = self.conns.remove(&id) {
                self.buffered -= c.recv_len;
            }
        }
    }

    // ---- inputs from the websocket ----

    /// A Ping or Pong arrived: extends the read deadline.
    pub fn handle_keepalive(&mut self, now: Instant) {
        self.last_rx = now;
    }

    /// A binary websocket message arrived. `frame` is the whole message; Data
    /// payloads are kept as slices of it, without a copy.
    pub fn handle_message(&mut self, now: Instant, frame: Bytes) -> Result<(), SessionError> {
        self.last_rx = now;
        if self.closed {
            return Ok(());
        }
        let msg = message::decode(&frame)?;
        let id = ConnId(msg.conn_id);
        match msg.body {
            Body::Data(payload) => {
                let payload = frame.slice_ref(payload);
                self.on_data(id, payload);
            }
            Body::Connect { target, truncated } => self.on_connect(now, id, target, truncated),
            Body::Error(text) => {
                let text = String::from_utf8_lossy(text).into_owned();
                self.on_error(id, text);
            }
            Body::Pause => {
                if let Some(c) = self.conns.get_mut(&id) {
                    c.paused_by_peer = true;
                    self.stats.pauses_received += 1;
                    tracing::debug!(conn = id.0, "tunnel: peer sent Pause");
                }
            }
            Body::Resume => {
                if let Some(c) = self.conns.get_mut(&id) {
                    tracing::debug!(conn = id.0, "tunnel: peer sent Resume");
                    c.paused_by_peer = false;
                    let wake = c.send_blocked;
                    c.send_blocked = false;
                    let has_work = !c.send.is_empty() || matches!(c.state, State::Closing { .. });
                    if wake {
                        self.events.push_back(Event::Writable(id));
                    }
                    if has_work {
                        self.mark_ready(id);
                    }
                }
            }
            Body::SyncConnections(list) => {
                let mut listed: Vec<i64> = list.iter().collect();
                listed.sort_unstable();
                let grace = self.limits.sync_grace;
                let stale: Vec<ConnId> = self
                    .conns
                    .iter()
                    .filter(|(id, c)| {
                        c.is_live()
                            && now.saturating_duration_since(c.created) >= grace
                            && listed.binary_search(&id.0).is_err()
                    })
                    .map(|(id, _)| *id)
                    .collect();
                for id in stale {
                    self.finish(id, Some("sync from client".into()));
                }
            }
            // Server-to-server peering is not supported; like a Go client, ignore it.
            Body::AddClient(_) | Body::RemoveClient(_) | Body::Unknown(_) => {}
        }
        Ok(())
    }

    fn on_data(&mut self, id: ConnId, payload: Bytes) {
        let n = payload.len();
        let limits = &self.limits;
        let Some(c) = self.conns.get_mut(&id) else {
            self.reply_not_found(id);
            return;
        };
        match c.state {
            State::Pending | State::Open => {}
            // Closed here and the EOF is on its way: late data is expected, drop it.
            State::Closing { .. } => return,
            State::Closed { .. } => {
                self.reply_not_found(id);
                return;
            }
        }
        if n == 0 {
            return;
        }
        if c.recv_len + n > limits.recv_buffer_hard
            || self.buffered + n > limits.session_buffer_hard
        {
            // The peer ignored Pause, or the session is out of memory: reset this one.
            self.stats.connections_reset_for_memory += 1;
            self.buffered -= c.recv_len;
            c.recv.clear();
            c.recv_len = 0;
            self.queue_reply(id, "receive buffer limit exceeded");
            self.finish(id, Some("receive buffer limit exceeded".into()));
            return;
        }
        let was_empty = c.recv_len == 0;
        c.recv.push_back(payload);
        c.recv_len += n;
        self.buffered += n;
        // With the control queue full the Pause waits for the next Data
        // (the driver has stopped reading by then anyway).
        let pause = !c.paused_by_us
            && self.control.len() < limits.max_control_queue
            && (c.recv_len > PAUSE_THRESHOLD
                || (self.buffered > limits.session_buffer_soft
                    && c.recv_len > limits.session_pause_floor));
        if pause {
            c.paused_by_us = true;
        }
        if was_empty && c.state == State::Open {
            self.events.push_back(Event::Readable(id));
        }
        if pause {
            self.stats.pauses_sent += 1;
            tracing::debug!(
                conn = id.0,
                buffered = self.buffered,
                "tunnel: sending Pause"
            );
            self.queue_control(id, MessageType::Pause, &[]);
        }
    }

    fn reply_not_found(&mut self, id: ConnId) {
        let side = match self.role {
            Role::Agent => "client",
            Role::Server => "server",
        };
        self.queue_reply(id, &format!("connection not found {side}/{id}"));
    }

    fn on_connect(&mut self, now: Instant, id: ConnId, target: &[u8], truncated: bool) {
        if let Some(c) = self.conns.get(&id) {
            // Same id twice: both ends now disagree about it, end it on both
            // (once: a finished entry is not finished again).
            let live = c.is_live();
            self.queue_reply(id, "duplicate connection id");
            if live {
                self.finish(id, Some("duplicate connection id".into()));
            }
            return;
        }
        if self.role == Role::Server {
            self.queue_reply(id, "connect not allowed");
            return;
        }
        let live = self.conns.values().filter(|c| c.is_live()).count();
        if live >= self.limits.max_connections {
            self.queue_reply(id, "too many connections");
            return;
        }
        let parsed = if truncated {
            None
        } else {
            message::parse_connect_target(target)
        };
        let Some((proto, address)) = parsed else {
            self.queue_reply(id, "failed to parse connect address");
            return;
        };
        let (proto, address) = (proto.to_owned(), address.to_owned());
        self.conns.insert(id, Connection::new(State::Pending, now));
        self.events.push_back(Event::Incoming {
            conn: id,
            proto,
            address,
        });
    }

    fn on_error(&mut self, id: ConnId, text: String) {
        let Some(c) = self.conns.get(&id) else {
            // An Error for an unknown connection is ignored (never answered: no ping-pong).
            return;
        };
        if !c.is_live() {
            return;
        }
        let was_closing = matches!(c.state, State::Closing { .. });
        let error = if text == "EOF" {
            None
        } else {
            Some(text.clone())
        };
        // The Go library answers a received Error with the same Error; so do we,
        // unless our own Error for it is already queued.
        if !was_closing {
            self.queue_reply(id, &text);
        }
        self.finish(id, error);
    }

    // ---- timers ----

    /// When `handle_timeout` should be called next.
    pub fn poll_timeout(&self) -> Instant {
        let deadline = self.last_rx + self.limits.read_timeout;
        match self.role {
            Role::Agent => deadline.min(self.next_ping).min(self.next_sync),
            Role::Server => deadline,
        }
    }

    /// Runs the timers: Ping and SyncConnections (agent), the read deadline (both).
    pub fn handle_timeout(&mut self, now: Instant) -> Result<(), SessionError> {
        if now >= self.last_rx + self.limits.read_timeout {
            return Err(SessionError::ReadTimeout);
        }
        if self.role == Role::Agent {
            if now >= self.next_ping {
                self.ping_due = true;
                self.next_ping = now + self.limits.ping_interval;
            }
            if now >= self.next_sync {
                // A full queue means the peer is not reading: skip this one
                // rather than pile up SyncConnections; the next interval retries.
                if self.control_room() {
                    let id = self.message_id();
                    let ids = self.live_ids();
                    self.control.push_back(message::encode_sync(id, ids));
                }
                self.next_sync = now + self.limits.sync_interval;
            }
        }
        Ok(())
    }

    // ---- output ----

    /// True when `poll_transmit` has something.
    pub fn has_transmit(&self) -> bool {
        self.ping_due || !self.control.is_empty() || !self.ready.is_empty()
    }

    /// The next frame to write.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if self.ping_due {
            self.ping_due = false;
            return Some(Transmit::Ping);
        }
        if let Some(frame) = self.control.pop_front() {
            return Some(Transmit::Message(frame));
        }
        while let Some(id) = self.ready.pop_front() {
            let half_queue = self.limits.send_queue / 2;
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            c.in_ready = false;
            if c.paused_by_peer && !c.send.is_empty() {
                continue;
            }
            if let Some(chunk) = c.send.pop_front() {
                c.send_len -= chunk.len();
                let wake = c.send_blocked && c.send_len <= half_queue;
                if wake {
                    c.send_blocked = false;
                }
                let more = !c.send.is_empty() || matches!(c.state, State::Closing { .. });
                let mut frame = Vec::with_capacity(message::MAX_HEADER_LEN + chunk.len());
                self.next_message_id = self.next_message_id.wrapping_add(1);
                message::encode_header(&mut frame, self.next_message_id, id.0, MessageType::Data);
                frame.extend_from_slice(&chunk);
                if wake {
                    self.events.push_back(Event::Writable(id));
                }
                if more {
                    self.mark_ready(id);
                }
                return Some(Transmit::Message(frame));
            }
            if let State::Closing { error } = &c.state {
                let error = error.clone();
                let message_id = self.message_id();
                let frame = message::encode(message_id, id.0, MessageType::Error, error.as_bytes());
                self.finish(id, None);
                return Some(Transmit::Message(frame));
            }
        }
        None
    }

    /// The next event.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    // ---- stream operations ----

    /// Server only: opens a connection to `proto/address` on the agent. Data
    /// may be sent at once; there is no acknowledgement.
    pub fn dial(&mut self, now: Instant, proto: &str, address: &str) -> Result<ConnId, DialError> {
        if self.role != Role::Server {
            return Err(DialError::NotServer);
        }
        if self.closed {
            return Err(DialError::SessionClosed);
        }
        if proto.len() + 1 + address.len() > MAX_CONNECT_PAYLOAD || proto.contains('/') {
            return Err(DialError::TargetTooLong);
        }
        let live = self.conns.values().filter(|c| c.is_live()).count();
        if live >= self.limits.max_connections {
            return Err(DialError::TooManyConnections(live));
        }
        self.next_conn_id += 1;
        let id = ConnId(self.next_conn_id);
        self.conns.insert(id, Connection::new(State::Open, now));
        self.queue_control(
            id,
            MessageType::Connect,
            format!("{proto}/{address}").as_bytes(),
        );
        Ok(id)
    }

    /// Accepts an `Incoming` connection.
    pub fn accept(&mut self, id: ConnId) -> Result<(), StreamError> {
        let c = self.conns.get_mut(&id).ok_or(StreamError::Unknown)?;
        if c.state != State::Pending {
            return Err(StreamError::Unknown);
        }
        c.state = State::Open;
        if c.recv_len > 0 {
            self.events.push_back(Event::Readable(id));
        }
        Ok(())
    }

    /// Refuses an `Incoming` connection (or fails an accepted one whose dial
    /// failed): the peer gets an Error with `reason` for this connection only
    /// (counted against `max_control_queue` as the reply to its Connect).
    pub fn refuse(&mut self, id: ConnId, reason: &str) {
        if let Some(c) = self.conns.remove(&id) {
            self.buffered -= c.recv_len;
            if c.is_live() {
                self.queue_reply(id, reason);
            }
        }
    }

    /// Queues up to `data_chunk`-sized pieces of `data`; returns how much was taken.
    pub fn send(&mut self, id: ConnId, data: &[u8]) -> Result<usize, StreamError> {
        let limits = &self.limits;
        let c = self.conns.get_mut(&id).ok_or(StreamError::Unknown)?;
        match &c.state {
            State::Open => {}
            State::Pending => return Err(StreamError::WouldBlock),
            State::Closing { .. } => return Err(StreamError::Closed),
            State::Closed { error: Some(e) } => return Err(StreamError::Reset(e.clone())),
            State::Closed { error: None } => return Err(StreamError::Reset("EOF".into())),
        }
        if data.is_empty() {
            return Ok(0);
        }
        let room = limits.send_queue.saturating_sub(c.send_len);
        if room == 0 || c.paused_by_peer && c.send_len > 0 {
            c.send_blocked = true;
            return Err(StreamError::WouldBlock);
        }
        let mut taken = 0;
        let total = data.len().min(room);
        while taken < total {
            match c.send.back_mut() {
                Some(last) if last.len() < limits.data_chunk => {
                    let n = (limits.data_chunk - last.len()).min(total - taken);
                    last.extend_from_slice(&data[taken..taken + n]);
                    taken += n;
                }
                _ => {
                    let n = limits.data_chunk.min(total - taken);
                    let mut chunk = Vec::with_capacity(limits.data_chunk.min(total - taken).max(n));
                    chunk.extend_from_slice(&data[taken..taken + n]);
                    c.send.push_back(chunk);
                    taken += n;
                }
            }
        }
        c.send_len += taken;
        self.mark_ready(id);
        Ok(taken)
    }

    /// Reads buffered data. `Ok(0)` is a clean end of stream.
    pub fn recv(&mut self, id: ConnId, buf: &mut [u8]) -> Result<usize, StreamError> {
        let c = self.conns.get_mut(&id).ok_or(StreamError::Unknown)?;
        if matches!(c.state, State::Closing { .. }) {
            return Err(StreamError::Closed);
        }
        if c.state == State::Pending {
            return Err(StreamError::WouldBlock);
        }
        if c.recv_len == 0 {
            return match &c.state {
                State::Closed { error: None } => Ok(0),
                State::Closed { error: Some(e) } => Err(StreamError::Reset(e.clone())),
                _ => Err(StreamError::WouldBlock),
            };
        }
        let mut n = 0;
        while n < buf.len() {
            let Some(front) = c.recv.front_mut() else {
                break;
            };
            let take = front.len().min(buf.len() - n);
            buf[n..n + take].copy_from_slice(&front[..take]);
            n += take;
            if take == front.len() {
                c.recv.pop_front();
            } else {
                let _ = front.split_to(take);
            }
        }
        c.recv_len -= n;
        self.buffered -= n;
        if c.paused_by_us && c.recv_len < RESUME_THRESHOLD && c.state == State::Open {
            c.paused_by_us = false;
            self.stats.resumes_sent += 1;
            tracing::debug!(conn = id.0, "tunnel: sending Resume");
            self.queue_control(id, MessageType::Resume, &[]);
        }
        Ok(n)
    }

    /// Bytes readable now on a connection.
    pub fn readable_len(&self, id: ConnId) -> usize {
        self.conns.get(&id).map_or(0, |c| c.recv_len)
    }

    /// Closes a connection from this side: queued data still goes out, then
    /// an Error with `error` (`None` sends `EOF`, a clean close). Both
    /// directions end (the protocol has no half-close).
    pub fn close(&mut self, id: ConnId, error: Option<&str>) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        match c.state {
            State::Open => {
                let text = message::truncate_error_text(error.unwrap_or("EOF")).to_owned();
                c.state = State::Closing { error: text };
                self.buffered -= c.recv_len;
                c.recv.clear();
                c.recv_len = 0;
                // Its Error must go out even if the peer paused it.
                if !c.in_ready {
                    c.in_ready = true;
                    self.ready.push_back(id);
                }
            }
            State::Pending => self.refuse(id, error.unwrap_or("EOF")),
            State::Closing { .. } | State::Closed { .. } => {}
        }
    }

    /// The local handle of a connection is gone: closes it if open and frees
    /// the entry once its closing Error is out.
    pub fn release(&mut self, id: ConnId) {
        self.close(id, None);
        if let Some(c) = self.conns.get_mut(&id) {
            c.released = true;
        }
        self.reap(id);
    }

    /// The websocket is gone: every connection fails with `reason`.
    pub fn close_all(&mut self, reason: &str) {
        self.closed = true;
        self.control.clear();
        self.ready.clear();
        self.ping_due = false;
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let live = self.conns.get(&id).is_some_and(Connection::is_live);
            if live {
                self.finish(id, Some(reason.to_owned()));
            } else {
                self.reap(id);
            }
        }
    }

    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

#[cfg(test)]
mod tests;
