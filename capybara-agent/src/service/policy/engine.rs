//! The deterministic core of time-dependent policy: period boundaries and gate decisions. Every
//! function takes the time as an argument, so tests drive them with any clock.
//!
//! ## Gate decisions, per device of a user (first matching rule)
//! 1. outside the allowed `window` (local time in the policy's zone) → held, `outside-window`;
//! 2. the day's online `time` used up → held, `outside-window` too (the kernel's gate reasons are
//!    fixed by `capybara-common`; "no more time today" is a window closed for the rest of the
//!    day, and `policy explain` / `quota show` say which rule it was);
//! 3. more devices online than `connections` → the devices that came online last are held,
//!    `device-limit` (ties by peer id); when one of the admitted devices goes offline, the
//!    longest-waiting held one is admitted;
//! 4. otherwise admitted.
//!
//! ## Account expiry: the admission deadline
//! [`decide`] puts the user's account expiry on top of the rules above: a user whose expiry has
//! passed has every device held as `expired`; otherwise an admitted device is admitted **until
//! the expiry** (`Gate::Admitted { until }`, a CLOCK_BOOTTIME deadline in the kernel), so the
//! kernel cuts it on time by itself, with no agent timer and the agent down. The effective
//! deadline is the earliest of the policy's and the expiry; the rules above hold or admit
//! without a deadline of their own, so today it is the expiry.
//!
//! ## MFA: held until a code admits the device's session
//! [`decide_mfa`] adds the device's MFA standing ([`MfaGate`], kept by `service::mfa` in the
//! policy's runtime state): a device of a user with MFA on (or required) is held as
//! `mfa-pending` unless a good code admitted it in its current session; an admission lasts
//! until the session ends (the agent forgets it) or the MFA lifetime passes. The admission's
//! deadline is the earlier of the account expiry and the MFA lifetime; when the MFA one is
//! earlier the gate is [`Gate::MfaAdmitted`], so the kernel holds the device as `mfa-pending`
//! (not `expired`) by itself once it passes. **Precedence** (first that applies): account
//! expired → `expired`; a rule above holds → its reason (a code cannot lift a window or the
//! device limit, so the page would promise what it cannot give); MFA not admitted (or its
//! lifetime passed) → `mfa-pending`; otherwise admitted until the earliest deadline. A held
//! device still reaches the verification page (`CAPY_GATE_ALLOW` passes whatever the reason).
//!
//! ## The policy's holds and everyone else's
//! The kernel has one gate per device, shared by several holders: the policy holds with
//! `outside-window`, `device-limit`, `expired` (account expiry, held at once or by the
//! admission's deadline) and `mfa-pending` (folded in above) ([`is_policy_hold`]); a kick
//! (`kicked`) and `over-quota` belong to their own owners. [`gate_write`] decides what the policy writes given
//! the gate the kernel holds now (read back, so holds written before an agent restart count):
//! a hold of another owner is left as it is, whatever the policy decides, until its owner ends
//! it — a kick ends with the device's next handshake, which is the one case the policy lifts
//! itself. An admission whose deadline differs from the decided one by more than
//! [`DEADLINE_SLACK`] is rewritten (an expiry set, moved or cleared; a deadline read back
//! through the clocks' conversion differs by nanoseconds, which is not a change).
//!
//! ## Periods
//! A period starts at local midnight (daily), Monday midnight (weekly) or midnight of the first
//! of the month (monthly) in the policy's zone; `none` never starts over. The agent stores the
//! start of the period each bucket was last reset for; whenever the current period's start is
//! later (at a boundary, or at start-up after downtime spanning one), the bucket is reset once.

use std::time::{Duration, SystemTime};

use capybara_common::{drop::DropReason, peer::PeerId};
use chrono::{DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveDateTime, TimeZone, Utc};

use super::{
    model::{Period, Zone},
    resolve::Effective,
};
use crate::dataplane::Gate;

