//! Join keys: what a node presents the first time it registers.
//!
//! A key reads `mvpn-key-<id>-<secret>`: the prefix makes a leaked key easy
//! to recognise (and to scan for), `<id>` is 16 hex digits (64 random bits)
//! by which the store finds the key, `<secret>` is 64 hex digits (256 random
//! bits from the OS generator through `ring::rand`). The key text is shown
//! once, at creation; the store keeps only SHA-256 of the secret.
//!
//! Why a plain hash and no slow KDF (bcrypt, argon2): a slow KDF protects
//! low-entropy passwords from an attacker who has stolen the hashes and
//! guesses offline. A uniformly random 256-bit secret cannot be guessed,
//! hashed fast or slow, so SHA-256's preimage resistance is the whole
//! protection needed; a slow KDF would only make every registration (and
//! every attacker's bogus one) cost the server CPU time.
//!
//! The hash is compared in constant time (`subtle`), and only after the key
//! was found by its id, so timing tells an attacker nothing about the
//! secret. Everything here is sans-IO: time comes in as `now` (Unix
//! seconds) and randomness as a `ring::rand::SecureRandom`.

use std::fmt;
use std::time::Duration;

use ring::rand::SecureRandom;
use subtle::ConstantTimeEq;
use zeroize::{Zeroize, Zeroizing};

use crate::node::{NodeRecord, NodeRequest};
use crate::store::{RedeemError, Store, StoreError};

/// What every join key starts with.
pub const KEY_PREFIX: &str = "mvpn-key-";
/// Hex digits of a key's id.
pub const ID_HEX_LEN: usize = 16;
/// Bytes of a key's secret (256 bits).
pub const SECRET_LEN: usize = 32;
/// The longest `--expiry` accepted (10 years): a longer one is a mistake
/// rather than a policy.
pub const MAX_EXPIRY: Duration = Duration::from_secs(10 * 365 * 86_400);

/// A join key as stored: no secret, only its hash.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinKeyRecord {
    pub id: String,
    /// SHA-256 of the 32 secret bytes.
    pub hash: [u8; 32],
    pub created: u64,
    /// Unix seconds after which it no longer works; `None`: never expires.
    pub expires: Option<u64>,
    /// Usable any number of times; otherwise single-use (the default).
    pub reusable: bool,
    /// Nodes registered with it are ephemeral.
    pub ephemeral: bool,
    /// Tags given to the nodes registered with it (`tag:k3s`).
    pub tags: Vec<String>,
    /// The cluster the nodes registered with it belong to (see
    /// [`validate_cluster`]); `None`: the unlabelled cluster.
    pub cluster: Option<String>,
    /// When it was revoked.
    pub revoked: Option<u64>,
    /// Successful registrations with it.
    pub uses: u64,
    pub last_used: Option<u64>,
}

impl fmt::Debug for JoinKeyRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The hash is not a secret, but it has no business in logs either.
        f.debug_struct("JoinKeyRecord")
            .field("id", &self.id)
            .field("expires", &self.expires)
            .field("reusable", &self.reusable)
            .field("ephemeral", &self.ephemeral)
            .field("tags", &self.tags)
            .field("cluster", &self.cluster)
            .field("revoked", &self.revoked)
            .field("uses", &self.uses)
            .finish_non_exhaustive()
    }
}

/// Where a key stands at `now`, for listings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyState {
    Valid,
    Expired,
    Revoked,
    Used,
}

impl fmt::Display for KeyState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyState::Valid => "valid",
            KeyState::Expired => "expired",
            KeyState::Revoked => "revoked",
            KeyState::Used => "used",
        })
    }
}

impl JoinKeyRecord {
    /// The first reason the key would be refused at `now`, in the order
    /// [`check`] reports them.
    pub fn state(&self, now: u64) -> KeyState {
        if self.revoked.is_some() {
            KeyState::Revoked
        } else if !self.reusable && self.uses > 0 {
            KeyState::Used
        } else if self.expires.is_some_and(|e| now >= e) {
            KeyState::Expired
        } else {
            KeyState::Valid
        }
    }
}

