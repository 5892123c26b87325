//! `vm-monitor trace plot FILE -o OUT.svg`: one self-contained SVG timeline of a recording,
//! readable in any browser or image viewer:
//! 1. memory (MiB): non-reclaimable usage and memory.current against the upscale threshold,
//!    memory.high, usable memory and the file cache (step lines: each value holds until the
//!    next reading), with UpscaleRequests, grants, downscale results and OOM kills as markers;
//! 2. event density: pressure events per time bucket, by kind (coalesced repeats included);
//! 3. reclaim stalls: one point per `*_reclaim_end`, memcg and guest-wide direct reclaim.
//!
//! The x axis is seconds since the recording started (boot clock).
//!
//! Memory is bounded by fixed caps, not by the recording: records stream through (see
//! [`plot_file`]); each series, stall panel and marker kind keeps at most
//! [`MAX_SERIES_POINTS`] points: past that, consecutive points are folded into groups that
//! keep their first, lowest, highest and last point, so every spike and dip still shows; the
//! density panel keeps at most [`MAX_DENSITY_BINS`] time bins, widening them as needed.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context as _, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::record::{
    Change, Header, MarkerKind, ReadSummary, Record, Recording, RecordingReader, Series,
    TimeOrdered, TimelineBuilder, TimelineItem,
};

/// Picture size in pixels.
pub const WIDTH: u32 = 1400;
pub const HEIGHT: u32 = 1000;
/// Time buckets in the event-density panel.
const BUCKETS: u64 = 120;
/// Points kept per series (each memory series, each stall kind, each marker kind): about four
/// per pixel column of a chart. Up to half of it, every point is kept.
pub const MAX_SERIES_POINTS: usize = 4096;
/// Groups a folded series keeps (each keeps at most four points).
const MAX_GROUPS: usize = MAX_SERIES_POINTS / 4;
/// Distinct time bins the event-density panel counts in before it widens them.
pub const MAX_DENSITY_BINS: usize = 4096;

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

/// A series of points `(ts_ns, value)` kept within [`MAX_SERIES_POINTS`] whatever its length:
/// points fall into groups of consecutive points, and a group keeps its first, lowest,
/// highest and last point; when there are too many groups, neighbours merge and groups
/// double in size. A line through what is kept has the same envelope as through everything.
#[derive(Clone, Debug)]
struct Folded<T> {
    groups: Vec<Group<T>>,
    group_size: u64,
    total: u64,
}

#[derive(Clone, Copy, Debug)]
struct Group<T> {
    first: (u64, T),
    low: (u64, T),
    high: (u64, T),
    last: (u64, T),
    n: u64,
}

impl<T: Copy + Ord> Group<T> {
    fn merge(self, b: Group<T>) -> Group<T> {
        Group {
            first: self.first,
            low: if b.low.1 < self.low.1 {
                b.low
            } else {
                self.low
            },
            high: if b.high.1 > self.high.1 {
                b.high
            } else {
                self.high
            },
            last: b.last,
            n: self.n + b.n,
        }
    }
}

impl<T: Copy + Ord> Default for Folded<T> {
    fn default() -> Self {
        Folded {
            groups: Vec::new(),
            group_size: 1,
            total: 0,
        }
    }
}

impl<T: Copy + Ord> Folded<T> {
    fn push(&mut self, ts_ns: u64, value: T) {
        self.total += 1;
        let p = (ts_ns, value);
        match self.groups.last_mut() {
            Some(g) if g.n < self.group_size => {
                if value < g.low.1 {
                    g.low = p;
                }
                if value > g.high.1 {
                    g.high = p;
                }
                g.last = p;
                g.n += 1;
            }
            _ => {
                self.groups.push(Group {
                    first: p,
                    low: p,
                    high: p,
                    last: p,
                    n: 1,
                });
                if self.groups.len() > MAX_GROUPS {
                    let groups = std::mem::take(&mut self.groups);
                    let mut it = groups.into_iter();
                    while let Some(a) = it.next() {
                        self.groups.push(match it.next() {
                            Some(b) => a.merge(b),
                            None => a,
                        });
                    }
                    self.group_size = self.group_size.saturating_mul(2);
                }
            }
        }
    }