/// Local wall time of `t` in `zone`.
pub fn local(zone: Zone, t: SystemTime) -> NaiveDateTime {
    DateTime::<Utc>::from(t)
        .with_timezone(&zone.0)
        .naive_local()
}

/// The UTC instant of local midnight starting `day` in `zone` (the first instant of the day when
/// a DST change skips midnight).
fn midnight(zone: Zone, day: NaiveDate) -> i64 {
    let naive = day.and_hms_opt(0, 0, 0).expect("midnight exists");
    match zone.0.from_local_datetime(&naive) {
        LocalResult::Single(t) | LocalResult::Ambiguous(t, _) => t.timestamp(),
        // Midnight skipped by a DST change: the day starts an hour later.
        LocalResult::None => zone
            .0
            .from_local_datetime(&(naive + chrono::Duration::hours(1)))
            .earliest()
            .map_or_else(|| naive.and_utc().timestamp(), |t| t.timestamp()),
    }
}

/// Unix seconds at which the period containing `now` started, in `zone`; `None` for
/// [`Period::None`].
pub fn period_start(period: Period, zone: Zone, now: SystemTime) -> Option<i64> {
    let today = local(zone, now).date();
    let day = match period {
        Period::None => return None,
        Period::Daily => today,
        Period::Weekly => today - Days::new(u64::from(today.weekday().num_days_from_monday())),
        Period::Monthly => today.with_day(1).expect("the first exists"),
    };
    Some(midnight(zone, day))
}

/// Whether a bucket last reset for the period starting at `last` must be reset now.
pub fn reset_due(period: Period, zone: Zone, last: Option<i64>, now: SystemTime) -> Option<i64> {
    let start = period_start(period, zone, now)?;
    match last {
        Some(l) if l >= start => None,
        _ => Some(start),
    }
}

/// One device of a user, as the gate engine sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Device {
    /// Its peer id.
    pub id: PeerId,
    /// When it came online (completed a handshake), if it is online.
    pub online_since: Option<SystemTime>,
}

/// The gate each device of a user should have: `None` = admitted, `Some(reason)` = held.
pub fn gates(
    eff: &Effective,
    devices: &[Device],
    online_today: Duration,
    now: SystemTime,
) -> Vec<(PeerId, Option<DropReason>)> {
    let zone = eff.tz.value;
    let outside = eff
        .window
        .value
        .is_some_and(|w| !w.contains(local(zone, now)));
    let no_time = eff.time.value.is_some_and(|t| online_today >= t.0);
    if outside || no_time {
        return devices
            .iter()
            .map(|d| (d.id, Some(DropReason::GateOutsideWindow)))
            .collect();
    }
    let mut online: Vec<&Device> = devices
        .iter()
        .filter(|d| d.online_since.is_some())
        .collect();
    online.sort_by_key(|d| (d.online_since, d.id));
    let allowed = eff.connections.value.map_or(usize::MAX, |c| c as usize);
    devices
        .iter()
        .map(|d| {
            let rank = online.iter().position(|o| o.id == d.id);
            let held = rank.is_some_and(|r| r >= allowed);
            (d.id, held.then_some(DropReason::GateDeviceLimit))
        })
        .collect()
}

/// Whether the policy owns holds with reason `r`: the only holds it writes or lifts (see the
/// module docs).
pub const fn is_policy_hold(r: DropReason) -> bool {
    matches!(
        r,
        DropReason::GateOutsideWindow
            | DropReason::GateDeviceLimit
            | DropReason::GateExpired
            | DropReason::GateMfaPending
    )
}

