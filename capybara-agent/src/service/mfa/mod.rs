//! Multi-factor authentication: enrolment (`mfa enable|confirm|disable|reset|status|
//! require-all`), the codes (TOTP, backup codes, one-time codes by e-mail or SMS) and the
//! verification page's view of the service ([`VerificationPort`], implemented by [`Mfa`]).
//!
//! - [`totp`]: RFC 6238 (HMAC-SHA-1, 6 digits, 30 s, ±1 step; a step is used once).
//! - [`codes`]: backup codes (argon2id, parameters there) and one-time codes.
//! - [`limits`]: failed codes per device and per user, and the lock.
//!
//! ## Enrolment
//! `mfa enable alice [--email A] [--sms N]` makes a 20-byte random secret and ten backup codes
//! and answers them once (the `otpauth://totp/Capybara:alice?…` URI, the codes); the user's
//! record is `pending`: MFA is **not on** until a valid TOTP code confirms it
//! (`mfa confirm alice CODE`, or the first good code on the page while the page shows
//! `Enrolling`). `mfa reset` makes a new secret and new codes (the old ones void, and the
//! sessions they admitted end) and puts the user back to `pending`; a user that was enrolled
//! stays **held** while pending after a reset (the page takes the first code of the new
//! secret), so a reset never opens the gate.
//! `mfa disable` deletes the record. `mfa require-all` makes every user need MFA: a user with
//! no enrolment is held as `mfa-pending`, and its device's page offers a **self-service
//! enrolment**: the first device of the user that opens the page gets a new secret (its URI on
//! the page, to that device only: trust on first use, by the device's WireGuard key, which only
//! the device has), and its first good code confirms it. A self-service enrolment has no backup
//! codes (the page shows none); `mfa reset` gives the user a set.
//!
//! ## Enforcement
//! Which users need an admission and which devices' sessions are admitted is kept in the
//! policy's runtime state (`Policy::set_mfa`, `Policy::mfa_admit`): the gate is decided in one
//! place (`policy::engine::decide_mfa`, its precedence there). A good code admits the device
//! until its session ends (disconnect, kick) or the MFA lifetime (`--mfa-lifetime`, default
//! [`DEFAULT_LIFETIME`]) passes; the kernel holds it again by itself at the deadline.
//!
//! ## Secrets at rest
//! The TOTP secret is sealed (ChaCha20-Poly1305, `secrets::Sealer`) under the key in
//! `<data dir>/mfa.key` (`paths::mfa_key_file`, mode 0600, the rules of every secret file), with
//! `mfa:<user>` as associated data: a sealed secret copied to another user's record does not
//! open. A backup carries the sealed records, not the key: restored beside another key, the
//! secrets do not open; such a user stays held (fail closed), `mfa status` and the page say why,
//! and `mfa reset` (or the old key file put back) is the way out; nothing is rewritten. Backup
//! codes are kept as argon2id hashes, one-time codes in memory as keyed hashes. Records live in
//! the `policy` family (`mfa/user/<name>`, `mfa/settings`), so backups carry them. A record
//! names the user's creation time: a record left by a removed user of the same name is ignored.
//! Neither secrets nor codes are ever logged or audited (`Debug` redacts them).
//!
//! ## Failed codes
//! Limited per device and per user ([`limits`]: 5 in 5 min per device, 10 in 15 min per user,
//! then locked for `--mfa-lock`, default 15 min). The lock that starts raises
//! `suspicious-activity` (`data.kind = "mfa-failures"`, the user, the device, its source
//! address), once per lock. Failures are logged (user, device, attempts left), not recorded as
//! auth attempts in the history: those are the tunnel's failed handshakes, counted per source
//! prefix and handshake reason, which a wrong code is not.
//!
//! ## One-time codes
//! [`VerificationPort::send_code`] makes a 6-digit code valid 10 min (one live code per user and
//! channel: a new one replaces it; at most one sent per user per 60 s) and hands it to the
//! [`CodeSender`] the daemon set ([`Mfa::set_sender`]); none, or a channel it does not serve, or
//! a user without that contact is `NoChannel`. A send that fails voids the code (logged) and is
//! answered `SendFailed` with the channel's reason (the page shows it; never the code).

pub mod codes;
pub mod limits;
#[cfg(test)]
mod tests;
pub mod totp;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::Path,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::{
    ServiceError,
    core::Core,
    directory::Directory,
    domain::{Actor, Peer, Protocol, PublicKey, User, UserName, ValidationError, unix_secs},
    error::not_found,
    notify::{Notification, NotifyKind},
    policy::Policy,
    secrets::{Sealer, SecretError},
    verification::{
        CodeChannel, CodeSender, Method, PageStatus, PageView, VerificationPort, Verified,
        VerifyError,
    },
};
use crate::{
    fsutil::{self, SecretKind},
    paths,
    store::{Batch, Cf, keys},
};

