//! The WireGuard relay protocol, sans-IO: the key-ownership proof that
//! registers a client, and the data frames. The websocket and threads are in
//! `relay::server` / `relay::client`; the full description is
//! `engine/docs/relay.md`.
//!
//! ```text
//!   server ──challenge [1][nonce 32][ephemeral X25519 public 32]──────────────► client
//!   client ──proof     [1][static public 32][HMAC-SHA256(K, transcript) 32]────► server
//!                      K = X25519(client static private, server ephemeral)
//!                        = X25519(server ephemeral private, client static public)
//!                      transcript = LABEL || nonce || ephemeral || static public || exporter
//!                      exporter = TLS exporter (RFC 5705/8446), label EXPORTER_LABEL, 32 bytes
//!   server ──accepted  [1][0]──────────────────────────────────────────────────► client
//!   client ──[destination public key 32][WireGuard datagram]───────────────────► server
//!   server ──[source public key 32][WireGuard datagram]────────────────────────► other client
//! ```
//!
//! A frame's datagram is normally WireGuard's (its first byte, the message
//! type, is 1 to 4). A datagram whose first byte is [`CANDIDATES_KIND`] is
//! instead a peer's NAT-traversal candidate list ([`Candidates`]); a node
//! without NAT traversal hands it to WireGuard's framing, which drops and
//! counts it as malformed, so old peers ignore it:
//!
//! ```text
//!   [CANDIDATES_KIND 0x80][CANDIDATES_VERSION 1][count <= MAX_CANDIDATES]
//!   count x ( [4][IPv4 4][port 2 BE] | [6][IPv6 16][port 2 BE] )
//! ```
//!
//! The sender is the frame's key as the relay server wrote it (the key the
//! sender proved), never anything in the payload.
//!
//! A relay message of at most [`KEY_LEN`] bytes cannot be a frame (a frame
//! holds a key and a non-empty datagram): such messages are the server's
//! **control messages**, `[kind][version][body]`. A client ignores kinds and
//! versions it does not know; a client older than control messages refuses
//! them as frames too short (counts one dropped frame) and carries on. The
//! one kind so far, sent once right after [`ACCEPTED`], tells the client the
//! address the server sees its connection come from ([`ObservedAddress`],
//! as DERP's server tells its clients their public IP):
//!
//! ```text
//!   [OBSERVED_KIND 0xA0][OBSERVED_VERSION 1]( [4][IPv4 4][port 2 BE] | [6][IPv6 16][port 2 BE] )
//! ```
//!
//! The proof shows possession of the private key of the registered public
//! key (only its owner can compute K), is fresh (the server's nonce and
//! ephemeral key), and is bound to this TLS session (the exporter), so a
//! proof seen by a man in the middle cannot be replayed on another
//! connection. The relay only ever sees WireGuard ciphertext.

use boringtun::x25519::{PublicKey as X25519Public, StaticSecret};
use ring::hmac;
use subtle::ConstantTimeEq;

/// Protocol version, the first byte of every handshake message.
pub const VERSION: u8 = 1;
/// Public keys on the wire: X25519, as WireGuard's.
pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 32;
pub const MAC_LEN: usize = 32;
pub const CHALLENGE_LEN: usize = 1 + NONCE_LEN + KEY_LEN;
pub const PROOF_LEN: usize = 1 + KEY_LEN + MAC_LEN;
/// The server's answer to a valid proof; a refusal closes the websocket.
pub const ACCEPTED: [u8; 2] = [VERSION, 0];
/// Largest WireGuard datagram a frame carries (a UDP payload's maximum).
pub const MAX_DATAGRAM: usize = 65_535;
/// Largest relay message: key plus datagram. Larger ones end the session.
pub const MAX_FRAME: usize = KEY_LEN + MAX_DATAGRAM;
/// TLS exporter label and length (RFC 8446 section 7.5).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-meshvpn-relay-v1";
pub const EXPORTER_LEN: usize = 32;
/// Domain separation for the proof's MAC.
const TRANSCRIPT_LABEL: &[u8] = b"meshvpn relay v1 key proof";

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RelayError {
    #[error("relay message of {0} bytes has the wrong length")]
    Length(usize),
    #[error("unsupported relay protocol version {0}")]
    Version(u8),
    #[error("the key is a low-order point")]
    LowOrderKey,
    #[error("the key proof does not verify")]
    BadProof,
    #[error("the relay refused the registration")]
    Refused,
}

