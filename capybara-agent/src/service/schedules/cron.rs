//! [`CronSchedule`]: a five-field cron expression in a time zone, parsed once at the edge.
//!
//! The expression is croner's (a maintained crate; the `cron` crate wants a seconds field and
//! counts Sunday as 1): exactly five fields, `minute hour day-of-month month day-of-week`, with
//! numbers, names (`JAN`–`DEC`, `SUN`–`SAT`, any case), lists (`1,15`), ranges (`MON-FRI`),
//! steps (`*/15`, `0-30/10`), `L` (last day of the month; last weekday of the month as `5L`),
//! `W` (nearest weekday) and `#` (`MON#1`, the first Monday). Day of month and day of week
//! combine as in Vixie cron: either may match. Sunday is 0 or 7. A sixth field (seconds, or a
//! year) is refused naming `cron`, as is any other count, an `@nickname` or a field out of
//! range; an unknown zone is refused naming `tz` (IANA names, `chrono-tz`; default `UTC`).
//!
//! ## Daylight-saving rule
//! Times are wall-clock times in the task's zone. Around a change of the clock:
//! - **Spring (a wall-clock time that does not exist)**: a *fixed-time* task (one minute and one
//!   hour, e.g. `30 2 * * *`) whose time falls in the gap runs once, at the first instant after
//!   the gap (Europe/Berlin on 2026-03-29: at 03:00 CEST, 01:00 UTC); an *interval* task (a
//!   step, a range, a list or `*` in the minute or hour, e.g. `*/15 * * * *`, `30 * * * *`) has
//!   no run at the wall-clock times that do not exist.
//! - **Autumn (a wall-clock time that exists twice)**: a fixed-time task runs once, at the first
//!   of the two (Europe/Berlin on 2026-10-25: at 02:30 CEST, 00:30 UTC, not again at 02:30
//!   CET); an interval task runs at both, as its interval is about elapsed time.
//!
//! This is croner's own rule (the Open Cron Pattern Specification's); it is what we want: a daily
//! job neither vanishes on the spring day nor runs twice on the autumn one. The tests below hold
//! croner to it, so an upgrade that changed it would fail here.

use std::str::FromStr as _;

use chrono::{DateTime, TimeZone as _, Utc};
use chrono_tz::Tz;
use croner::{
    Cron,
    parser::{CronParser, Seconds, Year},
};

use crate::service::domain::ValidationError;

/// The zone a task runs in when none is given.
pub const DEFAULT_TZ: &str = "UTC";

/// A validated cron expression and the time zone it is read in.
#[derive(Clone, Debug)]
pub struct CronSchedule {
    expr: String,
    tz: Tz,
    cron: Cron,
}

impl PartialEq for CronSchedule {
    fn eq(&self, other: &CronSchedule) -> bool {
        self.expr == other.expr && self.tz == other.tz
    }
}

impl CronSchedule {
    /// Parses `expr` (field `cron`) in the zone `tz` (field `tz`; empty: [`DEFAULT_TZ`]).
    pub fn parse(expr: &str, tz: &str) -> Result<CronSchedule, ValidationError> {
        let bad = |reason: String| ValidationError::Value {
            field: "cron",
            reason,
        };
        let expr = expr.trim();
        let fields = expr.split_whitespace().count();
        if fields == 6 {
            return Err(bad(format!(
                "{expr:?} has six fields: seconds (or a year) are not supported; give five \
                 (minute hour day-of-month month day-of-week), e.g. \"0 2 * * *\""
            )));
        }
        if fields != 5 || expr.contains('@') {
            return Err(bad(format!(
                "{expr:?}: expected five fields (minute hour day-of-month month day-of-week), \
                 e.g. \"0 2 * * *\" or \"0 9 * * MON\""
            )));
        }
        let parser = CronParser::builder()
            .seconds(Seconds::Disallowed)
            .year(Year::Disallowed)
            .build();
        let cron = parser
            .parse(expr)
            .map_err(|e| bad(format!("{expr:?}: {e}")))?;
        let tz_name = if tz.trim().is_empty() {
            DEFAULT_TZ
        } else {
            tz.trim()
        };
        let tz = Tz::from_str(tz_name).map_err(|_| ValidationError::Value {
            field: "tz",
            reason: format!(
                "unknown time zone {tz_name:?} (expected an IANA name such as Europe/Berlin or UTC)"
            ),
        })?;
        let s = CronSchedule {
            expr: expr.split_whitespace().collect::<Vec<_>>().join(" "),
            tz,
            cron,
        };
        // An expression that never matches (`0 0 30 FEB *`) is refused now, not at its first run.
        if s.next_after(0).is_none() && s.next_after(crate::service::core::now() as i64).is_none() {
            return Err(bad(format!("{expr:?} never matches a date")));
        }
        Ok(s)
    }

    /// The expression, its fields separated by one space.
    pub fn expr(&self) -> &str {
        &self.expr
    }

    /// The zone's IANA name.
    pub fn tz(&self) -> &str {
        self.tz.name()
    }

    /// The first time the task is due strictly after `after` (Unix seconds), under the
    /// daylight-saving rule of the module docs; `None` if there is none (within croner's search
    /// limit, or past what a date can hold).
    pub fn next_after(&self, after: i64) -> Option<i64> {
        let start: DateTime<Tz> = Utc
            .timestamp_opt(after, 0)
            .single()?
            .with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&start, false)
            .ok()
            .map(|t| t.timestamp())
    }
}

