//! The PNG chart of rows landed per second over time, one line per variant.
//!
//! plotters draws text with a font it is handed (its `ab_glyph` feature) rather than through fontconfig and
//! freetype, so the benchmark builds without system libraries; the font is read from the usual places at run
//! time. Without one, the chart is drawn without text and the report's legend names the colours.

use std::path::Path;

use anyhow::Context;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// Where Debian, Fedora, Arch and Alpine put a plain sans-serif TrueType font.
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf",
    "/usr/share/fonts/noto/NotoSans-Regular.ttf",
];

/// The line colours, in variant order; the report's legend uses the same names.
pub const COLOURS: &[(&str, RGBColor)] = &[
    ("blue", RGBColor(31, 119, 180)),
    ("orange", RGBColor(255, 127, 14)),
    ("green", RGBColor(44, 160, 44)),
    ("red", RGBColor(214, 39, 40)),
    ("purple", RGBColor(148, 103, 189)),
    ("brown", RGBColor(140, 86, 75)),
    ("pink", RGBColor(227, 119, 194)),
    ("grey", RGBColor(127, 127, 127)),
    ("olive", RGBColor(188, 189, 34)),
    ("cyan", RGBColor(23, 190, 207)),
];

/// Registers the first font found under the name plotters asks for; false when there is none.
fn register_font() -> bool {
    for path in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(path) {
            // plotters keeps fonts for the life of the process; one font, read once per run.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
    }
    false
}

/// Draws `series` (name, points of (seconds since load start, rows/s)) into `path`. Returns whether text
/// (title, axis labels, legend) could be drawn.
pub fn draw(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> anyhow::Result<bool> {
    let with_text = register_font();
    let x_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(1.0_f64, f64::max);
    let y_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.1))
        .fold(1.0_f64, f64::max)
        * 1.1;

    let root = BitMapBackend::new(path, (1280, 720)).into_drawing_area();
    root.fill(&WHITE).context("could not draw the chart")?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if with_text {
        builder
            .caption(title, ("sans-serif", 24))
            .x_label_area_size(45)
            .y_label_area_size(90);
    } else {
        builder.x_label_area_size(5).y_label_area_size(5);
    }
    let mut chart = builder
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)
        .context("could not draw the chart")?;
    let mut mesh = chart.configure_mesh();
    if with_text {
        mesh.x_desc("seconds since the load started")
            .y_desc("rows landed per second")
            .y_label_formatter(&|v| format_rate(*v))
            .label_style(("sans-serif", 15));
    } else {
        mesh.x_labels(0).y_labels(0).disable_mesh();
    }
    mesh.draw().context("could not draw the axes")?;

    for (index, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()].1;
        let line = chart
            .draw_series(LineSeries::new(points.iter().copied(), colour.stroke_width(2)))
            .context("could not draw a line")?;
        if with_text {
            line.label(name.as_str())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour.stroke_width(3)));
        }
    }
    if with_text {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 15))
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .context("could not draw the legend")?;
    }
    root.present().context("could not write the PNG")?;
    Ok(with_text)
}

/// 1234567 → "1.23M", 45600 → "45.6k".
pub fn format_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}
