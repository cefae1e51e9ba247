//! The admission gate: per-peer admission state in the peer's `CAPY_PEER_HOT` line and the
//! verification endpoint in `CAPY_GATE_ALLOW` (layouts: `capybara_common::peer::PeerHot`,
//! `capybara_common::gate`).
//!
//! - [`Dataplane::set_gate`] stores the changed fields of the peer's policy through the
//!   agent's mapping: deadline before gate when admitting; when holding, the gate (then the
//!   flags) and the deadline left as it was (`capybara_common::peer::PeerHot`): the kernel sees
//!   the peer admitted or held, never admitted under a deadline that is not the decision's.
//! - A held peer's packets are dropped in both directions and counted under its reason, except
//!   TCP/UDP between the peer and one of the server's tunnel addresses on an endpoint port
//!   ([`Dataplane::set_verification_endpoint`]).
//!
//! ## Deadlines and clocks
//! The kernel compares `bpf_ktime_get_boot_ns()` (CLOCK_BOOTTIME: nanoseconds since boot,
//! counting suspend) with the stored deadline. The API takes wall-clock deadlines
//! ([`SystemTime`]); [`boottime_deadline_ns`] converts one by reading both clocks now and
//! carrying the remaining time over: `deadline_boot = boot_now + (deadline − wall_now)`. The
//! deadline is thereby fixed as "this much time from now": a later step of the wall clock (NTP,
//! an administrator) does not move it, and a suspend does not stretch it. A deadline at or
//! before now becomes a boot time in the past (at least 1 ns, as 0 means "no deadline"): the
//! peer is held as `GateExpired` from its next packet.
//!
//! ## MFA admissions
//! [`Gate::MfaAdmitted`] is an admission whose deadline is the end of an MFA admission (the MFA
//! lifetime, earlier than any account expiry): it is written with `PEER_F_DEADLINE_MFA`, so the
//! kernel holds the peer as `GateMfaPending` (not `GateExpired`) once it passes, and the device
//! has to verify again with no agent action. Every other write clears the flag.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    os::fd::AsFd as _,
    time::{Duration, SystemTime},
};

use capybara_common::{
    drop::DropReason,
    gate::{GATE_ALLOW_MAX, GATE_FAMILY_V4, GateAllowKey},
    maps as names,
    peer::{GATE_ADMITTED, MAX_PEERS, PEER_F_DEADLINE_MFA, PeerId, PeerInfo},
};

use super::{Dataplane, DataplaneError, Result, map_err, sys, sys_err};

/// A peer's admission state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Traffic passes; with `until`, only until then (after it the kernel holds the peer as
    /// [`DropReason::GateExpired`] by itself).
    Admitted {
        /// The admission deadline (wall clock), if any.
        until: Option<SystemTime>,
    },
    /// Traffic is dropped and counted under this reason (one of the `Gate*` reasons), except to
    /// and from the verification endpoint.
    Held(DropReason),
    /// Traffic passes until `until`, the end of an MFA admission; after it the kernel holds the
    /// peer as [`DropReason::GateMfaPending`] by itself (`PEER_F_DEADLINE_MFA`, module docs).
    MfaAdmitted {
        /// The end of the MFA admission (wall clock).
        until: SystemTime,
    },
}

/// Whether `r` is a reason a peer can be held with.
pub const fn is_gate_reason(r: DropReason) -> bool {
    matches!(
        r,
        DropReason::GateMfaPending
            | DropReason::GateExpired
            | DropReason::GateKicked
            | DropReason::GateOverQuota
            | DropReason::GateOutsideWindow
            | DropReason::GateDeviceLimit
    )
}

/// Transport protocol of a verification endpoint port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum L4Proto {
    /// TCP (IP protocol 6).
    Tcp,
    /// UDP (IP protocol 17).
    Udp,
}

impl L4Proto {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            L4Proto::Tcp => 6,
            L4Proto::Udp => 17,
        }
    }

    fn from_number(n: u8) -> Option<L4Proto> {
        match n {
            6 => Some(L4Proto::Tcp),
            17 => Some(L4Proto::Udp),
            _ => None,
        }
    }
}

