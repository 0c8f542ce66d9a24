//! What a run measured and how it is shown: the [`Recorder`] every workload records its
//! operations in (an HDR histogram of the whole run, one per second for the timeline, errors
//! by kind), the progress bar, the summary table, the JSON object and the `--plot` chart.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use plotters::prelude::*;
use serde_json::{json, Map, Value};

/// The longest latency recorded, in microseconds (ten minutes); longer ones are clamped.
const LATENCY_MAX_US: u64 = 600_000_000;

/// Latencies of a run, in microseconds, to 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 3).expect("valid bounds")
}

/// A second of the timeline: latency at lower precision (one per second of the run).
fn second_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, 2).expect("valid bounds")
}

/// Records a workload's operations; shared by its tasks (cheap to clone).
#[derive(Clone)]
pub struct Recorder {
    inner: Arc<Mutex<Recorded>>,
    /// Operations recorded so far (read by the progress bar without the lock).
    ops: Arc<AtomicU64>,
    /// The measured window, in nanoseconds after `base`: its start (the timeline's second 0)
    /// and its end (0 while it lasts).
    window: Arc<[AtomicU64; 2]>,
    base: Instant,
}

/// Everything recorded.
pub struct Recorded {
    /// Latency of every successful operation, in microseconds.
    pub hist: Histogram<u64>,
    /// Per second of the run: the latency of the operations that completed in it.
    pub timeline: Vec<Histogram<u64>>,
    /// Failed operations by kind.
    pub errors: BTreeMap<String, u64>,
}

impl Recorder {
    /// A recorder whose timeline starts now.
    pub fn new() -> Self {
        Recorder {
            inner: Arc::new(Mutex::new(Recorded {
                hist: histogram(),
                timeline: Vec::new(),
                errors: BTreeMap::new(),
            })),
            ops: Arc::default(),
            window: Arc::default(),
            base: Instant::now(),
        }
    }

    fn since_base(&self) -> u64 {
        self.base.elapsed().as_nanos() as u64
    }

    /// Starts the measured part of the run now: set-up before it (connecting, pre-loading
    /// keys, opening watchers) counts neither in the throughput nor in the timeline.
    pub fn start_now(&self) {
        self.window[0].store(self.since_base(), Ordering::Relaxed);
    }

    /// Ends the measured part of the run now: checks and drains after it (reading back,
    /// waiting for expiries or deliveries) do not dilute the throughput.
    pub fn stop_now(&self) {
        self.window[1].store(self.since_base().max(1), Ordering::Relaxed);
    }

    /// How long the measured part of the run lasted (so far, if it has not ended).
    pub fn elapsed(&self) -> Duration {
        let end = match self.window[1].load(Ordering::Relaxed) {
            0 => self.since_base(),
            end => end,
        };
        Duration::from_nanos(end.saturating_sub(self.window[0].load(Ordering::Relaxed)))
    }

