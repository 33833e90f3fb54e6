//! Bench results as CSV and as a self-contained SVG chart (no dependencies): prefill and
//! decode tokens/s versus context, one panel each.

use std::fmt::Write as _;

/// One measured context frontier (the CSV columns).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchPoint {
    pub ctx_tokens: usize,
    pub prefill_tokens: usize,
    pub prefill_tps: f64,
    pub gen_tokens: usize,
    pub gen_tps: f64,
    pub kv_bytes: u64,
}

pub const CSV_HEADER: &str = "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kv_bytes";

/// Header line plus one line per point, `\n`-terminated; rates with 2 decimals.
pub fn bench_csv(points: &[BenchPoint]) -> String {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for p in points {
        let _ = writeln!(
            out,
            "{},{},{:.2},{},{:.2},{}",
            p.ctx_tokens, p.prefill_tokens, p.prefill_tps, p.gen_tokens, p.gen_tps, p.kv_bytes
        );
    }
    out
}

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 420.0;
const PANEL_W: f64 = WIDTH / 2.0;
/// Plot area inside a panel.
const LEFT: f64 = 70.0;
const RIGHT: f64 = 25.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 60.0;
const Y_TICKS: usize = 5;

/// Two panels side by side (prefill tok/s, decode tok/s) against context on a log2 axis
/// with a tick at every measured frontier; y linear from 0. `title` (which should name the
/// card) heads the chart. Zero, negative or non-finite rates are drawn at 0 and labelled
/// "n/a".
pub fn bench_svg(title: &str, points: &[BenchPoint]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" \
         viewBox=\"0 0 {WIDTH} {HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        s,
        "<rect x=\"0\" y=\"0\" width=\"{WIDTH}\" height=\"{HEIGHT}\" fill=\"white\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"24\" text-anchor=\"middle\" font-size=\"16\" \
         font-weight=\"bold\">{}</text>",
        WIDTH / 2.0,
        escape(title)
    );
    let prefill: Vec<(usize, f64)> = points
        .iter()
        .map(|p| (p.ctx_tokens, p.prefill_tps))
        .collect();
    let decode: Vec<(usize, f64)> = points.iter().map(|p| (p.ctx_tokens, p.gen_tps)).collect();
    panel(
        &mut s,
        0.0,
        "prefill",
        "prefill tokens/s",
        "#1f77b4",
        &prefill,
    );
    panel(
        &mut s,
        PANEL_W,
        "decode",
        "decode tokens/s",
        "#d62728",
        &decode,
    );
    s.push_str("</svg>\n");
    s
}

