//! Horizontal bar charts as hand-written SVG: one question per chart, each figure a bar with
//! its label on the left and its value written at the bar's end, each same-run baseline as its
//! own bar right under ours (another color), and each comparison's ratio and target written
//! under its group's heading.
//!
//! Why by hand and not plotters: the layout must guarantee that no two texts overlap and that
//! nothing is cut off, which needs the width of every text before placing it; plotters places
//! its tick labels and captions without knowing them. Text widths are estimated from DejaVu Sans
//! (Debian's `sans-serif`, what Chromium and most viewers draw) by [`text_width`], an upper
//! bound per character class, so the estimate errs wide; the `bench_report` test checks the
//! boxes Chromium actually drew (`getBBox`) do not overlap and stay inside the picture.
//!
//! Every bar is a `rect` with `data-figure` (the figure's name) and its value label a `text`
//! with `data-value-of` (the same name), so a test can pair them.

use std::fmt::Write as _;

/// Whose figure a bar is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Capybara's figure.
    Ours,
    /// A baseline measured in the same run (another tool, or ours configured differently).
    Baseline,
    /// A reference point that is neither: the rig with nothing on, the sender alone.
    Reference,
}

impl Role {
    /// The bar's fill.
    pub fn color(self) -> &'static str {
        match self {
            Role::Ours => "#1f6fb5",
            Role::Baseline => "#e8871e",
            Role::Reference => "#9a9a9a",
        }
    }

    /// The legend's words for the role (`reference`: what the chart's grey bars are).
    fn legend(self, reference: &str) -> &str {
        match self {
            Role::Ours => "Capybara",
            Role::Baseline => "same-run baseline",
            Role::Reference => reference,
        }
    }
}

/// One bar: a figure's value.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// What the bar is (left of it).
    pub label: String,
    /// The figure's name (`data-figure`).
    pub figure: String,
    /// The value (NaN is drawn as no bar and `n/a`).
    pub value: f64,
    /// The text at the bar's end: the value, its unit and the target if it has one.
    pub value_text: String,
    /// Ours, a baseline or a reference.
    pub role: Role,
}

/// Bars answering one part of the chart's question, under a heading.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The heading (bold).
    pub heading: String,
    /// Lines under the heading: the ratios and their targets, baselines not run.
    pub notes: Vec<String>,
    /// The bars, top to bottom.
    pub bars: Vec<Bar>,
}

/// A chart: one question, one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct BarChart {
    /// The question (wrapped when long).
    pub title: String,
    /// The unit and which way is better, under the title.
    pub subtitle: String,
    /// What the grey ([`Role::Reference`]) bars are, in the legend.
    pub reference: String,
    /// A range every one of our values should land in (a target `lo–hi`), shaded behind the
    /// bars.
    pub band: Option<(f64, f64)>,
    /// The groups, top to bottom.
    pub groups: Vec<Group>,
}

/// Width of the picture.
pub const WIDTH: f64 = 960.0;
const MARGIN: f64 = 20.0;
const TITLE_PX: f64 = 20.0;
const SUBTITLE_PX: f64 = 14.0;
const HEADING_PX: f64 = 15.0;
const NOTE_PX: f64 = 13.0;
const LABEL_PX: f64 = 13.0;
const TICK_PX: f64 = 12.0;
const BAR_PX: f64 = 18.0;
/// Space between the lines of a text block, as a multiple of the font size.
const LEADING: f64 = 1.35;
/// The label column is at most this share of the width (longer labels wrap).
const LABEL_SHARE: f64 = 0.34;
/// Gap between a label and its bar, a bar and its value.
const GAP: f64 = 8.0;

/// The font every text uses.
const FONT: &str = "DejaVu Sans, Verdana, sans-serif";
/// The target band's fill and edges.
const BAND: &str = "#d5f0d5";
const BAND_EDGE: &str = "#5aa95a";

/// A band's end as text (`0.95`, `1`).
fn short_num(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_owned()
}

/// The width `text` takes at `px` pixels in DejaVu Sans (bold when `bold`), estimated from
/// above: each character class is given the widest advance of its members.
pub fn text_width(text: &str, px: f64, bold: bool) -> f64 {
    let em: f64 = text
        .chars()
        .map(|c| match c {
            ' ' => 0.32,
            'i' | 'l' | 'j' | '\'' | '|' | '.' | ',' | ':' | ';' | '!' => 0.32,
            'f' | 't' | 'r' | '(' | ')' | '[' | ']' | '-' | '/' | 'I' => 0.44,
            'm' | 'M' | 'W' | '%' => 1.02,
            'w' => 0.84,
            '0'..='9' => 0.64,
            'a'..='z' => 0.64,
            'A'..='Z' => 0.78,
            _ => 0.86,
        })
        .sum();
    em * px * if bold { 1.08 } else { 1.0 }
}