/// How far a kernel deadline may be from the decided one and count as the same (a deadline read
/// back goes through both clocks and comes back off by nanoseconds).
pub const DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// The gate of one device: the rules' decision (`held`, from [`gates`]) with the user's account
/// expiry on top (see the module docs): expired at `now` → held `expired`; held by a rule → that
/// hold; otherwise admitted until the expiry.
pub fn decide(held: Option<DropReason>, expires: Option<SystemTime>, now: SystemTime) -> Gate {
    match (expires, held) {
        (Some(t), _) if t <= now => Gate::Held(DropReason::GateExpired),
        (_, Some(r)) => Gate::Held(r),
        (until, None) => Gate::Admitted { until },
    }
}

/// A device's MFA standing, as the gate decision takes it (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MfaGate {
    /// Its user has no MFA (or an enrolment not yet confirmed and not required).
    Off,
    /// MFA is on or required and no code admitted the device's current session.
    Pending,
    /// A good code admitted the device's current session until then (the MFA lifetime).
    Admitted {
        /// The end of the MFA lifetime.
        until: SystemTime,
    },
}

/// [`decide`] with the device's MFA standing (the precedence is in the module docs): expired →
/// `expired`; a rule's hold → it; MFA not admitted, or admitted until a time passed →
/// `mfa-pending`; otherwise admitted until the earlier of the expiry and the MFA lifetime, as
/// [`Gate::MfaAdmitted`] when the MFA lifetime is the earlier one.
pub fn decide_mfa(
    held: Option<DropReason>,
    expires: Option<SystemTime>,
    mfa: MfaGate,
    now: SystemTime,
) -> Gate {
    let gate = decide(held, expires, now);
    let Gate::Admitted { until: expiry } = gate else {
        return gate;
    };
    match mfa {
        MfaGate::Off => gate,
        MfaGate::Pending => Gate::Held(DropReason::GateMfaPending),
        MfaGate::Admitted { until } if until <= now => Gate::Held(DropReason::GateMfaPending),
        MfaGate::Admitted { until } => match expiry {
            Some(e) if e <= until => gate,
            _ => Gate::MfaAdmitted { until },
        },
    }
}

/// Whether two deadlines are the same within [`DEADLINE_SLACK`].
fn same_deadline(a: Option<SystemTime>, b: Option<SystemTime>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => {
            let d = a.duration_since(b).unwrap_or_else(|e| e.duration());
            d <= DEADLINE_SLACK
        }
        _ => false,
    }
}

/// What the policy writes to one device's gate, given the gate the kernel holds now
/// (`kernel`) and the policy's decision (`want`, from [`decide`]); `None` = leave the kernel's
/// gate as it is. `handshake`: the device has just completed a handshake, which ends a kick.
/// See the module docs for the rule.
pub fn gate_write(kernel: Gate, want: Gate, handshake: bool) -> Option<Gate> {
    match kernel {
        Gate::Held(DropReason::GateKicked) if handshake => {}
        Gate::Held(r) if !is_policy_hold(r) => return None,
        _ => {}
    }
    let same = match (kernel, want) {
        (Gate::Held(a), Gate::Held(b)) => a == b,
        (Gate::Admitted { until: a }, Gate::Admitted { until: b }) => same_deadline(a, b),
        (Gate::MfaAdmitted { until: a }, Gate::MfaAdmitted { until: b }) => {
            same_deadline(Some(a), Some(b))
        }
        _ => false,
    };
    (!same).then_some(want)
}

