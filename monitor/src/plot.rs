//! `vm-monitor trace plot FILE -o OUT.svg`: one self-contained SVG timeline of a recording,
//! readable in any browser or image viewer:
//! 1. memory (MiB): non-reclaimable usage and memory.current against the upscale threshold,
//!    memory.high, usable memory and the file cache (step lines: each value holds until the
//!    next reading), with UpscaleRequests, grants, downscale results and OOM kills as markers;
//! 2. event density: pressure events per time bucket, by kind (coalesced repeats included);
//! 3. reclaim stalls: one point per `*_reclaim_end`, memcg and guest-wide direct reclaim.
//!
//! The x axis is seconds since the recording started (boot clock).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::record::{Change, MarkerKind, Recording, Timeline};

/// Picture size in pixels.
pub const WIDTH: u32 = 1400;
pub const HEIGHT: u32 = 1000;
/// Time buckets in the event-density panel.
const BUCKETS: u64 = 120;
/// Beyond this many stall points, only the longest stall per pixel column is drawn (keeps the
/// SVG small for long storms; the shape that matters, the worst stalls, stays).
const MAX_POINTS: usize = 5000;
const COLUMNS: f64 = 1200.0;

// Series names, also the legend texts (tests look for them).
pub const SERIES_NON_RECLAIMABLE: &str = "non-reclaimable (anon)";
pub const SERIES_CURRENT: &str = "memory.current";
pub const SERIES_THRESHOLD: &str = "upscale threshold";
pub const SERIES_MEMORY_HIGH: &str = "memory.high";
pub const SERIES_USABLE: &str = "usable (allocation - sys buffer)";
pub const SERIES_FILE_CACHE: &str = "file cache";
pub const SERIES_UPSCALE_REQUEST: &str = "UpscaleRequest";
pub const SERIES_GRANT: &str = "upscale granted";
pub const SERIES_DOWNSCALE_OK: &str = "downscale approved";
pub const SERIES_DOWNSCALE_DENIED: &str = "downscale denied";
pub const SERIES_OOM: &str = "OOM kill";
pub const SERIES_MEMCG_STALL: &str = "memcg reclaim stall";
pub const SERIES_DIRECT_STALL: &str = "direct reclaim stall";

const ORANGE: RGBColor = RGBColor(230, 120, 0);
const PURPLE: RGBColor = RGBColor(130, 50, 160);
const BROWN: RGBColor = RGBColor(140, 80, 30);
const GRAY: RGBColor = RGBColor(120, 120, 120);
const DARK_GREEN: RGBColor = RGBColor(0, 140, 60);
const LIGHT_BLUE: RGBColor = RGBColor(110, 170, 230);

fn perr<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing the plot: {e}")
}

/// Renders `rec` as SVG text.
pub fn render_svg(rec: &Recording) -> anyhow::Result<String> {
    let t = rec.timeline();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, rec, &t)?;
        root.present().map_err(perr)?;
    }
    Ok(svg)
}

/// Writes the SVG for `rec` to `out`.
pub fn write_svg(rec: &Recording, out: &Path) -> anyhow::Result<()> {
    let svg = render_svg(rec)?;
    std::fs::write(out, svg).with_context(|| format!("writing {}", out.display()))
}

fn secs(t: &Timeline, ns: u64) -> f64 {
    ns.saturating_sub(t.start_ns) as f64 / 1e9
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// Step-line points for a change series, held to `end`.
fn steps(t: &Timeline, series: &[Change<u64>]) -> Vec<(f64, f64)> {
    let mut pts = Vec::with_capacity(series.len() * 2 + 1);
    for (i, c) in series.iter().enumerate() {
        let x = secs(t, c.ts_ns);
        let y = mib(c.value);
        if i > 0
            && let Some(&(_, prev)) = pts.last()
        {
            pts.push((x, prev));
        }
        pts.push((x, y));
    }
    if let Some(&(_, y)) = pts.last() {
        pts.push((secs(t, t.end_ns), y));
    }
    pts
}

/// memory.high as step-line runs; `max` periods leave gaps.
fn high_runs(t: &Timeline) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Option<Vec<(f64, f64)>> = None;
    for c in &t.memory_high {
        let x = secs(t, c.ts_ns);
        if let Some(run) = current.as_mut()
            && let Some(&(_, prev)) = run.last()
        {
            run.push((x, prev));
        }
        match c.value {
            Some(b) => current.get_or_insert_with(Vec::new).push((x, mib(b))),
            None => runs.extend(current.take()),
        }
    }
    if let Some(mut run) = current {
        if let Some(&(_, y)) = run.last() {
            run.push((secs(t, t.end_ns), y));
        }
        runs.push(run);
    }
    runs
}