/// `text` broken at spaces into lines of at most `width` pixels (a word longer than that gets
/// a line of its own).
pub fn wrap(text: &str, px: f64, bold: bool, width: f64) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let candidate = if line.is_empty() {
            word.to_owned()
        } else {
            format!("{line} {word}")
        };
        if !line.is_empty() && text_width(&candidate, px, bold) > width {
            lines.push(std::mem::replace(&mut line, word.to_owned()));
        } else {
            line = candidate;
        }
    }
    if !line.is_empty() || lines.is_empty() {
        lines.push(line);
    }
    lines
}

/// Round tick steps (1, 2, 2.5 or 5 × 10ⁿ) from 0 to at least `max`, at most `most` of them
/// after 0.
pub fn ticks(max: f64, most: usize) -> Vec<f64> {
    if !(max.is_finite() && max > 0.0) {
        return vec![0.0, 1.0];
    }
    let raw = max / most.max(1) as f64;
    let pow = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * pow)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * pow);
    let n = (max / step - 1e-9).ceil().max(1.0) as usize;
    (0..=n).map(|i| i as f64 * step).collect()
}

/// A tick's text: no more digits than the step needs.
fn tick_text(v: f64, step: f64) -> String {
    if step >= 1.0 || v == 0.0 {
        let s = format!("{v:.0}");
        // Thousands separated by a thin space, as the value labels' magnitudes are read.
        if v.abs() >= 10_000.0 {
            group_thousands(&s)
        } else {
            s
        }
    } else {
        let decimals = (0..6)
            .find(|d| {
                let m = step * 10f64.powi(*d);
                (m - m.round()).abs() < 1e-6
            })
            .unwrap_or(6) as usize;
        format!("{v:.decimals$}")
    }
}

fn group_thousands(digits: &str) -> String {
    let (sign, digits) = digits.strip_prefix('-').map_or(("", digits), |d| ("-", d));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A `text` element at `(x, y)` in `font` (pixels, bold).
fn text(
    out: &mut String,
    (x, y): (f64, f64),
    (px, bold): (f64, bool),
    anchor: &str,
    extra: &str,
    s: &str,
) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" font-family="{FONT}" font-size="{px}"{} text-anchor="{anchor}"{extra}>{}</text>"#,
        if bold { r#" font-weight="bold""# } else { "" },
        esc(s)
    );
}

