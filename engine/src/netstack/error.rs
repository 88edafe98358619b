use std::io;

/// What a stack operation can fail with. Each variant is something a caller
/// acts on differently; the C ABI gives each a stable number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NetstackError {
    /// The remote answered the SYN with a RST: nothing listens there.
    #[error("connection refused")]
    Refused,
    /// No peer's AllowedIPs cover the address, or that peer has no endpoint.
    #[error("no route to the address: no peer's AllowedIPs cover it, or the peer has no endpoint")]
    Unreachable,
    #[error("timed out")]
    TimedOut,
    /// The handle was closed, or the stack or its engine shut down.
    #[error("closed")]
    Closed,
    /// A non-blocking call found nothing to do.
    #[error("the operation would block")]
    WouldBlock,
    /// The remote reset an established connection (or it timed out).
    #[error("connection reset")]
    Reset,
    #[error("the stack's socket limit ({0}) is reached")]
    SocketLimit(usize),
    #[error("address in use")]
    AddrInUse,
    #[error("the address is not one of the stack's addresses")]
    AddrNotAvailable,
    #[error("datagram of {len} bytes is larger than the {max} bytes the MTU allows")]
    MessageTooLarge { len: usize, max: usize },
    #[error("invalid argument: {0}")]
    InvalidInput(&'static str),
    #[error("the stack has no address of that family")]
    NoAddress,
    #[error("cannot start the netstack thread")]
    Thread,
}

impl NetstackError {
    pub fn io_kind(self) -> io::ErrorKind {
        use io::ErrorKind as K;
        match self {
            NetstackError::Refused => K::ConnectionRefused,
            NetstackError::Unreachable => K::HostUnreachable,
            NetstackError::TimedOut => K::TimedOut,
            NetstackError::Closed => K::NotConnected,
            NetstackError::WouldBlock => K::WouldBlock,
            NetstackError::Reset => K::ConnectionReset,
            NetstackError::SocketLimit(_) | NetstackError::Thread => K::Other,
            NetstackError::AddrInUse => K::AddrInUse,
            NetstackError::AddrNotAvailable | NetstackError::NoAddress => K::AddrNotAvailable,
            NetstackError::MessageTooLarge { .. } | NetstackError::InvalidInput(_) => {
                K::InvalidInput
            }
        }
    }
}

impl From<NetstackError> for io::Error {
    fn from(e: NetstackError) -> io::Error {
        io::Error::new(e.io_kind(), e)
    }
}
