//! Figures drawn with plotters: line plots with 95% bands (one or several panels side by side),
//! grouped bars with error bars, and loss curves. PNG by default, SVG on request.
//!
//! Key decisions:
//! - Text is drawn with DejaVu Sans embedded in the binary (plotters' `ab_glyph` renderer), never
//!   a system font: figures render the same on a machine with no fonts or no fontconfig, and a
//!   PNG is the same bytes everywhere.
//! - The legend is a strip under the panels, never inside a plot, so it cannot hide data.
//! - Each figure is described by plain data ([`LineFigure`], [`BarFigure`]); what is drawn is
//!   exactly what the caller also writes to the figure's CSV.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{FontStyle, FontTransform};

use crate::ReportError;

/// DejaVu Sans 2.37 (Bitstream Vera licence, in `reports/fonts/`).
static FONT: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in and known good; a failure here is a build defect.
        plotters::style::register_font(FAMILY, FontStyle::Normal, FONT)
            .unwrap_or_else(|_| panic!("the embedded font does not parse"));
    });
}

/// The image format of figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Png,
    Svg,
}

impl Format {
    pub fn extension(self) -> &'static str {
        match self {
            Format::Png => "png",
            Format::Svg => "svg",
        }
    }

    pub fn parse(s: &str) -> Result<Format, ReportError> {
        match s {
            "png" => Ok(Format::Png),
            "svg" => Ok(Format::Svg),
            other => Err(ReportError::Figure(format!(
                "unknown figure format `{other}`; use png or svg"
            ))),
        }
    }
}

/// Colour-blind-safe colours (Okabe and Ito), in the order series get them.
const PALETTE: [RGBColor; 7] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
];

/// The colour of the `i`th series.
pub fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

/// One plotted value with its 95% interval.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    pub x: f64,
    pub mean: f64,
    pub low: f64,
    pub high: f64,
}

/// One line of a panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<Point>,
    /// Draw the interval as a band (false: the line only).
    pub band: bool,
    /// The colour index (the same run keeps its colour across figures).
    pub color: usize,
    /// A thin, lighter line (raw data under a smoothed curve).
    pub faint: bool,
}

/// One plot of a line figure.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub y_label: String,
    /// Fixed y range (for fractions, 0..1); None: from the data.
    pub y_range: Option<(f64, f64)>,
    pub series: Vec<Series>,
}

/// Panels side by side sharing the x axis meaning.
#[derive(Debug, Clone)]
pub struct LineFigure {
    pub title: String,
    pub x_label: String,
    /// Label x ticks as integers (k, carries, steps).
    pub integer_x: bool,
    pub panels: Vec<Panel>,
    /// An x interval to shade, with its legend text (the training range of k).
    pub shade: Option<(f64, f64, String)>,
}

/// Bars grouped by category, one bar per series in each group, with error bars.
#[derive(Debug, Clone)]
pub struct BarFigure {
    pub title: String,
    pub y_label: String,
    pub y_range: Option<(f64, f64)>,
    pub categories: Vec<String>,
    pub series: Vec<BarSeries>,
}

/// One bar per category.
#[derive(Debug, Clone)]
pub struct BarSeries {
    pub label: String,
    /// The colour index (the run's).
    pub color: usize,
    /// A paler shade of the colour (the second split of the same run).
    pub pale: bool,
    /// One value per category; None where the series has none.
    pub values: Vec<Option<Point>>,
}

type DrawResult = Result<(), ReportError>;

fn figure_err(e: impl std::fmt::Display) -> ReportError {
    ReportError::Figure(e.to_string())
}

const PANEL_W: u32 = 640;
const PANEL_H: u32 = 480;
const TITLE_H: u32 = 44;
const LEGEND_ROW_H: u32 = 26;

/// How many legend rows `labels` need in a figure `width` pixels wide.
fn legend_rows(labels: &[String], width: u32) -> u32 {
    let mut rows = 1;
    let mut x = 20u32;
    for l in labels {
        let w = legend_item_width(l);
        if x + w > width.saturating_sub(20) && x > 20 {
            rows += 1;
            x = 20;
        }
        x += w;
    }
    rows
}

fn legend_item_width(label: &str) -> u32 {
    // About 8.5 px per character at 16 px, plus the swatch and a gap.
    40 + (label.chars().count() as u32 * 17).div_ceil(2) + 24
}

/// Draws with `$draw` (given the root area) on a PNG or SVG backend of `$size` at `$path`,
/// then writes the file: one body for both backends, whose types differ.
macro_rules! render {
    ($format:expr, $path:expr, $size:expr, |$root:ident| $draw:expr) => {
        match $format {
            Format::Png => {
                let $root = &BitMapBackend::new($path, $size).into_drawing_area();
                $draw?;
                $root.present().map_err(figure_err)
            }
            Format::Svg => {
                let $root = &SVGBackend::new($path, $size).into_drawing_area();
                $draw?;
                $root.present().map_err(figure_err)
            }
        }
    };
}

