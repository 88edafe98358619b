//! The remotedialer message codec: one websocket binary message is one tunnel
//! message.
//!
//! ```text
//! varint id        per-sender counter; receivers ignore it
//! varint connID    chosen by the dialing side
//! varint type      1..=8, see MessageType
//! varint deadline  only for Data and Connect: written as 15000, read and ignored
//! payload ...      up to the end of the websocket message
//! ```
//!
//! Decoding borrows from the input and never allocates; every length that a
//! reader keeps is capped the way the Go library caps it (Connect 266 bytes,
//! Error / AddClient / RemoveClient 100 bytes).

use super::varint::{put_varint, read_varint, VarintError};

/// The deadline field Go writes into Data and Connect (15 s in ms); ignored on read.
pub const LEGACY_DEADLINE_MS: i64 = 15_000;
/// Go reads at most this many bytes of a Connect payload (`proto/address`).
pub const MAX_CONNECT_PAYLOAD: usize = 266;
/// Go reads at most this many bytes of an Error payload.
pub const MAX_ERROR_PAYLOAD: usize = 100;
/// Go reads at most this many bytes of an AddClient / RemoveClient payload.
pub const MAX_CLIENT_PAYLOAD: usize = 100;
/// Longest header: four ten-byte varints.
pub const MAX_HEADER_LEN: usize = 40;

/// Message types on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i64)]
pub enum MessageType {
    Data = 1,
    Connect = 2,
    Error = 3,
    AddClient = 4,
    RemoveClient = 5,
    Pause = 6,
    Resume = 7,
    SyncConnections = 8,
}

impl MessageType {
    fn from_wire(v: i64) -> Option<Self> {
        Some(match v {
            1 => Self::Data,
            2 => Self::Connect,
            3 => Self::Error,
            4 => Self::AddClient,
            5 => Self::RemoveClient,
            6 => Self::Pause,
            7 => Self::Resume,
            8 => Self::SyncConnections,
            _ => return None,
        })
    }

    fn has_deadline(self) -> bool {
        matches!(self, Self::Data | Self::Connect)
    }
}

/// Why a message could not be decoded. Any of these ends the session, as it
/// does in the Go library.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("bad {field} field: {source}")]
    Varint {
        field: &'static str,
        source: VarintError,
    },
    #[error("SyncConnections payload of {0} bytes is not a multiple of 8")]
    SyncLength(usize),
}

/// A decoded message borrowing its payload from the input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    pub id: i64,
    pub conn_id: i64,
    pub body: Body<'a>,
}

/// The payload of a message, by type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body<'a> {
    Data(&'a [u8]),
    /// `proto/address`, at most [`MAX_CONNECT_PAYLOAD`] bytes kept (the rest
    /// is reported through `truncated`, the Go reader silently drops it).
    Connect {
        target: &'a [u8],
        truncated: bool,
    },
    /// Error text, at most [`MAX_ERROR_PAYLOAD`] bytes; `EOF` is a clean close.
    Error(&'a [u8]),
    AddClient(&'a [u8]),
    RemoveClient(&'a [u8]),
    Pause,
    Resume,
    SyncConnections(ConnIdList<'a>),
    /// A type this library does not know; the Go library ignores these too.
    Unknown(i64),
}

/// The little-endian u64 connection ids of a SyncConnections payload, read lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnIdList<'a>(&'a [u8]);

impl<'a> ConnIdList<'a> {
    pub fn len(&self) -> usize {
        self.0.len() / 8
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = i64> + 'a {
        self.0.chunks_exact(8).map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b) as i64
        })
    }
}

fn field(input: &[u8], at: &mut usize, name: &'static str) -> Result<i64, DecodeError> {
    let rest = input.get(*at..).unwrap_or(&[]);
    let (v, n) = read_varint(rest).map_err(|source| DecodeError::Varint {
        field: name,
        source,
    })?;
    *at += n;
    Ok(v)
}

/// Decodes one websocket binary message.
pub fn decode(input: &[u8]) -> Result<Message<'_>, DecodeError> {
    let mut at = 0;
    let id = field(input, &mut at, "id")?;
    let conn_id = field(input, &mut at, "connID")?;
    let raw_type = field(input, &mut at, "type")?;
    let kind = MessageType::from_wire(raw_type);
    if kind.is_some_and(MessageType::has_deadline) {
        field(input, &mut at, "deadline")?;
    }
    let payload = input.get(at..).unwrap_or(&[]);
    let capped = |max: usize| &payload[..payload.len().min(max)];
    let body = match kind {
        Some(MessageType::Data) => Body::Data(payload),
        Some(MessageType::Connect) => Body::Connect {
            target: capped(MAX_CONNECT_PAYLOAD),
            truncated: payload.len() > MAX_CONNECT_PAYLOAD,
        },
        Some(MessageType::Error) => Body::Error(capped(MAX_ERROR_PAYLOAD)),
        Some(MessageType::AddClient) => Body::AddClient(capped(MAX_CLIENT_PAYLOAD)),
        Some(MessageType::RemoveClient) => Body::RemoveClient(capped(MAX_CLIENT_PAYLOAD)),
        Some(MessageType::Pause) => Body::Pause,
        Some(MessageType::Resume) => Body::Resume,
        Some(MessageType::SyncConnections) => {
            if payload.len() % 8 != 0 {
                return Err(DecodeError::SyncLength(payload.len()));
            }
            Body::SyncConnections(ConnIdList(payload))
        }
        None => Body::Unknown(raw_type),
    };
    Ok(Message { id, conn_id, body })
}

