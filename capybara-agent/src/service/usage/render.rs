//! A [`Report`] written as a document: text, JSON, CSV or html. Rendering lives in the agent,
//! so the CLI, a REST caller (`GET /api/v1/reports?format=html`) and a scheduled task get the
//! same document; the CLI writes it out as it is.
//!
//! The html report is **one self-contained file**: inline CSS, inline SVG charts (usage over
//! time as stacked bars, from the devices in blue `#1f6fb5` and to them in orange `#e8730c`;
//! top users and groups as horizontal bars), no script, font or image from anywhere. It is
//! accessible (one `h1`, a `h2` per section, tables with `th scope`, each chart an
//! `svg role="img"` with a `title` and a `desc` saying what it shows, and its figures in a
//! table below it) and printable (`@media print`: no backgrounds, sections not split).

use std::fmt::Write as _;

use super::report::{Format, Report, UsageTotals, civil_date};

/// `report` as a document in `format`.
pub fn render(report: &Report, format: Format) -> String {
    match format {
        Format::Text => text(report),
        Format::Json => serde_json::to_string_pretty(report).expect("reports serialise") + "\n",
        Format::Csv => csv(report),
        Format::Html => html(report),
    }
}

/// Bytes for people: B, kB, MB, GB, TB (powers of 1000).
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A rate in bytes per second as bits per second for people.
pub fn human_rate(bytes_per_s: u64) -> String {
    let bits = bytes_per_s as f64 * 8.0;
    if bits >= 1e9 {
        format!("{:.1} Gbit/s", bits / 1e9)
    } else if bits >= 1e6 {
        format!("{:.1} Mbit/s", bits / 1e6)
    } else if bits >= 1e3 {
        format!("{:.1} kbit/s", bits / 1e3)
    } else {
        format!("{bits:.0} bit/s")
    }
}

/// Seconds as `1h02m03s`.
pub fn human_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m:02}m{s:02}s")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM UTC`.
pub fn utc(secs: u64) -> String {
    format!(
        "{} {:02}:{:02} UTC",
        civil_date(secs / 86_400),
        secs / 3600 % 24,
        secs / 60 % 60
    )
}

fn drops_line(t: &UsageTotals) -> String {
    if t.drops.is_empty() {
        return "-".into();
    }
    t.drops
        .iter()
        .map(|(r, n)| format!("{r}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn quota_cell(u: &super::report::UserUsage) -> String {
    match &u.quota {
        Some(q) if q.limit_bytes > 0 => format!(
            "{} / {} ({:.0}%){}",
            human_bytes(q.used_bytes),
            human_bytes(q.limit_bytes),
            q.percent,
            if q.over { " OVER" } else { "" }
        ),
        Some(_) => "unlimited".into(),
        None => "-".into(),
    }
}

fn title(r: &Report) -> String {
    let mut t = format!("Usage report: {} to {}", utc(r.from), utc(r.to));
    if let Some(g) = &r.group {
        let _ = write!(t, ", group {g}");
    }
    t
}

/// Plain text.
pub fn text(r: &Report) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "{}", title(r));
    let _ = writeln!(
        o,
        "period: {}   generated: {}",
        r.period,
        utc(r.generated_at)
    );
    let t = &r.totals;
    let _ = writeln!(
        o,
        "total: {} from devices, {} to devices, {} sessions, online {}, peak {} / {}, drops {}",
        human_bytes(t.rx_bytes),
        human_bytes(t.tx_bytes),
        t.sessions,
        human_duration(t.online_seconds),
        human_rate(t.peak_rx_bytes_per_second),
        human_rate(t.peak_tx_bytes_per_second),
        drops_line(t)
    );
    let _ = writeln!(
        o,
        "\ntop users: {}",
        if r.top_users.is_empty() {
            "-".into()
        } else {
            r.top_users.join(", ")
        }
    );
    let _ = writeln!(
        o,
        "over quota: {}",
        if r.over_quota.is_empty() {
            "-".into()
        } else {
            r.over_quota.join(", ")
        }
    );
    if !r.groups.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<20} {:>8} {:>12} {:>12} {:>9} {:>12}",
            "GROUP", "MEMBERS", "FROM", "TO", "SESSIONS", "ONLINE"
        );
        for g in &r.groups {
            let u = &g.usage;
            let _ = writeln!(
                o,
                "{:<20} {:>8} {:>12} {:>12} {:>9} {:>12}",
                g.group,
                g.members,
                human_bytes(u.rx_bytes),
                human_bytes(u.tx_bytes),
                u.sessions,
                human_duration(u.online_seconds)
            );
        }
    }
    let _ = writeln!(
        o,
        "\n{:<20} {:>12} {:>12} {:>9} {:>12} {:>14} {:>14}  {:<28} DROPS",
        "USER", "FROM", "TO", "SESSIONS", "ONLINE", "PEAK FROM", "PEAK TO", "QUOTA"
    );
    for u in &r.users {
        let x = &u.usage;
        let _ = writeln!(
            o,
            "{:<20} {:>12} {:>12} {:>9} {:>12} {:>14} {:>14}  {:<28} {}",
            u.user,
            human_bytes(x.rx_bytes),
            human_bytes(x.tx_bytes),
            x.sessions,
            human_duration(x.online_seconds),
            human_rate(x.peak_rx_bytes_per_second),
            human_rate(x.peak_tx_bytes_per_second),
            quota_cell(u),
            drops_line(x)
        );
    }
    o
}