/// Why a node's join key was refused. Each class has its own message so a
/// node's operator knows what to do; none of them carries the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinError {
    #[error("the join key is malformed: expected {KEY_PREFIX}<16 hex digits>-<64 hex digits> (was it copied whole?)")]
    Malformed,
    #[error("the join key is not known to this control server (another server's key, or a wrong secret)")]
    Unknown,
    #[error("the join key expired at {}: create a new one with `meshvpn control keys create`", format_time(*.0))]
    Expired(u64),
    #[error("the join key was revoked: create a new one with `meshvpn control keys create`")]
    Revoked,
    #[error(
        "the join key was already used and is single-use: create a new one, or one with --reusable"
    )]
    AlreadyUsed,
}

/// Options of `meshvpn control keys create`.
#[derive(Clone, Debug, Default)]
pub struct KeyOptions {
    pub reusable: bool,
    pub ephemeral: bool,
    pub expiry: Option<Duration>,
    pub tags: Vec<String>,
    /// `--cluster NAME`: copied to every node registered with the key.
    pub cluster: Option<String>,
}

/// Why a key could not be created.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("`{0}` is not a tag: tags read tag:NAME, NAME of letters, digits and dashes, starting with a letter")]
    BadTag(String),
    #[error("`{0}` is not a cluster name: use 1 to {MAX_CLUSTER_LEN} lowercase letters, digits and dashes, starting with a letter (e.g. k3s-east)")]
    BadCluster(String),
    #[error("expiry {0:?} is longer than the 10-year maximum")]
    ExpiryTooLong(Duration),
    #[error("the system random generator failed")]
    Random,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A key just created: the full text, shown once, and what is stored.
pub struct NewKey {
    /// `mvpn-key-<id>-<secret>`, wiped on drop.
    pub text: Zeroizing<String>,
    pub record: JoinKeyRecord,
}

impl fmt::Debug for NewKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NewKey")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// A key's text split into its id and secret; the secret is wiped on drop.
pub struct ParsedKey {
    pub id: String,
    secret: Zeroizing<[u8; SECRET_LEN]>,
}

impl fmt::Debug for ParsedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ParsedKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// `tag:NAME` with NAME of ASCII letters, digits and dashes, starting with a
/// letter (Tailscale's rule).
pub fn validate_tag(tag: &str) -> bool {
    let Some(name) = tag.strip_prefix("tag:") else {
        return false;
    };
    name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphabetic())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The longest cluster name: one DNS label.
pub const MAX_CLUSTER_LEN: usize = 63;