/// At most one point (the highest) per pixel column once there are too many.
fn decimate(points: Vec<(f64, f64)>, x_max: f64) -> Vec<(f64, f64)> {
    if points.len() <= MAX_POINTS {
        return points;
    }
    let mut best: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for (x, y) in points {
        let col = (x / x_max * COLUMNS).max(0.0) as u64;
        let slot = best.entry(col).or_insert((x, y));
        if y > slot.1 {
            *slot = (x, y);
        }
    }
    best.into_values().collect()
}

fn title(rec: &Recording, t: &Timeline) -> String {
    let requests = t
        .markers
        .iter()
        .filter(|m| m.what == MarkerKind::UpscaleRequest)
        .count();
    let events: u64 = t.events.iter().map(|e| u64::from(e.2)).sum();
    format!(
        "vm-monitor recording: {} | {:.1} s, {} events, {} UpscaleRequests",
        rec.header.describe(),
        secs(t, t.end_ns),
        events,
        requests
    )
}

fn draw(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    rec: &Recording,
    t: &Timeline,
) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(perr)?;
    let root = root
        .titled(&title(rec, t), ("sans-serif", 18))
        .map_err(perr)?;
    let (w, h) = root.dim_in_pixel();
    let (top, rest) = root.split_vertically(h * 52 / 100);
    let (middle, bottom) = rest.split_vertically(h * 24 / 100);
    let x_max = secs(t, t.end_ns).max(1e-3);
    // Legends get their own column so they never hide data.
    let chart_w = w.saturating_sub(LEGEND_WIDTH);
    let (chart, side) = top.split_horizontally(chart_w);
    let legend = draw_memory(&chart, t, x_max)?;
    draw_legend(&side, &legend)?;
    let (chart, side) = middle.split_horizontally(chart_w);
    let legend = draw_density(&chart, t, x_max)?;
    draw_legend(&side, &legend)?;
    let (chart, side) = bottom.split_horizontally(chart_w);
    let legend = draw_stalls(&chart, t, x_max)?;
    draw_legend(&side, &legend)?;
    Ok(())
}

/// Width of the legend column, pixels.
const LEGEND_WIDTH: u32 = 260;

/// How a legend entry is drawn.
#[derive(Clone, Copy)]
enum Glyph {
    Line(RGBColor, u32),
    Dashed(RGBColor),
    Triangle(RGBColor),
    Dot(RGBColor, i32),
    Cross(RGBColor),
    VLine(RGBColor),
}

type Legend = Vec<(String, Glyph)>;

fn draw_legend(area: &DrawingArea<SVGBackend<'_>, Shift>, entries: &Legend) -> anyhow::Result<()> {
    let x = 12i32;
    let mut y = 40i32;
    for (name, glyph) in entries {
        let c = x + 12;
        match *glyph {
            Glyph::Line(color, width) => area.draw(&PathElement::new(
                vec![(x, y), (x + 24, y)],
                color.stroke_width(width),
            )),
            Glyph::Dashed(color) => area
                .draw(&PathElement::new(
                    vec![(x, y), (x + 9, y)],
                    color.stroke_width(2),
                ))
                .and_then(|()| {
                    area.draw(&PathElement::new(
                        vec![(x + 15, y), (x + 24, y)],
                        color.stroke_width(2),
                    ))
                }),
            Glyph::Triangle(color) => area.draw(&TriangleMarker::new((c, y), 6, color.filled())),
            Glyph::Dot(color, r) => area.draw(&Circle::new((c, y), r, color.filled())),
            Glyph::Cross(color) => area.draw(&Cross::new((c, y), 4, color.stroke_width(2))),
            Glyph::VLine(color) => area.draw(&PathElement::new(
                vec![(c, y - 7), (c, y + 7)],
                color.stroke_width(2),
            )),
        }
        .map_err(perr)?;
        area.draw(&Text::new(
            name.clone(),
            (x + 34, y - 7),
            ("sans-serif", 13),
        ))
        .map_err(perr)?;
        y += 20;
    }
    Ok(())
}