/// How long a good code admits a device by default (`--mfa-lifetime`).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// The verification page's TCP port by default (`--mfa-port`).
pub const DEFAULT_PORT: u16 = 80;

/// The MFA sealing key file, as its errors describe it.
const MFA_KEY: SecretKind = SecretKind {
    holds: "a 32-byte key in base64",
    if_removed: "a new key cannot open the MFA secrets sealed so far: every user with MFA must \
                 be reset (capybara mfa reset USER)",
};

/// The running agent's MFA settings (`--mfa-lifetime`, `--mfa-lock`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MfaConfig {
    /// How long a good code admits a device (its session's end ends it earlier).
    pub lifetime: Duration,
    /// How long too many failed codes lock a device or a user.
    pub lock: Duration,
}

impl Default for MfaConfig {
    fn default() -> MfaConfig {
        MfaConfig {
            lifetime: DEFAULT_LIFETIME,
            lock: limits::DEFAULT_LOCK,
        }
    }
}

/// Where a user's enrolment stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnrolState {
    /// Started (or reset): waits for its first good TOTP code.
    Pending,
    /// Confirmed: MFA is on.
    Enrolled,
}

impl EnrolState {
    /// `pending` or `enrolled`.
    pub const fn name(self) -> &'static str {
        match self {
            EnrolState::Pending => "pending",
            EnrolState::Enrolled => "enrolled",
        }
    }
}

/// A user's MFA record (`policy` family, `mfa/user/<name>`).
#[derive(Clone, Serialize, Deserialize)]
struct MfaRecord {
    user: UserName,
    /// The user's creation time: a record of a removed user of the same name is ignored.
    user_created: u64,
    state: EnrolState,
    /// Held while pending (a reset of an enrolled user).
    required: bool,
    /// The TOTP secret, sealed for `mfa:<user>`.
    secret: String,
    /// The last time step a TOTP code was taken for.
    last_step: Option<u64>,
    /// The backup codes' salt (hex) and the hashes of the unused ones.
    backup_salt: String,
    backup: Vec<String>,
    email: Option<String>,
    sms: Option<String>,
    created_at: u64,
    enrolled_at: Option<u64>,
    last_verified: Option<u64>,
    /// A self-service enrolment: the device that may see its URI (trust on first use).
    self_service: Option<PublicKey>,
}

impl std::fmt::Debug for MfaRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MfaRecord")
            .field("user", &self.user)
            .field("state", &self.state)
            .field("required", &self.required)
            .field("backup_codes_left", &self.backup.len())
            .finish_non_exhaustive()
    }
}

/// `mfa/settings`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MfaSettings {
    require_all: bool,
}

/// An enrolment started or reset: shown once, never stored in clear.
#[derive(Clone, PartialEq, Eq)]
pub struct Enrolment {
    /// The user.
    pub user: String,
    /// `otpauth://totp/Capybara:<user>?secret=…`.
    pub uri: String,
    /// Ten single-use backup codes, `xxxxx-xxxxx`.
    pub backup_codes: Vec<String>,
}

impl std::fmt::Debug for Enrolment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolment")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// A device admitted by MFA, as `mfa status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmittedDevice {
    /// The device's name.
    pub device: String,
    /// Admitted until then (Unix seconds), or the session's end before it.
    pub until: u64,
}

/// One user's MFA, as `mfa status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MfaStatus {
    /// The user.
    pub user: String,
    /// `enrolled`, `pending`, or `none` (no enrolment, required by `mfa require-all`).
    pub state: String,
    /// Its devices are held until a code admits them.
    pub required: bool,
    /// Enrolment started (Unix seconds).
    pub created_at: Option<u64>,
    /// Enrolment confirmed (Unix seconds).
    pub enrolled_at: Option<u64>,
    /// The last good code (Unix seconds).
    pub last_verified: Option<u64>,
    /// Backup codes not used yet.
    pub backup_codes_left: u32,
    /// The e-mail address one-time codes go to, masked.
    pub email: Option<String>,
    /// The phone number one-time codes go to, masked.
    pub sms: Option<String>,
    /// Its devices admitted now and until when.
    pub devices: Vec<AdmittedDevice>,
    /// Why its secret cannot be used (it does not open with this agent's key file).
    pub error: Option<String>,
}

/// `mfa status`: the setting and the users with MFA.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MfaOverview {
    /// `mfa require-all` is on.
    pub require_all: bool,
    /// The users (by name).
    pub users: Vec<MfaStatus>,
}