/// One reachable `(server address, protocol, port)` of the verification endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EndpointAddr {
    /// One of the server's tunnel addresses.
    pub addr: IpAddr,
    /// TCP or UDP.
    pub proto: L4Proto,
    /// The server's port.
    pub port: u16,
}

impl EndpointAddr {
    fn key(&self) -> GateAllowKey {
        let p = self.proto.number();
        match self.addr {
            IpAddr::V4(a) => GateAllowKey::v4(u32::from(a), p, self.port),
            IpAddr::V6(a) => GateAllowKey::v6(a.octets(), p, self.port),
        }
    }

    fn from_key(k: &GateAllowKey) -> Option<EndpointAddr> {
        let addr = if k.family == GATE_FAMILY_V4 {
            let [a, b, c, d, ..] = k.addr;
            IpAddr::from([a, b, c, d])
        } else {
            IpAddr::from(k.addr)
        };
        Some(EndpointAddr {
            addr,
            proto: L4Proto::from_number(k.protocol)?,
            port: k.port,
        })
    }
}

/// CLOCK_BOOTTIME nanoseconds for the wall-clock `deadline`, given both clocks read at the same
/// moment (`wall_now`, `boot_now`). See the module docs. Never 0 (0 means "no deadline").
pub fn boottime_deadline_ns(deadline: SystemTime, wall_now: SystemTime, boot_now: Duration) -> u64 {
    let boot_now_ns = boot_now.as_nanos().min(u128::from(u64::MAX)) as u64;
    let ns = match deadline.duration_since(wall_now) {
        Ok(ahead) => boot_now_ns.saturating_add(ahead.as_nanos().min(u128::from(u64::MAX)) as u64),
        Err(e) => {
            let behind = e.duration().as_nanos().min(u128::from(u64::MAX)) as u64;
            // Already passed: at or before now (and before boot if it was that long ago).
            boot_now_ns.saturating_sub(behind.max(1))
        }
    };
    ns.max(1)
}

/// The wall-clock time of CLOCK_BOOTTIME `ns`, given both clocks read at the same moment: the
/// inverse of [`boottime_deadline_ns`] (used for deadlines read back and event timestamps).
pub fn wall_time_of_boottime(ns: u64, wall_now: SystemTime, boot_now: Duration) -> SystemTime {
    let t = Duration::from_nanos(ns);
    if t >= boot_now {
        wall_now + (t - boot_now)
    } else {
        wall_now
            .checked_sub(boot_now - t)
            .unwrap_or(SystemTime::UNIX_EPOCH)
    }
}

/// Both clocks, read back to back.
pub fn clocks_now() -> (SystemTime, Duration) {
    (SystemTime::now(), sys::boottime_now())
}

/// Checks a gate state and encodes it as `(gate, deadline_ns)` for `PeerInfo` (whether
/// `PEER_F_DEADLINE_MFA` is set: [`mfa_flag`]).
fn encode(gate: Gate, wall_now: SystemTime, boot_now: Duration) -> Result<(u32, u64)> {
    match gate {
        Gate::Admitted { until: None } => Ok((GATE_ADMITTED, 0)),
        Gate::Admitted { until: Some(t) } | Gate::MfaAdmitted { until: t } => {
            Ok((GATE_ADMITTED, boottime_deadline_ns(t, wall_now, boot_now)))
        }
        Gate::Held(r) if is_gate_reason(r) => Ok((r as u32, 0)),
        Gate::Held(r) => Err(DataplaneError::NotAGateReason { reason: r }),
    }
}

/// `flags` with `PEER_F_DEADLINE_MFA` set for an [`Gate::MfaAdmitted`] and cleared otherwise.
fn mfa_flag(flags: u32, gate: Gate) -> u32 {
    match gate {
        Gate::MfaAdmitted { .. } => flags | PEER_F_DEADLINE_MFA,
        _ => flags & !PEER_F_DEADLINE_MFA,
    }
}

/// Decodes `PeerInfo`'s gate fields (a stored value that is no gate reason reads as the kernel
/// treats it: held as `GateKicked`).
fn decode(info: &PeerInfo, wall_now: SystemTime, boot_now: Duration) -> Gate {
    if info.gate != GATE_ADMITTED {
        return Gate::Held(
            DropReason::from_u32(info.gate)
                .filter(|r| is_gate_reason(*r))
                .unwrap_or(DropReason::GateKicked),
        );
    }
    let until = (info.deadline_ns != 0)
        .then(|| wall_time_of_boottime(info.deadline_ns, wall_now, boot_now));
    match until {
        Some(until) if info.flags & PEER_F_DEADLINE_MFA != 0 => Gate::MfaAdmitted { until },
        until => Gate::Admitted { until },
    }
}

