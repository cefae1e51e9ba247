//! A stand-in [`VerificationPort`] for testing the page's HTTP layer (unit tests here, the
//! browser test in `tests/`): one device per source address, one good code, single-use backup
//! codes, a lock after [`StandIn::max_failures`] wrong codes, and one-time codes sent through a
//! real [`CodeSender`] when one is given. It is not the MFA service (`service::mfa` is).

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use crate::service::{
    mfa::codes::SEND_INTERVAL,
    verification::{
        CodeChannel, CodeSender, Method, PageStatus, PageView, VerificationPort, Verified,
        VerifyError,
    },
};

/// One device the stand-in knows.
#[derive(Clone, Debug)]
pub struct Device {
    /// Its view (status, channels, enrolment URI).
    pub view: PageView,
    /// Wrong codes since the last good one.
    pub failures: u32,
    /// Locked until then.
    pub locked_until: Option<SystemTime>,
    /// The e-mail address and phone number codes are sent to.
    pub email: String,
    /// The phone number.
    pub phone: String,
}

/// The stand-in (see the module docs).
#[derive(Default)]
pub struct StandIn {
    /// The devices by tunnel address.
    pub devices: Mutex<HashMap<IpAddr, Device>>,
    /// The code that is always good (a TOTP stand-in).
    pub good_code: String,
    /// Single-use backup codes.
    pub backup_codes: Mutex<Vec<String>>,
    /// The one-time code last sent, if any.
    pub sent_code: Mutex<Option<String>>,
    /// Wrong codes before a lock.
    pub max_failures: u32,
    /// How long a lock lasts.
    pub lock_for: Duration,
    /// How long an admission lasts.
    pub lifetime: Duration,
    /// Sends one-time codes, if given.
    pub sender: Option<Arc<dyn CodeSender>>,
    /// Every `verify` call's code (to check what reached the service).
    pub seen: Mutex<Vec<String>>,
    /// When a code was last sent: one per minute, as the service sends them.
    pub last_send: Mutex<Option<SystemTime>>,
}

impl std::fmt::Debug for StandIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StandIn").finish_non_exhaustive()
    }
}

impl StandIn {
    /// A stand-in with `good_code`, 3 wrong codes before a 60 s lock, 12 h admissions.
    pub fn new(good_code: &str) -> StandIn {
        StandIn {
            good_code: good_code.to_owned(),
            max_failures: 3,
            lock_for: Duration::from_secs(60),
            lifetime: Duration::from_secs(12 * 3600),
            ..StandIn::default()
        }
    }

    /// Adds a held device of `user` at `addr`.
    pub fn add(
        &self,
        addr: IpAddr,
        user: &str,
        device: &str,
        channels: Vec<(CodeChannel, String)>,
    ) {
        self.devices.lock().unwrap().insert(
            addr,
            Device {
                view: PageView {
                    user: user.to_owned(),
                    device: device.to_owned(),
                    status: PageStatus::Pending,
                    channels,
                    retry_after: None,
                    enrol_uri: None,
                },
                failures: 0,
                locked_until: None,
                email: format!("{user}@example.org"),
                phone: "+4915100000012".into(),
            },
        );
    }

    /// Sets the device at `addr` (which must exist) with `f`.
    pub fn set(&self, addr: IpAddr, f: impl FnOnce(&mut Device)) {
        f(self
            .devices
            .lock()
            .unwrap()
            .get_mut(&addr)
            .expect("a device of the stand-in"));
    }
}

impl VerificationPort for StandIn {
    fn view(&self, src: IpAddr) -> Result<PageView, VerifyError> {
        let devices = self.devices.lock().unwrap();
        let d = devices.get(&src).ok_or(VerifyError::NotADevice)?;
        let mut view = d.view.clone();
        view.retry_after = d
            .locked_until
            .and_then(|t| t.duration_since(SystemTime::now()).ok());
        Ok(view)
    }

    fn verify(&self, src: IpAddr, code: &str) -> Result<Verified, VerifyError> {
        self.seen.lock().unwrap().push(code.to_owned());
        let mut devices = self.devices.lock().unwrap();
        let d = devices.get_mut(&src).ok_or(VerifyError::NotADevice)?;
        if d.view.status == PageStatus::NotRequired {
            return Err(VerifyError::NotRequired);
        }
        let now = SystemTime::now();
        if let Some(retry_after) = d.locked_until.and_then(|t| t.duration_since(now).ok()) {
            return Err(VerifyError::Locked { retry_after });
        }
        let mut backups = self.backup_codes.lock().unwrap();
        let mut sent = self.sent_code.lock().unwrap();
        let (method, left) = if code == self.good_code {
            (Method::Totp, None)
        } else if let Some(i) = backups.iter().position(|b| b == code) {
            backups.remove(i);
            (Method::Backup, Some(backups.len() as u32))
        } else if sent.as_deref() == Some(code) {
            *sent = None;
            (Method::Email, None)
        } else {
            d.failures += 1;
            if d.failures >= self.max_failures {
                d.failures = 0;
                d.locked_until = Some(now + self.lock_for);
                return Err(VerifyError::Locked {
                    retry_after: self.lock_for,
                });
            }
            return Err(VerifyError::WrongCode {
                attempts_left: self.max_failures - d.failures,
            });
        };
        d.failures = 0;
        let confirmed_enrolment = d.view.status == PageStatus::Enrolling;
        let until = now + self.lifetime;
        d.view.status = PageStatus::Admitted { until };
        d.view.enrol_uri = None;
        Ok(Verified {
            user: d.view.user.clone(),
            device: d.view.device.clone(),
            until,
            method,
            confirmed_enrolment,
            backup_codes_left: left,
        })
    }

    fn send_code(&self, src: IpAddr, channel: CodeChannel) -> Result<String, VerifyError> {
        let (user, to, masked) = {
            let devices = self.devices.lock().unwrap();
            let d = devices.get(&src).ok_or(VerifyError::NotADevice)?;
            let masked = d
                .view
                .channels
                .iter()
                .find(|(c, _)| *c == channel)
                .map(|(_, m)| m.clone())
                .ok_or(VerifyError::NoChannel)?;
            let to = match channel {
                CodeChannel::Email => d.email.clone(),
                CodeChannel::Sms => d.phone.clone(),
            };
            (d.view.user.clone(), to, masked)
        };
        let sender = self.sender.as_ref().ok_or(VerifyError::NoChannel)?;
        let now = SystemTime::now();
        let mut last = self.last_send.lock().unwrap();
        if let Some(retry_after) = last
            .and_then(|t| (t + SEND_INTERVAL).duration_since(now).ok())
            .filter(|d| !d.is_zero())
        {
            return Err(VerifyError::SendTooSoon { retry_after });
        }
        let code = format!("{:06}", rand::random::<u32>() % 1_000_000);
        sender
            .send(channel, &to, &user, &code)
            .map_err(VerifyError::SendFailed)?;
        *self.sent_code.lock().unwrap() = Some(code);
        *last = Some(now);
        Ok(masked)
    }
}