/// What is known only while running: failures, locks, live one-time codes.
#[derive(Debug, Default)]
struct Live {
    limiter: limits::Limiter,
    /// Live one-time codes: (keyed hash, valid until).
    codes: HashMap<(UserName, CodeChannel), (String, SystemTime)>,
    /// When a code was last sent to the user.
    sent: HashMap<UserName, SystemTime>,
}

/// The MFA feature.
pub struct Mfa {
    core: Arc<Core>,
    dir: Arc<Directory>,
    policy: Arc<Policy>,
    sealer: Sealer,
    /// Keys the one-time codes' hashes (derived from the sealing key).
    otc_key: [u8; 32],
    key_path: std::path::PathBuf,
    cfg: RwLock<MfaConfig>,
    live: Mutex<Live>,
    sender: RwLock<Option<Arc<dyn CodeSender>>>,
}

impl std::fmt::Debug for Mfa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mfa")
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ServiceError {
    ValidationError::Value {
        field,
        reason: reason.into(),
    }
    .into()
}

fn aad(user: &UserName) -> String {
    format!("mfa:{user}")
}

/// Checks an e-mail address (one `@`, a dotted domain, no spaces, at most 254 bytes).
fn check_email(s: &str) -> Result<String, ServiceError> {
    let ok = s.len() <= 254
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        && s.split_once('@').is_some_and(|(l, d)| {
            !l.is_empty() && d.contains('.') && !d.contains('@') && !d.starts_with('.')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err(invalid(
            "email",
            format!("{s:?} is not an e-mail address (name@example.org)"),
        ))
    }
}

/// Checks a phone number: E.164, `+` and 8 to 15 digits.
fn check_sms(s: &str) -> Result<String, ServiceError> {
    let digits = s.strip_prefix('+').unwrap_or("");
    if (8..=15).contains(&digits.len()) && digits.bytes().all(|b| b.is_ascii_digit()) {
        Ok(s.to_owned())
    } else {
        Err(invalid(
            "sms",
            format!("{s:?} is not a phone number in E.164 form (+4915112345678)"),
        ))
    }
}

/// `a***@example.org`.
pub fn mask_email(s: &str) -> String {
    match s.split_once('@') {
        Some((l, d)) => format!("{}***@{d}", l.chars().next().unwrap_or('*')),
        None => "***".to_owned(),
    }
}

/// `+49******12`.
pub fn mask_phone(s: &str) -> String {
    let n = s.chars().count();
    s.chars()
        .enumerate()
        .map(|(i, c)| if i < 3 || i + 2 >= n { c } else { '*' })
        .collect()
}

impl Mfa {
    /// The feature over the shared core: opens (or makes) the sealing key under the data
    /// directory and tells the policy which users need an MFA admission.
    pub fn new(
        core: Arc<Core>,
        dir: Arc<Directory>,
        policy: Arc<Policy>,
    ) -> Result<Mfa, ServiceError> {
        let data = core.store.path().parent().unwrap_or(Path::new("."));
        let key_path = paths::mfa_key_file(data);
        let key =
            fsutil::load_or_create_secret(&key_path, MFA_KEY, super::domain::decode_key, || {
                let k: [u8; 32] = rand::random();
                (k, format!("{}\n", super::domain::encode_key(&k)))
            })
            .map_err(SecretError::from)?;
        let mut h = Sha256::new();
        h.update(b"capybara mfa one-time codes\0");
        h.update(key);
        let mfa = Mfa {
            core,
            dir,
            policy,
            sealer: Sealer::new(&key),
            otc_key: h.finalize().into(),
            key_path,
            cfg: RwLock::new(MfaConfig::default()),
            live: Mutex::new(Live::default()),
            sender: RwLock::new(None),
        };
        mfa.reload()?;
        Ok(mfa)
    }

    /// Reads who needs an MFA admission from the records (at start, and when a cluster's
    /// change replaced them: `service::cluster`).
    pub fn reload(&self) -> Result<(), ServiceError> {
        let settings = self.settings()?;
        let mut required = Vec::new();
        // One scan of the records (not a read per user): their users are checked in memory.
        for (_, rec) in self
            .core
            .store
            .scan::<MfaRecord>(Cf::Policy, keys::MFA_USERS)?
        {
            let own = match self.dir.user(&rec.user) {
                Ok(u) => u.created_at == rec.user_created,
                Err(ServiceError::NotFound { .. }) => false,
                Err(e) => return Err(e),
            };
            if !own {
                continue;
            }
            if rec.state == EnrolState::Enrolled || rec.required {
                required.push(rec.user.clone());
            }
            if let Err(e) = self.open_secret(&rec) {
                tracing::error!(user = %rec.user, error = %e, "MFA secret does not open; the user's devices stay held until `mfa reset`");
            }
        }
        self.policy.init_mfa(required, settings.require_all);
        Ok(())
    }

    /// Sets the lifetime and the lock (`--mfa-lifetime`, `--mfa-lock`; at start).
    pub fn configure(&self, cfg: MfaConfig) {
        *self.cfg.write().unwrap() = cfg;
        self.live.lock().unwrap().limiter.set_lock(cfg.lock);
    }

    /// The running settings.
    pub fn config(&self) -> MfaConfig {
        *self.cfg.read().unwrap()
    }

    /// Sets the one-time-code sender (the daemon's SMTP / SMS gateway implementation).
    pub fn set_sender(&self, sender: Arc<dyn CodeSender>) {
        *self.sender.write().unwrap() = Some(sender);
    }

    // ---- records ------------------------------------------------------------------------------

    fn settings(&self) -> Result<MfaSettings, ServiceError> {
        Ok(self
            .core
            .store
            .get(Cf::Policy, keys::MFA_SETTINGS)?
            .unwrap_or_default())
    }

    /// `user`'s record, if it has one of its own (not one of a removed user of the same name).
    fn record(&self, user: &User) -> Result<Option<MfaRecord>, ServiceError> {
        let rec: Option<MfaRecord> = self
            .core
            .store
            .get(Cf::Policy, &keys::mfa_user(user.name.as_str()))?;
        Ok(rec.filter(|r| r.user_created == user.created_at))
    }

    fn open_secret(&self, rec: &MfaRecord) -> Result<Vec<u8>, ServiceError> {
        self.sealer
            .open_bytes(&rec.secret, &aad(&rec.user))
            .map_err(|_| {
                invalid(
                    "secret",
                    format!(
                        "the MFA secret of {} does not open with {} (a backup restored beside \
                     another key file?): put back the key file it was sealed with, or run \
                     `capybara mfa reset {}`",
                        rec.user,
                        self.key_path.display(),
                        rec.user
                    ),
                )
            })
    }

    /// A new secret and backup codes for `user`, as a pending record (its contacts as given).
    fn new_record(
        &self,
        user: &User,
        email: Option<String>,
        sms: Option<String>,
        backup: bool,
    ) -> (MfaRecord, Enrolment) {
        let secret: [u8; totp::SECRET_LEN] = rand::random();
        let (codes, salt, hashes) = if backup {
            codes::new_backup_codes()
        } else {
            (Vec::new(), String::new(), Vec::new())
        };
        let rec = MfaRecord {
            user: user.name.clone(),
            user_created: user.created_at,
            state: EnrolState::Pending,
            required: false,
            secret: self.sealer.seal_bytes(&secret, &aad(&user.name)),
            last_step: None,
            backup_salt: salt,
            backup: hashes,
            email,
            sms,
            created_at: unix_secs(SystemTime::now()),
            enrolled_at: None,
            last_verified: None,
            self_service: None,
        };
        let enrolment = Enrolment {
            user: user.name.to_string(),
            uri: totp::uri(user.name.as_str(), &secret),
            backup_codes: codes,
        };
        (rec, enrolment)
    }

    /// Writes `rec` with an audit record (`action`, never a secret) and commits.
    fn commit_record(
        &self,
        actor: &Actor,
        action: &str,
        rec: Option<&MfaRecord>,
        user: &UserName,
        after: serde_json::Value,
    ) -> Result<(), ServiceError> {
        let mut batch = Batch::default();
        match rec {
            Some(r) => batch.put(Cf::Policy, &keys::mfa_user(user.as_str()), r)?,
            None => batch.delete(Cf::Policy, &keys::mfa_user(user.as_str())),
        }
        self.core.audit(
            &mut batch,
            actor,
            action,
            format!("user:{user}"),
            None,
            Some(after),
        )?;
        self.core.commit(batch)
    }

    // ---- admin calls --------------------------------------------------------------------------

    /// `mfa enable USER [--email] [--sms]`: starts an enrolment (pending); answers the URI and
    /// the backup codes, once.
    pub fn enable(
        &self,
        actor: &Actor,
        user: &UserName,
        email: Option<&str>,
        sms: Option<&str>,
    ) -> Result<Enrolment, ServiceError> {
        let email = email.map(check_email).transpose()?;
        let sms = sms.map(check_sms).transpose()?;
        let _w = self.core.writer.lock().unwrap();
        let u = self.dir.user(user)?;
        if let Some(r) = self.record(&u)? {
            return Err(invalid(
                "user",
                format!(
                    "{user} has an MFA enrolment already ({}): `mfa reset {user}` makes a new \
                     secret, `mfa disable {user}` removes it",
                    r.state.name()
                ),
            ));
        }
        let (rec, enrolment) = self.new_record(&u, email, sms, true);
        let after = serde_json::json!({
            "state": "pending",
            "email": rec.email.as_deref().map(mask_email),
            "sms": rec.sms.as_deref().map(mask_phone),
        });
        self.commit_record(actor, "mfa.enable", Some(&rec), user, after)?;
        tracing::info!(%actor, user = %user, "MFA enrolment started");
        Ok(enrolment)
    }

    /// `mfa confirm USER CODE`: a TOTP code of the pending secret turns MFA on.
    pub fn confirm(
        &self,
        actor: &Actor,
        user: &UserName,
        code: &str,
    ) -> Result<MfaStatus, ServiceError> {
        let code = codes::normalize(code);
        if code.len() != totp::DIGITS as usize || !code.bytes().all(|b| b.is_ascii_digit()) {
            return Err(invalid("code", "expected the 6 digits the app shows"));
        }
        let _w = self.core.writer.lock().unwrap();
        let u = self.dir.user(user)?;
        let mut rec = self
            .record(&u)?
            .ok_or_else(|| not_found("mfa enrolment", user))?;
        if rec.state == EnrolState::Enrolled {
            return Err(invalid(
                "user",
                format!("{user}'s MFA is confirmed already"),
            ));
        }
        let secret = self.open_secret(&rec)?;
        let now = unix_secs(SystemTime::now());
        let step = totp::check(&secret, &code, now, rec.last_step)
            .ok_or_else(|| invalid("code", "wrong or expired code (nothing changed)"))?;
        rec.last_step = Some(step);
        rec.state = EnrolState::Enrolled;
        rec.required = false;
        rec.enrolled_at = Some(now);
        rec.self_service = None;
        self.commit_record(
            actor,
            "mfa.confirm",
            Some(&rec),
            user,
            serde_json::json!({"state": "enrolled"}),
        )?;
        self.policy.set_mfa(user, true)?;
        tracing::info!(%actor, user = %user, "MFA enrolment confirmed");
        self.status_of(&u)
    }

    /// `mfa disable USER`: removes the enrolment (secret and codes); the user's devices are no
    /// longer held for MFA (unless `mfa require-all`).
    pub fn disable(&self, actor: &Actor, user: &UserName) -> Result<MfaStatus, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let u = self.dir.user(user)?;
        if self.record(&u)?.is_none() {
            return Err(not_found("mfa enrolment", user));
        }
        self.commit_record(
            actor,
            "mfa.disable",
            None,
            user,
            serde_json::json!({"state": "none"}),
        )?;
        self.policy.set_mfa(user, false)?;
        tracing::info!(%actor, user = %user, "MFA disabled");
        self.status_of(&u)
    }

    /// `mfa reset USER`: a new secret and new backup codes (the old ones void), pending again;
    /// a user that was enrolled stays held until a code of the new secret confirms it.
    pub fn reset(&self, actor: &Actor, user: &UserName) -> Result<Enrolment, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        let u = self.dir.user(user)?;
        let old = self
            .record(&u)?
            .ok_or_else(|| not_found("mfa enrolment", user))?;
        let (mut rec, enrolment) = self.new_record(&u, old.email.clone(), old.sms.clone(), true);
        rec.required = old.state == EnrolState::Enrolled || old.required;
        self.commit_record(
            actor,
            "mfa.reset",
            Some(&rec),
            user,
            serde_json::json!({"state": "pending", "held": rec.required}),
        )?;
        self.policy.set_mfa(user, rec.required)?;
        // Sessions admitted by the old secret or codes end with them.
        self.policy.mfa_end_admissions(user)?;
        self.live
            .lock()
            .unwrap()
            .codes
            .retain(|(u, _), _| u != user);
        tracing::info!(%actor, user = %user, "MFA reset");
        Ok(enrolment)
    }

    /// `mfa require-all [--off]`.
    pub fn require_all(&self, actor: &Actor, on: bool) -> Result<MfaOverview, ServiceError> {
        {
            let _w = self.core.writer.lock().unwrap();
            let mut batch = Batch::default();
            batch.put(
                Cf::Policy,
                keys::MFA_SETTINGS,
                &MfaSettings { require_all: on },
            )?;
            self.core.audit(
                &mut batch,
                actor,
                "mfa.require-all",
                "mfa".to_owned(),
                None,
                Some(serde_json::json!({"require_all": on})),
            )?;
            self.core.commit(batch)?;
            self.policy.set_mfa_all(on)?;
        }
        tracing::info!(%actor, on, "MFA required of every user");
        self.status(None)
    }

    /// `mfa status [USER]`: one user, or every user with MFA (and, with `require-all`, every
    /// user without an enrolment, as `none`).
    pub fn status(&self, user: Option<&UserName>) -> Result<MfaOverview, ServiceError> {
        let settings = self.settings()?;
        let users = match user {
            Some(u) => vec![self.dir.user(u)?],
            None => self.dir.users()?,
        };
        let mut out = Vec::new();
        for u in &users {
            let s = self.status_of(u)?;
            if user.is_some() || s.state != "none" || s.required {
                out.push(s);
            }
        }
        Ok(MfaOverview {
            require_all: settings.require_all,
            users: out,
        })
    }

    fn status_of(&self, u: &User) -> Result<MfaStatus, ServiceError> {
        let rec = self.record(u)?;
        let now = SystemTime::now();
        let devices = self
            .policy
            .mfa_admissions(&u.name)
            .into_iter()
            .filter(|(_, t)| *t > now)
            .map(|(p, t)| AdmittedDevice {
                device: p.device.to_string(),
                until: unix_secs(t),
            })
            .collect();
        Ok(MfaStatus {
            user: u.name.to_string(),
            state: rec.as_ref().map_or("none", |r| r.state.name()).to_owned(),
            required: self.policy.mfa_required(&u.name),
            created_at: rec.as_ref().map(|r| r.created_at),
            enrolled_at: rec.as_ref().and_then(|r| r.enrolled_at),
            last_verified: rec.as_ref().and_then(|r| r.last_verified),
            backup_codes_left: rec.as_ref().map_or(0, |r| r.backup.len() as u32),
            email: rec
                .as_ref()
                .and_then(|r| r.email.as_deref().map(mask_email)),
            sms: rec.as_ref().and_then(|r| r.sms.as_deref().map(mask_phone)),
            devices,
            error: rec
                .as_ref()
                .and_then(|r| self.open_secret(r).err())
                .map(|e| e.to_string()),
        })
    }

    // ---- the page -----------------------------------------------------------------------------

    /// The device whose tunnel address is `src` (one index lookup).
    fn peer_at(&self, src: IpAddr) -> Result<Peer, VerifyError> {
        self.dir.peer_at(src).ok_or(VerifyError::NotADevice)
    }

    fn channels(&self, rec: Option<&MfaRecord>) -> Vec<(CodeChannel, String)> {
        let Some(rec) = rec else {
            return Vec::new();
        };
        let have = self
            .sender
            .read()
            .unwrap()
            .as_ref()
            .map(|s| s.channels())
            .unwrap_or_default();
        let mut out = Vec::new();
        if let (true, Some(e)) = (have.contains(&CodeChannel::Email), &rec.email) {
            out.push((CodeChannel::Email, mask_email(e)));
        }
        if let (true, Some(n)) = (have.contains(&CodeChannel::Sms), &rec.sms) {
            out.push((CodeChannel::Sms, mask_phone(n)));
        }
        out
    }

    /// [`VerificationPort::view`] at `now`.
    pub fn view_at(&self, src: IpAddr, now: SystemTime) -> Result<PageView, VerifyError> {
        let peer = self.peer_at(src)?;
        let u = self.dir.user(&peer.user)?;
        let required = self.policy.mfa_required(&peer.user);
        let mut rec = self.record(&u)?;
        if required && rec.is_none() {
            rec = Some(self.self_service(&u, &peer)?);
        }
        let mut enrol_uri = None;
        let status = match &rec {
            None => PageStatus::NotRequired,
            Some(r) if r.state == EnrolState::Pending => {
                if r.self_service == Some(peer.public_key) {
                    let secret = self.open_secret(r)?;
                    enrol_uri = Some(totp::uri(u.name.as_str(), &secret));
                }
                PageStatus::Enrolling
            }
            Some(_) if !required => PageStatus::NotRequired,
            Some(_) => match self.policy.mfa_admission(peer.id) {
                Some(until) if until > now => PageStatus::Admitted { until },
                _ => PageStatus::Pending,
            },
        };
        let retry_after = self
            .live
            .lock()
            .unwrap()
            .limiter
            .locked(peer.id, &peer.user, now);
        Ok(PageView {
            user: peer.user.to_string(),
            device: peer.device.to_string(),
            status,
            channels: self.channels(rec.as_ref()),
            retry_after,
            enrol_uri,
        })
    }

    /// The self-service enrolment of a required user without one, for the first device that
    /// opens the page (module docs).
    fn self_service(&self, u: &User, peer: &Peer) -> Result<MfaRecord, ServiceError> {
        let _w = self.core.writer.lock().unwrap();
        if let Some(r) = self.record(u)? {
            return Ok(r);
        }
        let (mut rec, _) = self.new_record(u, None, None, false);
        rec.self_service = Some(peer.public_key);
        self.commit_record(
            &Actor::Agent,
            "mfa.enable",
            Some(&rec),
            &u.name,
            serde_json::json!({"state": "pending", "self_service_device": peer.device.to_string()}),
        )?;
        self.core.settle()?;
        tracing::info!(user = %u.name, device = %peer.device, "MFA self-service enrolment started");
        Ok(rec)
    }

    /// [`VerificationPort::verify`] at `now`.
    pub fn verify_at(
        &self,
        src: IpAddr,
        code: &str,
        now: SystemTime,
    ) -> Result<Verified, VerifyError> {
        let peer = self.peer_at(src)?;
        let u = self.dir.user(&peer.user)?;
        if let Some(d) = self
            .live
            .lock()
            .unwrap()
            .limiter
            .locked(peer.id, &peer.user, now)
        {
            return Err(VerifyError::Locked { retry_after: d });
        }
        let required = self.policy.mfa_required(&peer.user);
        let w = self.core.writer.lock().unwrap();
        let rec = self.record(&u)?;
        let Some(mut rec) = rec.filter(|r| required || r.state == EnrolState::Pending) else {
            drop(w);
            if !required {
                return Err(VerifyError::NotRequired);
            }
            return Err(self.failed(&peer, src, now));
        };
        let secret = self.open_secret(&rec)?;
        let code = codes::normalize(code);
        let pending = rec.state == EnrolState::Pending;
        let method = if let Some(step) = totp::check(&secret, &code, unix_secs(now), rec.last_step)
        {
            rec.last_step = Some(step);
            Some(Method::Totp)
        } else if pending {
            // Only the app's code confirms an enrolment (it proves the secret was taken).
            None
        } else if code.len() == 6 {
            self.take_one_time(&peer.user, &code, now)
        } else if codes::is_backup_shape(&code) {
            codes::match_backup(&code, &rec.backup_salt, &rec.backup).map(|i| {
                rec.backup.remove(i);
                Method::Backup
            })
        } else {
            None
        };
        let Some(method) = method else {
            drop(w);
            return Err(self.failed(&peer, src, now));
        };
        if pending {
            rec.state = EnrolState::Enrolled;
            rec.required = false;
            rec.enrolled_at = Some(unix_secs(now));
            rec.self_service = None;
        }
        rec.last_verified = Some(unix_secs(now));
        let mut batch = Batch::default();
        batch
            .put(Cf::Policy, &keys::mfa_user(u.name.as_str()), &rec)
            .map_err(ServiceError::from)?;
        if pending {
            self.core.audit(
                &mut batch,
                &Actor::Agent,
                "mfa.confirm",
                format!("user:{}", u.name),
                None,
                Some(serde_json::json!({"state": "enrolled", "device": peer.device.to_string()})),
            )?;
        }
        self.core.commit(batch)?;
        if pending {
            self.policy.set_mfa(&peer.user, true)?;
        }
        let until = now + self.config().lifetime;
        self.policy.mfa_admit(&peer, until)?;
        drop(w);
        self.core.settle()?;
        self.live.lock().unwrap().limiter.success(peer.id);
        tracing::info!(user = %peer.user, device = %peer.device, ?method, confirmed = pending, "MFA code accepted; device admitted");
        Ok(Verified {
            user: peer.user.to_string(),
            device: peer.device.to_string(),
            until,
            method,
            confirmed_enrolment: pending,
            backup_codes_left: (method == Method::Backup).then_some(rec.backup.len() as u32),
        })
    }

    /// A live one-time code of `user` matching `code` (taken: single use).
    fn take_one_time(&self, user: &UserName, code: &str, now: SystemTime) -> Option<Method> {
        let mut live = self.live.lock().unwrap();
        live.codes.retain(|_, (_, t)| *t > now);
        for (channel, method) in [
            (CodeChannel::Email, Method::Email),
            (CodeChannel::Sms, Method::Sms),
        ] {
            let key = (user.clone(), channel);
            let want =
                codes::one_time_hash(&self.otc_key, user.as_str(), channel_name(channel), code);
            if live
                .codes
                .get(&key)
                .is_some_and(|(h, _)| super::secrets::hashes_equal(h, &want))
            {
                live.codes.remove(&key);
                return Some(method);
            }
        }
        None
    }

    /// Counts a failed code of `peer` (logged; `suspicious-activity` when it starts a lock).
    fn failed(&self, peer: &Peer, src: IpAddr, now: SystemTime) -> VerifyError {
        let f = self
            .live
            .lock()
            .unwrap()
            .limiter
            .fail(peer.id, &peer.user, now);
        tracing::warn!(user = %peer.user, device = %peer.device, attempts_left = f.attempts_left, locked_secs = f.locked.map(|d| d.as_secs()), "wrong MFA code");
        if f.newly_locked {
            let endpoint = self
                .core
                .tunnel
                .peers()
                .into_iter()
                .find(|s| s.key == peer.public_key)
                .and_then(|s| s.endpoint)
                .map(|e| e.ip());
            let n = Notification::device(
                NotifyKind::SuspiciousActivity,
                now,
                peer.user.as_str(),
                endpoint,
                Some(src),
                Protocol::Wireguard,
                serde_json::json!({
                    "kind": "mfa-failures",
                    "user": peer.user.to_string(),
                    "device": peer.device.to_string(),
                    "source": endpoint.map(|e| e.to_string()),
                    "locked_secs": f.locked.map(|d| d.as_secs()),
                }),
            );
            if let Err(e) = self.core.notify(n) {
                tracing::error!(error = %e, "cannot record the suspicious-activity event");
            }
        }
        match f.locked {
            Some(retry_after) => VerifyError::Locked { retry_after },
            None => VerifyError::WrongCode {
                attempts_left: f.attempts_left,
            },
        }
    }

    /// [`VerificationPort::send_code`] at `now`.
    pub fn send_code_at(
        &self,
        src: IpAddr,
        channel: CodeChannel,
        now: SystemTime,
    ) -> Result<String, VerifyError> {
        let peer = self.peer_at(src)?;
        let u = self.dir.user(&peer.user)?;
        if !self.policy.mfa_required(&peer.user) {
            return Err(VerifyError::NotRequired);
        }
        let rec = self
            .record(&u)?
            .filter(|r| r.state == EnrolState::Enrolled)
            .ok_or(VerifyError::NoChannel)?;
        let sender = self
            .sender
            .read()
            .unwrap()
            .clone()
            .filter(|s| s.channels().contains(&channel))
            .ok_or(VerifyError::NoChannel)?;
        let to = match channel {
            CodeChannel::Email => rec.email.clone(),
            CodeChannel::Sms => rec.sms.clone(),
        }
        .ok_or(VerifyError::NoChannel)?;
        let code = codes::new_one_time_code();
        {
            let mut live = self.live.lock().unwrap();
            if let Some(d) = live.limiter.locked(peer.id, &peer.user, now) {
                return Err(VerifyError::Locked { retry_after: d });
            }
            if let Some(wait) = live
                .sent
                .get(&peer.user)
                .and_then(|t| (*t + codes::SEND_INTERVAL).duration_since(now).ok())
                .filter(|d| !d.is_zero())
            {
                return Err(VerifyError::SendTooSoon { retry_after: wait });
            }
            let hash =
                codes::one_time_hash(&self.otc_key, u.name.as_str(), channel_name(channel), &code);
            live.codes.insert(
                (peer.user.clone(), channel),
                (hash, now + codes::ONE_TIME_VALID),
            );
            live.sent.insert(peer.user.clone(), now);
        }
        if let Err(e) = sender.send(channel, &to, peer.user.as_str(), &code) {
            tracing::warn!(user = %peer.user, channel = channel_name(channel), error = %e, "cannot send the one-time code");
            let mut live = self.live.lock().unwrap();
            live.codes.remove(&(peer.user.clone(), channel));
            live.sent.remove(&peer.user);
            return Err(VerifyError::SendFailed(e));
        }
        tracing::info!(user = %peer.user, device = %peer.device, channel = channel_name(channel), "one-time code sent");
        Ok(match channel {
            CodeChannel::Email => mask_email(&to),
            CodeChannel::Sms => mask_phone(&to),
        })
    }
}

/// `email` or `sms`.
pub const fn channel_name(c: CodeChannel) -> &'static str {
    match c {
        CodeChannel::Email => "email",
        CodeChannel::Sms => "sms",
    }
}

impl VerificationPort for Mfa {
    fn view(&self, src: IpAddr) -> Result<PageView, VerifyError> {
        self.view_at(src, SystemTime::now())
    }

    fn verify(&self, src: IpAddr, code: &str) -> Result<Verified, VerifyError> {
        self.verify_at(src, code, SystemTime::now())
    }

    fn send_code(&self, src: IpAddr, channel: CodeChannel) -> Result<String, VerifyError> {
        self.send_code_at(src, channel, SystemTime::now())
    }
}