    /// What is kept, in time order.
    fn points(&self) -> Vec<(u64, T)> {
        let mut out = Vec::with_capacity(self.groups.len() * 4);
        for g in &self.groups {
            let mut pts = [g.first, g.low, g.high, g.last];
            pts.sort_by_key(|p| p.0);
            for p in pts {
                if out.last() != Some(&p) {
                    out.push(p);
                }
            }
        }
        out
    }

    /// Whether points were dropped (groups of two keep both).
    fn thinned(&self) -> bool {
        self.group_size > 2
    }

    fn is_empty(&self) -> bool {
        self.total == 0
    }

    fn max(&self) -> Option<T> {
        self.groups.iter().map(|g| g.high.1).max()
    }

    fn changes(&self) -> Vec<Change<T>> {
        self.points()
            .into_iter()
            .map(|(ts_ns, value)| Change { ts_ns, value })
            .collect()
    }
}

/// Event groups of the density panel, in legend order.
const GROUPS: [&str; 9] = [
    "OOM victim",
    "PSI trigger",
    "direct reclaim",
    "kswapd wake",
    "memcg events",
    "memcg reclaim",
    "memory.events",
    "other",
    "poll sample",
];

/// Index of "other" in [`GROUPS`].
const OTHER: usize = 7;

/// Events per time bin and group, in at most [`MAX_DENSITY_BINS`] bins: bins start 1 ns wide
/// (exact) and double in width (neighbours merging) while there are too many.
#[derive(Clone, Debug)]
struct Density {
    width: u64,
    bins: BTreeMap<u64, [u64; GROUPS.len()]>,
    seen: [bool; GROUPS.len()],
    totals: [u64; GROUPS.len()],
}

impl Default for Density {
    fn default() -> Self {
        Density {
            width: 1,
            bins: BTreeMap::new(),
            seen: [false; GROUPS.len()],
            totals: [0; GROUPS.len()],
        }
    }
}

impl Density {
    fn push(&mut self, ts_ns: u64, group: usize, events: u64) {
        let (Some(seen), Some(total)) = (self.seen.get_mut(group), self.totals.get_mut(group))
        else {
            return;
        };
        *seen = true;
        *total += events;
        let bin = self.bins.entry(ts_ns / self.width).or_default();
        bin[group] += events;
        while self.bins.len() > MAX_DENSITY_BINS {
            let Some(width) = self.width.checked_mul(2) else {
                break;
            };
            let mut wider: BTreeMap<u64, [u64; GROUPS.len()]> = BTreeMap::new();
            for (k, counts) in std::mem::take(&mut self.bins) {
                let bin = wider.entry(k / 2).or_default();
                for (a, b) in bin.iter_mut().zip(counts) {
                    *a += b;
                }
            }
            self.bins = wider;
            self.width = width;
        }
    }
}

/// Everything a plot draws, gathered from records fed in time order, within fixed caps.
#[derive(Clone, Debug)]
pub struct PlotData {
    describe: String,
    start_boot_ns: u64,
    builder: TimelineBuilder,
    items: Vec<TimelineItem>,
    series: [Folded<u64>; 5],
    memory_high: Folded<Option<u64>>,
    requests: Folded<()>,
    grants: Folded<()>,
    approved: Folded<()>,
    denied: Folded<()>,
    ooms: Folded<()>,
    memcg_stalls: Folded<u64>,
    direct_stalls: Folded<u64>,
    density: Density,
    events: u64,
}

/// What a plot kept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlotStats {
    /// Some series had more than half of [`MAX_SERIES_POINTS`] points and were thinned.
    pub thinned: bool,
}

fn series_index(s: Series) -> usize {
    s as usize
}

impl PlotData {
    pub fn new(header: &Header) -> PlotData {
        PlotData {
            describe: header.describe(),
            start_boot_ns: header.start_boot_ns,
            builder: TimelineBuilder::default(),
            items: Vec::new(),
            series: Default::default(),
            memory_high: Folded::default(),
            requests: Folded::default(),
            grants: Folded::default(),
            approved: Folded::default(),
            denied: Folded::default(),
            ooms: Folded::default(),
            memcg_stalls: Folded::default(),
            direct_stalls: Folded::default(),
            density: Density::default(),
            events: 0,
        }
    }