fn draw_memory(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    t: &Timeline,
    x_max: f64,
) -> anyhow::Result<Legend> {
    let mut legend = Legend::new();
    let all = [
        &t.non_reclaimable,
        &t.current,
        &t.threshold,
        &t.usable,
        &t.file_cache,
    ];
    let y_top = all
        .iter()
        .flat_map(|s| s.iter().map(|c| mib(c.value)))
        .chain(t.memory_high.iter().filter_map(|c| c.value.map(mib)))
        .fold(1.0f64, f64::max);
    // Room above the data for the marker row.
    let marker_y = y_top * 1.08;
    let y_max = y_top * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("memory (MiB)", ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("seconds since recording start")
        .y_desc("MiB")
        .draw()
        .map_err(perr)?;

    let mut line = |series: &[Change<u64>], name: &str, color: RGBColor, width: u32| {
        if series.is_empty() {
            return Ok::<(), anyhow::Error>(());
        }
        chart
            .draw_series(LineSeries::new(steps(t, series), color.stroke_width(width)))
            .map_err(perr)?;
        legend.push((name.to_string(), Glyph::Line(color, width)));
        Ok(())
    };
    line(&t.usable, SERIES_USABLE, GRAY, 1)?;
    line(&t.file_cache, SERIES_FILE_CACHE, DARK_GREEN, 2)?;
    line(&t.current, SERIES_CURRENT, LIGHT_BLUE, 1)?;
    line(&t.non_reclaimable, SERIES_NON_RECLAIMABLE, BLUE, 2)?;
    let runs = high_runs(t);
    if !runs.is_empty() {
        legend.push((
            format!("{SERIES_MEMORY_HIGH} (gap = max)"),
            Glyph::Line(ORANGE, 2),
        ));
    }
    for run in runs {
        chart
            .draw_series(LineSeries::new(run, ORANGE.stroke_width(2)))
            .map_err(perr)?;
    }
    // The threshold goes on top: memory.high is kept at it, and both must stay visible.
    if !t.threshold.is_empty() {
        chart
            .draw_series(DashedLineSeries::new(
                steps(t, &t.threshold),
                8,
                5,
                RED.stroke_width(2),
            ))
            .map_err(perr)?;
        legend.push((SERIES_THRESHOLD.to_string(), Glyph::Dashed(RED)));
    }

    // Markers in a row above the data.
    let at = |pred: &dyn Fn(&MarkerKind) -> bool| -> Vec<(f64, f64)> {
        t.markers
            .iter()
            .filter(|m| pred(&m.what))
            .map(|m| (secs(t, m.ts_ns), marker_y))
            .collect()
    };
    let requests = at(&|k| *k == MarkerKind::UpscaleRequest);
    let grants = at(&|k| matches!(k, MarkerKind::UpscaleGranted { .. }));
    let approved = at(&|k| *k == MarkerKind::DownscaleResult { ok: true });
    let denied = at(&|k| *k == MarkerKind::DownscaleResult { ok: false });
    let ooms = at(&|k| matches!(k, MarkerKind::OomKill { .. }));
    if !ooms.is_empty() {
        chart
            .draw_series(
                ooms.iter().map(|&(x, _)| {
                    PathElement::new(vec![(x, 0.0), (x, y_max)], BLACK.stroke_width(2))
                }),
            )
            .map_err(perr)?;
        legend.push((SERIES_OOM.to_string(), Glyph::VLine(BLACK)));
    }
    if !requests.is_empty() {
        chart
            .draw_series(
                requests
                    .iter()
                    .map(|&p| TriangleMarker::new(p, 7, RED.filled())),
            )
            .map_err(perr)?;
        legend.push((SERIES_UPSCALE_REQUEST.to_string(), Glyph::Triangle(RED)));
    }
    if !grants.is_empty() {
        chart
            .draw_series(
                grants
                    .iter()
                    .map(|&p| Circle::new(p, 6, DARK_GREEN.filled())),
            )
            .map_err(perr)?;
        legend.push((SERIES_GRANT.to_string(), Glyph::Dot(DARK_GREEN, 6)));
    }
    if !approved.is_empty() {
        chart
            .draw_series(approved.iter().map(|&p| Circle::new(p, 4, BLUE.filled())))
            .map_err(perr)?;
        legend.push((SERIES_DOWNSCALE_OK.to_string(), Glyph::Dot(BLUE, 4)));
    }
    if !denied.is_empty() {
        chart
            .draw_series(
                denied
                    .iter()
                    .map(|&p| Cross::new(p, 5, GRAY.stroke_width(2))),
            )
            .map_err(perr)?;
        legend.push((SERIES_DOWNSCALE_DENIED.to_string(), Glyph::Cross(GRAY)));
    }
    if t.non_reclaimable.is_empty() && t.threshold.is_empty() {
        area.draw(&Text::new(
            "no memory readings in this recording (record with --cgroup)",
            (90, 60),
            ("sans-serif", 14).into_font().color(&GRAY),
        ))
        .map_err(perr)?;
    }
    Ok(legend)
}

/// Event kinds grouped for the density panel (one line each).
fn group(kind: &str) -> &'static str {
    match kind {
        "memcg_reclaim_begin" | "memcg_reclaim_end" => "memcg reclaim",
        "direct_reclaim_begin" | "direct_reclaim_end" => "direct reclaim",
        "kswapd_wake" => "kswapd wake",
        "oom_victim" => "OOM victim",
        "memcg_events" => "memcg events",
        "psi_trigger" => "PSI trigger",
        "memory_events" => "memory.events",
        "polled_sample" => "poll sample",
        _ => "other",
    }
}