/// A CSV field, quoted when it needs to be (RFC 4180).
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

/// CSV: a header, then one row per user, one per group and the total (`scope` says which).
pub fn csv(r: &Report) -> String {
    let mut o = String::from(
        "scope,name,groups,rx_bytes,tx_bytes,rx_packets,tx_packets,sessions,online_seconds,\
         peak_rx_bytes_per_second,peak_tx_bytes_per_second,drops,quota_used_bytes,\
         quota_limit_bytes,quota_percent,over_quota\r\n",
    );
    let mut row = |scope: &str,
                   name: &str,
                   groups: &str,
                   t: &UsageTotals,
                   q: Option<&super::report::QuotaStanding>| {
        let drops = t
            .drops
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(";");
        let (used, limit, pct, over) = match q {
            Some(q) => (
                q.used_bytes.to_string(),
                q.limit_bytes.to_string(),
                format!("{:.2}", q.percent),
                q.over.to_string(),
            ),
            None => Default::default(),
        };
        let _ = write!(
            o,
            "{scope},{},{},{},{},{},{},{},{},{},{},{},{used},{limit},{pct},{over}\r\n",
            csv_field(name),
            csv_field(groups),
            t.rx_bytes,
            t.tx_bytes,
            t.rx_packets,
            t.tx_packets,
            t.sessions,
            t.online_seconds,
            t.peak_rx_bytes_per_second,
            t.peak_tx_bytes_per_second,
            csv_field(&drops),
        );
    };
    for u in &r.users {
        row(
            "user",
            &u.user,
            &u.groups.join(";"),
            &u.usage,
            u.quota.as_ref(),
        );
    }
    for g in &r.groups {
        row("group", &g.group, "", &g.usage, None);
    }
    row("total", "", "", &r.totals, None);
    o
}

/// Escapes text for html.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The color of bytes from the devices in the charts.
pub const RX_COLOR: &str = "#1f6fb5";
/// The color of bytes to the devices.
pub const TX_COLOR: &str = "#e8730c";
/// The color of the top users' bars.
pub const USER_COLOR: &str = "#2f9e44";
/// The color of the groups' bars.
pub const GROUP_COLOR: &str = "#7048e8";

/// Width and height of the usage-over-time chart's plot area, in px.
pub const SERIES_PLOT: (u32, u32) = (860, 200);

const CSS: &str = "\
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;margin:0;color:#1d2430;background:#fff}\
main{max-width:1100px;margin:0 auto;padding:24px}\
h1{font-size:1.6rem;margin:0 0 4px}h2{font-size:1.2rem;margin:28px 0 8px;border-bottom:1px solid #d0d7de;padding-bottom:4px}\
.meta{color:#57606a;margin:0 0 16px}\
.cards{display:flex;flex-wrap:wrap;gap:12px;margin:0;padding:0;list-style:none}\
.cards li{border:1px solid #d0d7de;border-radius:6px;padding:8px 12px;min-width:140px}\
.cards b{display:block;font-size:1.2rem}\
table{border-collapse:collapse;width:100%;font-size:.9rem;margin:8px 0}\
th,td{border-bottom:1px solid #e5e8eb;padding:4px 8px;text-align:right;vertical-align:top}\
th:first-child,td:first-child{text-align:left}thead th{background:#f3f5f7}\
figure{margin:0}figcaption{color:#57606a;font-size:.85rem}\
.legend span{display:inline-block;width:12px;height:12px;margin:0 4px 0 12px;vertical-align:middle}\
.over{color:#b42318;font-weight:600}\
details{margin:4px 0 12px}\
section{break-inside:avoid}\
@media print{main{max-width:none;padding:0}thead th{background:none}details{display:none}a{color:inherit}}";

