//! [`CountryCode`]: a validated ISO 3166-1 alpha-2 code.
//!
//! The table holds the 249 officially assigned codes (ISO 3166 Maintenance Agency, as of 2024)
//! plus one user-assigned code, `XK` (Kosovo), because MaxMind's GeoIP2/GeoLite2 databases
//! use it for real networks and a database we cannot load is worse than one extra code, and one
//! transitionally reserved code, `AN` (Netherlands Antilles, dissolved in 2010), because the
//! RIR whois data behind ip-location-db's `geo-whois-asn-country` database (the one
//! `cargo xtask setup` installs) still places a network there.
//! Reserved and user-assigned codes (`XX`, `ZZ`, `EU`, `AP`, the legacy GeoIP `A1`/`A2`, …)
//! are rejected.

use std::fmt;
use std::str::FromStr;

/// Every accepted code, sorted (binary-searched by [`CountryCode::parse`]).
const CODES: [&str; 251] = [
    "AD", "AE", "AF", "AG", "AI", "AL", "AM", "AN", "AO", "AQ", "AR", "AS", "AT", "AU", "AW", "AX",
    "AZ", "BA", "BB", "BD", "BE", "BF", "BG", "BH", "BI", "BJ", "BL", "BM", "BN", "BO", "BQ", "BR",
    "BS", "BT", "BV", "BW", "BY", "BZ", "CA", "CC", "CD", "CF", "CG", "CH", "CI", "CK", "CL", "CM",
    "CN", "CO", "CR", "CU", "CV", "CW", "CX", "CY", "CZ", "DE", "DJ", "DK", "DM", "DO", "DZ", "EC",
    "EE", "EG", "EH", "ER", "ES", "ET", "FI", "FJ", "FK", "FM", "FO", "FR", "GA", "GB", "GD", "GE",
    "GF", "GG", "GH", "GI", "GL", "GM", "GN", "GP", "GQ", "GR", "GS", "GT", "GU", "GW", "GY", "HK",
    "HM", "HN", "HR", "HT", "HU", "ID", "IE", "IL", "IM", "IN", "IO", "IQ", "IR", "IS", "IT", "JE",
    "JM", "JO", "JP", "KE", "KG", "KH", "KI", "KM", "KN", "KP", "KR", "KW", "KY", "KZ", "LA", "LB",
    "LC", "LI", "LK", "LR", "LS", "LT", "LU", "LV", "LY", "MA", "MC", "MD", "ME", "MF", "MG", "MH",
    "MK", "ML", "MM", "MN", "MO", "MP", "MQ", "MR", "MS", "MT", "MU", "MV", "MW", "MX", "MY", "MZ",
    "NA", "NC", "NE", "NF", "NG", "NI", "NL", "NO", "NP", "NR", "NU", "NZ", "OM", "PA", "PE", "PF",
    "PG", "PH", "PK", "PL", "PM", "PN", "PR", "PS", "PT", "PW", "PY", "QA", "RE", "RO", "RS", "RU",
    "RW", "SA", "SB", "SC", "SD", "SE", "SG", "SH", "SI", "SJ", "SK", "SL", "SM", "SN", "SO", "SR",
    "SS", "ST", "SV", "SX", "SY", "SZ", "TC", "TD", "TF", "TG", "TH", "TJ", "TK", "TL", "TM", "TN",
    "TO", "TR", "TT", "TV", "TW", "TZ", "UA", "UG", "UM", "US", "UY", "UZ", "VA", "VC", "VE", "VG",
    "VI", "VN", "VU", "WF", "WS", "XK", "YE", "YT", "ZA", "ZM", "ZW",
];

/// A country code that is not in the table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown country code {input:?}: expected an ISO 3166-1 alpha-2 code such as \"US\"")]
pub struct CountryCodeError {
    /// The rejected input, as given.
    pub input: String,
}

/// An ISO 3166-1 alpha-2 country code, stored upper case (`CN`, `US`, …).
///
/// Ordered alphabetically, so maps keyed by it list countries in the order people expect.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct CountryCode([u8; 2]);

impl CountryCode {
    /// Parses a code case-insensitively (`"cn"`, `"Cn"` and `"CN"` are the same code).
    pub fn parse(input: &str) -> Result<Self, CountryCodeError> {
        let err = || CountryCodeError {
            input: input.to_owned(),
        };
        let &[a, b] = input.as_bytes() else {
            return Err(err());
        };
        let code = [a.to_ascii_uppercase(), b.to_ascii_uppercase()];
        CODES
            .binary_search_by(|c| c.as_bytes().cmp(&code[..]))
            .map(|_| Self(code))
            .map_err(|_| err())
    }

    /// The code as an upper-case `&str`.
    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("codes are ASCII letters from the table")
    }

    /// Every accepted code, in alphabetical order.
    pub fn all() -> impl Iterator<Item = CountryCode> {
        CODES.iter().map(|c| {
            let b = c.as_bytes();
            Self([b[0], b[1]])
        })
    }
}

impl FromStr for CountryCode {
    type Err = CountryCodeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for CountryCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CountryCode({})", self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_sorted_unique_upper_case() {
        assert!(CODES.windows(2).all(|w| w[0] < w[1]));
        assert!(
            CODES
                .iter()
                .all(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_uppercase()))
        );
        // 249 assigned codes + XK + AN.
        assert_eq!(CountryCode::all().count(), 251);
    }

    #[test]
    fn parse_is_case_insensitive_and_stores_upper_case() {
        for s in ["cn", "Cn", "cN", "CN"] {
            let c = CountryCode::parse(s).unwrap();
            assert_eq!(c.as_str(), "CN");
            assert_eq!(c.to_string(), "CN");
        }
        assert_eq!("gb".parse::<CountryCode>().unwrap().as_str(), "GB");
        assert_eq!(CountryCode::parse("xk").unwrap().as_str(), "XK");
        assert_eq!(CountryCode::parse("an").unwrap().as_str(), "AN");
    }

    #[test]
    fn unknown_codes_are_rejected_naming_the_input() {
        for s in [
            "XX", "ZZ", "C1", "A1", "EU", "", "C", "USA", "é", "c\u{e9}", " US",
        ] {
            let err = CountryCode::parse(s).unwrap_err();
            assert_eq!(err.input, s);
            assert!(err.to_string().contains(&format!("{s:?}")), "{err}");
        }
    }

    #[test]
    fn ordering_is_alphabetical() {
        let mut v = [
            CountryCode::parse("US").unwrap(),
            CountryCode::parse("CN").unwrap(),
            CountryCode::parse("AD").unwrap(),
        ];
        v.sort();
        let s: Vec<_> = v.iter().map(CountryCode::as_str).collect();
        assert_eq!(s, ["AD", "CN", "US"]);
    }
}
