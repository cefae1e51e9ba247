//! The list formats IP intelligence reads: one IP or CIDR a line with `#` and `;` comments
//! (whole-line or after the entry) and blank lines, which covers the Tor Project's bulk exit
//! list (`torbulkexitlist`: plain IPs), FireHOL's `.netset`/`.ipset`, Spamhaus DROP (`; SBL…`
//! after the CIDR) and most VPN/proxy feeds; and the Tor Project's `exit-addresses` format
//! (`ExitNode`, `Published`, `LastStatus` lines skipped, the address of each `ExitAddress` line
//! taken). CRLF line ends and a UTF-8 byte order mark are accepted.
//!
//! A list is taken whole or not at all: the first line that is none of the above refuses it,
//! naming the line's number (from 1) and its text (cut to [`MAX_QUOTED`] characters). Host
//! bits set (`10.0.0.1/8`) are refused too, as everywhere in the agent: a feed that means
//! `10.0.0.0/8` should say so. Bounds: [`MAX_LIST_BYTES`] of input, [`MAX_ENTRIES`] entries
//! (the blocklists' own limit per change).

use crate::net::Cidr;

/// The largest list accepted (a download is cut off there).
pub const MAX_LIST_BYTES: usize = 64 << 20;
/// The most entries a list may hold (as `blocklist add --file`).
pub const MAX_ENTRIES: usize = 4_194_304;
/// The most characters of a refused line quoted in the error.
pub const MAX_QUOTED: usize = 80;

/// Why a list was refused. Nothing of it was taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListParseError {
    /// A line is not an entry, a comment or blank.
    #[error("line {line}: {text:?}: {reason}")]
    Line {
        /// The line's number, from 1.
        line: usize,
        /// The line as found (cut to [`MAX_QUOTED`] characters).
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The list is larger than [`MAX_LIST_BYTES`].
    #[error("the list is larger than {} MiB", MAX_LIST_BYTES >> 20)]
    TooLarge,
    /// The list holds more than [`MAX_ENTRIES`] entries.
    #[error("the list holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
}

/// Parses a whole list (see the module docs for the formats).
pub fn parse_list(bytes: &[u8]) -> Result<Vec<Cidr>, ListParseError> {
    if bytes.len() > MAX_LIST_BYTES {
        return Err(ListParseError::TooLarge);
    }
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(bytes);
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = i + 1;
        let bad = |reason: &str| ListParseError::Line {
            line,
            text: quote(raw),
            reason: reason.to_owned(),
        };
        let text = std::str::from_utf8(raw).map_err(|_| bad("not UTF-8 text"))?;
        let text = match text.find(['#', ';']) {
            Some(at) => &text[..at],
            None => text,
        };
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        let mut words = text.split_ascii_whitespace();
        let first = words.next().expect("not empty");
        let entry = match first {
            // exit-addresses: the fields around each relay's addresses.
            "ExitNode" | "Published" | "LastStatus" => continue,
            "ExitAddress" => words
                .next()
                .ok_or_else(|| bad("ExitAddress without an address"))?,
            _ if words.next().is_some() => {
                return Err(bad(
                    "expected one IP address or CIDR a line (comments start with # or ;)",
                ));
            }
            _ => first,
        };
        let cidr: Cidr = entry.parse().map_err(|e: crate::net::CidrError| {
            // The parser's message quotes the entry; the line is quoted already.
            let msg = e.to_string();
            bad(msg.split_once(": ").map_or(msg.as_str(), |(_, r)| r))
        })?;
        if out.len() == MAX_ENTRIES {
            return Err(ListParseError::TooManyEntries);
        }
        out.push(cidr);
    }
    Ok(out)
}

