//! Syscalls: UDP sockets, TUN devices, unix sockets. The only module (with the FFI crate)
//! allowed `unsafe`; every block says why it is sound.
#![allow(unsafe_code)]

pub mod tun;
pub mod udp;
pub mod unix;

/// True for the errors a read with a timeout returns when nothing came
/// (or a signal cut it short): retry, they are not failures.
pub fn is_retryable(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}
