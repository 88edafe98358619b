//! An independent WireGuard initiator written from the protocol paper
//! (Donenfeld, "WireGuard: Next Generation Kernel Network Tunnel", section 5.4),
//! not from boringtun: the ephemeral key, sender index, timestamp and data
//! counters are the caller's. Tests and fuzz targets use it to reach code
//! that sits behind the cryptography (MAC1, the Noise handshake, the replay
//! window) with messages boringtun itself would never produce, and to know
//! every chaining key of a handshake (the log test searches for them).
//!
//! Shared by `engine/tests` and by `fuzz/` (through `#[path]`), so it needs
//! only crates both have: boringtun's x25519, blake2, hmac and ring.
#![allow(dead_code)]

use blake2::digest::{FixedOutput, KeyInit, Update};
use blake2::{Blake2s256, Blake2sMac, Digest};
use boringtun::x25519::{PublicKey, StaticSecret};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};

const CONSTRUCTION: &[u8] = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s";
const IDENTIFIER: &[u8] = b"WireGuard v1 zx2c4 Jason@zx2c4.com";
const LABEL_MAC1: &[u8] = b"mac1----";

pub const INITIATION_LEN: usize = 148;
pub const RESPONSE_LEN: usize = 92;

pub fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    for p in parts {
        Digest::update(&mut h, p);
    }
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <hmac::SimpleHmac<Blake2s256> as KeyInit>::new_from_slice(key).unwrap();
    for p in parts {
        m.update(p);
    }
    m.finalize_fixed().into()
}

/// The paper's KDF_n(key, input): returns (τ1, τ2, τ3).
fn kdf(key: &[u8; 32], input: &[u8]) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let t0 = hmac(key, &[input]);
    let t1 = hmac(&t0, &[&[1]]);
    let t2 = hmac(&t0, &[&t1, &[2]]);
    let t3 = hmac(&t0, &[&t2, &[3]]);
    (t1, t2, t3)
}

/// Keyed BLAKE2s with a 16-byte output: MAC1 and MAC2.
pub fn mac(key: &[u8], data: &[u8]) -> [u8; 16] {
    let mut m = <Blake2sMac<blake2::digest::consts::U16> as KeyInit>::new_from_slice(key).unwrap();
    m.update(data);
    m.finalize_fixed().into()
}

fn aead_key(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, key).unwrap())
}

fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

pub fn seal(key: &[u8; 32], counter: u64, plaintext: &[u8], aad: &[u8]) -> Vec<u8> {
    let mut buf = plaintext.to_vec();
    aead_key(key)
        .seal_in_place_append_tag(nonce(counter), Aad::from(aad), &mut buf)
        .unwrap();
    buf
}

pub fn open(key: &[u8; 32], counter: u64, ciphertext: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    let mut buf = ciphertext.to_vec();
    let n = aead_key(key)
        .open_in_place(nonce(counter), Aad::from(aad), &mut buf)
        .ok()?
        .len();
    buf.truncate(n);
    Some(buf)
}

fn dh(private: &[u8; 32], public: &[u8; 32]) -> [u8; 32] {
    StaticSecret::from(*private)
        .diffie_hellman(&PublicKey::from(*public))
        .to_bytes()
}

pub fn public_of(private: &[u8; 32]) -> [u8; 32] {
    PublicKey::from(&StaticSecret::from(*private)).to_bytes()
}

/// A TAI64N timestamp (12 bytes, big-endian seconds since 1970 + 2^62 + 10
/// as the paper has it, then nanoseconds).
pub fn tai64n(secs: u64, nanos: u32) -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..8].copy_from_slice(&(secs + (1u64 << 62) + 10).to_be_bytes());
    t[8..].copy_from_slice(&nanos.to_be_bytes());
    t
}

/// The current wall-clock time as TAI64N, plus `extra_nanos` (so a test can
/// make several strictly increasing timestamps within one clock tick).
pub fn tai64n_now(extra_nanos: u64) -> [u8; 12] {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        + std::time::Duration::from_nanos(extra_nanos);
    tai64n(d.as_secs(), d.subsec_nanos())
}

/// Recomputes MAC1 of a handshake message for `responder_public` (over all
/// bytes before it) and zeroes MAC2, as an initiator without a cookie does.
pub fn set_mac1(msg: &mut [u8], responder_public: &[u8; 32]) {
    let n = msg.len();
    let key = hash(&[LABEL_MAC1, responder_public]);
    let m = mac(&key, &msg[..n - 32]);
    msg[n - 32..n - 16].copy_from_slice(&m);
    msg[n - 16..].fill(0);
}

/// The fields of one initiation the caller chooses.
#[derive(Clone, Debug)]
pub struct InitiationFields {
    pub sender_index: u32,
    pub ephemeral_private: [u8; 32],
    pub timestamp: [u8; 12],
}

/// One side of a handshake we drive by hand.
pub struct Initiator {
    static_private: [u8; 32],
    responder_public: [u8; 32],
    psk: [u8; 32],
    state: Option<(InitiationFields, [u8; 32], [u8; 32])>,
    /// Every chaining key this initiator computed, in order.
    pub chaining_keys: Vec<[u8; 32]>,
}