/// The local day of `now` in `zone` (online time counts per local day).
pub fn local_day(zone: Zone, now: SystemTime) -> NaiveDate {
    local(zone, now).date()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::policy::{
        model::{Limits, LimitsText},
        resolve::{Layers, resolve},
    };

    fn at(s: &str) -> SystemTime {
        DateTime::parse_from_rfc3339(s).unwrap().into()
    }

    fn eff(f: impl FnOnce(&mut LimitsText)) -> Effective {
        let mut t = LimitsText::default();
        f(&mut t);
        let l = t.parse().unwrap().set;
        resolve(&Layers {
            user: Some(&l),
            groups: vec![],
            template: None,
            default: &Limits::default(),
        })
    }

    #[test]
    fn periods_start_at_local_midnight() {
        let berlin: Zone = "Europe/Berlin".parse().unwrap();
        // 2026-11-28 10:00 UTC is a Saturday, 11:00 in Berlin (CET, UTC+1).
        let now = at("2026-11-28T10:00:00Z");
        assert_eq!(
            period_start(Period::Daily, berlin, now),
            Some(
                at("2026-11-27T23:00:00Z")
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .unwrap()
                    .as_secs() as i64
            )
        );
        let secs = |s| {
            at(s)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
        };
        assert_eq!(
            period_start(Period::Weekly, berlin, now),
            Some(secs("2026-11-22T23:00:00Z"))
        );
        assert_eq!(
            period_start(Period::Monthly, berlin, now),
            Some(secs("2026-10-31T23:00:00Z"))
        );
        assert_eq!(period_start(Period::None, berlin, now), None);
        // Summer time: 1 July midnight in Berlin is 22:00 UTC the day before.
        assert_eq!(
            period_start(Period::Monthly, berlin, at("2026-07-15T12:00:00Z")),
            Some(secs("2026-06-30T22:00:00Z"))
        );
    }

    #[test]
    fn a_reset_missed_during_downtime_is_due_once() {
        let utc = Zone::default();
        let secs = |s| {
            at(s)
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64
        };
        let last = Some(secs("2026-10-01T00:00:00Z"));
        // Down from October to late November: one reset, for November.
        let due = reset_due(Period::Monthly, utc, last, at("2026-11-28T10:00:00Z"));
        assert_eq!(due, Some(secs("2026-11-01T00:00:00Z")));
        assert_eq!(
            reset_due(Period::Monthly, utc, due, at("2026-11-28T10:00:01Z")),
            None
        );
        assert_eq!(
            reset_due(Period::None, utc, None, at("2026-11-28T10:00:01Z")),
            None
        );
        // Never reset before: due (the period start is recorded).
        assert!(reset_due(Period::Daily, utc, None, at("2026-11-28T10:00:00Z")).is_some());
    }

    #[test]
    fn window_holds_and_admits_on_time() {
        let e = eff(|t| {
            t.window = Some("Mon-Fri 08:00-18:00".into());
            t.tz = Some("Europe/Berlin".into());
        });
        let d = [Device {
            id: 7,
            online_since: None,
        }];
        // Friday 16:59:59 UTC = 17:59:59 Berlin: inside; one second later: outside.
        assert_eq!(
            gates(&e, &d, Duration::ZERO, at("2026-11-27T16:59:59Z")),
            vec![(7, None)]
        );
        assert_eq!(
            gates(&e, &d, Duration::ZERO, at("2026-11-27T17:00:00Z")),
            vec![(7, Some(DropReason::GateOutsideWindow))]
        );
        // Monday 07:00 UTC = 08:00 Berlin: open again.
        assert_eq!(
            gates(&e, &d, Duration::ZERO, at("2026-11-30T07:00:00Z")),
            vec![(7, None)]
        );
    }

    #[test]
    fn daily_time_used_up_holds() {
        let e = eff(|t| t.time = Some("8h".into()));
        let d = [Device {
            id: 1,
            online_since: Some(at("2026-11-28T01:00:00Z")),
        }];
        let now = at("2026-11-28T10:00:00Z");
        assert_eq!(
            gates(&e, &d, Duration::from_secs(8 * 3600 - 1), now),
            vec![(1, None)]
        );
        assert_eq!(
            gates(&e, &d, Duration::from_secs(8 * 3600), now),
            vec![(1, Some(DropReason::GateOutsideWindow))]
        );
    }

    #[test]
    fn the_device_over_the_limit_waits_for_one_to_go() {
        let e = eff(|t| t.connections = Some("3".into()));
        let t0 = at("2026-11-28T10:00:00Z");
        let on = |id, s: u64| Device {
            id,
            online_since: Some(t0 + Duration::from_secs(s)),
        };
        let mut devs = vec![
            on(4, 0),
            on(2, 1),
            on(3, 2),
            on(1, 3),
            Device {
                id: 9,
                online_since: None,
            },
        ];
        let held = |devs: &[Device]| {
            gates(&e, devs, Duration::ZERO, t0)
                .into_iter()
                .filter(|(_, g)| g.is_some())
                .map(|(id, g)| (id, g.unwrap()))
                .collect::<Vec<_>>()
        };
        assert_eq!(held(&devs), vec![(1, DropReason::GateDeviceLimit)]);
        // Device 2 goes offline: the waiting device 1 is admitted.
        devs[1].online_since = None;
        assert!(held(&devs).is_empty());
    }

    #[test]
    fn the_policy_leaves_other_holds_and_lifts_a_kick_only_on_a_handshake() {
        let now = at("2026-11-28T10:00:00Z");
        let admitted = Gate::Admitted { until: None };
        let window = Gate::Held(DropReason::GateOutsideWindow);
        let limit = Gate::Held(DropReason::GateDeviceLimit);
        let expired = Gate::Held(DropReason::GateExpired);
        let until = Gate::Admitted {
            until: Some(now + Duration::from_secs(60)),
        };
        for other in [DropReason::GateKicked, DropReason::GateOverQuota] {
            for want in [admitted, until, window, limit, expired] {
                assert_eq!(
                    gate_write(Gate::Held(other), want, false),
                    None,
                    "{other:?} rewritten for {want:?}"
                );
            }
        }
        // A handshake ends a kick (the policy decides afresh), never another owner's hold.
        let kicked = Gate::Held(DropReason::GateKicked);
        assert_eq!(gate_write(kicked, admitted, true), Some(admitted));
        assert_eq!(gate_write(kicked, limit, true), Some(limit));
        // MFA is folded into the policy's decision (`decide_mfa`): its hold is the policy's.
        let mfa = Gate::Held(DropReason::GateMfaPending);
        assert_eq!(gate_write(mfa, admitted, true), Some(admitted));
        assert_eq!(gate_write(mfa, mfa, false), None);
        // The policy's own holds: written, changed and lifted; nothing written when unchanged.
        assert_eq!(gate_write(admitted, admitted, false), None);
        assert_eq!(gate_write(admitted, limit, false), Some(limit));
        assert_eq!(gate_write(limit, limit, false), None);
        assert_eq!(gate_write(limit, window, false), Some(window));
        assert_eq!(gate_write(window, admitted, false), Some(admitted));
    }

    #[test]
    fn the_account_expiry_is_the_admission_deadline() {
        let now = at("2026-11-28T10:00:00Z");
        let later = now + Duration::from_secs(3600);
        let window = DropReason::GateOutsideWindow;
        // Admitted: until the expiry; held by a rule: that hold; expired: held as expired.
        assert_eq!(decide(None, None, now), Gate::Admitted { until: None });
        assert_eq!(
            decide(None, Some(later), now),
            Gate::Admitted { until: Some(later) }
        );
        assert_eq!(decide(Some(window), Some(later), now), Gate::Held(window));
        assert_eq!(
            decide(None, Some(now), now),
            Gate::Held(DropReason::GateExpired)
        );
        assert_eq!(
            decide(Some(window), Some(now - Duration::from_secs(1)), now),
            Gate::Held(DropReason::GateExpired)
        );
        // An expiry set, moved or cleared rewrites the admission; a deadline read back within
        // the slack is the same one.
        let open = Gate::Admitted { until: None };
        let until = |t| Gate::Admitted { until: Some(t) };
        assert_eq!(gate_write(open, until(later), false), Some(until(later)));
        assert_eq!(
            gate_write(until(later), until(later + DEADLINE_SLACK), false),
            None
        );
        let moved = later + Duration::from_secs(60);
        assert_eq!(
            gate_write(until(later), until(moved), false),
            Some(until(moved))
        );
        assert_eq!(gate_write(until(later), open, false), Some(open));
        // Expired in the kernel (its deadline passed, or held as expired): renewing admits, an
        // expiry still passed holds with the reason.
        let passed = until(now - Duration::from_secs(5));
        let expired = Gate::Held(DropReason::GateExpired);
        assert_eq!(gate_write(passed, open, false), Some(open));
        assert_eq!(gate_write(passed, expired, false), Some(expired));
        assert_eq!(gate_write(expired, expired, false), None);
        assert_eq!(gate_write(expired, until(later), false), Some(until(later)));
        // A kick outlives an expiry: the kicked device stays held until its next handshake.
        let kicked = Gate::Held(DropReason::GateKicked);
        assert_eq!(gate_write(kicked, expired, false), None);
    }

    #[test]
    fn mfa_holds_until_admitted_and_the_earlier_deadline_wins() {
        let now = at("2026-11-28T10:00:00Z");
        let hour = Duration::from_secs(3600);
        let mfa = Gate::Held(DropReason::GateMfaPending);
        let window = DropReason::GateOutsideWindow;
        // Off: the decision without MFA.
        assert_eq!(
            decide_mfa(None, None, MfaGate::Off, now),
            Gate::Admitted { until: None }
        );
        // On and not admitted: held as mfa-pending; a passed admission too.
        assert_eq!(decide_mfa(None, None, MfaGate::Pending, now), mfa);
        let passed = MfaGate::Admitted { until: now };
        assert_eq!(decide_mfa(None, None, passed, now), mfa);
        // Admitted: until the MFA lifetime, with the MFA flag (no expiry, or a later one) ...
        let admitted = MfaGate::Admitted { until: now + hour };
        assert_eq!(
            decide_mfa(None, None, admitted, now),
            Gate::MfaAdmitted { until: now + hour }
        );
        assert_eq!(
            decide_mfa(None, Some(now + 2 * hour), admitted, now),
            Gate::MfaAdmitted { until: now + hour }
        );
        // ... or until an earlier expiry, without it (the kernel then holds as expired).
        assert_eq!(
            decide_mfa(None, Some(now + hour / 2), admitted, now),
            Gate::Admitted {
                until: Some(now + hour / 2)
            }
        );
        // Precedence: expired, then a rule's hold, then MFA.
        assert_eq!(
            decide_mfa(Some(window), Some(now), MfaGate::Pending, now),
            Gate::Held(DropReason::GateExpired)
        );
        assert_eq!(
            decide_mfa(Some(window), None, MfaGate::Pending, now),
            Gate::Held(window)
        );
        assert_eq!(
            decide_mfa(Some(window), None, admitted, now),
            Gate::Held(window)
        );
        // The policy writes and lifts its MFA holds; an MFA admission is rewritten when its
        // deadline moves, not when it reads back within the slack.
        let until = |t| Gate::MfaAdmitted { until: t };
        assert_eq!(
            gate_write(mfa, until(now + hour), false),
            Some(until(now + hour))
        );
        assert_eq!(
            gate_write(until(now + hour), until(now + hour + DEADLINE_SLACK), false),
            None
        );
        assert_eq!(gate_write(until(now + hour), mfa, false), Some(mfa));
        assert_eq!(
            gate_write(
                until(now + hour),
                Gate::Admitted {
                    until: Some(now + hour)
                },
                false
            ),
            Some(Gate::Admitted {
                until: Some(now + hour)
            })
        );
        // A kick still outlives an MFA decision until the next handshake.
        let kicked = Gate::Held(DropReason::GateKicked);
        assert_eq!(gate_write(kicked, mfa, false), None);
        assert_eq!(gate_write(kicked, mfa, true), Some(mfa));
    }
}