/// `raw` as text for an error, cut to [`MAX_QUOTED`] characters.
fn quote(raw: &[u8]) -> String {
    let s = String::from_utf8_lossy(raw);
    let s = s.trim_end_matches('\r');
    match s.char_indices().nth(MAX_QUOTED) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidrs(list: &[Cidr]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn plain_lists_with_comments_and_blank_lines() {
        let text = "# Tor exit list\r\n\r\n1.2.3.4\r\n; a comment\n10.0.0.0/8 # trailing\n  \
                    192.0.2.0/24 ; SBL123\n2001:db8::/32\n2001:db8::1\n\n";
        let l = parse_list(text.as_bytes()).unwrap();
        assert_eq!(
            cidrs(&l),
            [
                "1.2.3.4/32",
                "10.0.0.0/8",
                "192.0.2.0/24",
                "2001:db8::/32",
                "2001:db8::1/128"
            ]
        );
        assert_eq!(parse_list(b"").unwrap(), []);
        assert_eq!(parse_list(b"\xef\xbb\xbf# only a comment\n").unwrap(), []);
    }

    #[test]
    fn the_tor_bulk_exit_list() {
        // https://check.torproject.org/torbulkexitlist: one address a line, nothing else.
        let l = parse_list(b"185.220.101.1\n185.220.101.2\n204.8.96.7\n").unwrap();
        assert_eq!(
            cidrs(&l),
            ["185.220.101.1/32", "185.220.101.2/32", "204.8.96.7/32"]
        );
    }

    #[test]
    fn the_tor_exit_addresses_format() {
        // https://check.torproject.org/exit-addresses
        let text = "ExitNode 0011BD2485AD45D984EC4159C88FC066E5E3300E\n\
                    Published 2024-05-01 10:12:33\n\
                    LastStatus 2024-05-01 12:00:00\n\
                    ExitAddress 162.247.74.201 2024-05-01 12:07:02\n\
                    ExitNode 0091174DE56EE3A7ECC0EE0C8A6B38B2B2D3A6B9\n\
                    Published 2024-05-01 09:00:00\n\
                    LastStatus 2024-05-01 11:00:00\n\
                    ExitAddress 185.220.101.33 2024-05-01 11:30:00\n\
                    ExitAddress 2a0b:f4c2::33 2024-05-01 11:30:00\n";
        let l = parse_list(text.as_bytes()).unwrap();
        assert_eq!(
            cidrs(&l),
            [
                "162.247.74.201/32",
                "185.220.101.33/32",
                "2a0b:f4c2::33/128"
            ]
        );
        let e = parse_list(b"ExitNode X\nExitAddress\n").unwrap_err();
        assert!(
            matches!(&e, ListParseError::Line { line: 2, text, .. } if text == "ExitAddress"),
            "{e}"
        );
    }

    #[test]
    fn a_bad_line_refuses_the_whole_list_naming_its_number_and_text() {
        for (text, line, quoted, reason) in [
            (
                "1.2.3.4\n1.2.3.999\n",
                2,
                "1.2.3.999",
                "expected ADDRESS/LEN",
            ),
            ("# x\n\n10.0.0.1/8\n", 3, "10.0.0.1/8", "host bits are set"),
            ("1.2.3.4/33\n", 1, "1.2.3.4/33", "prefix length"),
            ("1.2.3.4 5.6.7.8\n", 1, "1.2.3.4 5.6.7.8", "one IP address"),
            ("<html>\r\n", 1, "<html>", "expected ADDRESS/LEN"),
        ] {
            let e = parse_list(text.as_bytes()).unwrap_err();
            let ListParseError::Line {
                line: l,
                text: t,
                reason: r,
            } = &e
            else {
                panic!("{e}");
            };
            assert_eq!((*l, t.as_str()), (line, quoted), "{text:?}");
            assert!(r.contains(reason), "{text:?}: {r}");
            assert!(e.to_string().starts_with(&format!("line {line}: ")), "{e}");
        }
        let e = parse_list(b"1.2.3.4\n\xff\xfe\n").unwrap_err();
        assert!(
            matches!(&e, ListParseError::Line { line: 2, reason, .. } if reason == "not UTF-8 text")
        );
        let long = format!("{}\n", "x".repeat(500));
        let ListParseError::Line { text, .. } = parse_list(long.as_bytes()).unwrap_err() else {
            panic!()
        };
        assert_eq!(
            text.chars().count(),
            MAX_QUOTED + 1,
            "cut, with an ellipsis"
        );
    }

    #[test]
    fn bounds() {
        assert_eq!(
            parse_list(&vec![b'\n'; MAX_LIST_BYTES + 1]),
            Err(ListParseError::TooLarge)
        );
    }
}
