//! A webhook's URL and the addresses the agent may send to (server-side request forgery).
//!
//! - A URL must be `http://` or `https://`, have a host, no user name or password, and at most
//!   [`MAX_URL_LEN`] characters; anything else is an error naming `url`.
//! - The host is resolved when the webhook is added and before every new connection, and every
//!   address it resolves to is checked ([`forbidden`]): loopback, unspecified, link-local,
//!   private (RFC 1918, IPv6 ULA and the old site-local), shared address space (CGNAT,
//!   100.64.0.0/10), multicast, broadcast and reserved (240.0.0.0/4), documentation and
//!   benchmarking ranges, the IETF protocol block (192.0.0.0/24), and an IPv4 address of one of
//!   those embedded in IPv6 (IPv4-mapped `::ffff:a.b.c.d`, IPv4-compatible `::a.b.c.d`, NAT64
//!   `64:ff9b::/96`, 6to4 `2002::/16`). If any address is forbidden the delivery is refused
//!   (a name that resolves to one public and one private address is not "half allowed"),
//!   unless the webhook was added with `--allow-private` (or the agent runs with
//!   `--webhook-allow-private`).
//! - The connection goes to the vetted addresses themselves ([`Vetted::addrs`]), never through a
//!   second lookup, so a name that changes its answer between the check and the connect (DNS
//!   rebinding) still reaches only a checked address. Redirects are not followed (a 3xx is a
//!   failed attempt), so a receiver cannot bounce the agent to another host either.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    time::Duration,
};

use crate::service::domain::ValidationError;

/// The longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;
/// How long a host's resolution may take.
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A webhook URL, parsed and checked for shape (not yet for its addresses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WebhookUrl {
    /// As given.
    pub url: String,
    /// `https`.
    pub tls: bool,
    /// The host (a name or an IP literal, without brackets).
    pub host: String,
    /// The port (the scheme's default if none).
    pub port: u16,
    /// The `Host` header (`host[:port]` as written).
    pub authority: String,
    /// Path and query (`/` if none).
    pub path: String,
}

/// Parses `s` as a webhook URL; every error names `url`.
pub fn parse_url(s: &str) -> Result<WebhookUrl, ValidationError> {
    let bad = |reason: &str| ValidationError::Value {
        field: "url",
        reason: format!("{s:?}: {reason}"),
    };
    if s.len() > MAX_URL_LEN {
        return Err(bad("longer than 2048 characters"));
    }
    match s.split_once("://") {
        None if !s.is_empty() => return Err(bad("no scheme (expected http:// or https://)")),
        Some((scheme, _)) if !["http", "https"].contains(&scheme.to_ascii_lowercase().as_str()) => {
            return Err(bad("only http and https URLs are accepted"));
        }
        _ => {}
    }
    let uri: http::Uri = s
        .parse()
        .map_err(|_| bad("not a URL (expected http://host/path or https://…)"))?;
    let tls = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        Some(_) => return Err(bad("only http and https URLs are accepted")),
        None => return Err(bad("no scheme (expected http:// or https://)")),
    };
    let authority = uri.authority().ok_or_else(|| bad("no host"))?;
    if authority.as_str().contains('@') {
        return Err(bad(
            "a user name or password in the URL is not accepted (the signature authenticates the agent)",
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = authority.port_u16().unwrap_or(if tls { 443 } else { 80 });
    if port == 0 {
        return Err(bad("port 0"));
    }
    Ok(WebhookUrl {
        url: s.to_owned(),
        tls,
        host: host.to_owned(),
        port,
        authority: authority.as_str().to_owned(),
        path: uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
    })
}

/// Why an address may not be sent to without `--allow-private`, if it may not.
pub fn forbidden(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        (0, ..) => "unspecified (0.0.0.0/8)",
        (127, ..) => "loopback",
        (10, ..) | (172, 16..=31, _) | (192, 168, _) => "private (RFC 1918)",
        (169, 254, _) => "link-local",
        (100, 64..=127, _) => "shared address space (CGNAT, 100.64.0.0/10)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, ..) => "multicast",
        (240..=255, ..) => "reserved or broadcast (240.0.0.0/4)",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_unspecified() {
        return Some("unspecified (::)");
    }
    if ip.is_loopback() {
        return Some("loopback");
    }
    // IPv4 embedded in IPv6: judged as the IPv4 address it carries.
    let v4 = |hi: u16, lo: u16| Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4).map(|_| "an IPv4-mapped address of a forbidden IPv4 range");
    }
    if s[..6] == [0; 6] {
        return forbidden_v4(v4(s[6], s[7]))
            .map(|_| "an IPv4-compatible address of a forbidden IPv4 range")
            .or(Some("IPv4-compatible (deprecated, ::/96)"));
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return forbidden_v4(v4(s[6], s[7])).map(|_| "a NAT64 address of a forbidden IPv4 range");
    }
    if s[0] == 0x2002 {
        return forbidden_v4(v4(s[1], s[2])).map(|_| "a 6to4 address of a forbidden IPv4 range");
    }
    Some(match s[0] {
        x if x & 0xfe00 == 0xfc00 => "private (unique local, fc00::/7)",
        x if x & 0xffc0 == 0xfe80 => "link-local",
        x if x & 0xffc0 == 0xfec0 => "private (site-local, fec0::/10)",
        x if x & 0xff00 == 0xff00 => "multicast",
        0x2001 if s[1] == 0x0db8 => "documentation (2001:db8::/32)",
        _ => return None,
    })
}

/// Addresses of a webhook's host that passed the check, to connect to as they are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vetted {
    /// In the resolver's order.
    pub addrs: Vec<SocketAddr>,
}

