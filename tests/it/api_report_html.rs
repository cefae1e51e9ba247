//! The html usage report in a real browser: Debian's headless Chromium (`chromium --headless
//! --screenshot`, no WebDriver needed for one static page; `--no-sandbox` as root, its profile in
//! a temporary directory, each run bounded to 60 s) opens a report rendered by the agent's own
//! code, and the test looks at what was drawn:
//! - the DOM Chromium built has the title, one `h1`, the three charts as `svg role="img"` with
//!   their `title` and `desc` (the text alternatives);
//! - in the screenshot, the usage-over-time chart's bars (the "from devices" color, `#1f6fb5`)
//!   are three, left to right at heights 1 : 2 : 4 as the data (50, 100 and 200 px of the 200 px
//!   plot at scale 1, ±2 px), and the top users' bars (`#2f9e44`) have widths 3 : 1;
//! - nothing is fetched: the file has no script, no link, no `src`.
//!
//! `CAPYBARA_REPORT_SHOT=FILE` keeps a copy of the screenshot (to look at it).

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use capybara_agent::service::usage::{
    render::{RX_COLOR, SERIES_PLOT, USER_COLOR, render},
    report::{Format, GroupUsage, Report, UsagePoint, UsageTotals, UserUsage},
};

const GB: u64 = 1_000_000_000;
/// 2026-12-01T00:00:00Z.
const DAY0: u64 = 1_796_083_200;

fn user(name: &str, rx: u64, tx: u64) -> UserUsage {
    UserUsage {
        user: name.into(),
        groups: vec!["staff".into()],
        usage: UsageTotals {
            rx_bytes: rx,
            tx_bytes: tx,
            sessions: 3,
            online_seconds: 7200,
            ..UsageTotals::default()
        },
        quota: None,
    }
}

fn report() -> Report {
    Report {
        period: "range".into(),
        from: DAY0,
        to: DAY0 + 3 * 86_400,
        generated_at: DAY0 + 3 * 86_400,
        group: None,
        resolution: "day".into(),
        totals: UsageTotals {
            rx_bytes: 7 * GB,
            ..UsageTotals::default()
        },
        users: vec![user("alice", 6 * GB, 0), user("bob", 2 * GB, 0)],
        groups: vec![GroupUsage {
            group: "staff".into(),
            members: 2,
            usage: UsageTotals {
                rx_bytes: 8 * GB,
                ..UsageTotals::default()
            },
        }],
        top_users: vec!["alice".into(), "bob".into()],
        over_quota: vec![],
        series: [1, 2, 4]
            .iter()
            .enumerate()
            .map(|(i, g)| UsagePoint {
                start: DAY0 + i as u64 * 86_400,
                rx_bytes: g * GB,
                tx_bytes: 0,
            })
            .collect(),
    }
}

/// Runs Chromium headless with `args` and the page, at most 60 s; its standard output.
fn chromium(profile: &Path, args: &[&str], page: &Path) -> String {
    let mut child = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            "--force-device-scale-factor=1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("run chromium (cargo xtask setup installs it)");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "chromium failed: {status}");
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    out
}

fn rgb(hex: &str) -> [u8; 3] {
    let v = u32::from_str_radix(hex.trim_start_matches('#'), 16).unwrap();
    [(v >> 16) as u8, (v >> 8) as u8, v as u8]
}