/// Writes a line figure to `path` (format from `format`).
pub fn line_figure(fig: &LineFigure, path: &Path, format: Format) -> DrawResult {
    register_font();
    let width = PANEL_W * fig.panels.len().max(1) as u32;
    let legend = legend_entries_lines(fig);
    let height =
        TITLE_H + PANEL_H + LEGEND_ROW_H * legend_rows(&legend_labels(&legend), width) + 16;
    render!(format, path, (width, height), |root| draw_lines(
        fig, root, &legend
    ))
}

/// Writes a bar figure to `path`.
pub fn bar_figure(fig: &BarFigure, path: &Path, format: Format) -> DrawResult {
    register_font();
    let width = bar_width(fig);
    let legend: Vec<LegendEntry> = fig
        .series
        .iter()
        .map(|b| LegendEntry {
            label: b.label.clone(),
            color: b.color,
            kind: LegendKind::Box { pale: b.pale },
        })
        .collect();
    let height = TITLE_H
        + PANEL_H
        + rotated_label_room(fig)
        + LEGEND_ROW_H * legend_rows(&legend_labels(&legend), width)
        + 16;
    render!(format, path, (width, height), |root| draw_bars(
        fig, root, &legend
    ))
}

/// Wide enough for every bar (at least 22 px each) and for each category's name under its
/// group when the names fit horizontally; from 640 px up to 6000.
fn bar_width(fig: &BarFigure) -> u32 {
    let cats = fig.categories.len().max(1) as u32;
    let bars = fig.series.len().max(1) as u32 * 22 + 24;
    let names = if rotate_labels(fig) {
        0
    } else {
        longest_label(fig) * 9 + 16
    };
    (160 + cats * bars.max(names)).clamp(PANEL_W, 6000)
}

fn longest_label(fig: &BarFigure) -> u32 {
    fig.categories
        .iter()
        .map(|c| c.chars().count() as u32)
        .max()
        .unwrap_or(0)
}

/// Many categories get their names written downwards under each group instead of across.
fn rotate_labels(fig: &BarFigure) -> bool {
    fig.categories.len() > 8
}

/// Extra height under the plot for names written downwards.
fn rotated_label_room(fig: &BarFigure) -> u32 {
    if rotate_labels(fig) {
        longest_label(fig) * 8
    } else {
        0
    }
}

#[derive(Debug, Clone)]
enum LegendKind {
    Line { faint: bool },
    Box { pale: bool },
    Shade,
}

#[derive(Debug, Clone)]
struct LegendEntry {
    label: String,
    color: usize,
    kind: LegendKind,
}

fn legend_labels(entries: &[LegendEntry]) -> Vec<String> {
    entries.iter().map(|e| e.label.clone()).collect()
}

/// Every distinct series label across panels (first appearance order), then the shade.
fn legend_entries_lines(fig: &LineFigure) -> Vec<LegendEntry> {
    let mut out: Vec<LegendEntry> = Vec::new();
    for p in &fig.panels {
        for s in &p.series {
            if !out.iter().any(|e| e.label == s.label) {
                out.push(LegendEntry {
                    label: s.label.clone(),
                    color: s.color,
                    kind: LegendKind::Line { faint: s.faint },
                });
            }
        }
    }
    if let Some((_, _, label)) = &fig.shade {
        out.push(LegendEntry {
            label: label.clone(),
            color: 0,
            kind: LegendKind::Shade,
        });
    }
    out
}

/// A bar's fill: the colour, or a pale shade of it.
fn bar_style(c: RGBColor, pale: bool) -> ShapeStyle {
    if pale {
        c.mix(0.35).filled()
    } else {
        c.filled()
    }
}

const SHADE: RGBColor = RGBColor(225, 225, 225);

fn text_style(size: u32) -> TextStyle<'static> {
    (FAMILY, size).into_font().color(&BLACK)
}

/// The strip of legend entries along the bottom of `area`.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    entries: &[LegendEntry],
) -> DrawResult {
    let (w, _) = area.dim_in_pixel();
    let mut x = 20i32;
    let mut y = 8i32;
    for e in entries {
        let iw = legend_item_width(&e.label) as i32;
        if x + iw > w as i32 - 20 && x > 20 {
            x = 20;
            y += LEGEND_ROW_H as i32;
        }
        let c = color(e.color);
        let mid = y + 9;
        match e.kind {
            LegendKind::Line { faint } => {
                let style = if faint {
                    c.mix(0.5).stroke_width(1)
                } else {
                    c.stroke_width(3)
                };
                area.draw(&PathElement::new(vec![(x, mid), (x + 30, mid)], style))
                    .map_err(figure_err)?;
            }
            LegendKind::Box { pale } => {
                area.draw(&Rectangle::new(
                    [(x + 6, y + 2), (x + 24, y + 16)],
                    bar_style(c, pale),
                ))
                .map_err(figure_err)?;
            }
            LegendKind::Shade => {
                area.draw(&Rectangle::new(
                    [(x, y + 1), (x + 30, y + 17)],
                    SHADE.filled(),
                ))
                .map_err(figure_err)?;
            }
        }
        area.draw(&Text::new(e.label.clone(), (x + 38, y - 1), text_style(16)))
            .map_err(figure_err)?;
        x += iw;
    }
    Ok(())
}