fn svg_text(x: f64, y: f64, anchor: &str, size: u32, s: &str) -> String {
    format!(
        "<text x=\"{x:.1}\" y=\"{y:.1}\" text-anchor=\"{anchor}\" font-size=\"{size}\" fill=\"#1d2430\">{}</text>",
        esc(s)
    )
}

/// The usage-over-time chart: stacked bars per bucket.
fn series_chart(r: &Report) -> String {
    let (pw, ph) = SERIES_PLOT;
    let (left, top, bottom) = (70.0, 10.0, 40.0);
    let width = f64::from(pw) + left + 10.0;
    let height = f64::from(ph) + top + bottom;
    let max = r
        .series
        .iter()
        .map(|p| p.rx_bytes.saturating_add(p.tx_bytes))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let n = r.series.len().max(1) as f64;
    let slot = f64::from(pw) / n;
    let bar = (slot * 0.7).max(1.0);
    let bucket = if r.resolution == "hour" {
        "hour"
    } else {
        "day"
    };
    let total: u64 = r.series.iter().map(|p| p.rx_bytes + p.tx_bytes).sum();
    let busiest = r
        .series
        .iter()
        .max_by_key(|p| p.rx_bytes + p.tx_bytes)
        .map(|p| (p.start, p.rx_bytes + p.tx_bytes));
    let desc = match busiest {
        Some((start, bytes)) if total > 0 => format!(
            "Bytes per {bucket}, from the devices (blue) stacked under to the devices (orange), {} buckets, {} in all; the busiest {bucket} starts {} with {}.",
            r.series.len(),
            human_bytes(total),
            utc(start),
            human_bytes(bytes)
        ),
        _ => format!("Bytes per {bucket}: no traffic in the period."),
    };
    let mut s = format!(
        "<svg id=\"chart-series\" role=\"img\" aria-labelledby=\"chart-series-title chart-series-desc\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" xmlns=\"http://www.w3.org/2000/svg\" shape-rendering=\"crispEdges\">\
<title id=\"chart-series-title\">Usage over time</title><desc id=\"chart-series-desc\">{}</desc>",
        esc(&desc)
    );
    // Axis and grid: 0, half, max.
    for (frac, label) in [
        (0.0, "0".to_owned()),
        (0.5, human_bytes((max / 2.0) as u64)),
        (1.0, human_bytes(max as u64)),
    ] {
        let y = top + f64::from(ph) * (1.0 - frac);
        let _ = write!(
            s,
            "<line x1=\"{left}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\" stroke=\"#d0d7de\" stroke-width=\"1\"/>",
            left + f64::from(pw)
        );
        s.push_str(&svg_text(left - 6.0, y + 4.0, "end", 11, &label));
    }
    let every = (r.series.len() / 8).max(1);
    for (i, p) in r.series.iter().enumerate() {
        let x = left + slot * i as f64 + (slot - bar) / 2.0;
        let base = top + f64::from(ph);
        let rx_h = p.rx_bytes as f64 / max * f64::from(ph);
        let tx_h = p.tx_bytes as f64 / max * f64::from(ph);
        if rx_h > 0.0 {
            let _ = write!(
                s,
                "<rect class=\"rx\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{rx_h:.1}\" fill=\"{RX_COLOR}\"><title>{}: {} from devices</title></rect>",
                base - rx_h,
                utc(p.start),
                human_bytes(p.rx_bytes)
            );
        }
        if tx_h > 0.0 {
            let _ = write!(
                s,
                "<rect class=\"tx\" x=\"{x:.1}\" y=\"{:.1}\" width=\"{bar:.1}\" height=\"{tx_h:.1}\" fill=\"{TX_COLOR}\"><title>{}: {} to devices</title></rect>",
                base - rx_h - tx_h,
                utc(p.start),
                human_bytes(p.tx_bytes)
            );
        }
        if i % every == 0 {
            let label = if bucket == "hour" {
                format!("{:02}:00", p.start / 3600 % 24)
            } else {
                civil_date(p.start / 86_400)[5..].to_owned()
            };
            s.push_str(&svg_text(x + bar / 2.0, base + 16.0, "middle", 11, &label));
        }
    }
    s.push_str("</svg>");
    s
}