    /// One record; feed them in time order.
    pub fn add(&mut self, r: &Record) {
        if let Record::Event(e) = r {
            let name = e.kind.name();
            let g = GROUPS
                .iter()
                .position(|n| *n == group(&name))
                .unwrap_or(OTHER);
            self.density.push(e.ts_ns, g, u64::from(e.events));
            self.events += u64::from(e.events);
        }
        let mut items = std::mem::take(&mut self.items);
        self.builder.feed(r, &mut items);
        for item in items.drain(..) {
            match item {
                TimelineItem::Change(s, c) => self.series[series_index(s)].push(c.ts_ns, c.value),
                TimelineItem::MemoryHigh(c) => self.memory_high.push(c.ts_ns, c.value),
                TimelineItem::Stall(s) => {
                    let kept = if s.memcg {
                        &mut self.memcg_stalls
                    } else {
                        &mut self.direct_stalls
                    };
                    kept.push(s.end_ns, s.stall_ns);
                }
                TimelineItem::Marker(m) => {
                    let kept = match m.what {
                        MarkerKind::UpscaleRequest => &mut self.requests,
                        MarkerKind::UpscaleGranted { .. } => &mut self.grants,
                        MarkerKind::DownscaleResult { ok: true } => &mut self.approved,
                        MarkerKind::DownscaleResult { ok: false } => &mut self.denied,
                        MarkerKind::OomKill { .. } => &mut self.ooms,
                        _ => continue,
                    };
                    kept.push(m.ts_ns, ());
                }
            }
        }
        self.items = items;
    }

    /// Earliest and latest time in the recording, ns.
    fn span(&self) -> (u64, u64) {
        self.builder.span(self.start_boot_ns)
    }

    fn end_ns(&self) -> u64 {
        self.span().1
    }

    pub fn stats(&self) -> PlotStats {
        let thinned = self.series.iter().any(Folded::thinned)
            || self.memory_high.thinned()
            || [
                &self.requests,
                &self.grants,
                &self.approved,
                &self.denied,
                &self.ooms,
            ]
            .iter()
            .any(|f| f.thinned())
            || self.memcg_stalls.thinned()
            || self.direct_stalls.thinned();
        PlotStats { thinned }
    }

    fn series(&self, s: Series) -> &Folded<u64> {
        &self.series[series_index(s)]
    }
}

/// Renders what `data` gathered as SVG text.
pub fn render(data: &PlotData) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        draw(&root, data)?;
        root.present().map_err(perr)?;
    }
    Ok(svg)
}

/// Renders a loaded recording as SVG text.
pub fn render_svg(rec: &Recording) -> anyhow::Result<String> {
    let mut data = PlotData::new(&rec.header);
    for r in rec.time_ordered() {
        data.add(r);
    }
    render(&data)
}

/// Writes the SVG for a loaded recording to `out`.
pub fn write_svg(rec: &Recording, out: &Path) -> anyhow::Result<()> {
    let svg = render_svg(rec)?;
    std::fs::write(out, svg).with_context(|| format!("writing {}", out.display()))
}

/// `trace plot`: reads the recording at `input` (a file or a `--record-dir` directory) record
/// by record and writes its SVG to `output`, in memory bounded by the caps above.
pub fn plot_file(input: &Path, output: &Path) -> anyhow::Result<(PlotStats, ReadSummary)> {
    let mut reader = RecordingReader::open(input)?;
    let mut data = PlotData::new(reader.header());
    for r in TimeOrdered::new(&mut reader) {
        data.add(&r);
    }
    let svg = render(&data)?;
    std::fs::write(output, svg).with_context(|| format!("writing {}", output.display()))?;
    Ok((data.stats(), reader.into_summary()))
}

fn secs(t: &PlotData, ns: u64) -> f64 {
    ns.saturating_sub(t.span().0) as f64 / 1e9
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1u32 << 20)
}

