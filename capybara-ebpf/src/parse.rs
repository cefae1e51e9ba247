//! Packet parsing: the one bounds-checked read helper and the Ethernet / IPv4 / IPv6 / UDP steps.
//!
//! Every byte a program reads from a packet goes through [`Packet::read`], which checks the
//! read against the packet end *before* forming the reference, in the form the verifier
//! understands (`start + off + size > end` → error). Offsets are additionally capped at
//! [`MAX_HEADER_OFFSET`], so even offsets computed from packet contents (IHL, IPv6 extension
//! header lengths) have a known upper bound. A failed read is [`Malformed`]; nothing is ever
//! read out of bounds and nothing panics.
//!
//! **Too deep is not malformed.** The stack walks any number of IPv6 extension headers of any
//! length; these steps follow at most [`MAX_IPV6_EXT_HEADERS`], none starting past
//! [`MAX_HEADER_OFFSET`]. A longer chain is a possibly valid packet that the stack may deliver
//! to a socket, but whose upper-layer header (hence its port) the program cannot see: [`ipv6`]
//! returns it with [`Upper::deep`] set, and an upper-layer header it finds starting past
//! [`MAX_HEADER_OFFSET`] cannot be read either. Each caller decides what that means (the XDP
//! guard and the flow step: `xdp_guard`, `flows`). Only IPv6 gets there: IPv4 headers end by
//! byte 18 + 60. A truncated or inconsistent packet, by contrast, is [`Malformed`]: the stack
//! drops it too (no socket receives a datagram whose headers are cut short). Measured before
//! the distinction: UDP from a blocked source behind 5 extension headers, or behind one
//! 1 024-byte hop-by-hop header, passed the XDP guard as malformed. (A flag on [`Upper`], not a
//! second kind of [`Malformed`]: a two-valued error pushed `tc_ingress` past the 512-byte BPF
//! stack, measured.)
//!
//! Header structs are `#[repr(C)]` byte arrays (alignment 1): multi-byte fields are read with
//! `from_be_bytes`, so there are no unaligned loads and no endianness surprises.

use core::mem::size_of;

/// A truncated or inconsistent packet (the only error of the parsing steps).
#[derive(Clone, Copy, Debug)]
pub struct Malformed;

/// Headers starting deeper than this many bytes into the packet are not read (the read is
/// [`Malformed`]; [`ipv6`] reports such a chain as [`Upper::deep`]). Bounds every computed
/// offset for the verifier.
pub const MAX_HEADER_OFFSET: usize = 1024;

/// EtherType IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// EtherType 802.1Q VLAN tag.
pub const ETH_P_8021Q: u16 = 0x8100;
/// EtherType 802.1ad (QinQ outer) VLAN tag.
pub const ETH_P_8021AD: u16 = 0x88a8;

/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IPv6 extension headers the guard skips.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// How many IPv6 extension headers are skipped at most (bounded loop); a longer chain is
/// [`Upper::deep`].
pub const MAX_IPV6_EXT_HEADERS: usize = 4;

/// The readable bytes of one packet, `[start, end)` as the program's context gives them.
pub struct Packet {
    start: usize,
    end: usize,
}

impl Packet {
    /// The packet between the context's `data` and `data_end`.
    #[inline(always)]
    pub fn new(start: usize, end: usize) -> Self {
        Packet { start, end }
    }

    /// Length of the readable bytes.
    #[inline(always)]
    pub fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }

    /// Reads a `T` (a header made of byte arrays) at `off`, or [`Malformed`] if any of its bytes
    /// lies past the end of the packet or `off` exceeds [`MAX_HEADER_OFFSET`].
    #[inline(always)]
    pub fn read<T: Copy>(&self, off: usize) -> Result<T, Malformed> {
        if off > MAX_HEADER_OFFSET {
            return Err(Malformed);
        }
        let at = self.start + off;
        if at + size_of::<T>() > self.end {
            return Err(Malformed);
        }
        // SAFETY: `[at, at + size_of::<T>())` lies inside `[start, end)`, the packet memory the
        // kernel gave this program (checked just above, in the form the verifier tracks). `T`
        // is a plain byte-array header (alignment 1, every bit pattern valid); the read is
        // unaligned-safe.
        Ok(unsafe { (at as *const T).read_unaligned() })
    }
}

/// Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: [u8; 2],
}

/// 802.1Q / 802.1ad tag (after the outer EtherType).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VlanHdr {
    pub tci: [u8; 2],
    pub ethertype: [u8; 2],
}

/// IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub total_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub protocol: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// IPv6 fixed header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    pub version_class_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next_header: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// The first 8 bytes of an IPv6 extension header (every one is at least 8 bytes long). For the
/// fragment header, `rest[0..2]` is the fragment offset field.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6ExtHdr {
    pub next_header: u8,
    pub len: u8,
    pub rest: [u8; 6],
}

/// Size of the IPv4 header without options.
pub const IPV4_HDR_LEN: usize = size_of::<Ipv4Hdr>();
/// Size of the IPv6 fixed header.
pub const IPV6_HDR_LEN: usize = size_of::<Ipv6Hdr>();
const ETH_HDR_LEN: usize = size_of::<EthHdr>();
const VLAN_HDR_LEN: usize = size_of::<VlanHdr>();

/// The two ends of an IP packet: IPv4 as host-order `u32`, IPv6 as octets.
#[derive(Clone, Copy)]
pub enum Addrs {
    V4 { src: u32, dst: u32 },
    V6 { src: [u8; 16], dst: [u8; 16] },
}

/// What the XDP guard needs from the IP layer.
pub struct Upper {
    /// Source address (the guard's only lookup key).
    pub src: Src,
    /// Upper-layer protocol (after IPv6 extension headers).
    pub protocol: u8,
    /// Offset of the upper-layer header.
    pub l4_off: usize,
    /// A fragment other than the first: there is no upper-layer header to read.
    pub later_fragment: bool,
    /// The IPv6 header chain goes on past what [`ipv6`] follows: `protocol` is the extension
    /// header it stopped at, `l4_off` where that header starts; the upper layer is unknown.
    pub deep: bool,
}

/// A source address.
#[derive(Clone, Copy)]
pub enum Src {
    V4(u32),
    V6([u8; 16]),
}

/// Parses the Ethernet header and at most one VLAN tag: returns the EtherType of the payload
/// and its offset.
#[inline(always)]
pub fn ethernet(pkt: &Packet) -> Result<(u16, usize), Malformed> {
    let eth: EthHdr = pkt.read(0)?;
    let ethertype = u16::from_be_bytes(eth.ethertype);
    if ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD {
        let tag: VlanHdr = pkt.read(ETH_HDR_LEN)?;
        return Ok((
            u16::from_be_bytes(tag.ethertype),
            ETH_HDR_LEN + VLAN_HDR_LEN,
        ));
    }
    Ok((ethertype, ETH_HDR_LEN))
}

/// Both addresses of the IP packet at `off`, IPv4 or IPv6 by the version nibble (the tunnel
/// device carries raw IP packets). The fixed header must be complete.
#[inline(always)]
pub fn ip_addrs(pkt: &Packet, off: usize) -> Result<Addrs, Malformed> {
    // The version nibble is read as part of the 20-byte IPv4 header (no IP packet is shorter):
    // a lone 1-byte read at offset 0 compiles to `data >= data_end`, a bound the verifier does
    // not track on TUN devices (measured: "invalid access to packet, off=0 size=1").
    let ip: Ipv4Hdr = pkt.read(off)?;
    match ip.version_ihl >> 4 {
        4 => {
            if ip.version_ihl & 0x0f < 5 {
                return Err(Malformed);
            }
            Ok(Addrs::V4 {
                src: u32::from_be_bytes(ip.src),
                dst: u32::from_be_bytes(ip.dst),
            })
        }
        6 => {
            let ip: Ipv6Hdr = pkt.read(off)?;
            Ok(Addrs::V6 {
                src: ip.src,
                dst: ip.dst,
            })
        }
        _ => Err(Malformed),
    }
}