/// A horizontal bar chart of `(label, value)`.
fn bars_chart(id: &str, title: &str, desc: &str, color: &str, rows: &[(String, u64)]) -> String {
    let row_h = 22.0;
    let (left, plot_w) = (160.0, 620.0);
    let height = row_h * rows.len().max(1) as f64 + 10.0;
    let width = left + plot_w + 110.0;
    let max = rows.iter().map(|r| r.1).max().unwrap_or(0).max(1) as f64;
    let mut s = format!(
        "<svg id=\"{id}\" role=\"img\" aria-labelledby=\"{id}-title {id}-desc\" width=\"{width:.0}\" height=\"{height:.0}\" viewBox=\"0 0 {width:.0} {height:.0}\" xmlns=\"http://www.w3.org/2000/svg\" shape-rendering=\"crispEdges\">\
<title id=\"{id}-title\">{}</title><desc id=\"{id}-desc\">{}</desc>",
        esc(title),
        esc(desc)
    );
    for (i, (label, v)) in rows.iter().enumerate() {
        let y = 5.0 + row_h * i as f64;
        let w = *v as f64 / max * plot_w;
        s.push_str(&svg_text(left - 8.0, y + 15.0, "end", 12, label));
        if w > 0.0 {
            let _ = write!(
                s,
                "<rect x=\"{left}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"{color}\"/>",
                y + 3.0,
                row_h - 6.0
            );
        }
        s.push_str(&svg_text(
            left + w + 6.0,
            y + 15.0,
            "start",
            12,
            &human_bytes(*v),
        ));
    }
    s.push_str("</svg>");
    s
}

fn totals_row(o: &mut String, first: &str, t: &UsageTotals, extra: &[String]) {
    let _ = write!(
        o,
        "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>",
        esc(first),
        human_bytes(t.rx_bytes),
        human_bytes(t.tx_bytes),
        t.sessions,
        human_duration(t.online_seconds),
        human_rate(t.peak_rx_bytes_per_second),
        human_rate(t.peak_tx_bytes_per_second),
    );
    for e in extra {
        let _ = write!(o, "<td>{e}</td>");
    }
    let _ = write!(o, "<td>{}</td></tr>", esc(&drops_line(t)));
}

const USAGE_HEADERS: &str = "<th scope=\"col\">From devices</th><th scope=\"col\">To devices</th><th scope=\"col\">Sessions</th><th scope=\"col\">Online</th><th scope=\"col\">Peak from</th><th scope=\"col\">Peak to</th>";