/// Splits a Connect payload into `(proto, address)` at the first `/`.
pub fn parse_connect_target(target: &[u8]) -> Option<(&str, &str)> {
    let s = std::str::from_utf8(target).ok()?;
    let (proto, address) = s.split_once('/')?;
    if proto.is_empty() || address.is_empty() {
        return None;
    }
    Some((proto, address))
}

/// Writes the header of a message of type `kind` into `out`.
pub fn encode_header(out: &mut Vec<u8>, id: i64, conn_id: i64, kind: MessageType) {
    put_varint(out, id);
    put_varint(out, conn_id);
    put_varint(out, kind as i64);
    if kind.has_deadline() {
        put_varint(out, LEGACY_DEADLINE_MS);
    }
}

/// Encodes a whole message: header, then `payload`.
pub fn encode(id: i64, conn_id: i64, kind: MessageType, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(MAX_HEADER_LEN + payload.len());
    encode_header(&mut out, id, conn_id, kind);
    out.extend_from_slice(payload);
    out
}

/// Encodes a SyncConnections message listing `ids`.
pub fn encode_sync(id: i64, ids: impl IntoIterator<Item = i64>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_header(&mut out, id, 0, MessageType::SyncConnections);
    for conn in ids {
        out.extend_from_slice(&(conn as u64).to_le_bytes());
    }
    out
}

