//! Plots as SVG: grouped bar charts and line charts, a few dozen elements
//! each, readable in any browser or image viewer.

use std::fmt::Write;

const COLORS: [&str; 6] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1",
];
const W: f64 = 720.0;
const H: f64 = 360.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 70.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A "nice" axis maximum and tick step for values up to `max`.
fn axis(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 2.5, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    ((max / step).ceil() * step, step)
}

fn fmt_num(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn frame(s: &mut String, title: &str, y_label: &str, ymax: f64, step: f64) {
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{}" y="24" text-anchor="middle" font-size="15" font-weight="bold">{}</text>
<text transform="translate(16,{}) rotate(-90)" text-anchor="middle">{}</text>
"#,
        W / 2.0,
        esc(title),
        TOP + (H - TOP - BOTTOM) / 2.0,
        esc(y_label)
    );
    let ph = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= ymax + step / 2.0 {
        let y = TOP + ph - v / ymax * ph;
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{}" y1="{y:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            fmt_num(v)
        );
        v += step;
    }
    let _ = writeln!(
        s,
        r##"<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{}" stroke="#333"/>"##,
        H - BOTTOM
    );
}

/// Grouped bars: one group per category, one bar per series.
pub fn bars(
    title: &str,
    y_label: &str,
    categories: &[String],
    series: &[(String, Vec<f64>)],
) -> String {
    let max = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0, f64::max);
    let (ymax, step) = axis(max);
    let mut s = String::new();
    frame(&mut s, title, y_label, ymax, step);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let gw = pw / categories.len().max(1) as f64;
    let bw = (gw * 0.8) / series.len().max(1) as f64;
    for (ci, cat) in categories.iter().enumerate() {
        let gx = LEFT + ci as f64 * gw + gw * 0.1;
        for (si, (_, vals)) in series.iter().enumerate() {
            let v = vals.get(ci).copied().unwrap_or(0.0);
            let h = v / ymax * ph;
            let x = gx + si as f64 * bw;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="{}"/><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="10">{}</text>"#,
                TOP + ph - h,
                bw * 0.92,
                COLORS[si % COLORS.len()],
                x + bw * 0.46,
                TOP + ph - h - 3.0,
                fmt_num(v)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + gw * 0.4,
            H - BOTTOM + 18.0,
            esc(cat)
        );
    }
    legend(&mut s, series.iter().map(|(n, _)| n.as_str()));
    s.push_str("</svg>\n");
    s
}

/// Lines over a shared numeric x axis.
pub fn lines(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> String {
    let pts = || series.iter().flat_map(|(_, p)| p.iter().copied());
    let (ymax, step) = axis(pts().map(|p| p.1).fold(0.0, f64::max));
    let xmin = pts().map(|p| p.0).fold(f64::INFINITY, f64::min);
    let xmax = pts().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
    let (xmin, xmax) = if xmin.is_finite() && xmax > xmin {
        (xmin, xmax)
    } else {
        (0.0, 1.0)
    };
    let mut s = String::new();
    frame(&mut s, title, y_label, ymax, step);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + (x - xmin) / (xmax - xmin) * pw;
    let py = |y: f64| TOP + ph - y / ymax * ph;
    for i in 0..=5 {
        let x = xmin + (xmax - xmin) * i as f64 / 5.0;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            px(x),
            H - BOTTOM + 18.0,
            fmt_num((x * 10.0).round() / 10.0)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - BOTTOM + 38.0,
        esc(x_label)
    );
    for (si, (_, p)) in series.iter().enumerate() {
        let d: Vec<String> = p
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline fill="none" stroke="{}" stroke-width="2" points="{}"/>"#,
            COLORS[si % COLORS.len()],
            d.join(" ")
        );
    }
    legend(&mut s, series.iter().map(|(n, _)| n.as_str()));
    s.push_str("</svg>\n");
    s
}

fn legend<'a>(s: &mut String, names: impl Iterator<Item = &'a str>) {
    let mut x = LEFT;
    for (i, n) in names.enumerate() {
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            H - 22.0,
            COLORS[i % COLORS.len()],
            x + 16.0,
            H - 12.0,
            esc(n)
        );
        x += 24.0 + 7.0 * n.len() as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axis_is_round_and_covers_the_max() {
        assert_eq!(axis(9_300.0), (10_000.0, 2_000.0));
        assert_eq!(axis(0.0), (1.0, 0.2));
        let (m, s) = axis(123_456.0);
        assert!(m >= 123_456.0 && (m / s) <= 6.0);
    }

    #[test]
    fn charts_are_svg_with_every_label() {
        let b = bars(
            "t <1>",
            "msgs/s",
            &["a".into(), "b".into()],
            &[
                ("max".into(), vec![1.0, 2.0]),
                ("half".into(), vec![0.5, 1.0]),
            ],
        );
        assert!(b.starts_with("<svg") && b.ends_with("</svg>\n"));
        assert!(b.contains("t &lt;1&gt;") && b.contains(">half<"));
        assert_eq!(b.matches("<rect").count(), 1 + 4 + 2);
        let l = lines("t", "x", "y", &[("s".into(), vec![(0.0, 1.0), (1.0, 2.0)])]);
        assert!(l.contains("<polyline"));
    }
}