/// Why a webhook's host may not be sent to.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Refused {
    /// The name did not resolve (or not within [`RESOLVE_TIMEOUT`]).
    #[error("cannot resolve {host}: {reason}")]
    Resolve {
        /// The host.
        host: String,
        /// The resolver's answer.
        reason: String,
    },
    /// An address is of a forbidden class.
    #[error(
        "{host} resolves to {ip}, a {class} address: refused (server-side request forgery) unless the webhook is added with --allow-private"
    )]
    Forbidden {
        /// The host.
        host: String,
        /// The address.
        ip: IpAddr,
        /// Its class.
        class: &'static str,
    },
}

/// Checks already-resolved `addrs` of `host`.
pub fn vet(host: &str, addrs: Vec<SocketAddr>, allow_private: bool) -> Result<Vetted, Refused> {
    if addrs.is_empty() {
        return Err(Refused::Resolve {
            host: host.to_owned(),
            reason: "no address".into(),
        });
    }
    if !allow_private {
        for a in &addrs {
            if let Some(class) = forbidden(a.ip()) {
                return Err(Refused::Forbidden {
                    host: host.to_owned(),
                    ip: a.ip(),
                    class,
                });
            }
        }
    }
    Ok(Vetted { addrs })
}

/// Resolves `url`'s host and checks every address ([`vet`]).
pub async fn resolve(url: &WebhookUrl, allow_private: bool) -> Result<Vetted, Refused> {
    let addrs: Vec<SocketAddr> = if let Ok(ip) = url.host.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, url.port)]
    } else {
        let fail = |reason: String| Refused::Resolve {
            host: url.host.clone(),
            reason,
        };
        tokio::time::timeout(
            RESOLVE_TIMEOUT,
            tokio::net::lookup_host((url.host.as_str(), url.port)),
        )
        .await
        .map_err(|_| fail(format!("no answer within {} s", RESOLVE_TIMEOUT.as_secs())))?
        .map_err(|e| fail(e.to_string()))?
        .collect()
    };
    vet(&url.host, addrs, allow_private)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_of_the_wrong_shape_name_url() {
        let ok = parse_url("https://hooks.example.com:8443/in?x=1").unwrap();
        assert_eq!(
            (ok.tls, ok.host.as_str(), ok.port, ok.path.as_str()),
            (true, "hooks.example.com", 8443, "/in?x=1")
        );
        let v6 = parse_url("http://[2001:db8::1]/").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("2001:db8::1", 80));
        for (bad, why) in [
            ("ftp://example.com/", "only http and https"),
            ("file:///etc/passwd", "only http and https"),
            ("example.com/hook", "no scheme"),
            ("http://user:pw@example.com/", "user name or password"),
            ("http://:80/", "no host"),
            ("http:///x", ""),
            ("", "not a URL"),
        ] {
            let e = parse_url(bad).unwrap_err().to_string();
            assert!(e.starts_with("url: ") && e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn every_forbidden_class_is_refused_and_public_addresses_pass() {
        for bad in [
            "127.0.0.1",
            "127.8.9.10",
            "0.0.0.0",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.254",
            "192.0.0.8",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.9",
            "198.18.0.1",
            "224.0.0.1",
            "239.255.255.250",
            "255.255.255.255",
            "240.0.0.1",
            "::",
            "::1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "2001:db8::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:c0a8:101::1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(forbidden(ip).is_some(), "{bad} should be refused");
            let e = vet("h", vec![SocketAddr::new(ip, 80)], false).unwrap_err();
            assert!(matches!(e, Refused::Forbidden { .. }), "{bad}");
            assert!(
                vet("h", vec![SocketAddr::new(ip, 80)], true).is_ok(),
                "{bad}"
            );
        }
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "172.15.255.255",
            "172.32.0.1",
            "100.63.255.255",
            "100.128.0.1",
            "192.169.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::1",
        ] {
            let ip: IpAddr = good.parse().unwrap();
            assert_eq!(forbidden(ip), None, "{good} should pass");
        }
        // One forbidden address among public ones refuses the host.
        let mixed = vec![
            SocketAddr::new("8.8.8.8".parse().unwrap(), 443),
            SocketAddr::new("10.0.0.1".parse().unwrap(), 443),
        ];
        assert!(vet("h", mixed, false).is_err());
    }

    #[tokio::test]
    async fn a_name_that_resolves_to_loopback_is_refused() {
        let url = parse_url("http://localhost:9/").unwrap();
        let e = resolve(&url, false).await.unwrap_err();
        assert!(
            matches!(
                e,
                Refused::Forbidden {
                    class: "loopback",
                    ..
                }
            ),
            "{e}"
        );
        assert!(resolve(&url, true).await.is_ok());
    }
}