/// One relay data frame: the peer's public key (destination upstream,
/// source downstream) and an opaque WireGuard datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame<'a> {
    pub key: &'a [u8; KEY_LEN],
    pub datagram: &'a [u8],
}

impl<'a> Frame<'a> {
    /// Parses a websocket message; empty datagrams and oversized messages
    /// are errors.
    pub fn decode(message: &'a [u8]) -> Result<Frame<'a>, RelayError> {
        if message.len() <= KEY_LEN || message.len() > MAX_FRAME {
            return Err(RelayError::Length(message.len()));
        }
        let (key, datagram) = message.split_at(KEY_LEN);
        let key = key
            .try_into()
            .map_err(|_| RelayError::Length(message.len()))?;
        Ok(Frame { key, datagram })
    }

    /// The message carrying `datagram` tagged with `key`.
    pub fn encode(key: &[u8; KEY_LEN], datagram: &[u8]) -> Result<Vec<u8>, RelayError> {
        if datagram.is_empty() || datagram.len() > MAX_DATAGRAM {
            return Err(RelayError::Length(KEY_LEN + datagram.len()));
        }
        let mut m = Vec::with_capacity(KEY_LEN + datagram.len());
        m.extend_from_slice(key);
        m.extend_from_slice(datagram);
        Ok(m)
    }
}

/// First byte of a relay datagram carrying [`Candidates`] (no WireGuard
/// message type: those are 1 to 4).
pub const CANDIDATES_KIND: u8 = 0x80;
/// Version of the candidate message; other versions are ignored (counted
/// as unsupported), so a later format can be sent next to this one.
pub const CANDIDATES_VERSION: u8 = 1;
/// Candidates one message carries at most: local addresses and the
/// server-reflexive one (Tailscale's magicsock sends about as many).
pub const MAX_CANDIDATES: usize = 8;
/// Longest candidate message: header and eight IPv6 entries (155 bytes).
pub const MAX_CANDIDATES_LEN: usize = 3 + MAX_CANDIDATES * (1 + 16 + 2);

/// Why a candidate message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CandidatesError {
    #[error("not a candidate message")]
    NotCandidates,
    #[error("candidate message version {0} is not supported")]
    Unsupported(u8),
    #[error("malformed candidate message")]
    Malformed,
}

/// A peer's NAT-traversal candidates: UDP addresses where it may be
/// reached directly. Only ever probed with WireGuard handshakes, so a
/// false one costs a few datagrams, never trust.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Candidates(pub Vec<std::net::SocketAddr>);

impl Candidates {
    /// True when `datagram` is meant to be a candidate message (by its
    /// first byte); what [`Candidates::decode`] then accepts is stricter.
    pub fn is_candidates(datagram: &[u8]) -> bool {
        datagram.first() == Some(&CANDIDATES_KIND)
    }