/// Step-line points for a change series, held to `end`.
fn steps(t: &PlotData, series: &[Change<u64>]) -> Vec<(f64, f64)> {
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
        pts.push((secs(t, t.end_ns()), y));
    }
    pts
}

/// memory.high as step-line runs; `max` periods leave gaps.
fn high_runs(t: &PlotData) -> Vec<Vec<(f64, f64)>> {
    let mut runs: Vec<Vec<(f64, f64)>> = Vec::new();
    let mut current: Option<Vec<(f64, f64)>> = None;
    for c in t.memory_high.changes() {
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
            run.push((secs(t, t.end_ns()), y));
        }
        runs.push(run);
    }
    runs
}

fn title(t: &PlotData) -> String {
    format!(
        "vm-monitor recording: {} | {:.1} s, {} events, {} UpscaleRequests",
        t.describe,
        secs(t, t.end_ns()),
        t.events,
        t.requests.total
    )
}

fn draw(root: &DrawingArea<SVGBackend<'_>, Shift>, t: &PlotData) -> anyhow::Result<()> {
    root.fill(&WHITE).map_err(perr)?;
    let root = root.titled(&title(t), ("sans-serif", 18)).map_err(perr)?;
    let (w, h) = root.dim_in_pixel();
    let (top, rest) = root.split_vertically(h * 52 / 100);
    let (middle, bottom) = rest.split_vertically(h * 24 / 100);
    let x_max = secs(t, t.end_ns()).max(1e-3);
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
    t: &PlotData,
    x_max: f64,
) -> anyhow::Result<Legend> {
    let mut legend = Legend::new();
    let y_top = t
        .series
        .iter()
        .filter_map(|s| s.max().map(mib))
        .chain(t.memory_high.max().flatten().map(mib))
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

    let mut line = |series: Series, name: &str, color: RGBColor, width: u32| {
        let series = t.series(series);
        if series.is_empty() {
            return Ok::<(), anyhow::Error>(());
        }
        chart
            .draw_series(LineSeries::new(
                steps(t, &series.changes()),
                color.stroke_width(width),
            ))
            .map_err(perr)?;
        legend.push((name.to_string(), Glyph::Line(color, width)));
        Ok(())
    };
    line(Series::Usable, SERIES_USABLE, GRAY, 1)?;
    line(Series::FileCache, SERIES_FILE_CACHE, DARK_GREEN, 2)?;
    line(Series::Current, SERIES_CURRENT, LIGHT_BLUE, 1)?;
    line(Series::NonReclaimable, SERIES_NON_RECLAIMABLE, BLUE, 2)?;
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
    let threshold = t.series(Series::Threshold);
    if !threshold.is_empty() {
        chart
            .draw_series(DashedLineSeries::new(
                steps(t, &threshold.changes()),
                8,
                5,
                RED.stroke_width(2),
            ))
            .map_err(perr)?;
        legend.push((SERIES_THRESHOLD.to_string(), Glyph::Dashed(RED)));
    }

    // Markers in a row above the data.
    let at = |kept: &Folded<()>| -> Vec<(f64, f64)> {
        kept.points()
            .iter()
            .map(|&(ts, ())| (secs(t, ts), marker_y))
            .collect()
    };
    let requests = at(&t.requests);
    let grants = at(&t.grants);
    let approved = at(&t.approved);
    let denied = at(&t.denied);
    let ooms = at(&t.ooms);
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
    if t.series(Series::NonReclaimable).is_empty() && threshold.is_empty() {
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
    t: &PlotData,
    x_max: f64,
) -> anyhow::Result<Legend> {
    let mut legend = Legend::new();
    let (start_ns, end_ns) = t.span();
    let span = end_ns.saturating_sub(start_ns).max(1);
    let bucket_ns = span.div_ceil(BUCKETS).max(1_000_000);
    let buckets = usize::try_from(span / bucket_ns + 1).unwrap_or(1);
    let density = &t.density;
    let mut counts: BTreeMap<&'static str, Vec<u64>> = GROUPS
        .iter()
        .zip(density.seen)
        .filter(|(_, seen)| *seen)
        .map(|(name, _)| (*name, vec![0; buckets]))
        .collect();
    // A bin is counted where it starts; bins are far narrower than buckets.
    for (bin, per_group) in &density.bins {
        let ts = bin.saturating_mul(density.width);
        let Ok(i) = usize::try_from(ts.saturating_sub(start_ns) / bucket_ns) else {
            continue;
        };
        for (name, n) in GROUPS.iter().zip(per_group) {
            if let Some(slot) = counts.get_mut(name).and_then(|v| v.get_mut(i)) {
                *slot += n;
            }
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
    t: &PlotData,
    x_max: f64,
) -> anyhow::Result<Legend> {
    let mut legend = Legend::new();
    let ms = |ns: u64| ns as f64 / 1e6;
    let y_max = [&t.memcg_stalls, &t.direct_stalls]
        .iter()
        .filter_map(|s| s.max().map(ms))
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
    let points = |kept: &Folded<u64>| -> Vec<(f64, f64)> {
        kept.points()
            .into_iter()
            .map(|(end, stall)| (secs(t, end), ms(stall)))
            .collect()
    };
    let ooms: Vec<f64> = t
        .ooms
        .points()
        .into_iter()
        .map(|(ts, ())| secs(t, ts))
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
    let memcg = points(&t.memcg_stalls);
    if !memcg.is_empty() {
        chart
            .draw_series(memcg.iter().map(|&p| Circle::new(p, 3, PURPLE.filled())))
            .map_err(perr)?;
        let n = t.memcg_stalls.total;
        legend.push((format!("{SERIES_MEMCG_STALL} ({n})"), Glyph::Dot(PURPLE, 3)));
    }
    let direct = points(&t.direct_stalls);
    if !direct.is_empty() {
        chart
            .draw_series(
                direct
                    .iter()
                    .map(|&p| Cross::new(p, 4, BROWN.stroke_width(2))),
            )
            .map_err(perr)?;
        let n = t.direct_stalls.total;
        legend.push((format!("{SERIES_DIRECT_STALL} ({n})"), Glyph::Cross(BROWN)));
    }
    if t.memcg_stalls.is_empty() && t.direct_stalls.is_empty() {
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
    fn short_series_are_kept_whole() {
        let mut f = Folded::default();
        for i in 0..(2 * MAX_GROUPS as u64) {
            f.push(i, i % 7);
        }
        assert!(!f.thinned());
        assert_eq!(f.points().len(), 2 * MAX_GROUPS);
    }

    #[test]
    fn long_series_keep_their_envelope_within_the_cap() {
        let mut f = Folded::default();
        let n = 1_000_000u64;
        for i in 0..n {
            // A slow wave with one spike and one dip.
            let v = match i {
                500_000 => 10_000,
                700_001 => 0,
                _ => 100 + (i / 1000) % 50,
            };
            f.push(i, v);
        }
        let kept = f.points();
        assert!(f.thinned());
        assert_eq!(f.total, n);
        assert!(kept.len() <= MAX_SERIES_POINTS, "{}", kept.len());
        assert!(kept.windows(2).all(|w| w[0].0 < w[1].0), "in time order");
        assert!(kept.contains(&(500_000, 10_000)), "the spike survives");
        assert!(kept.contains(&(700_001, 0)), "the dip survives");
        assert_eq!(kept.first(), Some(&(0, 100)));
        assert_eq!(kept.last().map(|p| p.0), Some(n - 1));
        assert_eq!(f.max(), Some(10_000));
    }

    #[test]
    fn density_bins_stay_bounded_and_count_everything() {
        let mut d = Density::default();
        for i in 0..200_000u64 {
            d.push(i * 1_000_003, (i % 3) as usize, 2);
        }
        d.push(5, GROUPS.len(), 1);
        assert_eq!(GROUPS[OTHER], "other");
        assert!(d.bins.len() <= MAX_DENSITY_BINS);
        let counted: u64 = d.bins.values().flat_map(|b| b.iter()).sum();
        assert_eq!(counted, 400_000);
        assert_eq!(d.totals.iter().sum::<u64>(), 400_000);
    }
}