/// A cluster name is one lowercase DNS label starting with a letter
/// (`k3s-east`), so it reads the same in listings, errors and the map.
pub fn validate_cluster(name: &str) -> bool {
    name.len() <= MAX_CLUSTER_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// Makes a new key (nothing stored yet): checks the options, draws the id
/// and secret from `rng`.
pub fn generate(
    opts: &KeyOptions,
    now: u64,
    rng: &dyn SecureRandom,
) -> Result<NewKey, CreateError> {
    if let Some(bad) = opts.tags.iter().find(|t| !validate_tag(t)) {
        return Err(CreateError::BadTag(bad.clone()));
    }
    if let Some(bad) = opts.cluster.as_ref().filter(|c| !validate_cluster(c)) {
        return Err(CreateError::BadCluster(bad.clone()));
    }
    if let Some(e) = opts.expiry.filter(|e| *e > MAX_EXPIRY) {
        return Err(CreateError::ExpiryTooLong(e));
    }
    let mut id = [0u8; ID_HEX_LEN / 2];
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    rng.fill(&mut id).map_err(|_| CreateError::Random)?;
    rng.fill(&mut secret[..]).map_err(|_| CreateError::Random)?;
    let id = hex(&id);
    let mut secret_hex = hex(&secret[..]);
    let text = Zeroizing::new(format!("{KEY_PREFIX}{id}-{secret_hex}"));
    secret_hex.zeroize();
    let mut tags = opts.tags.clone();
    tags.sort();
    tags.dedup();
    let record = JoinKeyRecord {
        id,
        hash: hash_secret(&secret),
        created: now,
        expires: opts.expiry.map(|e| now.saturating_add(e.as_secs())),
        reusable: opts.reusable,
        ephemeral: opts.ephemeral,
        tags,
        cluster: opts.cluster.clone(),
        revoked: None,
        uses: 0,
        last_used: None,
    };
    Ok(NewKey { text, record })
}

/// Generates a key and stores it; the caller shows `text` once.
pub fn create(
    store: &dyn Store,
    opts: &KeyOptions,
    now: u64,
    rng: &dyn SecureRandom,
) -> Result<NewKey, CreateError> {
    let key = generate(opts, now, rng)?;
    store.insert_key(&key.record)?;
    Ok(key)
}

/// Splits a key's text. Surrounding whitespace (a key file's newline) is
/// ignored; anything else off the format is [`JoinError::Malformed`].
pub fn parse(text: &str) -> Result<ParsedKey, JoinError> {
    let rest = text
        .trim()
        .strip_prefix(KEY_PREFIX)
        .ok_or(JoinError::Malformed)?;
    let (id, secret_hex) = rest.split_once('-').ok_or(JoinError::Malformed)?;
    if id.len() != ID_HEX_LEN || !id.bytes().all(is_lower_hex) {
        return Err(JoinError::Malformed);
    }
    if secret_hex.len() != SECRET_LEN * 2 || !secret_hex.bytes().all(is_lower_hex) {
        return Err(JoinError::Malformed);
    }
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    for (i, pair) in secret_hex.as_bytes().chunks(2).enumerate() {
        secret[i] = (hex_val(pair[0]) << 4) | hex_val(pair[1]);
    }
    Ok(ParsedKey {
        id: id.to_string(),
        secret,
    })
}

/// Whether `key` may register a node at `now`. The secret is checked first
/// (a wrong secret reads as [`JoinError::Unknown`], so the other answers are
/// only given to a holder of the key), then revoked, already used, expired.
pub fn check(record: &JoinKeyRecord, key: &ParsedKey, now: u64) -> Result<(), JoinError> {
    let hash = hash_secret(&key.secret);
    if !bool::from(hash[..].ct_eq(&record.hash[..])) {
        return Err(JoinError::Unknown);
    }
    match record.state(now) {
        KeyState::Valid => Ok(()),
        KeyState::Revoked => Err(JoinError::Revoked),
        KeyState::Used => Err(JoinError::AlreadyUsed),
        KeyState::Expired => Err(JoinError::Expired(record.expires.unwrap_or(now))),
    }
}

/// Registers a node with a join key: parses and checks the key and records
/// the node in one store transaction, so two racing requests with one
/// single-use key cannot both succeed.
pub fn redeem(
    store: &dyn Store,
    key_text: &str,
    node: &NodeRequest,
    now: u64,
) -> Result<NodeRecord, RedeemError> {
    let key = parse(key_text)?;
    store.redeem_and_register(&key.id, &mut |record| check(record, &key, now), node, now)
}

/// `90s`, `30m`, `24h`, `7d`: a positive whole number and one unit.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let bad = || format!("`{s}` is not a duration: use a number and one of s, m, h, d (e.g. 24h)");
    let unit = s.chars().last().ok_or_else(bad)?;
    let secs_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(bad()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
    if n == 0 {
        return Err(format!("`{s}`: a key that expires at once is no key"));
    }
    n.checked_mul(secs_per)
        .map(Duration::from_secs)
        .ok_or_else(bad)
}

/// `2026-12-05T19:30:00Z` from Unix seconds (UTC), for listings and errors.
pub fn format_time(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn hash_secret(secret: &[u8; SECRET_LEN]) -> [u8; 32] {
    let digest = ring::digest::digest(&ring::digest::SHA256, secret);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn is_lower_hex(b: u8) -> bool {
    b.is_ascii_digit() || (b'a'..=b'f').contains(&b)
}

fn hex_val(b: u8) -> u8 {
    if b.is_ascii_digit() {
        b - b'0'
    } else {
        b - b'a' + 10
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;

    const NOW: u64 = 1_800_000_000;

    fn key(opts: &KeyOptions) -> NewKey {
        generate(opts, NOW, &SystemRandom::new()).unwrap()
    }

    #[test]
    fn key_text_has_the_prefix_id_and_256_bit_secret_and_round_trips() {
        let k = key(&KeyOptions::default());
        let text: &str = &k.text;
        assert!(text.starts_with(KEY_PREFIX), "{}", k.record.id);
        assert_eq!(
            text.len(),
            KEY_PREFIX.len() + ID_HEX_LEN + 1 + 2 * SECRET_LEN
        );
        let parsed = parse(&format!("  {text}\n")).unwrap();
        assert_eq!(parsed.id, k.record.id);
        check(&k.record, &parsed, NOW).unwrap();
        // Two keys never share an id or secret.
        let k2 = key(&KeyOptions::default());
        assert_ne!(k2.record.id, k.record.id);
        assert_ne!(k2.record.hash, k.record.hash);
        // The record and its Debug never hold the secret.
        let secret = &text[text.len() - 2 * SECRET_LEN..];
        assert!(!format!("{:?} {:?}", k, parsed).contains(secret));
    }

    #[test]
    fn malformed_keys_are_refused_as_malformed() {
        let k = key(&KeyOptions::default());
        let text: &str = &k.text;
        let cut = &text[..text.len() - 1];
        let upper = text.to_uppercase();
        let other_prefix = text.replacen("mvpn-key-", "tskey-auth-", 1);
        let extra = format!("{text}0");
        let non_hex = format!("{}g", cut);
        for bad in [
            "",
            "mvpn-key-",
            cut,
            &upper,
            &other_prefix,
            &extra,
            &non_hex,
        ] {
            assert_eq!(parse(bad).err(), Some(JoinError::Malformed), "{bad:?}");
        }
    }

    #[test]
    fn a_wrong_secret_reads_as_unknown() {
        let k = key(&KeyOptions::default());
        let text: &str = &k.text;
        let mut wrong = text.to_string();
        let last = wrong.pop().unwrap();
        wrong.push(if last == '0' { '1' } else { '0' });
        assert_eq!(
            check(&k.record, &parse(&wrong).unwrap(), NOW),
            Err(JoinError::Unknown)
        );
    }

    #[test]
    fn expiry_is_checked_against_the_given_now() {
        let k = key(&KeyOptions {
            expiry: Some(Duration::from_secs(3600)),
            ..Default::default()
        });
        let p = parse(&k.text).unwrap();
        check(&k.record, &p, NOW + 3599).unwrap();
        assert_eq!(
            check(&k.record, &p, NOW + 3600),
            Err(JoinError::Expired(NOW + 3600))
        );
        let msg = JoinError::Expired(NOW + 3600).to_string();
        assert!(msg.contains("2027-01-15T09:00:00Z"), "{msg}");
    }

    #[test]
    fn revoked_and_used_take_precedence_over_expired() {
        let k = key(&KeyOptions {
            expiry: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        let p = parse(&k.text).unwrap();
        let mut used = k.record.clone();
        used.uses = 1;
        assert_eq!(check(&used, &p, NOW + 3600), Err(JoinError::AlreadyUsed));
        let mut revoked = used.clone();
        revoked.revoked = Some(NOW);
        assert_eq!(check(&revoked, &p, NOW + 3600), Err(JoinError::Revoked));
        let mut reusable = k.record.clone();
        reusable.reusable = true;
        reusable.uses = 5;
        check(&reusable, &p, NOW).unwrap();
    }

    #[test]
    fn options_are_validated() {
        let bad_tag = KeyOptions {
            tags: vec!["k3s".into()],
            ..Default::default()
        };
        assert!(matches!(
            generate(&bad_tag, NOW, &SystemRandom::new()),
            Err(CreateError::BadTag(_))
        ));
        assert!(validate_tag("tag:k3s-cluster-a"));
        assert!(!validate_tag("tag:-x") && !validate_tag("tag:") && !validate_tag("tag:a b"));
        let long = KeyOptions {
            expiry: Some(MAX_EXPIRY * 2),
            ..Default::default()
        };
        assert!(matches!(
            generate(&long, NOW, &SystemRandom::new()),
            Err(CreateError::ExpiryTooLong(_))
        ));
        for bad in [
            "",
            "K3s",
            "1east",
            "east-",
            "a b",
            "tag:east",
            &"a".repeat(64),
        ] {
            let opts = KeyOptions {
                cluster: Some(bad.to_string()),
                ..Default::default()
            };
            assert!(
                matches!(
                    generate(&opts, NOW, &SystemRandom::new()),
                    Err(CreateError::BadCluster(_))
                ),
                "{bad:?}"
            );
        }
        let east = KeyOptions {
            cluster: Some("k3s-east".into()),
            ..Default::default()
        };
        let k = generate(&east, NOW, &SystemRandom::new()).unwrap();
        assert_eq!(k.record.cluster.as_deref(), Some("k3s-east"));
    }

    #[test]
    fn durations_and_times() {
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        for bad in [
            "",
            "h",
            "24",
            "0h",
            "-1h",
            "1.5h",
            "24x",
            "99999999999999999999d",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
        assert_eq!(format_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(format_time(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(format_time(1_800_000_000), "2027-01-15T08:00:00Z");
    }
}
