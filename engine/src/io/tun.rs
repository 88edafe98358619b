//! Linux TUN devices (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`): one IP packet
//! per read and per write.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

const IFNAMSIZ: usize = 16;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[repr(C)]
struct IfReqMtu {
    name: [libc::c_char; IFNAMSIZ],
    mtu: libc::c_int,
    _pad: [u8; 20],
}

/// Packets one burst read takes at most.
pub const TUN_BURST: usize = 64;
/// Room per packet in a burst: the largest IP packet.
const TUN_SLOT: usize = 65535;

/// Buffers for [`Tun::read_burst`], reused across reads.
pub struct TunBurst {
    buf: Vec<u8>,
    lens: [usize; TUN_BURST],
}

impl Default for TunBurst {
    fn default() -> Self {
        TunBurst {
            buf: vec![0u8; TUN_BURST * TUN_SLOT],
            lens: [0; TUN_BURST],
        }
    }
}

impl TunBurst {
    /// The first `n` packets read.
    pub fn packets(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        self.lens[..n]
            .iter()
            .enumerate()
            .map(|(i, &len)| &self.buf[i * TUN_SLOT..i * TUN_SLOT + len])
    }
}

/// An open TUN device.
pub struct Tun {
    file: File,
    name: String,
}

fn ifname(name: &str) -> io::Result<[libc::c_char; IFNAMSIZ]> {
    let c = CString::new(name).map_err(|_| {
        io::Error::new(io::ErrorKind::InvalidInput, "interface name has a NUL byte")
    })?;
    let bytes = c.as_bytes_with_nul();
    if bytes.len() > IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name longer than 15 bytes",
        ));
    }
    let mut out = [0 as libc::c_char; IFNAMSIZ];
    for (o, b) in out.iter_mut().zip(bytes) {
        *o = *b as libc::c_char;
    }
    Ok(out)
}

impl Tun {
    /// Creates (or attaches to) the TUN interface `name`. Needs CAP_NET_ADMIN.
    pub fn create(name: &str) -> io::Result<Tun> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut req = IfReqFlags {
            name: ifname(name)?,
            flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is a properly
        // sized, initialised ifreq that outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        let name = req
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        set_nonblocking(&file)?;
        Ok(Tun { file, name })
    }

    /// Adopts a TUN file descriptor opened by someone else (a parent
    /// process, Android's VpnService, a container runtime).
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tun {
        Tun {
            file: File::from(fd),
            name: name.to_string(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn try_clone(&self) -> io::Result<Tun> {
        Ok(Tun {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Sets the interface MTU (SIOCSIFMTU).
    pub fn set_mtu(&self, mtu: u16) -> io::Result<()> {
        let mut req = IfReqMtu {
            name: ifname(&self.name)?,
            mtu: mtu as libc::c_int,
            _pad: [0; 20],
        };
        // SAFETY: a datagram socket only to carry the ioctl; closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `sock` is a valid fd we own; wrapping it closes it on drop.
        let sock = unsafe { OwnedFd::from_raw_fd(sock) };
        // SAFETY: SIOCSIFMTU reads an ifreq; `req` is valid for the call.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFMTU, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout` for packets, then reads as many as are ready
    /// (up to the burst's capacity) without blocking again. Returns how
    /// many were read; 0 on timeout.
    pub fn read_burst(&mut self, burst: &mut TunBurst, timeout: Duration) -> io::Result<usize> {
        if !super::poll(self.file.as_raw_fd(), libc::POLLIN, timeout)? {
            return Ok(0);
        }
        let mut n = 0;
        while n < TUN_BURST {
            let slot = &mut burst.buf[n * TUN_SLOT..(n + 1) * TUN_SLOT];
            match self.file.read(slot) {
                Ok(len) => {
                    burst.lens[n] = len;
                    n += 1;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    break
                }
                Err(e) if n > 0 => {
                    tracing::debug!(error = %e, "TUN read failed after a burst");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    pub fn write_packet(&self, packet: &[u8]) -> io::Result<()> {
        (&self.file).write(packet).map(|_| ())
    }
}

/// Reads never block: the reader polls first, then drains a burst.
fn set_nonblocking(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