/// Transport keys after a completed handshake.
#[derive(Clone)]
pub struct Session {
    /// Our index (the responder puts it in data it sends us).
    pub local_index: u32,
    /// The responder's index: goes into every data message we send.
    pub remote_index: u32,
    pub send_key: [u8; 32],
    pub recv_key: [u8; 32],
}

impl Initiator {
    pub fn new(
        static_private: [u8; 32],
        responder_public: [u8; 32],
        psk: Option<[u8; 32]>,
    ) -> Self {
        Initiator {
            static_private,
            responder_public,
            psk: psk.unwrap_or([0u8; 32]),
            state: None,
            chaining_keys: Vec::new(),
        }
    }

    pub fn static_public(&self) -> [u8; 32] {
        public_of(&self.static_private)
    }

    /// A handshake initiation with valid MAC1 (MAC2 zero).
    pub fn initiation(&mut self, f: &InitiationFields) -> [u8; INITIATION_LEN] {
        let s_pub = self.static_public();
        self.initiation_claiming(f, &s_pub)
    }

    /// Like [`Initiator::initiation`] but encrypts `claimed_static` as the
    /// initiator's identity (the static-static DH still uses our real key).
    pub fn initiation_claiming(
        &mut self,
        f: &InitiationFields,
        claimed_static: &[u8; 32],
    ) -> [u8; INITIATION_LEN] {
        let mut msg = [0u8; INITIATION_LEN];
        let ck = hash(&[CONSTRUCTION]);
        let h = hash(&[&hash(&[&ck, IDENTIFIER]), &self.responder_public]);
        let e_pub = public_of(&f.ephemeral_private);
        msg[0] = 1;
        msg[4..8].copy_from_slice(&f.sender_index.to_le_bytes());
        msg[8..40].copy_from_slice(&e_pub);
        let h = hash(&[&h, &e_pub]);
        let (ck, _, _) = kdf(&ck, &e_pub);
        self.chaining_keys.push(ck);
        let (ck, k, _) = kdf(&ck, &dh(&f.ephemeral_private, &self.responder_public));
        self.chaining_keys.push(ck);
        let enc_static = seal(&k, 0, claimed_static, &h);
        msg[40..88].copy_from_slice(&enc_static);
        let h = hash(&[&h, &enc_static]);
        let (ck, k, _) = kdf(&ck, &dh(&self.static_private, &self.responder_public));
        self.chaining_keys.push(ck);
        let enc_ts = seal(&k, 0, &f.timestamp, &h);
        msg[88..116].copy_from_slice(&enc_ts);
        let h = hash(&[&h, &enc_ts]);
        set_mac1(&mut msg, &self.responder_public);
        self.state = Some((f.clone(), ck, h));
        msg
    }

    /// Completes the handshake from the responder's message; `None` when it
    /// does not verify or answers another initiation.
    pub fn consume_response(&mut self, resp: &[u8]) -> Option<Session> {
        let (f, ck, h) = self.state.as_ref()?;
        if resp.len() != RESPONSE_LEN || resp[..4] != [2, 0, 0, 0] {
            return None;
        }
        let remote_index = u32::from_le_bytes(resp[4..8].try_into().unwrap());
        let receiver = u32::from_le_bytes(resp[8..12].try_into().unwrap());
        if receiver != f.sender_index {
            return None;
        }
        let e_r: [u8; 32] = resp[12..44].try_into().unwrap();
        let h = hash(&[h, &e_r]);
        let (ck, _, _) = kdf(ck, &e_r);
        let (ck, _, _) = kdf(&ck, &dh(&f.ephemeral_private, &e_r));
        let (ck, _, _) = kdf(&ck, &dh(&self.static_private, &e_r));
        let (ck, t, k) = kdf(&ck, &self.psk);
        let h = hash(&[&h, &t]);
        open(&k, 0, &resp[44..60], &h)?;
        self.chaining_keys.push(ck);
        let (send_key, recv_key, _) = kdf(&ck, &[]);
        Some(Session {
            local_index: f.sender_index,
            remote_index,
            send_key,
            recv_key,
        })
    }
}

impl Session {
    /// A data message carrying `plaintext` with the given counter.
    pub fn data(&self, counter: u64, plaintext: &[u8]) -> Vec<u8> {
        let mut d = vec![4, 0, 0, 0];
        d.extend_from_slice(&self.remote_index.to_le_bytes());
        d.extend_from_slice(&counter.to_le_bytes());
        d.extend_from_slice(&seal(&self.send_key, counter, plaintext, &[]));
        d
    }

    /// Decrypts a data message the responder sent us.
    pub fn open(&self, datagram: &[u8]) -> Option<(u64, Vec<u8>)> {
        if datagram.len() < 32 || datagram[..4] != [4, 0, 0, 0] {
            return None;
        }
        let counter = u64::from_le_bytes(datagram[8..16].try_into().unwrap());
        open(&self.recv_key, counter, &datagram[16..], &[]).map(|p| (counter, p))
    }
}
