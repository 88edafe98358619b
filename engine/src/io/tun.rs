//! Linux TUN devices (`/dev/net/tun`, `IFF_TUN | IFF_NO_PI`).
//!
//! Where the kernel allows it the device is opened with `IFF_VNET_HDR` and
//! TSO/checksum offloads ([`super::offload`]): one read then returns up to
//! 64 KiB of one TCP stream, split here into MSS-sized packets, and one
//! write takes a whole decrypted batch of a flow's segments. Without
//! offloads (an old kernel, or `MESHVPN_TUN_OFFLOAD=0`) it is one IP packet
//! per read and per write.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use super::offload::{split, Coalescer, OffloadError};
use crate::wire::virtio::{self, VirtioNetHdr};

const IFNAMSIZ: usize = 16;
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const IFF_VNET_HDR: libc::c_int = 0x4000;
const TUN_F_CSUM: libc::c_uint = 0x01;
const TUN_F_TSO4: libc::c_uint = 0x02;
const TUN_F_TSO6: libc::c_uint = 0x04;
const TUN_F_USO4: libc::c_uint = 0x20;
const TUN_F_USO6: libc::c_uint = 0x40;

/// Set to `0` to open TUN devices without offloads (for comparisons and
/// for kernels that misbehave with them).
pub const OFFLOAD_ENV: &str = "MESHVPN_TUN_OFFLOAD";

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

/// Reads one burst takes at most.
pub const TUN_BURST: usize = 64;
/// Room per packet in a burst: the largest IP packet.
const TUN_SLOT: usize = 65535;
/// Packets (after splitting) one burst holds.
const BURST_PACKETS: usize = 4096;
/// A read is attempted only with this much room left: a 64 KiB
/// super-packet grows by a header per segment when split.
const READ_ROOM: usize = 2 * TUN_SLOT;

/// Buffers for [`Tun::read_burst`], reused across reads.
pub struct TunBurst {
    buf: Vec<u8>,
    spans: Vec<(usize, usize)>,
    /// One raw read with its virtio-net header (offload mode).
    raw: Vec<u8>,
}

impl Default for TunBurst {
    fn default() -> Self {
        TunBurst {
            buf: vec![0u8; TUN_BURST * TUN_SLOT],
            spans: Vec::with_capacity(BURST_PACKETS),
            raw: vec![0u8; virtio::HEADER_LEN + TUN_SLOT],
        }
    }
}

impl TunBurst {
    /// The first `n` packets read.
    pub fn packets(&self, n: usize) -> impl Iterator<Item = &[u8]> {
        self.spans[..n]
            .iter()
            .map(|&(at, len)| &self.buf[at..at + len])
    }

    fn used(&self) -> usize {
        self.spans.last().map_or(0, |&(at, len)| at + len)
    }

    fn has_room(&self) -> bool {
        self.buf.len() - self.used() >= READ_ROOM
            && self.spans.len() + TUN_SLOT / 512 < self.spans.capacity()
    }
}

thread_local! {
    /// Per writer thread: the coalescer a burst of decrypted packets goes
    /// through (no lock held across the write).
    static COALESCER: std::cell::RefCell<Coalescer> = std::cell::RefCell::new(Coalescer::default());
}

/// An open TUN device.
pub struct Tun {
    file: File,
    name: String,
    /// Opened with `IFF_VNET_HDR` and offloads on.
    offload: bool,
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
    /// Creates (or attaches to) the TUN interface `name`, with offloads
    /// when the kernel takes them and [`OFFLOAD_ENV`] is not `0`. Needs
    /// CAP_NET_ADMIN.
    pub fn create(name: &str) -> io::Result<Tun> {
        let wanted = std::env::var(OFFLOAD_ENV).map_or(true, |v| v != "0");
        if wanted {
            match Tun::open(name, true) {
                Ok(t) => return Ok(t),
                Err(e) => tracing::info!(error = %e, "TUN offloads refused; one packet per read"),
            }
        }
        Tun::open(name, false)
    }