    /// Whether an address may be a candidate at all: a unicast address
    /// and a port. Loopback, unspecified, multicast and broadcast ones
    /// would turn probes at this host's own services or at a whole segment.
    pub fn usable(a: &std::net::SocketAddr) -> bool {
        use std::net::IpAddr;
        if a.port() == 0 {
            return false;
        }
        match a.ip().to_canonical() {
            IpAddr::V4(v4) => {
                !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast())
            }
            IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast()),
        }
    }

    /// The message for these candidates. Unusable addresses and duplicates
    /// are left out, and at most [`MAX_CANDIDATES`] are written.
    pub fn encode(&self) -> Vec<u8> {
        let mut m = Vec::with_capacity(MAX_CANDIDATES_LEN);
        m.extend_from_slice(&[CANDIDATES_KIND, CANDIDATES_VERSION, 0]);
        let mut seen: Vec<std::net::SocketAddr> = Vec::new();
        for a in &self.0 {
            let a = std::net::SocketAddr::new(a.ip().to_canonical(), a.port());
            if seen.len() == MAX_CANDIDATES || !Self::usable(&a) || seen.contains(&a) {
                continue;
            }
            seen.push(a);
            put_addr(&mut m, a);
        }
        m[2] = seen.len() as u8;
        m
    }

    /// Parses a candidate message: exactly `count` well-formed entries,
    /// nothing after them, every address [`usable`](Self::usable) and none
    /// twice. Anything else is refused whole.
    pub fn decode(datagram: &[u8]) -> Result<Candidates, CandidatesError> {
        if !Self::is_candidates(datagram) {
            return Err(CandidatesError::NotCandidates);
        }
        if datagram.len() > MAX_CANDIDATES_LEN || datagram.len() < 3 {
            return Err(CandidatesError::Malformed);
        }
        if datagram[1] != CANDIDATES_VERSION {
            return Err(CandidatesError::Unsupported(datagram[1]));
        }
        let count = datagram[2] as usize;
        if count > MAX_CANDIDATES {
            return Err(CandidatesError::Malformed);
        }
        let mut list = Vec::with_capacity(count);
        let mut rest = &datagram[3..];
        for _ in 0..count {
            let (a, after) = take_addr(rest).ok_or(CandidatesError::Malformed)?;
            if !Self::usable(&a) || list.contains(&a) {
                return Err(CandidatesError::Malformed);
            }
            list.push(a);
            rest = after;
        }
        if !rest.is_empty() {
            return Err(CandidatesError::Malformed);
        }
        Ok(Candidates(list))
    }
}

/// First byte of the server's control message carrying [`ObservedAddress`].
pub const OBSERVED_KIND: u8 = 0xA0;
/// Version of the observed-address message; a client ignores other ones.
pub const OBSERVED_VERSION: u8 = 1;

/// What a relay message of at most [`KEY_LEN`] bytes (a server control
/// message) says, as far as this client understands it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    /// The address the server sees the client's connection come from.
    Observed(ObservedAddress),
    /// A kind or version this client does not know: ignored (a later
    /// server may send more than this one understands).
    Unknown,
}

/// Why a control message was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    #[error("not a control message")]
    NotControl,
    #[error("malformed control message")]
    Malformed,
}

/// The client's address (IP and TCP port) as the relay server sees it: the
/// public address of the client's NAT, if it has one. The IP changing
/// between sessions means the NAT's public address changed (the UDP
/// mapping with it), so the client runs discovery again at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObservedAddress(pub std::net::SocketAddr);

impl ObservedAddress {
    /// The control message (9 bytes for IPv4, 21 for IPv6: never a frame).
    pub fn encode(&self) -> Vec<u8> {
        let mut m = vec![OBSERVED_KIND, OBSERVED_VERSION];
        put_addr(&mut m, self.0);
        m
    }
}

impl Control {
    /// True when a relay message is a control message (too short for a frame).
    pub fn is_control(message: &[u8]) -> bool {
        message.len() <= KEY_LEN
    }

    /// Parses a control message. An unknown kind or version is
    /// [`Control::Unknown`]; a known one must be exact (no trailing bytes).
    pub fn decode(message: &[u8]) -> Result<Control, ControlError> {
        if !Self::is_control(message) {
            return Err(ControlError::NotControl);
        }
        match message {
            [OBSERVED_KIND, OBSERVED_VERSION, rest @ ..] => match take_addr(rest) {
                Some((a, [])) => Ok(Control::Observed(ObservedAddress(a))),
                _ => Err(ControlError::Malformed),
            },
            [_, _, ..] => Ok(Control::Unknown),
            _ => Err(ControlError::Malformed),
        }
    }
}

