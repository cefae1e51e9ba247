//! The VLESS (version 0) request and response headers: a pure parser over bytes.
//!
//! Request, as v2ray's and Xray's `proxy/vless/encoding` write it:
//!
//! | field | bytes | values |
//! |---|---|---|
//! | version | 1 | `0` |
//! | UUID | 16 | the user's id |
//! | addons length `M` | 1 | |
//! | addons | `M` | protobuf `Addons { string Flow = 1; bytes Seed = 2; }` |
//! | command | 1 | `1` TCP, `2` UDP, `3` mux |
//! | port | 2 | big endian (absent for mux) |
//! | address type | 1 | `1` IPv4, `2` domain, `3` IPv6 (absent for mux) |
//! | address | 4 / 1 + `L` / 16 | a domain is its length `L` (1–255) then `L` bytes |
//!
//! then the payload. The response is version `0`, addons length `0`, then the payload.
//!
//! [`parse_request`] never panics: it returns the header and its length, `Ok(None)` while
//! the bytes so far are a prefix of a valid header (read more), or the first field that is
//! wrong. A header is at most [`MAX_REQUEST_LEN`] bytes.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::proxy::Target;

/// The VLESS version this endpoint speaks.
pub const VERSION: u8 = 0;
/// The longest request header: version, UUID, addons (≤ 255), command, port, address type,
/// a 255-byte domain with its length byte.
pub const MAX_REQUEST_LEN: usize = 1 + 16 + 1 + 255 + 1 + 2 + 1 + 1 + 255;
/// The response header this endpoint sends: version 0, no addons.
pub const RESPONSE: [u8; 2] = [VERSION, 0];

/// What the client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// A TCP stream to the target (`1`).
    Tcp,
    /// UDP packets to the target (`2`), length-prefixed in the stream.
    Udp,
    /// v2ray's mux.cool (`3`): many streams in one (no target in the header).
    Mux,
}

/// A parsed request header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The user's UUID.
    pub uuid: [u8; 16],
    /// The addons' `Flow` (empty when none: plain VLESS; `xtls-rprx-*` for XTLS).
    pub flow: String,
    /// The command.
    pub command: Command,
    /// Where to (`None` for [`Command::Mux`]).
    pub target: Option<Target>,
}

/// The first wrong field of a request header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The version byte is not [`VERSION`].
    #[error("vless header: version {0}, expected 0")]
    Version(u8),
    /// The addons are not a valid `Addons` protobuf message.
    #[error("vless header: malformed addons")]
    Addons,
    /// The command byte is not 1, 2 or 3.
    #[error("vless header: unknown command {0}")]
    Command(u8),
    /// The port is 0.
    #[error("vless header: port 0")]
    Port,
    /// The address type byte is not 1, 2 or 3.
    #[error("vless header: unknown address type {0}")]
    AddressType(u8),
    /// The domain is empty or holds a byte that is not a printable ASCII character.
    #[error("vless header: malformed domain name")]
    Domain,
    /// The connection ended before the header did.
    #[error("vless header: truncated")]
    Truncated,
}

/// A cursor over the header bytes: `None` when they run out (the header is incomplete).
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
}

/// Parses a request header at the start of `buf`: `Ok(Some((request, header length)))`,
/// `Ok(None)` if `buf` is a valid prefix of a header, or the first wrong field.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Request, usize)>, HeaderError> {
    let mut c = Cursor { buf, pos: 0 };
    // Each field is checked as soon as it is complete, so garbage is refused at its first
    // wrong byte rather than after a timeout.
    macro_rules! next {
        ($e:expr) => {
            match $e {
                Some(v) => v,
                None => return Ok(None),
            }
        };
    }
    let version = next!(c.u8());
    if version != VERSION {
        return Err(HeaderError::Version(version));
    }
    let uuid: [u8; 16] = next!(c.take(16))
        .try_into()
        .map_err(|_| HeaderError::Addons)?;
    let addons_len = next!(c.u8());
    let addons = next!(c.take(usize::from(addons_len)));
    let flow = parse_addons(addons)?;
    let command = match next!(c.u8()) {
        1 => Command::Tcp,
        2 => Command::Udp,
        3 => Command::Mux,
        other => return Err(HeaderError::Command(other)),
    };
    if command == Command::Mux {
        let request = Request {
            uuid,
            flow,
            command,
            target: None,
        };
        return Ok(Some((request, c.pos)));
    }
    let port_bytes = next!(c.take(2));
    let port = u16::from_be_bytes([port_bytes[0], port_bytes[1]]);
    if port == 0 {
        return Err(HeaderError::Port);
    }
    let target = match next!(c.u8()) {
        1 => {
            let a: [u8; 4] = next!(c.take(4))
                .try_into()
                .map_err(|_| HeaderError::Addons)?;
            Target::Addr(SocketAddr::new(Ipv4Addr::from(a).into(), port))
        }
        2 => {
            let len = next!(c.u8());
            if len == 0 {
                return Err(HeaderError::Domain);
            }
            // Checked byte by byte so that a bad byte is refused before the rest arrives.
            let have = &buf[c.pos..buf.len().min(c.pos + usize::from(len))];
            if !have.iter().all(u8::is_ascii_graphic) {
                return Err(HeaderError::Domain);
            }
            let name = next!(c.take(usize::from(len)));
            let name = std::str::from_utf8(name).map_err(|_| HeaderError::Domain)?;
            Target::Domain(name.to_owned(), port)
        }
        3 => {
            let a: [u8; 16] = next!(c.take(16))
                .try_into()
                .map_err(|_| HeaderError::Addons)?;
            Target::Addr(SocketAddr::new(Ipv6Addr::from(a).into(), port))
        }
        other => return Err(HeaderError::AddressType(other)),
    };
    let request = Request {
        uuid,
        flow,
        command,
        target: Some(target),
    };
    Ok(Some((request, c.pos)))
}