/// Title on top, legend strip at the bottom; returns the area in between.
fn frame<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    legend: &[LegendEntry],
) -> Result<DrawingArea<DB, Shift>, ReportError> {
    root.fill(&WHITE).map_err(figure_err)?;
    let (w, h) = root.dim_in_pixel();
    let legend_h = LEGEND_ROW_H * legend_rows(&legend_labels(legend), w) + 16;
    let (top, rest) = root.split_vertically(TITLE_H);
    let (body, bottom) = rest.split_vertically(h - TITLE_H - legend_h);
    top.draw(&Text::new(
        title.to_string(),
        (w as i32 / 2, TITLE_H as i32 / 2),
        text_style(22).pos(Pos::new(HPos::Center, VPos::Center)),
    ))
    .map_err(figure_err)?;
    draw_legend(&bottom, legend)?;
    Ok(body)
}

fn x_bounds(fig: &LineFigure) -> (f64, f64) {
    let xs = fig
        .panels
        .iter()
        .flat_map(|p| p.series.iter())
        .flat_map(|s| s.points.iter().map(|p| p.x));
    let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
        (a.min(x), b.max(x))
    });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    if fig.integer_x {
        (lo - 0.5, hi + 0.5)
    } else if hi > lo {
        (lo, hi)
    } else {
        (lo - 1.0, hi + 1.0)
    }
}

fn y_bounds(p: &Panel) -> (f64, f64) {
    if let Some(r) = p.y_range {
        return r;
    }
    let (lo, hi) = p
        .series
        .iter()
        .flat_map(|s| s.points.iter())
        .flat_map(|q| [q.low, q.high, q.mean])
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let lo = lo.min(0.0);
    let span = (hi - lo).max(1e-9);
    (lo, hi + 0.05 * span)
}

fn draw_lines<DB: DrawingBackend>(
    fig: &LineFigure,
    root: &DrawingArea<DB, Shift>,
    legend: &[LegendEntry],
) -> DrawResult {
    let body = frame(root, &fig.title, legend)?;
    let areas = body.split_evenly((1, fig.panels.len().max(1)));
    let (x0, x1) = x_bounds(fig);
    for (panel, area) in fig.panels.iter().zip(&areas) {
        let (y0, y1) = y_bounds(panel);
        let mut builder = ChartBuilder::on(area);
        if !panel.title.is_empty() {
            builder.caption(&panel.title, text_style(18));
        }
        let mut chart = builder
            .margin(12)
            .margin_right(24)
            .x_label_area_size(48)
            .y_label_area_size(68)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(figure_err)?;
        let integer_x = fig.integer_x;
        let span = x1 - x0;
        let x_labels = if integer_x {
            (span.round() as usize).clamp(2, 13)
        } else {
            8
        };
        chart
            .configure_mesh()
            .x_desc(&fig.x_label)
            .y_desc(&panel.y_label)
            .x_labels(x_labels)
            .y_labels(8)
            .x_label_formatter(&|x| {
                if integer_x {
                    if (x - x.round()).abs() < 1e-6 {
                        format!("{}", x.round() as i64)
                    } else {
                        String::new()
                    }
                } else {
                    compact(*x)
                }
            })
            .y_label_formatter(&|y| compact(*y))
            .label_style(text_style(15))
            .axis_desc_style(text_style(16))
            .light_line_style(RGBColor(240, 240, 240))
            .bold_line_style(RGBColor(215, 215, 215))
            .draw()
            .map_err(figure_err)?;
        if let Some((lo, hi, _)) = &fig.shade {
            // Clipped to the plot: plotters does not clip shapes to the chart area.
            let (lo, hi) = ((lo - 0.5).max(x0), (hi + 0.5).min(x1));
            if lo < hi {
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(lo, y0), (hi, y1)],
                        SHADE.mix(0.6).filled(),
                    )))
                    .map_err(figure_err)?;
            }
        }
        for s in &panel.series {
            let c = color(s.color);
            if s.band && s.points.len() > 1 {
                let mut outline: Vec<(f64, f64)> =
                    s.points.iter().map(|p| (p.x, p.high.min(y1))).collect();
                outline.extend(s.points.iter().rev().map(|p| (p.x, p.low.max(y0))));
                chart
                    .draw_series(std::iter::once(Polygon::new(outline, c.mix(0.15).filled())))
                    .map_err(figure_err)?;
            }
        }
        for s in &panel.series {
            let c = color(s.color);
            let style = if s.faint {
                c.mix(0.5).stroke_width(1)
            } else {
                c.stroke_width(2)
            };
            chart
                .draw_series(LineSeries::new(
                    s.points.iter().map(|p| (p.x, p.mean)),
                    style,
                ))
                .map_err(figure_err)?;
            if s.band && s.points.len() == 1 {
                let p = s.points[0];
                chart
                    .draw_series(std::iter::once(ErrorBar::new_vertical(
                        p.x,
                        p.low,
                        p.mean,
                        p.high,
                        c.stroke_width(2),
                        12,
                    )))
                    .map_err(figure_err)?;
            }
            if integer_x && !s.faint {
                chart
                    .draw_series(
                        s.points
                            .iter()
                            .map(|p| Circle::new((p.x, p.mean), 4, c.filled())),
                    )
                    .map_err(figure_err)?;
            }
        }
    }
    Ok(())
}

