//! Validated network types, parsed once at the edge (CLI, API, policy files, list files).
//!
//! [`Cidr`] is an IPv4 or IPv6 network in canonical form: host bits are zero. Parsing rejects
//! `10.0.0.1/8` instead of silently masking it (the admin probably meant something else) and says
//! what the network would be. A bare address (`10.0.0.1`, `2001:db8::1`) is a host route
//! (`/32`, `/128`). Everything past the edge takes `Cidr`, never a string.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    str::FromStr,
};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};

/// Whether a listener on `addr` is reachable from this machine only: 127.0.0.0/8, `::1`, and
/// `::ffff:127.x.y.z`. The rule every plain (no TLS, or no token) listener follows: the API's
/// (`--api-listen`, `capybara api enable`) and the metrics' (`--metrics-listen`).
pub fn is_loopback(addr: std::net::SocketAddr) -> bool {
    addr.ip().to_canonical().is_loopback()
}

/// A network device's state as `SIOCGIFFLAGS` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkState {
    /// Administratively up (`IFF_UP`).
    pub up: bool,
    /// Operationally up (`IFF_RUNNING`: the operational state is `up` or `unknown`, i.e. not
    /// `down`, `lowerlayerdown`, `dormant` or `notpresent`).
    pub running: bool,
}

/// The state of device `name` in the calling thread's network namespace (an ioctl on a socket
/// of that namespace, so right under `--netns` where `/sys/class/net` shows the namespace the
/// sysfs was mounted in); `None` if there is no such device.
pub fn link_state(name: &str) -> std::io::Result<Option<LinkState>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Ok(None);
    }
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, b) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = b as libc::c_char;
    }
    // SAFETY: a plain socket(2) call.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: SIOCGIFFLAGS reads the name from and writes the flags into `req`, which lives
    // across the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) } < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENODEV) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = i32::from(unsafe { req.ifr_ifru.ifru_flags });
    Ok(Some(LinkState {
        up: flags & libc::IFF_UP != 0,
        running: flags & libc::IFF_RUNNING != 0,
    }))
}

/// Why a string is not a valid CIDR. Every variant carries the input as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    /// Not of the form `ADDRESS[/LEN]` with a valid IPv4 or IPv6 address.
    #[error("invalid CIDR {input:?}: expected ADDRESS/LEN, e.g. 10.0.0.0/8 or 2001:db8::/32")]
    Syntax {
        /// The input as given.
        input: String,
    },
    /// The prefix length is not a number within the address family's range.
    #[error("invalid CIDR {input:?}: prefix length must be 0..={max}")]
    PrefixLength {
        /// The input as given.
        input: String,
        /// The family's maximum prefix length (32 or 128).
        max: u8,
    },
    /// Bits beyond the prefix length are set.
    #[error("invalid CIDR {input:?}: host bits are set (did you mean {network}?)")]
    HostBitsSet {
        /// The input as given.
        input: String,
        /// The network the input lies in, as a hint.
        network: String,
    },
}

/// An IPv4 or IPv6 network with its host bits zero.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr(IpNet);

impl Cidr {
    /// The IPv4 network `addr/len`; errors if `len > 32` or host bits are set.
    pub fn v4(addr: Ipv4Addr, len: u8) -> Result<Cidr, CidrError> {
        Cidr::checked(IpAddr::V4(addr), len, &format!("{addr}/{len}"))
    }

    /// The IPv6 network `addr/len`; errors if `len > 128` or host bits are set.
    pub fn v6(addr: Ipv6Addr, len: u8) -> Result<Cidr, CidrError> {
        Cidr::checked(IpAddr::V6(addr), len, &format!("{addr}/{len}"))
    }

    /// The host route of `addr` (`/32` or `/128`).
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr(IpNet::from(addr))
    }

    fn checked(addr: IpAddr, len: u8, input: &str) -> Result<Cidr, CidrError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let net = IpNet::new(addr, len).map_err(|_| CidrError::PrefixLength {
            input: input.to_owned(),
            max,
        })?;
        if net.network() != addr {
            return Err(CidrError::HostBitsSet {
                input: input.to_owned(),
                network: net.trunc().to_string(),
            });
        }
        Ok(Cidr(net))
    }

    /// The network address.
    pub fn addr(&self) -> IpAddr {
        self.0.network()
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.0.prefix_len()
    }

    /// True for an IPv4 network.
    pub fn is_ipv4(&self) -> bool {
        matches!(self.0, IpNet::V4(_))
    }

    /// True for a host route (`/32` or `/128`).
    pub fn is_host(&self) -> bool {
        self.0.prefix_len() == self.0.max_prefix_len()
    }

    /// The IPv4 network, if this is one.
    pub fn as_v4(&self) -> Option<Ipv4Net> {
        match self.0 {
            IpNet::V4(n) => Some(n),
            IpNet::V6(_) => None,
        }
    }

    /// The IPv6 network, if this is one.
    pub fn as_v6(&self) -> Option<Ipv6Net> {
        match self.0 {
            IpNet::V6(n) => Some(n),
            IpNet::V4(_) => None,
        }
    }

    /// The underlying `ipnet` value.
    pub fn net(&self) -> IpNet {
        self.0
    }

    /// True if `addr` lies in this network.
    pub fn contains(&self, addr: IpAddr) -> bool {
        self.0.contains(&addr)
    }
}