/// Appends one address as the candidate and observed-address messages
/// carry it: `[4][IPv4 4][port 2 BE]` or `[6][IPv6 16][port 2 BE]`, an
/// IPv4-mapped IPv6 address written as IPv4.
fn put_addr(m: &mut Vec<u8>, a: std::net::SocketAddr) {
    use std::net::IpAddr;
    match a.ip().to_canonical() {
        IpAddr::V4(v4) => {
            m.push(4);
            m.extend_from_slice(&v4.octets());
        }
        IpAddr::V6(v6) => {
            m.push(6);
            m.extend_from_slice(&v6.octets());
        }
    }
    m.extend_from_slice(&a.port().to_be_bytes());
}

/// Reads one address [`put_addr`] wrote from the front of `b`: the address
/// (its IP canonical) and the bytes after it, or `None` when `b` does not
/// start with a whole one.
fn take_addr(b: &[u8]) -> Option<(std::net::SocketAddr, &[u8])> {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
    let (ip, rest) = match b {
        [4, x, y, z, w, rest @ ..] => (IpAddr::V4(Ipv4Addr::new(*x, *y, *z, *w)), rest),
        [6, rest @ ..] if rest.len() >= 16 => {
            let (octets, rest) = rest.split_at(16);
            let octets: [u8; 16] = octets.try_into().ok()?;
            (IpAddr::V6(Ipv6Addr::from(octets)), rest)
        }
        _ => return None,
    };
    match rest {
        [hi, lo, rest @ ..] => Some((
            SocketAddr::new(ip.to_canonical(), u16::from_be_bytes([*hi, *lo])),
            rest,
        )),
        _ => None,
    }
}

fn transcript_mac(
    shared: &[u8; 32],
    nonce: &[u8],
    ephemeral: &[u8],
    client: &[u8],
    exporter: &[u8],
) -> hmac::Context {
    let key = hmac::Key::new(hmac::HMAC_SHA256, shared);
    let mut ctx = hmac::Context::with_key(&key);
    for part in [TRANSCRIPT_LABEL, nonce, ephemeral, client, exporter] {
        ctx.update(part);
    }
    ctx
}

fn check_version(message: &[u8], len: usize) -> Result<(), RelayError> {
    if message.len() != len {
        return Err(RelayError::Length(message.len()));
    }
    if message[0] != VERSION {
        return Err(RelayError::Version(message[0]));
    }
    Ok(())
}

/// The server's half: a fresh nonce and ephemeral key per connection.
pub struct ServerHandshake {
    nonce: [u8; NONCE_LEN],
    ephemeral: StaticSecret,
}

impl ServerHandshake {
    /// `random` must come from a cryptographic generator (the caller's:
    /// this layer has no I/O).
    pub fn new(random: [u8; NONCE_LEN + KEY_LEN]) -> ServerHandshake {
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&random[..NONCE_LEN]);
        let mut secret = [0u8; KEY_LEN];
        secret.copy_from_slice(&random[NONCE_LEN..]);
        ServerHandshake {
            nonce,
            ephemeral: StaticSecret::from(secret),
        }
    }

    pub fn challenge(&self) -> [u8; CHALLENGE_LEN] {
        let mut m = [0u8; CHALLENGE_LEN];
        m[0] = VERSION;
        m[1..1 + NONCE_LEN].copy_from_slice(&self.nonce);
        m[1 + NONCE_LEN..].copy_from_slice(X25519Public::from(&self.ephemeral).as_bytes());
        m
    }

    /// Checks a client's proof for this TLS session's `exporter` value;
    /// returns the public key it proved. The MAC comparison is constant time.
    pub fn verify(&self, proof: &[u8], exporter: &[u8]) -> Result<[u8; KEY_LEN], RelayError> {
        check_version(proof, PROOF_LEN)?;
        let mut client = [0u8; KEY_LEN];
        client.copy_from_slice(&proof[1..1 + KEY_LEN]);
        let shared = self.ephemeral.diffie_hellman(&X25519Public::from(client));
        if !shared.was_contributory() {
            return Err(RelayError::LowOrderKey);
        }
        let ephemeral = X25519Public::from(&self.ephemeral);
        let expected = transcript_mac(
            shared.as_bytes(),
            &self.nonce,
            ephemeral.as_bytes(),
            &client,
            exporter,
        )
        .sign();
        if !bool::from(expected.as_ref().ct_eq(&proof[1 + KEY_LEN..])) {
            return Err(RelayError::BadProof);
        }
        Ok(client)
    }
}