fn panel(s: &mut String, x0: f64, name: &str, y_title: &str, color: &str, pts: &[(usize, f64)]) {
    let (px0, px1) = (x0 + LEFT, x0 + PANEL_W - RIGHT);
    let (py0, py1) = (TOP, HEIGHT - BOTTOM);
    let _ = writeln!(s, "<g class=\"{name}\">");
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"52\" text-anchor=\"middle\" font-size=\"14\">{name}</text>",
        (px0 + px1) / 2.0
    );
    // Axes.
    let _ = writeln!(
        s,
        "<line x1=\"{px0:.1}\" y1=\"{py1:.1}\" x2=\"{px1:.1}\" y2=\"{py1:.1}\" stroke=\"black\"/>"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{px0:.1}\" y1=\"{py0:.1}\" x2=\"{px0:.1}\" y2=\"{py1:.1}\" stroke=\"black\"/>"
    );

    // y: 0 .. a round maximum in Y_TICKS steps.
    let top = pts.iter().map(|p| clean(p.1)).fold(0.0, f64::max);
    let step = nice_step(top / Y_TICKS as f64);
    // Round steps overshoot: 3100 in steps of 1000 needs 4 ticks, not 5.
    let n_ticks = ((top / step).ceil() as usize).clamp(1, Y_TICKS);
    let y_max = step * n_ticks as f64;
    let y_of = |v: f64| py1 - (clean(v) / y_max) * (py1 - py0);
    for i in 0..=n_ticks {
        let v = step * i as f64;
        let y = y_of(v);
        let _ = writeln!(
            s,
            "<line x1=\"{px0:.1}\" y1=\"{y:.1}\" x2=\"{px1:.1}\" y2=\"{y:.1}\" stroke=\"#dddddd\"/>"
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            px0 - 6.0,
            y + 4.0,
            tick_label(v)
        );
    }

    // x: log2 of the context, a tick at every frontier.
    let logs: Vec<f64> = pts.iter().map(|p| (p.0.max(1) as f64).log2()).collect();
    let lo = logs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let inner = 20.0;
    let x_of = |l: f64| {
        if hi > lo {
            px0 + inner + (l - lo) / (hi - lo) * (px1 - px0 - 2.0 * inner)
        } else {
            (px0 + px1) / 2.0
        }
    };
    let mut ticks: Vec<usize> = pts.iter().map(|p| p.0).collect();
    ticks.sort_unstable();
    ticks.dedup();
    for ctx in ticks {
        let x = x_of((ctx.max(1) as f64).log2());
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{py1:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"black\"/>",
            py1 + 5.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            py1 + 18.0,
            ctx_label(ctx)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">context (tokens, log2 scale)</text>",
        (px0 + px1) / 2.0,
        HEIGHT - 18.0
    );
    let (ty_x, ty_y) = (x0 + 18.0, (py0 + py1) / 2.0);
    let _ = writeln!(
        s,
        "<text x=\"{ty_x:.1}\" y=\"{ty_y:.1}\" text-anchor=\"middle\" \
         transform=\"rotate(-90 {ty_x:.1} {ty_y:.1})\">{y_title}</text>"
    );

    // Data.
    let coords: Vec<(f64, f64)> = pts
        .iter()
        .zip(&logs)
        .map(|(p, &l)| (x_of(l), y_of(p.1)))
        .collect();
    let list: Vec<String> = coords
        .iter()
        .map(|(x, y)| format!("{x:.1},{y:.1}"))
        .collect();
    let _ = writeln!(
        s,
        "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
        list.join(" ")
    );
    for ((x, y), p) in coords.iter().zip(pts) {
        let _ = writeln!(
            s,
            "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"4\" fill=\"{color}\"/>"
        );
        let _ = writeln!(
            s,
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\">{}</text>",
            y - 9.0,
            value_label(p.1)
        );
    }
    s.push_str("</g>\n");
}

/// Rates that cannot be plotted (NaN, infinite, negative) count as 0.
fn clean(v: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { 0.0 }
}

/// The smallest of 1, 2, 2.5, 5 × 10^k at or above `raw` (1 when there is no data).
fn nice_step(raw: f64) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|&v| v >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * mag)
}