fn draw_bars<DB: DrawingBackend>(
    fig: &BarFigure,
    root: &DrawingArea<DB, Shift>,
    legend: &[LegendEntry],
) -> DrawResult {
    let body = frame(root, &fig.title, legend)?;
    let n = fig.categories.len().max(1);
    let y = fig.y_range.unwrap_or_else(|| {
        let hi = fig
            .series
            .iter()
            .flat_map(|b| b.values.iter().flatten())
            .map(|p| p.high.max(p.mean))
            .filter(|v| v.is_finite())
            .fold(0.0f64, f64::max);
        (0.0, if hi > 0.0 { hi * 1.08 } else { 1.0 })
    });
    let mut chart = ChartBuilder::on(&body)
        .margin(12)
        .margin_right(24)
        .x_label_area_size(56 + rotated_label_room(fig))
        .y_label_area_size(68)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), y.0..y.1)
        .map_err(figure_err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .x_label_formatter(&|_| String::new())
        .y_desc(&fig.y_label)
        .y_labels(8)
        .y_label_formatter(&|v| compact(*v))
        .label_style(text_style(15))
        .axis_desc_style(text_style(16))
        .light_line_style(RGBColor(240, 240, 240))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(figure_err)?;
    let k = fig.series.len().max(1) as f64;
    let group_w = 0.8;
    let bar_w = group_w / k;
    for (si, b) in fig.series.iter().enumerate() {
        let c = color(b.color);
        for (cat, v) in b.values.iter().enumerate() {
            let Some(p) = v else { continue };
            let left = cat as f64 - group_w / 2.0 + si as f64 * bar_w;
            let mid = left + bar_w / 2.0;
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(left + 0.1 * bar_w, y.0), (left + 0.9 * bar_w, p.mean)],
                    bar_style(c, b.pale),
                )))
                .map_err(figure_err)?;
            chart
                .draw_series(std::iter::once(ErrorBar::new_vertical(
                    mid,
                    p.low.max(y.0),
                    p.mean,
                    p.high.min(y.1),
                    BLACK.stroke_width(1),
                    8,
                )))
                .map_err(figure_err)?;
        }
    }
    // Category names under each group, placed in pixels (plotters picks its own tick positions
    // on a continuous axis, which need not fall on the categories).
    let rotate = rotate_labels(fig);
    for (i, name) in fig.categories.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(i as f64, y.0));
        let base = root.get_base_pixel();
        let style = if rotate {
            text_style(15)
                .transform(FontTransform::Rotate90)
                .pos(Pos::new(HPos::Left, VPos::Center))
        } else {
            text_style(15).pos(Pos::new(HPos::Center, VPos::Top))
        };
        root.draw(&Text::new(
            name.clone(),
            (px - base.0, py - base.1 + 10),
            style,
        ))
        .map_err(figure_err)?;
    }
    Ok(())
}

/// A tick label without trailing zeros: 0.5, 1, 12.5, 1500.
fn compact(v: f64) -> String {
    if v.abs() >= 1000.0 {
        return format!("{v:.0}");
    }
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s == "-0" {
        "0".into()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_compact() {
        assert_eq!(compact(0.5), "0.5");
        assert_eq!(compact(1.0), "1");
        assert_eq!(compact(0.125), "0.125");
        assert_eq!(compact(-0.0), "0");
        assert_eq!(compact(2500.0), "2500");
    }

    #[test]
    fn formats_parse() {
        assert_eq!(Format::parse("svg").unwrap(), Format::Svg);
        assert!(Format::parse("pdf")
            .unwrap_err()
            .to_string()
            .contains("png or svg"));
    }
}
