//! WireGuard keys: Curve25519 private/public keys and preshared keys.
//!
//! Private and preshared keys are zeroed on drop and never printed: their
//! `Debug` shows only that a key is present. Public keys compare in constant
//! time.

use std::fmt;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use boringtun::x25519;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// Length in bytes of every WireGuard key.
pub const KEY_LEN: usize = 32;

/// Why a key could not be read. Displays as `FIELD: REASON`; a caller that
/// names the field itself (a parser reporting `line N: FIELD: ...`) uses
/// [`KeyError::reason`] so the field is not named twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {}", self.field(), self.reason())]
pub enum KeyError {
    Base64 { field: &'static str },
    Hex { field: &'static str },
    Length { field: &'static str, len: usize },
}

impl KeyError {
    /// The field the key was read for (`PrivateKey`, `public_key`, ...).
    pub fn field(&self) -> &'static str {
        match self {
            KeyError::Base64 { field }
            | KeyError::Hex { field }
            | KeyError::Length { field, .. } => field,
        }
    }

    /// What is wrong with the key, without the field's name.
    pub fn reason(&self) -> String {
        match self {
            KeyError::Base64 { .. } => {
                "not valid base64 (a WireGuard key is 44 base64 characters)".into()
            }
            KeyError::Hex { .. } => "not valid hex (a key in the UAPI is 64 hex digits)".into(),
            KeyError::Length { len, .. } => format!("a key is 32 bytes, got {len}"),
        }
    }
}

fn decode_base64(s: &str, field: &'static str) -> Result<[u8; KEY_LEN], KeyError> {
    let s = s.trim();
    let mut raw = BASE64
        .decode(s.as_bytes())
        .map_err(|_| KeyError::Base64 { field })?;
    let out = to_array(&raw, field);
    raw.zeroize();
    out
}

fn decode_hex(s: &str, field: &'static str) -> Result<[u8; KEY_LEN], KeyError> {
    let s = s.trim().as_bytes();
    if s.len() != KEY_LEN * 2 {
        return Err(if s.iter().all(u8::is_ascii_hexdigit) {
            KeyError::Length {
                field,
                len: s.len() / 2,
            }
        } else {
            KeyError::Hex { field }
        });
    }
    let mut out = [0u8; KEY_LEN];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = hex_digit(pair[0]).ok_or(KeyError::Hex { field })?;
        let lo = hex_digit(pair[1]).ok_or(KeyError::Hex { field })?;
        out[i] = hi << 4 | lo;
    }
    Ok(out)
}

fn hex_digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

fn encode_hex(bytes: &[u8; KEY_LEN]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(KEY_LEN * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

fn to_array(raw: &[u8], field: &'static str) -> Result<[u8; KEY_LEN], KeyError> {
    raw.try_into().map_err(|_| KeyError::Length {
        field,
        len: raw.len(),
    })
}

fn random_bytes() -> [u8; KEY_LEN] {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; KEY_LEN];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .expect("the operating system's random number generator failed");
    bytes
}

/// The text forms and constant-time equality every key type shares:
/// base64 (wg-quick, `wg`), hex (the UAPI), raw bytes.
macro_rules! key_codec {
    ($ty:ident, $conf_field:literal, $uapi_field:literal) => {
        impl $ty {
            pub fn from_bytes(bytes: [u8; KEY_LEN]) -> Self {
                $ty(bytes)
            }
            pub fn from_base64(s: &str) -> Result<Self, KeyError> {
                decode_base64(s, $conf_field).map($ty)
            }
            pub fn from_hex(s: &str) -> Result<Self, KeyError> {
                decode_hex(s, $uapi_field).map($ty)
            }
            pub fn to_base64(&self) -> String {
                BASE64.encode(self.0)
            }
            pub fn to_hex(&self) -> String {
                encode_hex(&self.0)
            }
            pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
                &self.0
            }
        }

        impl PartialEq for $ty {
            fn eq(&self, other: &Self) -> bool {
                self.0.ct_eq(&other.0).into()
            }
        }
        impl Eq for $ty {}
    };
}

key_codec!(PrivateKey, "PrivateKey", "private_key");
key_codec!(PublicKey, "PublicKey", "public_key");
key_codec!(PresharedKey, "PresharedKey", "preshared_key");

/// A Curve25519 private key. Zeroed on drop; `Debug` never shows it.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PrivateKey([u8; KEY_LEN]);

impl PrivateKey {
    /// A fresh random key, clamped as `wg genkey` does.
    pub fn generate() -> Self {
        let mut bytes = random_bytes();
        bytes[0] &= 248;
        bytes[31] &= 127;
        bytes[31] |= 64;
        PrivateKey(bytes)
    }
    pub fn public_key(&self) -> PublicKey {
        PublicKey(x25519::PublicKey::from(&self.to_x25519()).to_bytes())
    }
    pub(crate) fn to_x25519(&self) -> x25519::StaticSecret {
        x25519::StaticSecret::from(self.0)
    }
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(<redacted>)")
    }
}