    fn open(name: &str, offload: bool) -> io::Result<Tun> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/net/tun")?;
        let mut flags = libc::IFF_TUN | libc::IFF_NO_PI;
        if offload {
            flags |= IFF_VNET_HDR;
        }
        let mut req = IfReqFlags {
            name: ifname(name)?,
            flags: flags as libc::c_short,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETIFF reads and writes an ifreq; `req` is a properly
        // sized, initialised ifreq that outlives the call.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        if offload {
            let tso = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            // UDP segmentation offload came in Linux 6.2; older kernels
            // refuse the flags and get TCP offloads only.
            if set_offload(&file, tso | TUN_F_USO4 | TUN_F_USO6).is_err() {
                set_offload(&file, tso)?;
            }
        }
        let name = req
            .name
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8 as char)
            .collect();
        set_nonblocking(&file)?;
        Ok(Tun {
            file,
            name,
            offload,
        })
    }

    /// True when reads and writes carry virtio-net headers (offloads on).
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Adopts a TUN file descriptor opened by someone else (a parent
    /// process, Android's VpnService, a container runtime).
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tun {
        Tun {
            file: File::from(fd),
            name: name.to_string(),
            offload: false,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn try_clone(&self) -> io::Result<Tun> {
        Ok(Tun {
            file: self.file.try_clone()?,
            name: self.name.clone(),
            offload: self.offload,
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
    /// many IP packets the burst holds (super-packets split); 0 on timeout.
    pub fn read_burst(&mut self, burst: &mut TunBurst, timeout: Duration) -> io::Result<usize> {
        burst.spans.clear();
        if !super::poll(self.file.as_raw_fd(), libc::POLLIN, timeout)? {
            return Ok(0);
        }
        let mut reads = 0;
        while reads < TUN_BURST && burst.has_room() {
            let at = burst.used();
            let read = if self.offload {
                self.file.read(&mut burst.raw)
            } else {
                self.file.read(&mut burst.buf[at..at + TUN_SLOT])
            };
            match read {
                Ok(len) => {
                    reads += 1;
                    if !self.offload {
                        burst.spans.push((at, len));
                    } else if let Err(e) = split_read(burst, at, len) {
                        tracing::debug!(error = %e, "TUN packet dropped");
                    }
                }
                Err(e)
                    if e.kind() == io::ErrorKind::WouldBlock
                        || e.kind() == io::ErrorKind::Interrupted =>
                {
                    break
                }
                Err(e) if reads > 0 => {
                    tracing::debug!(error = %e, "TUN read failed after a burst");
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(burst.spans.len())
    }

    /// Writes one IP packet.
    pub fn write_packet(&self, packet: &[u8]) -> io::Result<()> {
        if self.offload {
            let hdr = VirtioNetHdr::default().to_bytes();
            let iov = [io::IoSlice::new(&hdr), io::IoSlice::new(packet)];
            return (&self.file).write_vectored(&iov).map(|_| ());
        }
        (&self.file).write(packet).map(|_| ())
    }

    /// Writes a batch of IP packets; with offloads, in-order TCP segments
    /// of one flow go as one write. `written(i, ok)` reports each packet.
    pub fn write_burst<'a>(
        &self,
        packets: impl IntoIterator<Item = &'a [u8]>,
        mut written: impl FnMut(usize, bool),
    ) {
        if !self.offload {
            for (i, p) in packets.into_iter().enumerate() {
                written(i, self.write_packet(p).is_ok());
            }
            return;
        }
        COALESCER.with_borrow_mut(|co| {
            let mut next = 0;
            let mut report = |ok: bool, segments: usize| {
                for i in next..next + segments {
                    written(i, ok);
                }
                next += segments;
            };
            let file = &self.file;
            for p in packets {
                if co.push(p) {
                    continue;
                }
                co.drain(|bytes, segments| report((&*file).write(bytes).is_ok(), segments));
                // After a drain only a packet larger than the coalescer's
                // buffer can be refused; none is (64 KiB at most).
                if !co.push(p) {
                    report(false, 1);
                }
            }
            co.drain(|bytes, segments| report((&*file).write(bytes).is_ok(), segments));
        });
    }
}

/// Splits the offload read in `burst.raw[..len]` into the burst at `at`.
fn split_read(burst: &mut TunBurst, at: usize, len: usize) -> Result<(), OffloadError> {
    let raw = burst.raw.get(..len).ok_or(OffloadError::BadHeader)?;
    let hdr = VirtioNetHdr::new_checked(raw)?;
    let spans = &mut burst.spans;
    split(
        &hdr,
        &raw[virtio::HEADER_LEN..],
        &mut burst.buf[at..],
        |r| spans.push((at + r.start, r.len())),
    )?;
    Ok(())
}

fn set_offload(file: &File, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; no pointers.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
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