impl Dataplane {
    pub(super) fn active_peer_info(&self, id: PeerId) -> Result<PeerInfo> {
        if id >= MAX_PEERS {
            return Err(DataplaneError::PeerIdOutOfRange { id, max: MAX_PEERS });
        }
        if !self.peers.mirror.contains_key(&id) {
            return Err(DataplaneError::UnknownPeer { id });
        }
        Ok(self.peers.info(id))
    }

    /// Admits or holds active peer `id`: its policy's gate fields stored (flags kept, but
    /// `PEER_F_DEADLINE_MFA`, which follows the gate). Validates first (the id, the hold
    /// reason): on error nothing is written.
    pub fn set_gate(&mut self, id: PeerId, gate: Gate) -> Result<()> {
        let (wall_now, boot_now) = clocks_now();
        let (g, deadline_ns) = encode(gate, wall_now, boot_now)?;
        let mut info = self.active_peer_info(id)?;
        info.gate = g;
        info.deadline_ns = deadline_ns;
        info.flags = mfa_flag(info.flags, gate);
        self.write_peer_info(id, info, "write gate")?;
        tracing::debug!(id, ?gate, deadline_ns, "gate set");
        Ok(())
    }

    /// The gate state of active peer `id` as stored. An admission whose deadline has passed
    /// reads as `Admitted { until: Some(<past>) }`: the kernel holds the peer as `GateExpired`.
    pub fn gate(&self, id: PeerId) -> Result<Gate> {
        let info = self.active_peer_info(id)?;
        let (wall_now, boot_now) = clocks_now();
        Ok(decode(&info, wall_now, boot_now))
    }

    /// Sets the verification endpoint held peers can still reach: every combination of the
    /// server's tunnel `addrs` and `ports` (at most `GATE_ALLOW_MAX`). New entries are written
    /// before stale ones are removed, so an endpoint kept across the change never lapses.
    /// Validates first (no port 0, the size): on error nothing is written. Empty = none.
    pub fn set_verification_endpoint(
        &mut self,
        addrs: &[IpAddr],
        ports: &[(L4Proto, u16)],
    ) -> Result<()> {
        if let Some(&(proto, port)) = ports.iter().find(|(_, p)| *p == 0) {
            return Err(DataplaneError::EndpointPort { proto, port });
        }
        let want: BTreeSet<EndpointAddr> = addrs
            .iter()
            .flat_map(|&addr| {
                ports
                    .iter()
                    .map(move |&(proto, port)| EndpointAddr { addr, proto, port })
            })
            .collect();
        if want.len() > GATE_ALLOW_MAX as usize {
            return Err(DataplaneError::EndpointTooLarge {
                entries: want.len(),
                max: GATE_ALLOW_MAX,
            });
        }
        let have: Vec<(GateAllowKey, u32)> = sys::dump_hash(self.gate_allow.fd.as_fd())
            .map_err(sys_err(names::GATE_ALLOW, "batch lookup"))?;
        let want_keys: BTreeSet<GateAllowKey> = want.iter().map(EndpointAddr::key).collect();
        for k in &want_keys {
            self.gate_allow
                .map
                .insert(k, 1, 0)
                .map_err(map_err(names::GATE_ALLOW, "insert"))?;
        }
        for (k, _) in have.iter().filter(|(k, _)| !want_keys.contains(k)) {
            self.gate_allow
                .map
                .remove(k)
                .map_err(map_err(names::GATE_ALLOW, "remove"))?;
        }
        tracing::info!(endpoint = ?want, "verification endpoint set");
        Ok(())
    }

