//! Bounds on what one tunnel session may hold, and the protocol's timers.

use std::time::Duration;

/// Go's `MaxBuffer`: above this much buffered for one connection the receiver
/// sends Pause.
pub const PAUSE_THRESHOLD: usize = 1 << 21;
/// Go's `MaxBuffer / 8`: once reads bring the buffer under this, Resume.
pub const RESUME_THRESHOLD: usize = PAUSE_THRESHOLD / 8;
/// Go's `PingWriteInterval`.
pub const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Go's `PingWaitDuration`: the read deadline of a session.
pub const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Go's `SyncConnectionsInterval`.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(60);

/// Go's remotedialer has no cap on the streams an agent serves (goroutines
/// are cheap); here each costs two threads, so the agent caps them.
pub const MAX_AGENT_STREAMS: usize = 1024;

/// Per-session limits. Memory held by a session is at most about
/// `session_buffer_hard + max_connections * (send_queue + data_chunk)`, plus
/// its control queue: at most `max_control_queue` frames caused by the
/// peer's messages (replies, Pause; the driver stops reading while it is
/// full) and, on top, at most one Connect and one Resume per live connection
/// and one SyncConnections, all small (under 300 bytes each). The
/// websocket's own write buffer (1 MiB) comes on top. Both roles.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Live connections per session; a Connect beyond it is answered with an Error.
    pub max_connections: usize,
    /// Bytes one connection may have buffered before it is reset. A peer that
    /// honours Pause stays below 2 MiB plus what was in flight when it got the
    /// Pause (TCP buffers: ~10 MB at most on Linux defaults), so this is well
    /// above that.
    pub recv_buffer_hard: usize,
    /// Bytes buffered over all connections above which every connection with
    /// more than `session_pause_floor` buffered is paused early.
    pub session_buffer_soft: usize,
    /// Bytes buffered over all connections above which a connection receiving
    /// more data is reset.
    pub session_buffer_hard: usize,
    /// See `session_buffer_soft`.
    pub session_pause_floor: usize,
    /// Bytes queued for sending per connection before writers block.
    pub send_queue: usize,
    /// Largest Data payload this side sends in one message.
    pub data_chunk: usize,
    /// Control frames (Pause, Resume, Error, ...) queued for the peer. When
    /// this many are waiting the driver stops reading from the socket
    /// (backpressure) until writes drain them; a reply that would overfill
    /// it anyway is dropped and counted (`SessionStats::replies_dropped`).
    pub max_control_queue: usize,
    /// The read deadline: the session ends when nothing arrived for this long.
    pub read_timeout: Duration,
    /// Agent only: websocket Ping interval.
    pub ping_interval: Duration,
    /// Agent only: SyncConnections interval.
    pub sync_interval: Duration,
    /// Agent only: streams dialed and pumped to targets at once, over every
    /// session of the agent. Each holds two threads, so this caps the
    /// threads a server can make the agent start (`max_connections` alone
    /// would allow 20,000). A Connect beyond it is refused with the Error
    /// "too many streams" and counted (`AgentStatus::streams_refused_at_cap`).
    /// Default [`MAX_AGENT_STREAMS`].
    pub max_agent_streams: usize,
    /// Server only: a connection younger than this is never closed by a
    /// SyncConnections that does not list it (its Connect may still be in flight).
    pub sync_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            recv_buffer_hard: 16 * PAUSE_THRESHOLD,
            session_buffer_soft: 64 << 20,
            session_buffer_hard: 256 << 20,
            session_pause_floor: 64 << 10,
            send_queue: 256 << 10,
            data_chunk: 32 << 10,
            max_control_queue: 4096,
            read_timeout: READ_TIMEOUT,
            ping_interval: PING_INTERVAL,
            sync_interval: SYNC_INTERVAL,
            max_agent_streams: MAX_AGENT_STREAMS,
            sync_grace: Duration::from_secs(10),
        }
    }
}