/// One self-contained html file (see the module docs).
pub fn html(r: &Report) -> String {
    let t = &r.totals;
    let title = title(r);
    let mut o = String::with_capacity(4096 + r.users.len() * 400);
    let _ = write!(
        o,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{}</title><style>{CSS}</style></head><body><main>",
        esc(&title)
    );
    let _ = write!(
        o,
        "<h1>{}</h1><p class=\"meta\">Period: {}. Generated {}. Bytes are IP bytes as the kernel counts them; rates are the highest 10-second average of one device.</p>",
        esc(&title),
        esc(&r.period),
        utc(r.generated_at)
    );
    let _ = write!(
        o,
        "<section aria-labelledby=\"h-summary\"><h2 id=\"h-summary\">Summary</h2><ul class=\"cards\">\
<li>From devices<b>{}</b></li><li>To devices<b>{}</b></li><li>Sessions<b>{}</b></li><li>Online<b>{}</b></li>\
<li>Users<b>{}</b></li><li>Over quota<b>{}</b></li></ul></section>",
        human_bytes(t.rx_bytes),
        human_bytes(t.tx_bytes),
        t.sessions,
        human_duration(t.online_seconds),
        r.users.len(),
        r.over_quota.len()
    );
    // Usage over time.
    let _ = write!(
        o,
        "<section aria-labelledby=\"h-series\"><h2 id=\"h-series\">Usage over time</h2><figure>{}<figcaption class=\"legend\"><span style=\"background:{RX_COLOR}\"></span>from devices<span style=\"background:{TX_COLOR}\"></span>to devices (per {})</figcaption></figure>",
        series_chart(r),
        esc(&r.resolution)
    );
    o.push_str("<details><summary>Figures</summary><table><thead><tr><th scope=\"col\">Start (UTC)</th><th scope=\"col\">From devices</th><th scope=\"col\">To devices</th></tr></thead><tbody>");
    for p in &r.series {
        let _ = write!(
            o,
            "<tr><th scope=\"row\">{}</th><td>{}</td><td>{}</td></tr>",
            utc(p.start),
            human_bytes(p.rx_bytes),
            human_bytes(p.tx_bytes)
        );
    }
    o.push_str("</tbody></table></details></section>");
    // Top users.
    let top: Vec<(String, u64)> = r
        .top_users
        .iter()
        .filter_map(|n| r.users.iter().find(|u| &u.user == n))
        .map(|u| (u.user.clone(), u.usage.bytes()))
        .collect();
    let top_desc = if top.is_empty() {
        "No user had traffic in the period.".to_owned()
    } else {
        format!(
            "Bytes both ways of the {} busiest users: {}.",
            top.len(),
            top.iter()
                .map(|(n, b)| format!("{n} {}", human_bytes(*b)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let _ = write!(
        o,
        "<section aria-labelledby=\"h-top\"><h2 id=\"h-top\">Top users</h2><figure>{}</figure></section>",
        bars_chart("chart-top", "Top users", &top_desc, USER_COLOR, &top)
    );
    // Groups.
    if !r.groups.is_empty() {
        let rows: Vec<(String, u64)> = r
            .groups
            .iter()
            .map(|g| (g.group.clone(), g.usage.bytes()))
            .collect();
        let desc = format!(
            "Bytes both ways per group: {}.",
            rows.iter()
                .map(|(n, b)| format!("{n} {}", human_bytes(*b)))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let _ = write!(
            o,
            "<section aria-labelledby=\"h-groups\"><h2 id=\"h-groups\">Groups</h2><figure>{}</figure>\
<table><thead><tr><th scope=\"col\">Group</th>{USAGE_HEADERS}<th scope=\"col\">Members</th><th scope=\"col\">Drops</th></tr></thead><tbody>",
            bars_chart("chart-groups", "Usage per group", &desc, GROUP_COLOR, &rows)
        );
        for g in &r.groups {
            totals_row(&mut o, &g.group, &g.usage, &[g.members.to_string()]);
        }
        o.push_str("</tbody></table></section>");
    }
    // Over quota.
    let _ = write!(
        o,
        "<section aria-labelledby=\"h-over\"><h2 id=\"h-over\">Over quota</h2>"
    );
    if r.over_quota.is_empty() {
        o.push_str("<p>No user is over quota.</p>");
    } else {
        let _ = write!(o, "<p class=\"over\">{}</p>", esc(&r.over_quota.join(", ")));
    }
    o.push_str("</section>");
    // Users.
    let _ = write!(
        o,
        "<section aria-labelledby=\"h-users\"><h2 id=\"h-users\">Users</h2><table><thead><tr><th scope=\"col\">User</th>{USAGE_HEADERS}<th scope=\"col\">Groups</th><th scope=\"col\">Quota</th><th scope=\"col\">Drops</th></tr></thead><tbody>"
    );
    for u in &r.users {
        let quota = quota_cell(u);
        let quota = if u.quota.as_ref().is_some_and(|q| q.over) {
            format!("<span class=\"over\">{}</span>", esc(&quota))
        } else {
            esc(&quota)
        };
        totals_row(
            &mut o,
            &u.user,
            &u.usage,
            &[esc(&u.groups.join(", ")), quota],
        );
    }
    let _ = write!(o, "</tbody><tfoot>");
    totals_row(&mut o, "Total", t, &[String::new(), String::new()]);
    o.push_str("</tfoot></table></section></main></body></html>\n");
    o
}