/// Length of the IP and transport headers of the packet at `off` (TCP with its options, UDP 8
/// bytes, anything else the IP header alone): what each extra segment of a GSO packet repeats.
/// IPv6 extension headers are not followed (GSO packets do not carry them).
#[inline(always)]
pub fn gso_header_len(pkt: &Packet, off: usize, v6: bool) -> Result<usize, Malformed> {
    let (ip_len, protocol) = if v6 {
        let ip: Ipv6Hdr = pkt.read(off)?;
        (IPV6_HDR_LEN, ip.next_header)
    } else {
        let ip: Ipv4Hdr = pkt.read(off)?;
        (((ip.version_ihl & 0x0f) as usize) * 4, ip.protocol)
    };
    let l4 = match protocol {
        IPPROTO_TCP => {
            // Byte 12 of the TCP header: data offset in 32-bit words (high nibble).
            let tcp: [u8; 13] = pkt.read(off + ip_len)?;
            ((tcp[12] >> 4) as usize) * 4
        }
        IPPROTO_UDP => 8,
        _ => 0,
    };
    Ok(ip_len + l4)
}

/// The IPv4 header at `off`: source, protocol, where the payload starts, and whether this is a
/// non-first fragment. Checks version and IHL; the options (if any) must be present.
#[inline(always)]
pub fn ipv4(pkt: &Packet, off: usize) -> Result<Upper, Malformed> {
    let ip: Ipv4Hdr = pkt.read(off)?;
    let ihl = (ip.version_ihl & 0x0f) as usize;
    if ip.version_ihl >> 4 != 4 || ihl < 5 {
        return Err(Malformed);
    }
    let hlen = ihl * 4;
    // Options, if any, must be in the packet too.
    if hlen > IPV4_HDR_LEN {
        let _: u8 = pkt.read(off + hlen - 1)?;
    }
    let frag_offset = u16::from_be_bytes(ip.frag_off) & 0x1fff;
    Ok(Upper {
        src: Src::V4(u32::from_be_bytes(ip.src)),
        protocol: ip.protocol,
        l4_off: off + hlen,
        later_fragment: frag_offset != 0,
        deep: false,
    })
}

/// The IPv6 header at `off` and up to [`MAX_IPV6_EXT_HEADERS`] extension headers (hop-by-hop,
/// routing, destination options, fragment). More extension headers than that, or one starting
/// past [`MAX_HEADER_OFFSET`], is [`Upper::deep`]; a truncated one is [`Malformed`]. The
/// upper-layer header may start past [`MAX_HEADER_OFFSET`] (reading it fails). A fragment header
/// with a non-zero offset ends the walk: the rest is not the upper-layer header.
#[inline(always)]
pub fn ipv6(pkt: &Packet, off: usize) -> Result<Upper, Malformed> {
    let ip: Ipv6Hdr = pkt.read(off)?;
    if ip.version_class_flow[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let src = Src::V6(ip.src);
    let mut next = ip.next_header;
    let mut at = off + IPV6_HDR_LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        let ext = matches!(
            next,
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT
        );
        if ext && at > MAX_HEADER_OFFSET {
            return Ok(Upper {
                src,
                protocol: next,
                l4_off: at,
                later_fragment: false,
                deep: true,
            });
        }
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let ext: Ipv6ExtHdr = pkt.read(at)?;
                next = ext.next_header;
                at += (ext.len as usize + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let ext: Ipv6ExtHdr = pkt.read(at)?;
                next = ext.next_header;
                at += size_of::<Ipv6ExtHdr>();
                let frag_offset = u16::from_be_bytes([ext.rest[0], ext.rest[1]]) >> 3;
                if frag_offset != 0 {
                    return Ok(Upper {
                        src,
                        protocol: next,
                        l4_off: at,
                        later_fragment: true,
                        deep: false,
                    });
                }
            }
            _ => {
                return Ok(Upper {
                    src,
                    protocol: next,
                    l4_off: at,
                    later_fragment: false,
                    deep: false,
                });
            }
        }
    }
    Ok(Upper {
        src,
        protocol: next,
        l4_off: at,
        later_fragment: false,
        deep: matches!(
            next,
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT
        ),
    })
}

/// The destination port of the UDP or TCP header at `off` (both start with the two ports). At
/// least 8 bytes of it must be present: a whole UDP header, and no TCP header is shorter.
#[inline(always)]
pub fn dst_port(pkt: &Packet, off: usize) -> Result<u16, Malformed> {
    let head: [u8; 8] = pkt.read(off)?;
    Ok(u16::from_be_bytes([head[2], head[3]]))
}