impl FromStr for Cidr {
    type Err = CidrError;

    fn from_str(input: &str) -> Result<Cidr, CidrError> {
        let syntax = || CidrError::Syntax {
            input: input.to_owned(),
        };
        let s = input.trim();
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| syntax())?;
        let max: u8 = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len {
            None => max,
            Some(l) if !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()) => match l.parse() {
                Ok(l) if l <= max => l,
                _ => {
                    return Err(CidrError::PrefixLength {
                        input: input.to_owned(),
                        max,
                    });
                }
            },
            Some(_) => {
                return Err(CidrError::PrefixLength {
                    input: input.to_owned(),
                    max,
                });
            }
        };
        Cidr::checked(addr, len, input)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl From<Ipv4Net> for Cidr {
    fn from(n: Ipv4Net) -> Cidr {
        Cidr(IpNet::V4(n.trunc()))
    }
}

impl From<Ipv6Net> for Cidr {
    fn from(n: Ipv6Net) -> Cidr {
        Cidr(IpNet::V6(n.trunc()))
    }
}

impl serde::Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_loopback_device_is_up_and_a_missing_one_is_none() {
        let lo = super::link_state("lo").unwrap().unwrap();
        assert!(lo.up && lo.running, "{lo:?}");
        assert_eq!(super::link_state("capy-no-such0").unwrap(), None);
    }

    use super::*;

    fn err(s: &str) -> CidrError {
        s.parse::<Cidr>().unwrap_err()
    }

    #[test]
    fn parses_v4_v6_and_bare_hosts() {
        assert_eq!(
            "10.0.0.0/8".parse::<Cidr>().unwrap().to_string(),
            "10.0.0.0/8"
        );
        assert_eq!(
            "10.1.2.3".parse::<Cidr>().unwrap().to_string(),
            "10.1.2.3/32"
        );
        assert_eq!(
            "2001:db8::/32".parse::<Cidr>().unwrap().to_string(),
            "2001:db8::/32"
        );
        assert_eq!("::1".parse::<Cidr>().unwrap().prefix_len(), 128);
        assert_eq!("0.0.0.0/0".parse::<Cidr>().unwrap().prefix_len(), 0);
        assert!("10.1.2.3/32".parse::<Cidr>().unwrap().is_host());
        assert!(!"10.1.2.0/24".parse::<Cidr>().unwrap().is_host());
    }

    #[test]
    fn rejects_host_bits_with_a_hint() {
        let e = err("10.0.0.1/8");
        assert_eq!(
            e,
            CidrError::HostBitsSet {
                input: "10.0.0.1/8".into(),
                network: "10.0.0.0/8".into()
            }
        );
        assert!(e.to_string().contains("did you mean 10.0.0.0/8"), "{e}");
        assert!(matches!(
            err("2001:db8::1/32"),
            CidrError::HostBitsSet { .. }
        ));
    }

    #[test]
    fn names_the_input_in_every_error() {
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.0/-1",
            "x/8",
            "10.0.0.0/8/8",
            "10.0.0.0/ 8",
        ] {
            let e = err(bad);
            assert!(e.to_string().contains(&format!("{bad:?}")), "{bad}: {e}");
        }
        assert!(matches!(
            err("10.0.0.0/33"),
            CidrError::PrefixLength { max: 32, .. }
        ));
        assert!(matches!(
            err("::/129"),
            CidrError::PrefixLength { max: 128, .. }
        ));
        assert!(matches!(err("banana"), CidrError::Syntax { .. }));
    }

    #[test]
    fn constructors_check_too() {
        assert!(Cidr::v4(Ipv4Addr::new(10, 0, 0, 1), 24).is_err());
        assert!(Cidr::v4(Ipv4Addr::new(10, 0, 0, 0), 33).is_err());
        assert!(Cidr::v6(Ipv6Addr::LOCALHOST, 128).is_ok());
    }

    #[test]
    fn serde_round_trips_as_a_string() {
        let c: Cidr = "192.168.0.0/16".parse().unwrap();
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(j, "\"192.168.0.0/16\"");
        assert_eq!(serde_json::from_str::<Cidr>(&j).unwrap(), c);
        assert!(serde_json::from_str::<Cidr>("\"192.168.0.1/16\"").is_err());
    }
}