    /// The verification endpoint as the kernel holds it.
    pub fn verification_endpoint(&self) -> Result<Vec<EndpointAddr>> {
        let have: Vec<(GateAllowKey, u32)> = sys::dump_hash(self.gate_allow.fd.as_fd())
            .map_err(sys_err(names::GATE_ALLOW, "batch lookup"))?;
        let mut v: Vec<EndpointAddr> = have
            .iter()
            .filter_map(|(k, _)| EndpointAddr::from_key(k))
            .collect();
        v.sort();
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn future_deadline_carries_the_remaining_time_to_boottime() {
        let ns = boottime_deadline_ns(wall(1_000_002), wall(1_000_000), 100 * SEC);
        assert_eq!(ns, 102_000_000_000);
    }

    #[test]
    fn past_deadline_lies_before_now_on_the_boot_clock() {
        let ns = boottime_deadline_ns(wall(999_990), wall(1_000_000), 100 * SEC);
        assert_eq!(ns, 90_000_000_000);
        // Exactly now is already expired (the kernel holds at now >= deadline).
        assert_eq!(
            boottime_deadline_ns(wall(1_000_000), wall(1_000_000), 100 * SEC),
            100_000_000_000
        );
    }

    #[test]
    fn deadline_before_boot_is_never_zero() {
        assert_eq!(boottime_deadline_ns(wall(1), wall(1_000_000), 5 * SEC), 1);
        assert_eq!(boottime_deadline_ns(wall(0), wall(0), Duration::ZERO), 1);
    }

    #[test]
    fn far_future_saturates() {
        let ns = boottime_deadline_ns(
            SystemTime::UNIX_EPOCH + Duration::from_secs(u64::MAX / 2),
            wall(0),
            SEC,
        );
        assert_eq!(ns, u64::MAX);
    }

    #[test]
    fn boottime_round_trips_to_wall_time() {
        let (w, b) = (wall(1_000_000), 100 * SEC);
        for t in [wall(1_000_005), wall(999_950)] {
            assert_eq!(
                wall_time_of_boottime(boottime_deadline_ns(t, w, b), w, b),
                t
            );
        }
    }

    #[test]
    fn encode_validates_the_hold_reason() {
        let (w, b) = (wall(10), SEC);
        for r in DropReason::ALL {
            let got = encode(Gate::Held(r), w, b);
            if is_gate_reason(r) {
                assert_eq!(got.unwrap(), (r as u32, 0));
            } else {
                let e = got.unwrap_err();
                assert!(
                    matches!(e, DataplaneError::NotAGateReason { reason } if reason == r),
                    "{e}"
                );
                assert!(e.to_string().contains(r.name()), "{e}");
            }
        }
        assert_eq!(
            encode(Gate::Admitted { until: None }, w, b).unwrap(),
            (GATE_ADMITTED, 0)
        );
        assert_eq!(
            encode(
                Gate::Admitted {
                    until: Some(wall(12))
                },
                w,
                b
            )
            .unwrap(),
            (GATE_ADMITTED, 3_000_000_000)
        );
    }

    #[test]
    fn decode_reads_back_what_encode_wrote() {
        let (w, b) = (wall(10), SEC);
        for g in [
            Gate::Admitted { until: None },
            Gate::Admitted {
                until: Some(wall(20)),
            },
            Gate::Held(DropReason::GateMfaPending),
            Gate::Held(DropReason::GateDeviceLimit),
            Gate::MfaAdmitted { until: wall(30) },
        ] {
            let (gate, deadline_ns) = encode(g, w, b).unwrap();
            let info = PeerInfo {
                gate,
                deadline_ns,
                flags: mfa_flag(
                    capybara_common::peer::PEER_F_ACTIVE | PEER_F_DEADLINE_MFA,
                    g,
                ),
                ..PeerInfo::default()
            };
            assert_eq!(decode(&info, w, b), g);
        }
        let bogus = PeerInfo {
            gate: DropReason::Malformed as u32,
            ..PeerInfo::default()
        };
        assert_eq!(decode(&bogus, w, b), Gate::Held(DropReason::GateKicked));
    }

    #[test]
    fn endpoint_keys_round_trip() {
        for e in [
            EndpointAddr {
                addr: "10.8.0.1".parse().unwrap(),
                proto: L4Proto::Tcp,
                port: 8443,
            },
            EndpointAddr {
                addr: "fd00::1".parse().unwrap(),
                proto: L4Proto::Udp,
                port: 53,
            },
        ] {
            assert_eq!(EndpointAddr::from_key(&e.key()), Some(e));
        }
    }
}