/// The client's answer to `challenge`: proves it owns `secret` on the TLS
/// session whose exporter value is `exporter`.
pub fn prove(
    challenge: &[u8],
    secret: &StaticSecret,
    exporter: &[u8],
) -> Result<[u8; PROOF_LEN], RelayError> {
    check_version(challenge, CHALLENGE_LEN)?;
    let nonce = &challenge[1..1 + NONCE_LEN];
    let mut ephemeral = [0u8; KEY_LEN];
    ephemeral.copy_from_slice(&challenge[1 + NONCE_LEN..]);
    let shared = secret.diffie_hellman(&X25519Public::from(ephemeral));
    if !shared.was_contributory() {
        return Err(RelayError::LowOrderKey);
    }
    let public = X25519Public::from(secret);
    let mac = transcript_mac(
        shared.as_bytes(),
        nonce,
        &ephemeral,
        public.as_bytes(),
        exporter,
    )
    .sign();
    let mut m = [0u8; PROOF_LEN];
    m[0] = VERSION;
    m[1..1 + KEY_LEN].copy_from_slice(public.as_bytes());
    m[1 + KEY_LEN..].copy_from_slice(mac.as_ref());
    Ok(m)
}

/// Reads the server's answer to a proof.
pub fn check_accepted(message: &[u8]) -> Result<(), RelayError> {
    check_version(message, ACCEPTED.len())?;
    if message[1] != 0 {
        return Err(RelayError::Refused);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> StaticSecret {
        StaticSecret::from([b; 32])
    }

    fn server() -> ServerHandshake {
        let mut r = [0u8; 64];
        for (i, b) in r.iter_mut().enumerate() {
            *b = i as u8 ^ 0x5a;
        }
        ServerHandshake::new(r)
    }

    #[test]
    fn proof_accepted_for_the_owner_on_the_same_session() {
        let s = server();
        let client = secret(7);
        let proof = prove(&s.challenge(), &client, &[9; 32]).unwrap();
        let key = s.verify(&proof, &[9; 32]).unwrap();
        assert_eq!(&key, X25519Public::from(&client).as_bytes());
    }

    #[test]
    fn proof_rejected_when_anything_differs() {
        let s = server();
        let client = secret(7);
        let proof = prove(&s.challenge(), &client, &[9; 32]).unwrap();
        // Another TLS session (exporter value).
        assert_eq!(s.verify(&proof, &[8; 32]), Err(RelayError::BadProof));
        // Another server challenge (replay on a new connection).
        let mut r = [1u8; 64];
        r[0] = 2;
        assert_eq!(
            ServerHandshake::new(r).verify(&proof, &[9; 32]),
            Err(RelayError::BadProof)
        );
        // Claiming someone else's key with our MAC.
        let mut stolen = proof;
        stolen[1..33].copy_from_slice(X25519Public::from(&secret(8)).as_bytes());
        assert_eq!(s.verify(&stolen, &[9; 32]), Err(RelayError::BadProof));
        // Every single bit flipped in the MAC.
        for i in 1 + KEY_LEN..PROOF_LEN {
            let mut bad = proof;
            bad[i] ^= 1;
            assert_eq!(s.verify(&bad, &[9; 32]), Err(RelayError::BadProof));
        }
        // Wrong version, every wrong length.
        let mut v = proof;
        v[0] = 2;
        assert_eq!(s.verify(&v, &[9; 32]), Err(RelayError::Version(2)));
        for n in 0..PROOF_LEN + 3 {
            if n != PROOF_LEN {
                let buf = vec![VERSION; n];
                assert_eq!(s.verify(&buf, &[9; 32]), Err(RelayError::Length(n)));
            }
        }
    }

    #[test]
    fn low_order_keys_refused_both_ways() {
        let s = server();
        let mut proof = [0u8; PROOF_LEN];
        proof[0] = VERSION; // the all-zero public key is of low order
        assert_eq!(s.verify(&proof, &[]), Err(RelayError::LowOrderKey));
        let mut challenge = s.challenge();
        challenge[1 + NONCE_LEN..].fill(0);
        assert_eq!(
            prove(&challenge, &secret(7), &[]).err(),
            Some(RelayError::LowOrderKey)
        );
    }

    #[test]
    fn frames_round_trip_and_limits() {
        let key = [3u8; 32];
        let m = Frame::encode(&key, b"\x04abc").unwrap();
        assert_eq!(m.len(), 36);
        let f = Frame::decode(&m).unwrap();
        assert_eq!((f.key, f.datagram), (&key, &b"\x04abc"[..]));

        for n in 0..=KEY_LEN {
            assert_eq!(Frame::decode(&vec![0; n]), Err(RelayError::Length(n)));
        }
        assert!(Frame::decode(&vec![0; MAX_FRAME]).is_ok());
        assert_eq!(
            Frame::decode(&vec![0; MAX_FRAME + 1]),
            Err(RelayError::Length(MAX_FRAME + 1))
        );
        assert!(Frame::encode(&key, &[]).is_err());
        assert!(Frame::encode(&key, &vec![0; MAX_DATAGRAM + 1]).is_err());
    }

    fn sa(s: &str) -> std::net::SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn candidates_round_trip_and_never_look_like_wireguard() {
        let c = Candidates(vec![
            sa("192.0.2.7:51820"),
            sa("[2001:db8::1]:4000"),
            sa("10.1.2.3:51820"),
        ]);
        let m = c.encode();
        assert_eq!(m.len(), 3 + 7 + 19 + 7);
        assert_eq!(Candidates::decode(&m), Ok(c));
        assert!(crate::wire::WireMessage::new_checked(&m).is_err());
        // Empty lists are fine (a node that knows no address of its own).
        let empty = Candidates::default().encode();
        assert_eq!(Candidates::decode(&empty), Ok(Candidates::default()));
        // IPv4-mapped addresses travel as IPv4.
        let mapped = Candidates(vec![sa("[::ffff:192.0.2.9]:1")]).encode();
        assert_eq!(
            Candidates::decode(&mapped).unwrap().0,
            vec![sa("192.0.2.9:1")]
        );
    }

    #[test]
    fn candidates_encoding_is_bounded_and_skips_unusable_addresses() {
        let many: Vec<_> = (1..=40u16)
            .map(|p| sa(&format!("[2001:db8::{p}]:{p}")))
            .collect();
        let m = Candidates(many.clone()).encode();
        assert_eq!(m.len(), MAX_CANDIDATES_LEN);
        assert_eq!(Candidates::decode(&m).unwrap().0, many[..MAX_CANDIDATES]);
        let bad = Candidates(vec![
            sa("127.0.0.1:51820"),
            sa("0.0.0.0:51820"),
            sa("224.0.0.1:51820"),
            sa("255.255.255.255:51820"),
            sa("[::1]:51820"),
            sa("[ff02::1]:51820"),
            sa("192.0.2.1:0"),
            sa("192.0.2.1:5"),
            sa("192.0.2.1:5"),
        ]);
        assert_eq!(
            Candidates::decode(&bad.encode()).unwrap().0,
            vec![sa("192.0.2.1:5")]
        );
    }

    #[test]
    fn malformed_candidates_are_refused_whole() {
        let good = Candidates(vec![sa("192.0.2.7:51820"), sa("198.51.100.1:9")]).encode();
        // Every truncation, and one byte too many.
        for n in 0..good.len() {
            assert!(Candidates::decode(&good[..n]).is_err(), "cut at {n}");
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Candidates::decode(&long), Err(CandidatesError::Malformed));
        // A count above the bound, a count past the data, an unknown family.
        let mut m = good.clone();
        m[2] = MAX_CANDIDATES as u8 + 1;
        assert_eq!(Candidates::decode(&m), Err(CandidatesError::Malformed));
        let mut m = good.clone();
        m[2] = 3;
        assert_eq!(Candidates::decode(&m), Err(CandidatesError::Malformed));
        let mut m = good.clone();
        m[3] = 5;
        assert_eq!(Candidates::decode(&m), Err(CandidatesError::Malformed));
        // A loopback address, a duplicate, port 0.
        let mut m = good.clone();
        m[4..8].copy_from_slice(&[127, 0, 0, 1]);
        assert_eq!(Candidates::decode(&m), Err(CandidatesError::Malformed));
        let mut m = good.clone();
        m.truncate(10);
        m.extend_from_within(3..10);
        assert_eq!(Candidates::decode(&m), Err(CandidatesError::Malformed));
        let mut m = good.clone();
        m[8..10].copy_from_slice(&[0, 0]);
        assert_eq!(Candidates::decode(&m), Err(CandidatesError::Malformed));
        // Oversized, whatever it holds; another version; not ours at all.
        let mut huge = vec![CANDIDATES_KIND, CANDIDATES_VERSION, 0];
        huge.resize(MAX_CANDIDATES_LEN + 1, 0);
        assert_eq!(Candidates::decode(&huge), Err(CandidatesError::Malformed));
        let mut v2 = good.clone();
        v2[1] = 2;
        assert_eq!(
            Candidates::decode(&v2),
            Err(CandidatesError::Unsupported(2))
        );
        assert_eq!(
            Candidates::decode(&[1, 0, 0, 0]),
            Err(CandidatesError::NotCandidates)
        );
        assert_eq!(Candidates::decode(&[]), Err(CandidatesError::NotCandidates));
    }

    #[test]
    fn observed_address_round_trips_and_is_never_a_frame() {
        for a in [
            "192.0.2.7:40000",
            "[2001:db8::9]:443",
            "[::ffff:198.51.100.2]:5",
        ] {
            let a = sa(a);
            let m = ObservedAddress(a).encode();
            assert!(Control::is_control(&m), "{a}");
            assert!(Frame::decode(&m).is_err(), "an old client must refuse {a}");
            let want = std::net::SocketAddr::new(a.ip().to_canonical(), a.port());
            assert_eq!(
                Control::decode(&m),
                Ok(Control::Observed(ObservedAddress(want)))
            );
        }
        // A frame is never a control message.
        assert_eq!(
            Control::decode(&[0; KEY_LEN + 1]),
            Err(ControlError::NotControl)
        );
    }

    #[test]
    fn control_messages_unknown_are_ignored_malformed_refused() {
        let good = ObservedAddress(sa("192.0.2.7:40000")).encode();
        // Every truncation and one byte too many of a known kind.
        for n in 2..good.len() {
            assert_eq!(Control::decode(&good[..n]), Err(ControlError::Malformed));
        }
        let mut long = good.clone();
        long.push(0);
        assert_eq!(Control::decode(&long), Err(ControlError::Malformed));
        let mut fam = good.clone();
        fam[2] = 5;
        assert_eq!(Control::decode(&fam), Err(ControlError::Malformed));
        // Too short to say its kind and version.
        assert_eq!(Control::decode(&[]), Err(ControlError::Malformed));
        assert_eq!(
            Control::decode(&[OBSERVED_KIND]),
            Err(ControlError::Malformed)
        );
        // Another version, another kind: a later server's, ignored.
        let mut v2 = good.clone();
        v2[1] = 2;
        assert_eq!(Control::decode(&v2), Ok(Control::Unknown));
        assert_eq!(Control::decode(&[0xA1, 1, 9, 9]), Ok(Control::Unknown));
        assert_eq!(Control::decode(&[0; KEY_LEN]), Ok(Control::Unknown));
    }

    #[test]
    fn accepted_answer() {
        assert_eq!(check_accepted(&ACCEPTED), Ok(()));
        assert_eq!(check_accepted(&[VERSION, 1]), Err(RelayError::Refused));
        assert_eq!(check_accepted(&[2, 0]), Err(RelayError::Version(2)));
        assert_eq!(check_accepted(&[VERSION]), Err(RelayError::Length(1)));
    }
}