/// The `Flow` of an `Addons` message (field 1, a string); `Seed` (field 2) and unknown fields
/// are skipped by their wire type.
fn parse_addons(mut b: &[u8]) -> Result<String, HeaderError> {
    let mut flow = String::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 {
            return Err(HeaderError::Addons);
        }
        match wire {
            0 => {
                varint(&mut b)?;
            }
            1 | 5 => {
                let n = if wire == 1 { 8 } else { 4 };
                b = b.get(n..).ok_or(HeaderError::Addons)?;
            }
            2 => {
                let len = usize::try_from(varint(&mut b)?).map_err(|_| HeaderError::Addons)?;
                let value = b.get(..len).ok_or(HeaderError::Addons)?;
                b = &b[len..];
                if field == 1 {
                    flow = std::str::from_utf8(value)
                        .map_err(|_| HeaderError::Addons)?
                        .to_owned();
                }
            }
            _ => return Err(HeaderError::Addons),
        }
    }
    Ok(flow)
}

/// A protobuf varint (at most 10 bytes) from the front of `b`.
fn varint(b: &mut &[u8]) -> Result<u64, HeaderError> {
    let mut v = 0u64;
    for i in 0..10 {
        let (&byte, rest) = b.split_first().ok_or(HeaderError::Addons)?;
        *b = rest;
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(HeaderError::Addons)
}

#[cfg(test)]
mod tests {
    use super::*;

    const UUID: [u8; 16] = [
        0x6b, 0x1e, 0x8f, 0x3a, 0x2c, 0x44, 0x4d, 0x1b, 0x9a, 0x0e, 0x55, 0x66, 0x77, 0x88, 0x99,
        0xaa,
    ];

    /// A request header as v2ray writes it.
    fn encode(addons: &[u8], command: u8, port: u16, addr: &[u8]) -> Vec<u8> {
        let mut v = vec![0];
        v.extend_from_slice(&UUID);
        v.push(addons.len() as u8);
        v.extend_from_slice(addons);
        v.push(command);
        if command != 3 {
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(addr);
        }
        v
    }

    fn domain(name: &str) -> Vec<u8> {
        let mut v = vec![2, name.len() as u8];
        v.extend_from_slice(name.as_bytes());
        v
    }

    /// Every valid header kind, with what it parses to.
    fn valid() -> Vec<(Vec<u8>, Request)> {
        let req = |command, target| Request {
            uuid: UUID,
            flow: String::new(),
            command,
            target,
        };
        let long = "a".repeat(255);
        vec![
            (
                encode(&[], 1, 443, &[1, 10, 0, 0, 1]),
                req(
                    Command::Tcp,
                    Some(Target::Addr("10.0.0.1:443".parse().unwrap())),
                ),
            ),
            (
                encode(&[], 1, 80, &domain("example.com")),
                req(Command::Tcp, Some(Target::Domain("example.com".into(), 80))),
            ),
            (
                encode(&[], 2, 53, &{
                    let mut a = vec![3];
                    a.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
                    a
                }),
                req(
                    Command::Udp,
                    Some(Target::Addr("[2001:db8::1]:53".parse().unwrap())),
                ),
            ),
            (
                encode(&[], 1, 65535, &domain(&long)),
                req(Command::Tcp, Some(Target::Domain(long.clone(), 65535))),
            ),
            (encode(&[], 3, 0, &[]), req(Command::Mux, None)),
            (
                // Flow "xtls-rprx-direct" and a seed, as v2ray 4.34's XTLS client sends.
                encode(
                    &[
                        &[0x0a, 16][..],
                        b"xtls-rprx-direct",
                        &[0x12, 3, 1, 2, 3],
                        // An unknown varint field 3 and fixed32 field 4: skipped.
                        &[0x18, 0x96, 0x01, 0x25, 1, 2, 3, 4],
                    ]
                    .concat(),
                    1,
                    443,
                    &[1, 127, 0, 0, 1],
                ),
                Request {
                    flow: "xtls-rprx-direct".into(),
                    ..req(
                        Command::Tcp,
                        Some(Target::Addr("127.0.0.1:443".parse().unwrap())),
                    )
                },
            ),
        ]
    }

    #[test]
    fn valid_headers_parse_with_their_length_and_leave_the_payload() {
        for (bytes, want) in valid() {
            let mut with_payload = bytes.clone();
            with_payload.extend_from_slice(b"GET / HTTP/1.1\r\n");
            assert_eq!(
                parse_request(&with_payload),
                Ok(Some((want.clone(), bytes.len()))),
                "{bytes:?}"
            );
            assert!(bytes.len() <= MAX_REQUEST_LEN);
        }
    }

    #[test]
    fn every_truncation_of_a_valid_header_asks_for_more() {
        for (bytes, _) in valid() {
            for n in 0..bytes.len() {
                assert_eq!(parse_request(&bytes[..n]), Ok(None), "{n} of {bytes:?}");
            }
        }
    }

    #[test]
    fn malformed_fields_are_named() {
        let ok = encode(&[], 1, 443, &[1, 10, 0, 0, 1]);
        let mut v = ok.clone();
        v[0] = 1;
        assert_eq!(parse_request(&v), Err(HeaderError::Version(1)));
        // A garbage first byte is refused at once.
        assert_eq!(parse_request(b"\x16"), Err(HeaderError::Version(0x16)));
        assert_eq!(
            parse_request(&encode(&[], 4, 443, &[1, 10, 0, 0, 1])),
            Err(HeaderError::Command(4))
        );
        assert_eq!(
            parse_request(&encode(&[], 0, 443, &[1, 10, 0, 0, 1])),
            Err(HeaderError::Command(0))
        );
        assert_eq!(
            parse_request(&encode(&[], 1, 0, &[1, 10, 0, 0, 1])),
            Err(HeaderError::Port)
        );
        assert_eq!(
            parse_request(&encode(&[], 1, 443, &[4, 10, 0, 0, 1])),
            Err(HeaderError::AddressType(4))
        );
        assert_eq!(
            parse_request(&encode(&[], 1, 443, &[2, 0])),
            Err(HeaderError::Domain)
        );
        // A control byte or space in a domain, refused before the rest of it arrives.
        assert_eq!(
            parse_request(&encode(&[], 1, 443, &[2, 20, b'a', b' '])),
            Err(HeaderError::Domain)
        );
        assert_eq!(
            parse_request(&encode(&[], 1, 443, &[2, 3, b'a', 0xff, b'b'])),
            Err(HeaderError::Domain)
        );
        for addons in [
            &[0x0a][..],                  // a key with no length
            &[0x0a, 5, b'a'],             // a length past the end
            &[0x0a, 2, 0xff, 0xfe],       // a flow that is not UTF-8
            &[0x0b, 0],                   // wire type 3 (groups)
            &[0x02, 0],                   // field 0
            &[0x08, 0xff],                // a varint cut short
            &[0x0d, 1, 2],                // fixed32 cut short
            &[0x09, 1, 2, 3, 4, 5, 6, 7], // fixed64 cut short
            &[
                0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ], // 11-byte varint
            &[
                0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01,
            ], // huge length
        ] {
            assert_eq!(
                parse_request(&encode(addons, 1, 443, &[1, 10, 0, 0, 1])),
                Err(HeaderError::Addons),
                "{addons:?}"
            );
        }
    }

    #[test]
    fn garbage_never_panics_and_never_reads_past_the_longest_header() {
        // A deterministic xorshift stream: random bytes, and valid headers with one byte
        // flipped, cut at every length.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let check = |bytes: &[u8]| {
            if let Ok(Some((_, len))) = parse_request(bytes) {
                assert!(len <= bytes.len() && len <= MAX_REQUEST_LEN);
            }
            if bytes.len() >= MAX_REQUEST_LEN {
                // Never "read more" once the longest header is in: a valid header or an error.
                assert_ne!(parse_request(bytes), Ok(None), "{bytes:?}");
            }
        };
        for _ in 0..20_000 {
            let len = (rand() % 700) as usize;
            let mut bytes: Vec<u8> = (0..len).map(|_| rand() as u8).collect();
            check(&bytes);
            // Valid version: the parser gets further.
            if let Some(b) = bytes.first_mut() {
                *b = 0;
            }
            check(&bytes);
        }
        for (bytes, _) in valid() {
            for i in 0..bytes.len() {
                for flip in [0x01, 0x80, 0xff] {
                    let mut v = bytes.clone();
                    v[i] ^= flip;
                    for n in 0..=v.len() {
                        check(&v[..n]);
                    }
                }
            }
        }
        // The longest possible header: 255 bytes of addons (an unknown bytes field) and a
        // 255-byte domain.
        let mut addons = vec![0x1a, 0xfc, 0x01];
        addons.resize(255, b'x');
        let longest = encode(&addons, 1, 1, &domain(&"d".repeat(255)));
        assert_eq!(longest.len(), MAX_REQUEST_LEN);
        let (_, len) = parse_request(&longest).unwrap().unwrap();
        assert_eq!(len, MAX_REQUEST_LEN);
    }
}
