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

    #[test]
    fn accepted_answer() {
        assert_eq!(check_accepted(&ACCEPTED), Ok(()));
        assert_eq!(check_accepted(&[VERSION, 1]), Err(RelayError::Refused));
        assert_eq!(check_accepted(&[2, 0]), Err(RelayError::Version(2)));
        assert_eq!(check_accepted(&[VERSION]), Err(RelayError::Length(1)));
    }
}
