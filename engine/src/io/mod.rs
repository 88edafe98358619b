//! Syscalls: UDP sockets, TUN devices, unix sockets. The only module (with the FFI crate)
//! allowed `unsafe`; every block says why it is sound.
#![allow(unsafe_code)]

pub mod tun;
pub mod udp;
pub mod unix;
