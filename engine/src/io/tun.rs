//! Linux TUN devices (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`): one IP packet
//! per read and per write.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
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

    /// Waits up to `timeout` for a packet; `Ok(None)` on timeout.
    pub fn read_timeout(&mut self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        if !wait_readable(self.file.as_raw_fd(), timeout)? {
            return Ok(None);
        }
        match self.file.read(buf) {
            Ok(n) => Ok(Some(n)),
            Err(e)
                if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::WouldBlock =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    pub fn write_packet(&self, packet: &[u8]) -> io::Result<()> {
        (&self.file).write(packet).map(|_| ())
    }
}

/// poll(2) for readability with a timeout.
pub fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: one valid pollfd, count 1.
    let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
    match rc {
        n if n < 0 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0
            && pfd.revents & libc::POLLIN == 0 =>
        {
            Err(io::Error::new(io::ErrorKind::BrokenPipe, "device closed"))
        }
        _ => Ok(true),
    }
}