    /// Records an operation that succeeded, issued (or due, in an open loop) at `since`.
    pub fn record(&self, since: Instant) {
        let now = Instant::now();
        let us = now.duration_since(since).as_micros().max(1) as u64;
        let from_start = (now.duration_since(self.base).as_nanos() as u64)
            .saturating_sub(self.window[0].load(Ordering::Relaxed));
        let second = (from_start / 1_000_000_000) as usize;
        let mut r = self.inner.lock().expect("recorder lock");
        r.hist.saturating_record(us);
        if r.timeline.len() <= second {
            r.timeline.resize_with(second + 1, second_histogram);
        }
        r.timeline[second].saturating_record(us);
        drop(r);
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed operation.
    pub fn error(&self, kind: &str) {
        let mut r = self.inner.lock().expect("recorder lock");
        *r.errors.entry(kind.to_string()).or_default() += 1;
    }

    /// Operations recorded so far.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Takes what was recorded.
    pub fn take(&self) -> Recorded {
        let mut r = self.inner.lock().expect("recorder lock");
        Recorded {
            hist: std::mem::replace(&mut r.hist, histogram()),
            timeline: std::mem::take(&mut r.timeline),
            errors: std::mem::take(&mut r.errors),
        }
    }
}

/// A progress bar on stderr (hidden when stderr is not a terminal) showing the operations
/// recorded and the current rate, until dropped.
pub struct Progress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// Starts showing `recorder`'s progress through a run of `duration`.
    pub fn start(label: &str, recorder: &Recorder, duration: Duration) -> Self {
        let bar = ProgressBar::new(duration.as_secs().max(1));
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {wide_bar} {msg}")
                .expect("a valid template"),
        );
        bar.set_prefix(label.to_string());
        let (shown, recorder) = (bar.clone(), recorder.clone());
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            let (mut last_ops, mut last_at) = (0, Instant::now());
            loop {
                tick.tick().await;
                let (ops, now) = (recorder.ops(), Instant::now());
                let rate = (ops - last_ops) as f64 / now.duration_since(last_at).as_secs_f64();
                (last_ops, last_at) = (ops, now);
                shown.set_position(recorder.elapsed().as_secs());
                shown.set_message(format!("{ops} ops, {rate:.0}/s"));
            }
        });
        Progress { bar, task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

/// The fields every report has (scripts depend on them), from the run's recording.
pub fn summary(recorded: &Recorded, elapsed: Duration) -> Map<String, Value> {
    let hist = &recorded.hist;
    let secs = elapsed.as_secs_f64();
    let fields = json!({
        "duration_s": secs,
        "ops": hist.len(),
        "ops_per_sec": hist.len() as f64 / secs,
        "p50_us": hist.value_at_quantile(0.50),
        "p90_us": hist.value_at_quantile(0.90),
        "p99_us": hist.value_at_quantile(0.99),
        "p999_us": hist.value_at_quantile(0.999),
        "max_us": hist.max(),
        "errors": recorded.errors,
    });
    crate::figures(fields)
}

/// Prints `report` as the summary table.
pub fn print_table(report: &Map<String, Value>) {
    let get = |k: &str| report.get(k).cloned().unwrap_or(Value::Null);
    println!(
        "{} on {}: {} clients, {:.1} s",
        get("workload"),
        get("target"),
        get("clients"),
        get("duration_s").as_f64().unwrap_or(0.0)
    );
    println!(
        "  {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "ops", "ops/s", "p50 ms", "p90 ms", "p99 ms", "p999 ms", "max ms"
    );
    let ms = |k: &str| get(k).as_f64().unwrap_or(0.0) / 1000.0;
    println!(
        "  {:>10} {:>10.0} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        get("ops"),
        get("ops_per_sec").as_f64().unwrap_or(0.0),
        ms("p50_us"),
        ms("p90_us"),
        ms("p99_us"),
        ms("p999_us"),
        ms("max_us"),
    );
    match report.get("errors").and_then(Value::as_object) {
        Some(errors) if !errors.is_empty() => {
            for (kind, n) in errors {
                println!("  error {kind:<28} {n}");
            }
        }
        _ => println!("  errors: none"),
    }
    const SHOWN: &[&str] = &[
        "workload",
        "target",
        "clients",
        "duration_s",
        "ops",
        "ops_per_sec",
        "p50_us",
        "p90_us",
        "p99_us",
        "p999_us",
        "max_us",
        "errors",
    ];
    for (name, value) in report {
        if !SHOWN.contains(&name.as_str()) {
            println!("  {name:<28} {value}");
        }
    }
}

/// The font charts are drawn with (Debian's fonts-dejavu-core).
const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            let bytes = std::fs::read(FONT_PATH)
                .map_err(|e| format!("{FONT_PATH}: {e} (scripts/install-deps.sh installs it)"))?;
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes.leak())
                .map_err(|_| format!("{FONT_PATH} is not a font plotters can read"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Draws the run's timeline into a PNG: latency percentiles (p50, p99, max) per second above,
/// throughput per second below. The last second, cut short by the end of the run, is left
/// out.
pub fn plot(path: &Path, title: &str, timeline: &[Histogram<u64>]) -> anyhow::Result<()> {
    register_font()?;
    let timeline = match timeline {
        [measured @ .., _last] if !measured.is_empty() => measured,
        whole => whole,
    };
    let root = BitMapBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE)?;
    let (upper, lower) = root.split_vertically(400);
    let seconds = timeline.len().max(1) as u32;
    let series = |q: f64| -> Vec<(u32, f64)> {
        timeline
            .iter()
            .enumerate()
            .filter(|(_, h)| !h.is_empty())
            .map(|(s, h)| (s as u32, h.value_at_quantile(q) as f64 / 1000.0))
            .collect()
    };
    let (p50, p99, max) = (series(0.5), series(0.99), series(1.0));
    let top = max.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 1.1;
    let mut latency = ChartBuilder::on(&upper)
        .caption(format!("{title}: latency"), ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0..seconds, (0.01f64..top).log_scale())?;
    latency
        .configure_mesh()
        .x_desc("second")
        .y_desc("ms")
        .draw()?;
    for (points, name, color) in [(p50, "p50", BLUE), (p99, "p99", RED), (max, "max", BLACK)] {
        latency
            .draw_series(LineSeries::new(points, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    latency
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;

    let throughput: Vec<(u32, f64)> = timeline
        .iter()
        .enumerate()
        .map(|(s, h)| (s as u32, h.len() as f64))
        .collect();
    let peak = throughput.iter().map(|(_, v)| *v).fold(1.0, f64::max) * 1.1;
    let mut rate = ChartBuilder::on(&lower)
        .caption(format!("{title}: throughput"), ("sans-serif", 22))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0..seconds, 0f64..peak)?;
    rate.configure_mesh()
        .x_desc("second")
        .y_desc("ops/s")
        .draw()?;
    rate.draw_series(LineSeries::new(throughput, GREEN.stroke_width(2)))?;
    root.present()
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