fn group_color(name: &str) -> RGBColor {
    match name {
        "memcg reclaim" => PURPLE,
        "direct reclaim" => BROWN,
        "kswapd wake" => CYAN,
        "OOM victim" => BLACK,
        "memcg events" => MAGENTA,
        "PSI trigger" => ORANGE,
        "memory.events" => DARK_GREEN,
        "poll sample" => GRAY,
        _ => BLUE,
    }
}

fn draw_density(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    t: &Timeline,
    x_max: f64,
) -> anyhow::Result<Legend> {
    let mut legend = Legend::new();
    let span = t.end_ns.saturating_sub(t.start_ns).max(1);
    let bucket_ns = span.div_ceil(BUCKETS).max(1_000_000);
    let buckets = usize::try_from(span / bucket_ns + 1).unwrap_or(1);
    let mut counts: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
    for (ts, kind, n) in &t.events {
        let Ok(i) = usize::try_from(ts.saturating_sub(t.start_ns) / bucket_ns) else {
            continue;
        };
        let v = counts
            .entry(group(kind))
            .or_insert_with(|| vec![0; buckets]);
        if let Some(slot) = v.get_mut(i) {
            *slot += u64::from(*n);
        }
    }
    let y_max = counts
        .values()
        .flat_map(|v| v.iter().copied())
        .max()
        .unwrap_or(0)
        .max(1) as f64
        * 1.1;
    let bucket_s = bucket_ns as f64 / 1e9;
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("event density (events per {:.0} ms bucket)", bucket_s * 1e3),
            ("sans-serif", 15),
        )
        .margin(8)
        .x_label_area_size(28)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .y_desc("events")
        .draw()
        .map_err(perr)?;
    for (name, v) in &counts {
        let mut pts = Vec::with_capacity(v.len() * 2);
        for (i, &c) in v.iter().enumerate() {
            let x0 = i as f64 * bucket_s;
            pts.push((x0, c as f64));
            pts.push(((x0 + bucket_s).min(x_max), c as f64));
        }
        let color = group_color(name);
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(perr)?;
        let total: u64 = v.iter().sum();
        legend.push((format!("{name} events ({total})"), Glyph::Line(color, 2)));
    }
    if counts.is_empty() {
        area.draw(&Text::new(
            "no pressure events in this recording",
            (90, 40),
            ("sans-serif", 14).into_font().color(&GRAY),
        ))
        .map_err(perr)?;
    }
    Ok(legend)
}