impl CronSchedule {
    /// The last time the task was due at or before `at` (Unix seconds), under the same rule.
    pub fn latest_at_or_before(&self, at: i64) -> Option<i64> {
        let start: DateTime<Tz> = Utc.timestamp_opt(at, 0).single()?.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&start, true)
            .ok()
            .map(|t| t.timestamp())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    fn utc(t: i64) -> String {
        Utc.timestamp_opt(t, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    }

    /// The first `n` runs after `from`.
    fn runs(s: &CronSchedule, from: &str, n: usize) -> Vec<String> {
        let mut t = at(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap();
                utc(t)
            })
            .collect()
    }

    #[test]
    fn five_fields_with_names_ranges_steps_l_and_hash() {
        let s = CronSchedule::parse("0 9 * * MON", "").unwrap();
        assert_eq!(s.tz(), "UTC");
        // 2026-12-07 is a Monday.
        assert_eq!(
            runs(&s, "2026-12-07T09:00:00Z", 2),
            ["2026-12-14T09:00:00Z", "2026-12-21T09:00:00Z"]
        );
        let s = CronSchedule::parse("*/15 * * * *", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2026-12-07T10:07:00Z", 3),
            [
                "2026-12-07T10:15:00Z",
                "2026-12-07T10:30:00Z",
                "2026-12-07T10:45:00Z"
            ]
        );
        let s = CronSchedule::parse("0 0 1 * *", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2026-12-07T00:00:00Z", 1),
            ["2027-01-01T00:00:00Z"]
        );
        let s = CronSchedule::parse("0 8 * jan-mar mon-fri", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2026-12-07T00:00:00Z", 1),
            ["2027-01-01T08:00:00Z"]
        );
        let s = CronSchedule::parse("0 0 L * *", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2027-02-01T00:00:00Z", 1),
            ["2027-02-28T00:00:00Z"]
        );
        let s = CronSchedule::parse("0 0 * * MON#1", "UTC").unwrap();
        assert_eq!(
            runs(&s, "2026-12-07T00:00:00Z", 1),
            ["2027-01-04T00:00:00Z"]
        );
        // Sunday is 0 and 7.
        let a = CronSchedule::parse("0 0 * * 0", "UTC").unwrap();
        let b = CronSchedule::parse("0 0 * * 7", "UTC").unwrap();
        assert_eq!(
            runs(&a, "2026-12-07T00:00:00Z", 2),
            runs(&b, "2026-12-07T00:00:00Z", 2)
        );
        assert_eq!(
            runs(&a, "2026-12-07T00:00:00Z", 1),
            ["2026-12-13T00:00:00Z"]
        );
    }

    #[test]
    fn bad_expressions_and_zones_name_their_field() {
        for bad in [
            "0 0 2 * * *",
            "0 2 * *",
            "",
            "@daily",
            "61 * * * *",
            "0 24 * * *",
            "* * * FOO *",
            "0 0 30 2 *",
            "*/0 * * * *",
        ] {
            let e = CronSchedule::parse(bad, "UTC").unwrap_err();
            assert!(e.to_string().starts_with("cron: "), "{bad:?}: {e}");
        }
        let e = CronSchedule::parse("0 0 2 * * *", "UTC").unwrap_err();
        assert!(e.to_string().contains("six fields"), "{e}");
        let e = CronSchedule::parse("0 2 * * *", "Mars/Olympus").unwrap_err();
        assert!(e.to_string().starts_with("tz: unknown time zone"), "{e}");
    }

    #[test]
    fn daylight_saving_fixed_time_runs_once_each_day() {
        let s = CronSchedule::parse("30 2 * * *", "Europe/Berlin").unwrap();
        // Spring: 02:30 does not exist on 2026-03-29; it runs at 03:00 CEST (01:00 UTC).
        assert_eq!(
            runs(&s, "2026-03-27T12:00:00Z", 4),
            [
                "2026-03-28T01:30:00Z", // 02:30 CET
                "2026-03-29T01:00:00Z", // 03:00 CEST, the first instant after the gap
                "2026-03-30T00:30:00Z", // 02:30 CEST
                "2026-03-31T00:30:00Z",
            ]
        );
        // Autumn: 02:30 exists twice on 2026-10-25; it runs at the first (CEST) only.
        assert_eq!(
            runs(&s, "2026-10-23T12:00:00Z", 4),
            [
                "2026-10-24T00:30:00Z", // 02:30 CEST
                "2026-10-25T00:30:00Z", // 02:30 CEST, not again at 02:30 CET (01:30 UTC)
                "2026-10-26T01:30:00Z", // 02:30 CET
                "2026-10-27T01:30:00Z",
            ]
        );
    }

    #[test]
    fn daylight_saving_interval_tasks_follow_elapsed_time() {
        let s = CronSchedule::parse("30 * * * *", "Europe/Berlin").unwrap();
        // Spring: no 02:30 wall-clock time, so 01:30 CET is followed by 03:30 CEST.
        assert_eq!(
            runs(&s, "2026-03-29T00:00:00Z", 2),
            ["2026-03-29T00:30:00Z", "2026-03-29T01:30:00Z"]
        );
        // Autumn: 02:30 CEST and 02:30 CET both run.
        assert_eq!(
            runs(&s, "2026-10-24T23:45:00Z", 3),
            [
                "2026-10-25T00:30:00Z",
                "2026-10-25T01:30:00Z",
                "2026-10-25T02:30:00Z"
            ]
        );
    }
}