/// Runs of adjacent columns (or rows, `by_row`) holding `color`: (first, last, the most such
/// pixels in one column (row) of the run: a bar's height (width)).
fn runs(img: &Image, color: [u8; 3], by_row: bool) -> Vec<(usize, usize, usize)> {
    let n = if by_row { img.height } else { img.width };
    let mut counts = vec![0usize; n];
    for y in 0..img.height {
        for x in 0..img.width {
            let p = img.px(x, y);
            if p.iter().zip(color).all(|(a, b)| a.abs_diff(b) <= 6) {
                counts[if by_row { y } else { x }] += 1;
            }
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        if counts[i] == 0 {
            i += 1;
            continue;
        }
        let start = i;
        let mut high = 0;
        while i < n && counts[i] > 0 {
            high = high.max(counts[i]);
            i += 1;
        }
        out.push((start, i - 1, high));
    }
    out
}

struct Image {
    width: usize,
    height: usize,
    channels: usize,
    data: Vec<u8>,
}

impl Image {
    fn read(path: &Path) -> Image {
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut data = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut data).unwrap();
        assert_eq!(info.bit_depth, png::BitDepth::Eight);
        let channels = match info.color_type {
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
            other => panic!("unexpected PNG color type {other:?}"),
        };
        data.truncate(info.buffer_size());
        Image {
            width: info.width as usize,
            height: info.height as usize,
            channels,
            data,
        }
    }

    fn px(&self, x: usize, y: usize) -> [u8; 3] {
        let i = (y * self.width + x) * self.channels;
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

#[test]
fn chromium_draws_the_html_report_as_the_data_says() {
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    let html = render(&report(), Format::Html);
    for outside in ["<script", "<link", "src=", "url(", "@import"] {
        assert!(
            !html.contains(outside),
            "the report fetches something: {outside}"
        );
    }
    std::fs::write(&page, &html).unwrap();

    let dom = chromium(&dir.path().join("profile-dom"), &["--dump-dom"], &page);
    assert!(
        dom.contains("<title>Usage report: 2026-12-01 00:00 UTC to 2026-12-04 00:00 UTC</title>"),
        "{dom}"
    );
    assert_eq!(dom.matches("<h1>").count(), 1);
    for id in ["chart-series", "chart-top", "chart-groups"] {
        assert!(
            dom.contains(&format!(
                "<svg id=\"{id}\" role=\"img\" aria-labelledby=\"{id}"
            )),
            "{id} is not an accessible image in the DOM: {}",
            dom.find("<svg")
                .map_or("no svg", |i| &dom[i..(i + 300).min(dom.len())])
        );
    }
    assert!(dom.contains("<title id=\"chart-series-title\">Usage over time</title>"));
    assert!(
        dom.contains("the busiest day starts 2026-12-03 00:00 UTC with 4.0 GB"),
        "{dom}"
    );
    assert!(dom.contains("<th scope=\"col\">From devices</th>"));

    let shot = dir.path().join("shot.png");
    chromium(
        &dir.path().join("profile-shot"),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,1200",
        ],
        &page,
    );
    if let Ok(keep) = std::env::var("CAPYBARA_REPORT_SHOT") {
        std::fs::copy(&shot, keep).unwrap();
    }
    let img = Image::read(&shot);
    assert_eq!(img.width, 1200);

    let bars = runs(&img, rgb(RX_COLOR), false);
    // The legend's swatch is 12 px tall; the bars are the three taller runs.
    let bars: Vec<_> = bars.into_iter().filter(|b| b.2 > 20).collect();
    assert_eq!(bars.len(), 3, "three days, three bars: {bars:?}");
    assert!(bars[0].0 < bars[1].0 && bars[1].0 < bars[2].0);
    let plot = SERIES_PLOT.1 as f64;
    for (bar, expect) in bars.iter().zip([0.25, 0.5, 1.0]) {
        let h = bar.2 as f64;
        assert!(
            (h - plot * expect).abs() <= 2.0,
            "bar {bar:?} is {h} px, expected {} px",
            plot * expect
        );
    }
    let widths: Vec<f64> = runs(&img, rgb(USER_COLOR), true)
        .into_iter()
        .map(|(_, _, w)| w as f64)
        .collect();
    assert_eq!(widths.len(), 2, "two top users: {widths:?}");
    assert!(
        (widths[0] / widths[1] - 3.0).abs() < 0.05,
        "alice 6 GB, bob 2 GB: {widths:?}"
    );
}