fn draw_stalls(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    t: &Timeline,
    x_max: f64,
) -> anyhow::Result<Legend> {
    let mut legend = Legend::new();
    let ms = |ns: u64| ns as f64 / 1e6;
    let y_max = t
        .stalls
        .iter()
        .map(|s| ms(s.stall_ns))
        .fold(0.1f64, f64::max)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption("reclaim stalls (ms, per task)", ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(perr)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE.mix(0.0))
        .x_desc("seconds since recording start")
        .y_desc("stall ms")
        .draw()
        .map_err(perr)?;
    let points = |memcg: bool| -> Vec<(f64, f64)> {
        let all: Vec<(f64, f64)> = t
            .stalls
            .iter()
            .filter(|s| s.memcg == memcg)
            .map(|s| (secs(t, s.end_ns), ms(s.stall_ns)))
            .collect();
        decimate(all, x_max)
    };
    let ooms: Vec<f64> = t
        .markers
        .iter()
        .filter(|m| matches!(m.what, MarkerKind::OomKill { .. }))
        .map(|m| secs(t, m.ts_ns))
        .collect();
    if !ooms.is_empty() {
        chart
            .draw_series(
                ooms.iter()
                    .map(|&x| PathElement::new(vec![(x, 0.0), (x, y_max)], BLACK.stroke_width(2))),
            )
            .map_err(perr)?;
        legend.push((SERIES_OOM.to_string(), Glyph::VLine(BLACK)));
    }
    let memcg = points(true);
    if !memcg.is_empty() {
        chart
            .draw_series(memcg.iter().map(|&p| Circle::new(p, 3, PURPLE.filled())))
            .map_err(perr)?;
        let n = t.stalls.iter().filter(|s| s.memcg).count();
        legend.push((format!("{SERIES_MEMCG_STALL} ({n})"), Glyph::Dot(PURPLE, 3)));
    }
    let direct = points(false);
    if !direct.is_empty() {
        chart
            .draw_series(
                direct
                    .iter()
                    .map(|&p| Cross::new(p, 4, BROWN.stroke_width(2))),
            )
            .map_err(perr)?;
        let n = t.stalls.iter().filter(|s| !s.memcg).count();
        legend.push((format!("{SERIES_DIRECT_STALL} ({n})"), Glyph::Cross(BROWN)));
    }
    if t.stalls.is_empty() {
        area.draw(&Text::new(
            "no reclaim stalls in this recording",
            (90, 40),
            ("sans-serif", 14).into_font().color(&GRAY),
        ))
        .map_err(perr)?;
    }
    Ok(legend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimation_keeps_the_worst_stall_per_column() {
        let few = vec![(0.5, 1.0), (0.5, 2.0)];
        assert_eq!(decimate(few.clone(), 1.0), few);
        let many: Vec<(f64, f64)> = (0..50_000)
            .map(|i| (f64::from(i) / 50_000.0, f64::from(i % 40)))
            .collect();
        let kept = decimate(many, 1.0);
        assert!(kept.len() <= COLUMNS as usize + 1, "{}", kept.len());
        assert!(
            kept.iter().all(|p| p.1 == 39.0),
            "each column keeps its maximum"
        );
    }
}
