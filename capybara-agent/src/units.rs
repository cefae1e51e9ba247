//! Validated quantities, parsed once at the edge (CLI, API, policy files).
//!
//! [`Rate`] is a bandwidth in bits per second within what the shaper supports (1 Mbit/s to
//! 10 Gbit/s). The text form is a number with an SI unit of bits per second: `10Mbps`,
//! `500kbit`, `50mbit`, `2.5Gbps`, `50Mbit/s`, `50M` (`k`/`m`/`g` in either case = 10³/10⁶/10⁹;
//! `bps`, `bit`, `bit/s`, `b/s` = bits); a bare number is bits per second. An upper-case `B`
//! (bytes: `50MBps`, `50MB/s`) is refused rather than guessed at: whether it means bytes or a
//! typo for bits, a factor of eight is too much to get wrong silently.

use std::{fmt, str::FromStr};

/// Why a rate is invalid. Every variant carries the input or the value as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Not a number followed by an optional `k`/`m`/`g` and an optional `bps`, `bit`, `bit/s`,
    /// `b/s` (bits; an upper-case `B` is refused).
    #[error(
        "invalid rate {input:?}: expected a number of bits per second with an optional unit, \
         e.g. 10Mbps, 50mbit, 2.5Gbps, 800kbit (bytes per second are not accepted)"
    )]
    Syntax {
        /// The input as given.
        input: String,
    },
    /// Outside `MIN..=MAX`.
    #[error(
        "rate {bits_per_sec} bit/s is out of range ({} to {})",
        Rate::MIN,
        Rate::MAX
    )]
    OutOfRange {
        /// The rate asked for.
        bits_per_sec: u64,
    },
}

/// A bandwidth in bits per second, `Rate::MIN..=Rate::MAX`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(u64);

impl Rate {
    /// 1 Mbit/s.
    pub const MIN: Rate = Rate(1_000_000);
    /// 10 Gbit/s.
    pub const MAX: Rate = Rate(10_000_000_000);

    /// `bits_per_sec`, if within range.
    pub fn from_bits_per_sec(bits_per_sec: u64) -> Result<Rate, RateError> {
        if (Self::MIN.0..=Self::MAX.0).contains(&bits_per_sec) {
            Ok(Rate(bits_per_sec))
        } else {
            Err(RateError::OutOfRange { bits_per_sec })
        }
    }

    /// `mbit` Mbit/s (tests and constants).
    pub fn mbit(mbit: u64) -> Result<Rate, RateError> {
        Self::from_bits_per_sec(mbit.saturating_mul(1_000_000))
    }

    /// Bits per second.
    pub fn bits_per_sec(self) -> u64 {
        self.0
    }

    /// Bytes per second (rounded down).
    pub fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (div, unit) = match self.0 {
            r if r % 1_000_000_000 == 0 => (1_000_000_000, "gbit"),
            r if r % 1_000_000 == 0 => (1_000_000, "mbit"),
            r if r % 1_000 == 0 => (1_000, "kbit"),
            _ => (1, "bit"),
        };
        write!(f, "{}{unit}", self.0 / div)
    }
}

impl FromStr for Rate {
    type Err = RateError;

    fn from_str(input: &str) -> Result<Rate, RateError> {
        let syntax = || RateError::Syntax {
            input: input.to_owned(),
        };
        if input.contains('B') {
            return Err(syntax());
        }
        let s = input.trim().to_ascii_lowercase();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let unit = ["bit/s", "b/s", "bps", "bit"]
            .iter()
            .find_map(|suffix| unit.strip_suffix(suffix))
            .unwrap_or(unit);
        let scale: u64 = match unit {
            "" => 1,
            "k" => 1_000,
            "m" => 1_000_000,
            "g" => 1_000_000_000,
            _ => return Err(syntax()),
        };
        // Integer and fraction parts separately, so "2.5g" is exact.
        let (int, frac) = num.split_once('.').unwrap_or((num, ""));
        if int.is_empty() && frac.is_empty() || frac.len() > 9 {
            return Err(syntax());
        }
        let int: u64 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| syntax())?
        };
        let frac_scaled = if frac.is_empty() {
            0
        } else {
            let digits: u64 = frac.parse().map_err(|_| syntax())?;
            let denom = 10u64.pow(frac.len() as u32);
            digits.saturating_mul(scale) / denom
        };
        let bits = int.saturating_mul(scale).saturating_add(frac_scaled);
        Rate::from_bits_per_sec(bits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_fractions() {
        for (s, bits) in [
            ("50mbit", 50_000_000),
            ("50Mbit/s", 50_000_000),
            ("50M", 50_000_000),
            ("10Mbps", 10_000_000),
            ("2.5Gbps", 2_500_000_000),
            ("1500kbps", 1_500_000),
            ("2.5gbit", 2_500_000_000),
            ("1500kbit", 1_500_000),
            ("10g", 10_000_000_000),
            ("1000000", 1_000_000),
            (" 5 mbit", 5_000_000),
        ] {
            let s = s.replace(' ', "");
            assert_eq!(s.parse::<Rate>().map(Rate::bits_per_sec), Ok(bits), "{s}");
        }
    }

    #[test]
    fn rejects_bytes_garbage_and_out_of_range() {
        for s in [
            "",
            "mbit",
            "50MBps",
            "5 0m",
            "1.2.3m",
            "-5m",
            "50tbit",
            "1.0000000001g",
        ] {
            assert!(
                matches!(s.parse::<Rate>(), Err(RateError::Syntax { .. })),
                "{s:?} should be a syntax error"
            );
        }
        assert_eq!(
            "999kbit".parse::<Rate>(),
            Err(RateError::OutOfRange {
                bits_per_sec: 999_000
            })
        );
        assert_eq!(
            "10.001gbit".parse::<Rate>(),
            Err(RateError::OutOfRange {
                bits_per_sec: 10_001_000_000
            })
        );
        assert!(Rate::mbit(0).is_err());
    }

    #[test]
    fn displays_in_the_largest_exact_unit() {
        assert_eq!(Rate::mbit(50).unwrap().to_string(), "50mbit");
        assert_eq!("2.5g".parse::<Rate>().unwrap().to_string(), "2500mbit");
        assert_eq!("1500k".parse::<Rate>().unwrap().to_string(), "1500kbit");
        assert_eq!(Rate::MAX.to_string(), "10gbit");
    }
}
