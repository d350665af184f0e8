//! The benchmark report: rows, counts and notes, the figures' units and
//! statistics, and a description of the machine.

use std::time::Duration;

use super::MIB;

/// One line of the report.
#[derive(Clone, Debug)]
pub struct Row {
    pub figure: String,
    pub direct: String,
    pub tunnel: String,
    /// Tunnel over direct (for throughput, tunnel/direct too: higher is better).
    pub ratio: Option<f64>,
    pub goal: String,
    /// Whether the goal is met, when there is one.
    pub met: Option<bool>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Counts that must hold whatever the timing: (what, expected, got).
    pub counts: Vec<(String, u64, u64)>,
    pub notes: Vec<String>,
}

impl Report {
    pub(crate) fn row(
        &mut self,
        figure: impl Into<String>,
        direct: impl Into<String>,
        tunnel: impl Into<String>,
        ratio: Option<f64>,
        goal: impl Into<String>,
        met: Option<bool>,
    ) {
        let row = Row {
            figure: figure.into(),
            direct: direct.into(),
            tunnel: tunnel.into(),
            ratio,
            goal: goal.into(),
            met,
        };
        eprintln!(
            "  {:<48} direct {:>14}  tunnel {:>14}  ratio {:>6}  goal {}",
            row.figure,
            row.direct,
            row.tunnel,
            row.ratio.map(|r| format!("{r:.2}")).unwrap_or_default(),
            row.goal
        );
        self.rows.push(row);
    }

    /// The report as a Markdown table.
    pub fn markdown(&self) -> String {
        let mut out = String::from(
            "| figure | direct | tunnel | tunnel/direct | goal | met |\n| --- | ---: | ---: | ---: | --- | --- |\n",
        );
        for r in &self.rows {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                r.figure,
                r.direct,
                r.tunnel,
                r.ratio
                    .map(|r| format!("{r:.2}"))
                    .unwrap_or_else(|| "—".into()),
                r.goal,
                match r.met {
                    Some(true) => "yes",
                    Some(false) => "**no**",
                    None => "—",
                }
            ));
        }
        out
    }
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub(crate) fn mib_s(bytes_per_s: f64) -> String {
    format!("{:.0} MiB/s", bytes_per_s / MIB)
}

/// Nearest-rank percentile of a sorted slice.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

pub(crate) fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The machine: cores, memory, load average.
pub fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_default();
    format!(
        "{cores} cores ({model}), {:.1} GiB memory, load average {}",
        mem_kib as f64 / 1024.0 / 1024.0,
        loadavg()
    )
}

/// `/proc/loadavg`'s first three fields.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}