/// A Curve25519 public key: the identity of a peer.
#[derive(Clone, Copy)]
pub struct PublicKey([u8; KEY_LEN]);

impl PublicKey {
    /// True when this key is one of the points of small order (or the
    /// all-zero key): a Diffie-Hellman with it yields a known, all-zero
    /// shared secret, so no handshake may be made with such a peer.
    pub fn is_low_order(&self) -> bool {
        let probe = x25519::StaticSecret::from([0x42u8; KEY_LEN]);
        let shared = probe.diffie_hellman(&x25519::PublicKey::from(self.0));
        !shared.was_contributory()
    }
    pub(crate) fn to_x25519(self) -> x25519::PublicKey {
        x25519::PublicKey::from(self.0)
    }
}

// Hash agrees with the constant-time `eq`: equal keys have equal bytes.
impl std::hash::Hash for PublicKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state)
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.to_base64())
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_base64())
    }
}

/// A symmetric preshared key mixed into the handshake. Zeroed on drop.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct PresharedKey([u8; KEY_LEN]);

impl PresharedKey {
    pub fn generate() -> Self {
        PresharedKey(random_bytes())
    }
    /// The all-zero key, which the UAPI uses to mean "no preshared key".
    pub fn is_zero(&self) -> bool {
        self.0.ct_eq(&[0u8; KEY_LEN]).into()
    }
}

impl fmt::Debug for PresharedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PresharedKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Test vector from `echo <priv> | wg pubkey` (wireguard-tools).
    const PRIV: &str = "yAnz5TF+lXXJte14tji3zlMNq+hd2rYUIgJBgB3fBmk=";
    const PUB: &str = "HIgo9xNzJMWLKASShiTqIybxZ0U3wGLiUeJ1PKf8ykw=";

    #[test]
    fn public_key_matches_wg_pubkey() {
        let k = PrivateKey::from_base64(PRIV).unwrap();
        assert_eq!(k.public_key().to_base64(), PUB);
    }

    #[test]
    fn base64_and_hex_round_trip() {
        let k = PrivateKey::generate();
        assert_eq!(PrivateKey::from_base64(&k.to_base64()).unwrap(), k);
        assert_eq!(PrivateKey::from_hex(&k.to_hex()).unwrap(), k);
        let p = k.public_key();
        assert_eq!(PublicKey::from_hex(&p.to_hex()).unwrap(), p);
    }

    #[test]
    fn generated_keys_are_clamped_and_distinct() {
        let a = PrivateKey::generate();
        let b = PrivateKey::generate();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[0] & 7, 0);
        assert_eq!(a.as_bytes()[31] & 0xc0, 0x40);
    }

    #[test]
    fn bad_keys_name_the_field() {
        let e = PublicKey::from_base64("not base64!").unwrap_err();
        assert_eq!(e, KeyError::Base64 { field: "PublicKey" });
        assert!(e.to_string().starts_with("PublicKey:"));
        let e = PrivateKey::from_base64("AAAA").unwrap_err();
        assert_eq!(
            e,
            KeyError::Length {
                field: "PrivateKey",
                len: 3
            }
        );
        assert!(matches!(
            PublicKey::from_hex("zz"),
            Err(KeyError::Hex { .. })
        ));
        assert!(matches!(
            PublicKey::from_hex(&"0".repeat(62)),
            Err(KeyError::Length { .. })
        ));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let k = PrivateKey::generate();
        let shown = format!("{k:?} {:?}", PresharedKey::generate());
        assert!(!shown.contains(&k.to_base64()));
        assert!(shown.contains("redacted"));
    }

    #[test]
    fn low_order_points_are_detected() {
        assert!(PublicKey::from_bytes([0u8; 32]).is_low_order());
        let mut one = [0u8; 32];
        one[0] = 1;
        assert!(PublicKey::from_bytes(one).is_low_order());
        // A point of order 8 (from the Curve25519 small-order list).
        let order8 = [
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f,
            0xc4, 0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16,
            0x5f, 0x49, 0xb8, 0x00,
        ];
        assert!(PublicKey::from_bytes(order8).is_low_order());
        assert!(!PrivateKey::generate().public_key().is_low_order());
    }
}
