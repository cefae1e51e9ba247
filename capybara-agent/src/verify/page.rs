//! The verification page: one HTML document rendered by a pure function ([`render`]) from what
//! the service says about the device ([`PageView`]), what the last form post did ([`Notice`])
//! and the device's CSRF token.
//!
//! - One document, inline CSS (allowed by its hash in the Content-Security-Policy: [`csp`]), no
//!   JavaScript, no external resources (the enrolment QR code is inline SVG).
//! - Accessible: `lang`, every input has a `<label for>`, the code input has
//!   `inputmode="numeric" autocomplete="one-time-code"`, a visible focus ring, text contrast of at
//!   least 7:1 (AAA) on white, the device's state announced in a `role="status"` region and errors
//!   in a `role="alert"` one, an invalid code input marked `aria-invalid` and tied to its error
//!   by `aria-describedby`.
//! - Everything the service or the request gives (names, URIs, error texts) is HTML-escaped.

use std::{
    fmt::Write as _,
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use crate::service::verification::{CodeChannel, PageStatus, PageView, Verified};

/// The page's only CSS. Colors: text `#1b1b1b` on `#fff` (17:1), links and buttons `#0b4a8f`
/// (9:1 with white), errors `#8a0010` (10:1), the admitted state `#0b5e2a` (8:1).
pub const CSS: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:18px/1.5 system-ui,sans-serif;color:#1b1b1b;background:#fff}\
main{max-width:36rem;margin:0 auto;padding:1.5rem 1rem}\
h1{font-size:1.6rem;margin:0 0 .5rem}h2{font-size:1.2rem;margin:1.5rem 0 .5rem}\
.who{margin:0 0 1rem}\
.state{border-left:.4rem solid #0b4a8f;padding:.5rem 1rem;margin:1rem 0;background:#eef4fb}\
.state.ok{border-color:#0b5e2a;background:#edf7f0}\
.state.locked,.alert{border-left:.4rem solid #8a0010;background:#fbeef0}\
.alert{padding:.5rem 1rem;margin:1rem 0;color:#8a0010}\
.done{border-left:.4rem solid #0b5e2a;padding:.5rem 1rem;margin:1rem 0;background:#edf7f0}\
label{display:block;font-weight:600;margin:.5rem 0 .25rem}\
input{font:inherit;font-size:1.4rem;letter-spacing:.15em;width:12ch;padding:.3rem .5rem;\
border:2px solid #1b1b1b;border-radius:.25rem}\
input[aria-invalid=true]{border-color:#8a0010}\
.hint{margin:.25rem 0;font-size:.95rem;color:#3b3b3b}\
button{font:inherit;color:#fff;background:#0b4a8f;border:2px solid #0b4a8f;border-radius:.25rem;\
padding:.4rem 1rem;margin:.75rem .5rem 0 0;cursor:pointer}\
button.secondary{color:#0b4a8f;background:#fff}\
:focus-visible{outline:3px solid #c25e00;outline-offset:2px}\
code{word-break:break-all;font-size:.9rem}\
svg{display:block;width:14rem;height:14rem;margin:.5rem 0}\
time{white-space:nowrap}";

/// The Content-Security-Policy of every answer: nothing may load or run, the inline style is
/// allowed by its hash only, forms post back here only, no framing.
pub fn csp() -> &'static str {
    static CSP: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    CSP.get_or_init(|| {
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(CSS));
        format!(
            "default-src 'none'; style-src 'sha256-{hash}'; img-src 'none'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'"
        )
    })
}

/// What the page is about.
#[derive(Clone, Debug)]
pub enum Subject<'a> {
    /// A device of the server, as the service sees it.
    Device(&'a PageView),
    /// The request's source address is no device's tunnel address.
    NotADevice,
    /// The device's user has no MFA.
    NotRequired,
    /// The service could not say (an internal error: the text is generic).
    Unavailable,
}

/// What the last form post did.
#[derive(Clone, Debug)]
pub enum Notice {
    /// A code was accepted.
    Verified(Verified),
    /// A one-time code was sent.
    Sent {
        /// Over which channel.
        channel: CodeChannel,
        /// The masked destination.
        to: String,
    },
    /// The post was refused: the text names what was wrong.
    Error {
        /// The message.
        message: String,
        /// The form field it is about (`code`: the code input is marked invalid).
        field: Option<&'static str>,
    },
}

/// Everything [`render`] needs.
#[derive(Clone, Debug)]
pub struct Page<'a> {
    /// The device (or why there is none).
    pub subject: Subject<'a>,
    /// The last post's outcome, if this answers a post.
    pub notice: Option<&'a Notice>,
    /// The device's CSRF token (a hidden field of every form).
    pub csrf: &'a str,
    /// Now (admission times are shown relative to it too).
    pub now: SystemTime,
}

/// `s` with `& < > " '` escaped for HTML text and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A duration as people read it: `45 s`, `4 min 10 s`, `2 h 5 min` (at least 1 s).
pub fn human_duration(d: Duration) -> String {
    let s = d.as_secs().max(1) + u64::from(d.subsec_nanos() > 0 && d.as_secs() > 0);
    match s {
        0..60 => format!("{s} s"),
        60..3600 if s.is_multiple_of(60) => format!("{} min", s / 60),
        60..3600 => format!("{} min {} s", s / 60, s % 60),
        _ if s % 3600 / 60 == 0 => format!("{} h", s / 3600),
        _ => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// `t` as RFC 3339 in UTC, to the second (`2026-12-07T20:30:00Z`).
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `t` as people read it: `2026-12-07 20:30 UTC`.
fn readable(t: SystemTime) -> String {
    let s = rfc3339(t);
    format!("{} {} UTC", &s[..10], &s[11..16])
}

/// The channel's name in a sentence.
fn channel_name(c: CodeChannel) -> &'static str {
    match c {
        CodeChannel::Email => "e-mail",
        CodeChannel::Sms => "SMS",
    }
}

/// The channel's form value.
pub fn channel_value(c: CodeChannel) -> &'static str {
    match c {
        CodeChannel::Email => "email",
        CodeChannel::Sms => "sms",
    }
}

/// The QR code of `data` as an inline SVG (one path of dark modules, a 4-module quiet zone),
/// labelled for screen readers; `None` if `data` is too long for a QR code.
pub fn qr_svg(data: &str) -> Option<String> {
    let code = qrcode::QrCode::with_error_correction_level(data, qrcode::EcLevel::M).ok()?;
    let width = code.width();
    let colors = code.to_colors();
    let size = width + 8;
    let mut path = String::new();
    for (i, c) in colors.iter().enumerate() {
        if *c == qrcode::Color::Dark {
            let _ = write!(path, "M{} {}h1v1h-1z", i % width + 4, i / width + 4);
        }
    }
    Some(format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {size} {size}\" role=\"img\" \
         aria-labelledby=\"qr-title\" shape-rendering=\"crispEdges\"><title id=\"qr-title\">QR \
         code of the enrolment URI for your authenticator app</title><rect width=\"{size}\" \
         height=\"{size}\" fill=\"#fff\"/><path fill=\"#000\" d=\"{path}\"/></svg>"
    ))
}

/// The whole page.
pub fn render(page: &Page<'_>) -> String {
    let mut h = String::with_capacity(4096);
    h.push_str(
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <meta name=\"referrer\" content=\"same-origin\">\
         <title>Verify this device – VPN</title><style>",
    );
    h.push_str(CSS);
    h.push_str("</style></head><body><main><h1>Verify this device</h1>");
    match &page.subject {
        Subject::Device(view) => device(&mut h, page, view),
        Subject::NotADevice => {
            notice(&mut h, page.notice);
            h.push_str(
                "<div class=\"state locked\" role=\"status\"><p>This address is no device of this \
                 VPN server. Open this page through the VPN tunnel of the device you want to \
                 verify.</p></div>",
            );
        }
        Subject::NotRequired => h.push_str(
            "<div class=\"state ok\" role=\"status\"><p>Multi-factor authentication is not \
             required for this device's user: there is nothing to verify.</p></div>",
        ),
        Subject::Unavailable => h.push_str(
            "<div class=\"alert\" role=\"alert\"><p>The verification service is not available \
             right now. Reload this page in a minute; if it stays like this, tell your \
             administrator.</p></div>",
        ),
    }
    h.push_str("</main></body></html>\n");
    h
}

/// The device's part: who, where it stands, the last post's outcome, the forms.
fn device(h: &mut String, page: &Page<'_>, view: &PageView) {
    let _ = write!(
        h,
        "<p class=\"who\">User <strong>{}</strong>, device <strong>{}</strong></p>",
        escape(&view.user),
        escape(&view.device)
    );
    // A successful post has just changed the state: say so first.
    notice(h, page.notice);
    let locked = view.retry_after.filter(|d| !d.is_zero());
    let (class, text) = match (&view.status, locked) {
        (PageStatus::Admitted { until }, _) => (
            "state ok",
            format!(
                "This device is verified: the VPN is open for it until <time datetime=\"{}\">{}</time> \
                 (in {}), or until its session ends.",
                rfc3339(*until),
                readable(*until),
                human_duration(until.duration_since(page.now).unwrap_or_default())
            ),
        ),
        (PageStatus::NotRequired, _) => (
            "state ok",
            "Multi-factor authentication is not required for this user: there is nothing to \
             verify."
                .to_owned(),
        ),
        (_, Some(wait)) => (
            "state locked",
            format!(
                "Too many wrong codes: this device is held and no code is taken for {}. Try again \
                 after that.",
                human_duration(wait)
            ),
        ),
        (PageStatus::Enrolling, None) => (
            "state",
            "This device is held until you finish setting up multi-factor authentication: add \
             the account to your authenticator app, then enter the code it shows."
                .to_owned(),
        ),
        (PageStatus::Pending, None) => (
            "state",
            "This device is held: enter a code from your authenticator app (or a backup code) to \
             open the VPN for it."
                .to_owned(),
        ),
    };
    let _ = write!(
        h,
        "<div class=\"{class}\" role=\"status\" id=\"state\"><p>{text}</p></div>"
    );
    let held = matches!(view.status, PageStatus::Pending | PageStatus::Enrolling);
    if !held {
        return;
    }
    if let (PageStatus::Enrolling, Some(uri)) = (&view.status, &view.enrol_uri) {
        h.push_str(
            "<section aria-labelledby=\"enrol-h\"><h2 id=\"enrol-h\">Set up your authenticator \
             app</h2><p>Scan this QR code with your authenticator app, or add the account by \
             hand with the URI below it.</p>",
        );
        if let Some(svg) = qr_svg(uri) {
            h.push_str(&svg);
        }
        let _ = write!(
            h,
            "<p>URI: <code id=\"enrol-uri\">{}</code></p></section>",
            escape(uri)
        );
    }
    let code_error = match page.notice {
        Some(Notice::Error {
            field: Some("code"),
            ..
        }) => " aria-invalid=\"true\" aria-describedby=\"code-hint notice\"",
        _ => " aria-describedby=\"code-hint\"",
    };
    let disabled = if locked.is_some() { " disabled" } else { "" };
    let _ = write!(
        h,
        "<form method=\"post\" action=\"/\"><input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <label for=\"code\">Code</label>\
         <input id=\"code\" name=\"code\" type=\"text\" inputmode=\"numeric\" \
         autocomplete=\"one-time-code\" autocapitalize=\"off\" spellcheck=\"false\" required \
         maxlength=\"32\"{code_error}{disabled}>\
         <p class=\"hint\" id=\"code-hint\">The 6 digits your authenticator app shows, a code \
         sent to you, or one of your backup codes.</p>\
         <button type=\"submit\" id=\"verify\"{disabled}>Verify</button></form>",
        csrf = escape(page.csrf),
    );
    if !view.channels.is_empty() && matches!(view.status, PageStatus::Pending) {
        let _ = write!(
            h,
            "<h2 id=\"send-h\">No authenticator app at hand?</h2>\
             <form method=\"post\" action=\"/\" aria-labelledby=\"send-h\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">",
            escape(page.csrf)
        );
        for (channel, to) in &view.channels {
            let _ = write!(
                h,
                "<button type=\"submit\" class=\"secondary\" name=\"send\" value=\"{}\">Send me a \
                 code by {} ({})</button>",
                channel_value(*channel),
                channel_name(*channel),
                escape(to)
            );
        }
        h.push_str("</form>");
    }
}

/// The last post's outcome: an error as an alert, a success as a status.
fn notice(h: &mut String, notice: Option<&Notice>) {
    match notice {
        None => {}
        Some(Notice::Error { message, .. }) => {
            let _ = write!(
                h,
                "<div class=\"alert\" role=\"alert\" id=\"notice\"><p>{}</p></div>",
                escape(message)
            );
        }
        Some(Notice::Sent { channel, to }) => {
            let _ = write!(
                h,
                "<div class=\"done\" role=\"status\" id=\"notice\"><p>A code was sent by {} to \
                 {}. Enter it below.</p></div>",
                channel_name(*channel),
                escape(to)
            );
        }
        Some(Notice::Verified(v)) => {
            let mut text = if v.confirmed_enrolment {
                "Code accepted: multi-factor authentication is set up for your account.".to_owned()
            } else {
                "Code accepted.".to_owned()
            };
            if let Some(left) = v.backup_codes_left {
                let _ = write!(
                    text,
                    " You used a backup code: {left} backup code{} left.",
                    if left == 1 { "" } else { "s" }
                );
            }
            let _ = write!(
                h,
                "<div class=\"done\" role=\"status\" id=\"notice\"><p>{text}</p></div>"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::verification::Method;

    fn view(status: PageStatus) -> PageView {
        PageView {
            user: "alice".into(),
            device: "laptop".into(),
            status,
            channels: vec![
                (CodeChannel::Email, "a***@example.org".into()),
                (CodeChannel::Sms, "+49******12".into()),
            ],
            retry_after: None,
            enrol_uri: None,
        }
    }

    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_670_000)
    }

    fn render_view(v: &PageView, notice: Option<&Notice>) -> String {
        render(&Page {
            subject: Subject::Device(v),
            notice,
            csrf: "tok\"en",
            now: now(),
        })
    }

    /// The rules every page keeps: one document, no script, no external resource, labelled input.
    fn assert_well_formed(h: &str) {
        assert!(h.starts_with("<!doctype html>\n<html lang=\"en\">"), "{h}");
        assert_eq!(h.matches("<html").count(), 1);
        assert!(h.ends_with("</html>\n"));
        let lower = h.to_ascii_lowercase();
        for banned in [
            "<script",
            "javascript:",
            " src=",
            "<link",
            "http://",
            "https://",
            "@import",
            "url(",
        ] {
            // The SVG's namespace is the one URL allowed: it loads nothing.
            let count = lower.matches(banned).count()
                - usize::from(
                    banned == "http://" && lower.contains("xmlns=\"http://www.w3.org/2000/svg\""),
                );
            assert_eq!(count, 0, "{banned} in {h}");
        }
        // Every input but the hidden ones has a label tied to it.
        for (i, _) in h.match_indices("<input ") {
            let tag = &h[i..i + h[i..].find('>').unwrap()];
            if tag.contains("type=\"hidden\"") {
                continue;
            }
            let id = tag
                .split("id=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap();
            assert!(h.contains(&format!("<label for=\"{id}\">")), "{tag}");
        }
    }

    #[test]
    fn a_held_device_gets_the_code_form_and_its_channels() {
        let v = view(PageStatus::Pending);
        let h = render_view(&v, None);
        assert_well_formed(&h);
        assert!(h.contains("User <strong>alice</strong>, device <strong>laptop</strong>"));
        assert!(h.contains("role=\"status\" id=\"state\"><p>This device is held"));
        assert!(h.contains("inputmode=\"numeric\""));
        assert!(h.contains("autocomplete=\"one-time-code\""));
        assert!(h.contains("aria-describedby=\"code-hint\""));
        assert!(!h.contains("aria-invalid=\"true\""));
        // The CSRF token is escaped into both forms.
        assert_eq!(h.matches("name=\"csrf\" value=\"tok&quot;en\"").count(), 2);
        assert!(
            h.contains("name=\"send\" value=\"email\">Send me a code by e-mail (a***@example.org)")
        );
        assert!(h.contains("name=\"send\" value=\"sms\">Send me a code by SMS (+49******12)"));
        assert!(!h.contains("role=\"alert\""));
        assert!(!h.contains("<svg"));
    }

    #[test]
    fn an_admitted_device_sees_until_when_and_no_form() {
        let until = now() + Duration::from_secs(12 * 3600);
        let v = view(PageStatus::Admitted { until });
        let verified = Notice::Verified(Verified {
            user: "alice".into(),
            device: "laptop".into(),
            until,
            method: Method::Backup,
            confirmed_enrolment: false,
            backup_codes_left: Some(1),
        });
        let h = render_view(&v, Some(&verified));
        assert_well_formed(&h);
        assert!(
            h.contains(&format!(
                "until <time datetime=\"{}\">{} UTC</time> (in 12 h)",
                rfc3339(until),
                &rfc3339(until)[..16].replace('T', " ")
            )),
            "{h}"
        );
        assert!(h.contains("Code accepted. You used a backup code: 1 backup code left."));
        assert!(!h.contains("<form"));
    }

    #[test]
    fn a_locked_device_is_told_how_long_and_cannot_post() {
        let mut v = view(PageStatus::Pending);
        v.retry_after = Some(Duration::from_secs(250));
        let wrong = Notice::Error {
            message: "too many wrong codes: try again in 250s".into(),
            field: Some("code"),
        };
        let h = render_view(&v, Some(&wrong));
        assert_well_formed(&h);
        assert!(h.contains("class=\"state locked\" role=\"status\""));
        assert!(h.contains("no code is taken for 4 min 10 s"));
        assert!(h.contains("role=\"alert\" id=\"notice\"><p>too many wrong codes"));
        assert!(h.contains("aria-invalid=\"true\" aria-describedby=\"code-hint notice\" disabled"));
    }

    #[test]
    fn self_service_enrolment_shows_the_uri_and_its_qr_code() {
        let mut v = view(PageStatus::Enrolling);
        let uri = "otpauth://totp/Capybara:alice?secret=JBSWY3DPEHPK3PXP&issuer=Capybara&x=<b>";
        v.enrol_uri = Some(uri.into());
        let h = render_view(&v, None);
        assert_well_formed(&h);
        assert!(h.contains(&format!("<code id=\"enrol-uri\">{}</code>", escape(uri))));
        assert!(!h.contains("<b>"));
        assert!(h.contains("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(h.contains("aria-labelledby=\"qr-title\""));
        // Codes are not sent while enrolling (the channels prove nothing yet).
        assert!(!h.contains("name=\"send\""));
        // The QR code decodes to the URI's modules: as many dark squares as the code has.
        let code = qrcode::QrCode::with_error_correction_level(uri, qrcode::EcLevel::M).unwrap();
        let dark = code
            .to_colors()
            .iter()
            .filter(|c| **c == qrcode::Color::Dark)
            .count();
        assert_eq!(h.matches("h1v1h-1z").count(), dark);
    }

    #[test]
    fn other_states_and_hostile_names() {
        let mut v = view(PageStatus::NotRequired);
        v.user = "<script>alert(1)</script>".into();
        let h = render_view(&v, None);
        assert_well_formed(&h);
        assert!(h.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
        assert!(h.contains("not required for this user"));
        for subject in [
            Subject::NotADevice,
            Subject::NotRequired,
            Subject::Unavailable,
        ] {
            let h = render(&Page {
                subject,
                notice: None,
                csrf: "",
                now: now(),
            });
            assert_well_formed(&h);
            assert!(!h.contains("<form"));
        }
    }

    #[test]
    fn durations_and_the_csp() {
        for (secs, text) in [
            (0, "1 s"),
            (45, "45 s"),
            (60, "1 min"),
            (250, "4 min 10 s"),
            (3600, "1 h"),
            (7500, "2 h 5 min"),
        ] {
            assert_eq!(human_duration(Duration::from_secs(secs)), text);
        }
        assert_eq!(human_duration(Duration::from_millis(59_500)), "1 min");
        let hash = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(CSS));
        assert!(csp().starts_with("default-src 'none'; "));
        assert!(csp().contains(&format!("style-src 'sha256-{hash}'")));
        assert!(!csp().contains("unsafe"));
    }
}