/// Cuts error text to what a Go reader keeps, on a character boundary.
pub fn truncate_error_text(text: &str) -> &str {
    if text.len() <= MAX_ERROR_PAYLOAD {
        return text;
    }
    let mut end = MAX_ERROR_PAYLOAD;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // The vectors of engine/docs/remotedialer.md, produced by the Go code with id = 1.
    #[test]
    fn protocol_page_vectors() {
        let mut connect = hex("02 04 04 b0ea01");
        connect.extend_from_slice(b"tcp/127.0.0.1:10250");
        assert_eq!(
            encode(1, 2, MessageType::Connect, b"tcp/127.0.0.1:10250"),
            connect
        );
        assert_eq!(
            encode(1, 2, MessageType::Data, b"hi"),
            hex("02 04 02 b0ea01 68 69")
        );
        assert_eq!(
            encode(1, 2, MessageType::Error, b"EOF"),
            hex("02 04 06 45 4f 46")
        );
        assert_eq!(encode(1, 2, MessageType::Pause, b""), hex("02 04 0c"));
        assert_eq!(encode(1, 2, MessageType::Resume, b""), hex("02 04 0e"));
        assert_eq!(
            encode_sync(1, [2, 3]),
            hex("02 00 10 0200000000000000 0300000000000000")
        );
        let mut add = hex("02 00 08");
        add.extend_from_slice(b"node1/12345");
        assert_eq!(encode(1, 0, MessageType::AddClient, b"node1/12345"), add);

        // And they decode back to what they say.
        let m = decode(&connect).unwrap();
        assert_eq!((m.id, m.conn_id), (1, 2));
        assert_eq!(
            m.body,
            Body::Connect {
                target: b"tcp/127.0.0.1:10250",
                truncated: false
            }
        );
        assert_eq!(
            parse_connect_target(b"tcp/127.0.0.1:10250"),
            Some(("tcp", "127.0.0.1:10250"))
        );
        assert_eq!(
            decode(&hex("02 04 02 b0ea01 68 69")).unwrap().body,
            Body::Data(b"hi")
        );
        assert_eq!(
            decode(&hex("02 04 06 45 4f 46")).unwrap().body,
            Body::Error(b"EOF")
        );
        assert_eq!(decode(&hex("02 04 0c")).unwrap().body, Body::Pause);
        assert_eq!(decode(&hex("02 04 0e")).unwrap().body, Body::Resume);
        let sync = hex("02 00 10 0200000000000000 0300000000000000");
        match decode(&sync).unwrap().body {
            Body::SyncConnections(ids) => assert_eq!(ids.iter().collect::<Vec<_>>(), vec![2, 3]),
            other => panic!("{other:?}"),
        }
        assert_eq!(decode(&add).unwrap().body, Body::AddClient(b"node1/12345"));
    }

    #[test]
    fn round_trip_property() {
        let kinds = [
            MessageType::Data,
            MessageType::Connect,
            MessageType::Error,
            MessageType::AddClient,
            MessageType::RemoveClient,
            MessageType::Pause,
            MessageType::Resume,
        ];
        let mut s: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s
        };
        for _ in 0..5_000 {
            let id = next() as i64;
            let conn = (next() >> (next() % 64)) as i64;
            let kind = kinds[(next() % kinds.len() as u64) as usize];
            let len = (next() % 300) as usize;
            let payload: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            let wire = encode(
                id,
                conn,
                kind,
                if matches!(kind, MessageType::Pause | MessageType::Resume) {
                    &[]
                } else {
                    &payload
                },
            );
            let m = decode(&wire).unwrap();
            assert_eq!((m.id, m.conn_id), (id, conn));
            match (kind, m.body) {
                (MessageType::Data, Body::Data(p)) => assert_eq!(p, &payload[..]),
                (MessageType::Connect, Body::Connect { target, truncated }) => {
                    assert_eq!(target, &payload[..len.min(MAX_CONNECT_PAYLOAD)]);
                    assert_eq!(truncated, len > MAX_CONNECT_PAYLOAD);
                }
                (MessageType::Error, Body::Error(p)) => assert_eq!(p, &payload[..len.min(100)]),
                (MessageType::AddClient, Body::AddClient(p))
                | (MessageType::RemoveClient, Body::RemoveClient(p)) => {
                    assert_eq!(p, &payload[..len.min(100)])
                }
                (MessageType::Pause, Body::Pause) | (MessageType::Resume, Body::Resume) => {}
                (k, b) => panic!("{k:?} decoded as {b:?}"),
            }
            // Every cut inside the header is an error, never a panic or a wrong message.
            let header_len = wire.len()
                - if matches!(kind, MessageType::Pause | MessageType::Resume) {
                    0
                } else {
                    len
                };
            for cut in 0..header_len {
                assert!(decode(&wire[..cut]).is_err(), "cut {cut} of {kind:?}");
            }
        }
    }

    #[test]
    fn truncated_and_overflowing_varints() {
        assert!(matches!(
            decode(&[]),
            Err(DecodeError::Varint {
                field: "id",
                source: VarintError::Truncated
            })
        ));
        assert!(matches!(
            decode(&[0x02, 0x80]),
            Err(DecodeError::Varint {
                field: "connID",
                ..
            })
        ));
        assert!(matches!(
            decode(&[0x02, 0x04, 0x02, 0xb0]),
            Err(DecodeError::Varint {
                field: "deadline",
                ..
            })
        ));
        let mut overflow = vec![0x02];
        overflow.extend_from_slice(&[0xff; 10]);
        assert!(matches!(
            decode(&overflow),
            Err(DecodeError::Varint {
                source: VarintError::Overflow,
                ..
            })
        ));
    }

    #[test]
    fn oversized_payloads_are_capped_not_kept() {
        let big = vec![b'a'; 100_000];
        let wire = encode(1, 2, MessageType::Connect, &big);
        assert_eq!(
            decode(&wire).unwrap().body,
            Body::Connect {
                target: &big[..266],
                truncated: true
            }
        );
        let wire = encode(1, 2, MessageType::Error, &big);
        assert_eq!(decode(&wire).unwrap().body, Body::Error(&big[..100]));
        let mut bad_sync = encode_sync(1, [2]);
        bad_sync.push(0);
        assert_eq!(decode(&bad_sync), Err(DecodeError::SyncLength(9)));
        // Unknown types are reported, not fatal.
        assert_eq!(decode(&[0x02, 0x04, 0x7e]).unwrap().body, Body::Unknown(63));
    }

    #[test]
    fn connect_target_parsing() {
        assert_eq!(
            parse_connect_target(b"tcp/[::1]:10250"),
            Some(("tcp", "[::1]:10250"))
        );
        assert_eq!(
            parse_connect_target(b"unix//run/x.sock"),
            Some(("unix", "/run/x.sock"))
        );
        assert_eq!(parse_connect_target(b"tcp"), None);
        assert_eq!(parse_connect_target(b"/x"), None);
        assert_eq!(parse_connect_target(&[0xff, b'/', b'x']), None);
    }

    #[test]
    fn error_text_truncation_respects_utf8() {
        let s = "é".repeat(80);
        let t = truncate_error_text(&s);
        assert!(t.len() <= 100 && t.len() >= 99);
        assert!(s.starts_with(t));
    }
}