/// The chart as an SVG document; its height follows from its content.
pub fn render(chart: &BarChart) -> String {
    let inner = WIDTH - 2.0 * MARGIN;
    let bars: Vec<&Bar> = chart.groups.iter().flat_map(|g| &g.bars).collect();
    let label_w = bars
        .iter()
        .map(|b| text_width(&b.label, LABEL_PX, false))
        .fold(0.0, f64::max)
        .min(WIDTH * LABEL_SHARE);
    let value_w = bars
        .iter()
        .map(|b| text_width(&b.value_text, LABEL_PX, false))
        .fold(0.0, f64::max);
    let x0 = MARGIN + label_w + GAP;
    let x1 = (WIDTH - MARGIN - value_w - GAP).max(x0 + 120.0);
    let max = bars
        .iter()
        .map(|b| b.value)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max)
        .max(chart.band.map_or(0.0, |b| b.1));
    // As many ticks as fit with room between their texts.
    let mut most = 6;
    let ticks = loop {
        let t = ticks(max, most);
        let step = t[1] - t[0];
        let widest = t
            .iter()
            .map(|v| text_width(&tick_text(*v, step), TICK_PX, false))
            .fold(0.0, f64::max);
        let spacing = (x1 - x0) / (t.len() - 1) as f64;
        if spacing >= widest + 12.0 || most == 1 {
            break t;
        }
        most -= 1;
    };
    let top = *ticks.last().unwrap_or(&1.0);
    let step = ticks[1] - ticks[0];
    let scale = |v: f64| x0 + (x1 - x0) * (v / top).clamp(0.0, 1.0);

    let mut body = String::new();
    let mut y = MARGIN;
    for line in wrap(&chart.title, TITLE_PX, true, inner) {
        y += TITLE_PX;
        text(&mut body, (MARGIN, y), (TITLE_PX, true), "start", "", &line);
        y += TITLE_PX * (LEADING - 1.0);
    }
    for line in wrap(&chart.subtitle, SUBTITLE_PX, false, inner) {
        y += SUBTITLE_PX * LEADING;
        text(
            &mut body,
            (MARGIN, y),
            (SUBTITLE_PX, false),
            "start",
            r##" fill="#333""##,
            &line,
        );
    }
    // The legend: one swatch per role drawn, left to right, wrapping.
    y += 10.0;
    let mut x = MARGIN;
    let mut first = true;
    for role in [Role::Ours, Role::Baseline, Role::Reference] {
        if !bars.iter().any(|b| b.role == role) {
            continue;
        }
        let words = role.legend(&chart.reference);
        let w = 14.0 + 6.0 + text_width(words, NOTE_PX, false);
        if !first && x + w > WIDTH - MARGIN {
            x = MARGIN;
            y += NOTE_PX * LEADING + 4.0;
        }
        if first {
            y += NOTE_PX;
            first = false;
        }
        let _ = writeln!(
            body,
            r#"<rect x="{x:.1}" y="{:.1}" width="14" height="12" fill="{}"/>"#,
            y - 11.0,
            role.color()
        );
        text(
            &mut body,
            (x + 20.0, y),
            (NOTE_PX, false),
            "start",
            "",
            words,
        );
        x += w + 22.0;
    }
    if let Some((lo, hi)) = chart.band {
        let words = format!("target {}–{}", short_num(lo), short_num(hi));
        let w = 14.0 + 6.0 + text_width(&words, NOTE_PX, false);
        if x + w > WIDTH - MARGIN {
            x = MARGIN;
            y += NOTE_PX * LEADING + 4.0;
        }
        let _ = writeln!(
            body,
            r#"<rect x="{x:.1}" y="{:.1}" width="14" height="12" fill="{BAND}" stroke="{BAND_EDGE}"/>"#,
            y - 11.0
        );
        text(
            &mut body,
            (x + 20.0, y),
            (NOTE_PX, false),
            "start",
            "",
            &words,
        );
    }
    y += 8.0;

    let mut rows = String::new();
    // The bar blocks' vertical extents: grid lines and the band run through bars only, never
    // through a heading or a note.
    let mut blocks: Vec<(f64, f64)> = Vec::new();
    for g in &chart.groups {
        y += 14.0;
        for line in wrap(&g.heading, HEADING_PX, true, inner) {
            y += HEADING_PX * LEADING;
            text(
                &mut rows,
                (MARGIN, y),
                (HEADING_PX, true),
                "start",
                "",
                &line,
            );
        }
        for note in &g.notes {
            for line in wrap(note, NOTE_PX, false, inner - 12.0) {
                y += NOTE_PX * LEADING;
                text(
                    &mut rows,
                    (MARGIN + 12.0, y),
                    (NOTE_PX, false),
                    "start",
                    r##" fill="#333" class="note""##,
                    &line,
                );
            }
        }
        y += 6.0;
        let block_top = y;
        for b in &g.bars {
            let lines = wrap(&b.label, LABEL_PX, false, label_w);
            let row_h = (lines.len() as f64 * LABEL_PX * LEADING + 8.0).max(BAR_PX + 10.0);
            let mid = y + row_h / 2.0;
            let first_line =
                mid - (lines.len() as f64 - 1.0) * LABEL_PX * LEADING / 2.0 + LABEL_PX * 0.35;
            for (i, line) in lines.iter().enumerate() {
                text(
                    &mut rows,
                    (x0 - GAP, first_line + i as f64 * LABEL_PX * LEADING),
                    (LABEL_PX, false),
                    "end",
                    r#" class="label""#,
                    line,
                );
            }
            let end = if b.value.is_finite() && b.value > 0.0 {
                // The smallest bar stays visible beside a thousand times larger one.
                scale(b.value).max(x0 + 2.0)
            } else {
                x0
            };
            let _ = writeln!(
                rows,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{BAR_PX}" fill="{}" data-figure="{}" class="bar"><title>{}</title></rect>"#,
                mid - BAR_PX / 2.0,
                end - x0,
                b.role.color(),
                esc(&b.figure),
                esc(&format!("{}: {}", b.figure, b.value_text))
            );
            text(
                &mut rows,
                (end + GAP, mid + LABEL_PX * 0.35),
                (LABEL_PX, false),
                "start", // A white halo keeps the value legible where it crosses a grid line or the band.
                &format!(
                    r#" class="value" data-value-of="{}" paint-order="stroke" stroke="white" stroke-width="4" stroke-linejoin="round""#,
                    esc(&b.figure)
                ),
                &b.value_text,
            );
            y += row_h;
        }
        blocks.push((block_top, y));
    }
    let bars_bottom = y + 4.0;
    // The band and the grid lines behind the bars, the tick texts under them.
    let mut grid = String::new();
    for (i, (b0, b1)) in blocks.iter().enumerate() {
        let b1 = if i + 1 == blocks.len() {
            bars_bottom
        } else {
            *b1
        };
        if let Some((lo, hi)) = chart.band {
            let _ = writeln!(
                grid,
                r#"<rect x="{:.1}" y="{b0:.1}" width="{:.1}" height="{:.1}" fill="{BAND}" stroke="{BAND_EDGE}" stroke-dasharray="4 3"/>"#,
                scale(lo),
                (scale(hi) - scale(lo)).max(1.0),
                b1 - b0
            );
        }
        for t in &ticks {
            let x = scale(*t);
            let _ = writeln!(
                grid,
                r##"<line x1="{x:.1}" y1="{b0:.1}" x2="{x:.1}" y2="{b1:.1}" stroke="{}" stroke-width="1"/>"##,
                if *t == 0.0 { "#444" } else { "#e3e3e3" }
            );
        }
    }
    for t in &ticks {
        text(
            &mut grid,
            (scale(*t), bars_bottom + TICK_PX + 4.0),
            (TICK_PX, false),
            "middle",
            r#" class="tick""#,
            &tick_text(*t, step),
        );
    }
    let height = (bars_bottom + TICK_PX + 4.0 + MARGIN).ceil();
    let mut svg = String::new();
    let _ = writeln!(
        svg,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img" aria-label="{}">"#,
        esc(&chart.title)
    );
    let _ = writeln!(svg, "<title>{}</title>", esc(&chart.title));
    let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
    svg.push_str(&body);
    svg.push_str(&grid);
    svg.push_str(&rows);
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_round_and_cover_the_maximum() {
        let near = |a: Vec<f64>, b: &[f64]| {
            assert_eq!(a.len(), b.len(), "{a:?} {b:?}");
            assert!(
                a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-9),
                "{a:?} {b:?}"
            );
        };
        near(
            ticks(24_000.0, 6),
            &[0.0, 5000.0, 10000.0, 15000.0, 20000.0, 25000.0],
        );
        near(ticks(1.757, 6), &[0.0, 0.5, 1.0, 1.5, 2.0]);
        near(ticks(0.35, 4), &[0.0, 0.1, 0.2, 0.3, 0.4]);
        near(ticks(0.0, 6), &[0.0, 1.0]);
        assert_eq!(tick_text(25_000.0, 5000.0), "25\u{202f}000");
        assert_eq!(tick_text(0.25, 0.25), "0.25");
        assert_eq!(tick_text(1.5, 0.5), "1.5");
    }

    #[test]
    fn long_text_wraps_at_spaces_within_the_width() {
        let lines = wrap(
            "Tunnel throughput per implementation against its baselines",
            20.0,
            true,
            300.0,
        );
        assert!(lines.len() > 1, "{lines:?}");
        for l in &lines {
            assert!(text_width(l, 20.0, true) <= 300.0, "{l}");
        }
        assert_eq!(
            lines.join(" "),
            "Tunnel throughput per implementation against its baselines"
        );
        assert_eq!(wrap("", 13.0, false, 100.0), [""]);
    }

    #[test]
    fn every_bar_has_its_value_label_and_the_height_follows_the_rows() {
        let bar = |label: &str, figure: &str, value: f64, role| Bar {
            label: label.into(),
            figure: figure.into(),
            value,
            value_text: format!("{value} Mbit/s"),
            role,
        };
        let one = BarChart {
            title: "Q".into(),
            subtitle: "Mbit/s".into(),
            reference: "no filter".into(),
            band: None,
            groups: vec![Group {
                heading: "g".into(),
                notes: vec!["a / b = 2".into()],
                bars: vec![
                    bar("a", "fig_a", 2.0, Role::Ours),
                    bar("b", "fig_b", 1.0, Role::Baseline),
                ],
            }],
        };
        let svg = render(&one);
        assert!(
            svg.contains(r#"data-figure="fig_a""#) && svg.contains(r#"data-value-of="fig_b""#),
            "{svg}"
        );
        assert!(svg.contains(">a / b = 2</text>"), "{svg}");
        assert!(
            !svg.contains("no filter"),
            "no grey bar, no legend for it: {svg}"
        );
        let mut two = one.clone();
        two.groups.push(one.groups[0].clone());
        let h = |s: &str| -> f64 {
            let i = s.find("height=\"").unwrap() + 8;
            s[i..].split('"').next().unwrap().parse().unwrap()
        };
        assert!(h(&render(&two)) > h(&svg) + 60.0);
    }
}