fn tick_label(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

fn value_label(v: f64) -> String {
    if !(v.is_finite() && v > 0.0) {
        "n/a".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// 2048 → "2K", 1048576 → "1M", 3000 → "3000".
fn ctx_label(ctx: usize) -> String {
    const K: usize = 1024;
    if ctx >= K * K && ctx.is_multiple_of(K * K) {
        format!("{}M", ctx / (K * K))
    } else if ctx >= K && ctx.is_multiple_of(K) {
        format!("{}K", ctx / K)
    } else {
        ctx.to_string()
    }
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            _ => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn point(ctx: usize, prefill: f64, decode: f64) -> BenchPoint {
        BenchPoint {
            ctx_tokens: ctx,
            prefill_tokens: ctx,
            prefill_tps: prefill,
            gen_tokens: 64,
            gen_tps: decode,
            kv_bytes: ctx as u64 * 13760,
        }
    }

    #[test]
    fn csv_exact() {
        let text = bench_csv(&[point(2048, 3123.456, 201.0), point(32768, 2500.0, 180.125)]);
        assert_eq!(
            text,
            "ctx_tokens,prefill_tokens,prefill_tps,gen_tokens,gen_tps,kv_bytes\n\
             2048,2048,3123.46,64,201.00,28180480\n\
             32768,32768,2500.00,64,180.12,450887680\n"
        );
        assert_eq!(bench_csv(&[]), format!("{CSV_HEADER}\n"));
    }

    /// Tag names in document order; panics on an unbalanced close. Text never holds `<`
    /// (titles are escaped), so a scan for `<...>` finds every tag.
    fn check_balanced(svg: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut opened = Vec::new();
        let mut rest = svg;
        while let Some(start) = rest.find('<') {
            let end = rest[start..].find('>').unwrap() + start;
            let tag = &rest[start + 1..end];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name), "unbalanced </{name}>");
            } else {
                let name = tag.split_whitespace().next().unwrap().to_string();
                opened.push(name.clone());
                if !tag.ends_with('/') {
                    stack.push(name);
                }
            }
            rest = &rest[end + 1..];
        }
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        opened
    }

    fn polyline_counts(svg: &str) -> Vec<usize> {
        svg.match_indices("<polyline points=\"")
            .map(|(i, m)| {
                let from = i + m.len();
                let to = svg[from..].find('"').unwrap() + from;
                svg[from..to].split_whitespace().count()
            })
            .collect()
    }

    #[test]
    fn svg_two_panels_with_every_point() {
        let pts = [
            point(2048, 3100.0, 205.5),
            point(32768, 2900.0, 190.0),
            point(1 << 20, 1200.0, 120.0),
        ];
        let svg = bench_svg("ds4 bench q2 <synthetic> — NVIDIA H100 80GB HBM3", &pts);
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.trim_end().ends_with("</svg>"));
        let tags = check_balanced(&svg);
        assert_eq!(tags.iter().filter(|t| *t == "polyline").count(), 2);
        assert_eq!(polyline_counts(&svg), vec![3, 3]);
        assert_eq!(tags.iter().filter(|t| *t == "circle").count(), 6);
        for label in [
            "NVIDIA H100 80GB HBM3",
            "&lt;synthetic&gt;",
            "prefill tokens/s",
            "decode tokens/s",
            "context (tokens, log2 scale)",
            ">2K<",
            ">32K<",
            ">1M<",
            ">3100<",
            ">206<",
            ">120<",
        ] {
            assert!(svg.contains(label), "{label} missing:\n{svg}");
        }
        // y axes from 0 to a round maximum: prefill 0..4000 (step 1000), decode 0..250 (step 50).
        assert!(svg.contains(">4000<") && svg.contains(">0<") && svg.contains(">250<"));
        assert!(!svg.contains(">5000<") && !svg.contains(">300<"), "{svg}");
    }

    #[test]
    fn svg_one_point_and_bad_rates() {
        let svg = bench_svg("one", &[point(2048, 0.0, f64::NAN)]);
        check_balanced(&svg);
        assert_eq!(polyline_counts(&svg), vec![1, 1]);
        assert!(svg.contains("n/a"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        let svg = bench_svg(
            "mixed",
            &[point(2048, f64::INFINITY, -3.0), point(4096, 10.0, 2.5)],
        );
        check_balanced(&svg);
        assert_eq!(polyline_counts(&svg), vec![2, 2]);
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        let svg = bench_svg("empty", &[]);
        check_balanced(&svg);
        assert_eq!(polyline_counts(&svg), vec![0, 0]);
    }

    #[test]
    fn steps_and_labels() {
        assert_eq!(nice_step(620.0), 1000.0);
        assert_eq!(nice_step(41.0), 50.0);
        assert_eq!(nice_step(2.1), 2.5);
        assert_eq!(nice_step(0.0), 1.0);
        assert_eq!(ctx_label(2048), "2K");
        assert_eq!(ctx_label(1 << 20), "1M");
        assert_eq!(ctx_label(3000), "3000");
    }
}
