//! The MFA verification endpoint's view of the service: what the page on the tunnel address
//! ([`VerificationPort`]) and the one-time-code channels ([`CodeSender`]) need, as small traits.
//!
//! The page knows a device by its tunnel source address (no login form): every call takes the
//! source address of the request. `service::mfa` implements [`VerificationPort`]; the daemon's
//! page server calls it. [`CodeSender`] is what `service::mfa` needs to send a one-time code by
//! e-mail or SMS; its implementation (SMTP with STARTTLS, an SMS gateway webhook) lives beside
//! the page server.

use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use super::ServiceError;

/// A channel a one-time code can be sent over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CodeChannel {
    /// E-mail (SMTP with STARTTLS).
    Email,
    /// SMS (a webhook to an SMS gateway).
    Sms,
}

/// Where a device stands, as its page shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PageStatus {
    /// Held as `mfa-pending`: a code admits it.
    Pending,
    /// The user's enrolment waits for its first code (which confirms it and admits the device).
    Enrolling,
    /// Admitted until then (the end of the MFA lifetime, or the session's end before it).
    Admitted {
        /// When the admission ends at the latest.
        until: SystemTime,
    },
    /// The device's user has no MFA: nothing to verify.
    NotRequired,
}

/// What the page shows the device at a source address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PageView {
    /// The user's name.
    pub user: String,
    /// The device's name.
    pub device: String,
    /// Where the device stands.
    pub status: PageStatus,
    /// The channels a code can be sent over, each with its masked destination
    /// (`a***@example.org`, `+49******12`).
    pub channels: Vec<(CodeChannel, String)>,
    /// While failed codes lock the device or the user: how long until a code is taken again.
    pub retry_after: Option<Duration>,
    /// While [`PageStatus::Enrolling`] and the enrolment is self-service (the user is required
    /// to enrol and has no secret yet, `mfa require-all`): the `otpauth://` URI the page shows
    /// (as text and a QR code) to this device only, until the first code confirms it.
    pub enrol_uri: Option<String>,
}

/// How a code was accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// A TOTP code (RFC 6238).
    Totp,
    /// One of the user's single-use backup codes.
    Backup,
    /// A one-time code sent by e-mail.
    Email,
    /// A one-time code sent by SMS.
    Sms,
}

/// A code that was accepted: the device is admitted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The user's name.
    pub user: String,
    /// The device's name.
    pub device: String,
    /// The admission ends at the latest then (the MFA lifetime; the session's end ends it
    /// earlier).
    pub until: SystemTime,
    /// How the code was accepted.
    pub method: Method,
    /// This code confirmed the user's enrolment (MFA is on from now).
    pub confirmed_enrolment: bool,
    /// Backup codes left, when a backup code was used.
    pub backup_codes_left: Option<u32>,
}

/// Why the page refused a request.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// The source address is no device's tunnel address.
    #[error("this address is no device of this server")]
    NotADevice,
    /// The device's user has no MFA (nothing to verify).
    #[error("multi-factor authentication is not on for this user")]
    NotRequired,
    /// The code is wrong, used already or expired.
    #[error("code: wrong, already used or expired")]
    WrongCode {
        /// Attempts left before the lock.
        attempts_left: u32,
    },
    /// Too many failed codes: locked for this long.
    #[error("too many wrong codes: try again in {}s", retry_after.as_secs().max(1))]
    Locked {
        /// When a code is taken again.
        retry_after: Duration,
    },
    /// A code was sent to the user within the last minute: the next one after this.
    #[error("send: a code was sent a moment ago; wait {}s before asking again", retry_after.as_secs().max(1))]
    SendTooSoon {
        /// When the next code can be sent.
        retry_after: Duration,
    },
    /// The channel is not configured for the user or the agent.
    #[error("channel: not available for this user")]
    NoChannel,
    /// The channel failed to take the code (the SMTP server, the SMS gateway): why, never
    /// the code.
    #[error("send: the code could not be sent ({0})")]
    SendFailed(String),
    /// Anything else.
    #[error(transparent)]
    Service(#[from] ServiceError),
}

/// What the verification page needs from the service (implemented by `service::mfa`).
pub trait VerificationPort: Send + Sync {
    /// The device whose tunnel address is `src`, and where it stands.
    fn view(&self, src: IpAddr) -> Result<PageView, VerifyError>;
    /// Checks `code` (TOTP, backup or a sent one-time code) for the device at `src`; a good code
    /// admits the device (the kernel gate is opened before this returns).
    fn verify(&self, src: IpAddr, code: &str) -> Result<Verified, VerifyError>;
    /// Sends a one-time code over `channel` to the user of the device at `src`; answers the
    /// masked destination.
    fn send_code(&self, src: IpAddr, channel: CodeChannel) -> Result<String, VerifyError>;
}

/// Sends a one-time code (implemented beside the page server: SMTP with STARTTLS, an SMS
/// gateway webhook). Called off the async runtime's threads; may block for the send's timeout.
pub trait CodeSender: Send + Sync + std::fmt::Debug {
    /// The channels this agent is configured for.
    fn channels(&self) -> Vec<CodeChannel>;
    /// Sends `code` for `user` over `channel` to `to` (an e-mail address or a phone number).
    fn send(&self, channel: CodeChannel, to: &str, user: &str, code: &str) -> Result<(), String>;
}
