//! What the overview's pictures show: the master samples, every [`SAMPLE_EVERY`], the dominant
//! share of each role (the resources its frameworks use over the cluster's, max over kinds)
//! and the cluster's utilisation per resource kind, into a bounded ring; the overview draws
//! them as SVG line charts rendered here (no script).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use agora_sdk::proto::{AgentView, FrameworkView};
use agora_sdk::resources::Resources;
use maud::{html, Markup, PreEscaped};
use tokio_util::sync::CancellationToken;

use crate::server::MasterHandle;

/// How often the master samples allocation and utilisation.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples kept: half an hour at [`SAMPLE_EVERY`].
pub const SAMPLES: usize = 360;
/// Roles drawn per sample (the largest shares): frameworks choose role names, so their number
/// is bounded here.
const ROLES: usize = 12;

/// One sample.
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: SystemTime,
    /// Dominant share per role, 0 to 1.
    pub roles: BTreeMap<String, f64>,
    /// Used over total per resource kind (`cpus`, `mem`, `disk`), 0 to 1.
    pub utilisation: BTreeMap<&'static str, f64>,
}

/// The ring of samples, shared by the sampler and the pages.
#[derive(Clone, Default)]
pub struct History(Arc<Mutex<VecDeque<Sample>>>);

fn frac(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        (a as f64 / b as f64).min(1.0)
    }
}

impl History {
    /// A sample of what `agents` and `frameworks` show now.
    pub fn sample(agents: &[AgentView], frameworks: &[FrameworkView]) -> Sample {
        let mut total = Resources::default();
        let mut used = Resources::default();
        for a in agents.iter().filter(|a| a.status == agora_sdk::AgentViewStatus::Active) {
            total.add_assign(&a.resources.flatten());
            used.add_assign(&a.used.flatten());
        }
        let mut by_role: BTreeMap<&str, Resources> = BTreeMap::new();
        for f in frameworks {
            by_role.entry(&f.role).or_default().add_assign(&f.used.flatten());
        }
        let mut shares: Vec<(String, f64)> =
            by_role.into_iter().map(|(r, u)| (r.to_string(), u.dominant_share(&total).min(1.0))).collect();
        shares.sort_by(|a, b| b.1.total_cmp(&a.1));
        shares.truncate(ROLES);
        let utilisation = BTreeMap::from([
            ("cpus", frac(used.cpus, total.cpus)),
            ("mem", frac(used.mem, total.mem)),
            ("disk", frac(used.disk, total.disk)),
        ]);
        Sample { at: SystemTime::now(), roles: shares.into_iter().collect(), utilisation }
    }

    /// Adds a sample, dropping the oldest past [`SAMPLES`].
    pub fn push(&self, s: Sample) {
        let mut ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if ring.len() == SAMPLES {
            ring.pop_front();
        }
        ring.push_back(s);
    }

    /// The samples, oldest first.
    pub fn samples(&self) -> Vec<Sample> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect()
    }

    /// Samples `master` every [`SAMPLE_EVERY`] until `shutdown` (nothing while a standby).
    pub fn spawn_sampler(&self, master: MasterHandle, shutdown: CancellationToken) {
        let history = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SAMPLE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if !master.is_leader() {
                    continue;
                }
                let agents = master.agents().await;
                let frameworks = master.frameworks().await;
                history.push(Self::sample(&agents, &frameworks));
            }
        });
    }
}

/// Line colours (distinguishable, readable on white).
const COLOURS: [&str; 8] =
    ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

const W: f64 = 560.0;
const H: f64 = 160.0;
const PAD: f64 = 30.0;

/// A line chart of series (name, one value per sample in 0..=1; `None` where absent).
fn chart(title: &str, samples: &[Sample], series: &[(String, Vec<Option<f64>>)]) -> Markup {
    let n = samples.len();
    let x = |i: usize| PAD + if n <= 1 { 0.0 } else { (W - PAD - 10.0) * i as f64 / (n - 1) as f64 };
    let y = |v: f64| 10.0 + (H - 10.0 - PAD) * (1.0 - v.clamp(0.0, 1.0));
    let mut svg = String::new();
    let _ = write!(svg, r##"<svg class="chart" viewBox="0 0 {W} {H}" xmlns="http://www.w3.org/2000/svg">"##);
    for (v, label) in [(0.0, "0%"), (0.5, "50%"), (1.0, "100%")] {
        let _ = write!(
            svg,
            r##"<line x1="{PAD}" x2="{x2}" y1="{yy}" y2="{yy}" class="grid"/><text x="2" y="{ty}" class="axis">{label}</text>"##,
            x2 = W - 10.0,
            yy = y(v),
            ty = y(v) + 4.0,
        );
    }
    for (k, (_, values)) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let mut points = String::new();
        for (i, v) in values.iter().enumerate() {
            match v {
                Some(v) => {
                    let _ = write!(points, "{:.1},{:.1} ", x(i), y(*v));
                }
                None if !points.is_empty() => {
                    let _ = write!(
                        svg,
                        r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>"##
                    );
                    points.clear();
                }
                None => {}
            }
        }
        if !points.is_empty() {
            let _ = write!(
                svg,
                r##"<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>"##
            );
        }
    }
    svg.push_str("</svg>");
    let span = match (samples.first(), samples.last()) {
        (Some(a), Some(b)) => b.at.duration_since(a.at).unwrap_or_default().as_secs(),
        _ => 0,
    };
    html! {
        figure.chart {
            figcaption { (title) " " span.muted { "(last " (span / 60) " min " (span % 60) " s, every " (SAMPLE_EVERY.as_secs()) " s)" } }
            @if n == 0 {
                p.muted { "No samples yet (the first comes within " (SAMPLE_EVERY.as_secs()) " s)." }
            } @else {
                // Built above from numbers and fixed strings only; names go in the legend.
                (PreEscaped(svg))
                ul.legend {
                    @for (k, (name, values)) in series.iter().enumerate() {
                        li {
                            span.swatch style=(format!("background:{}", COLOURS[k % COLOURS.len()])) {}
                            (name) " "
                            span.muted { (values.last().copied().flatten().map(|v| format!("{:.0}%", v * 100.0)).unwrap_or_default()) }
                        }
                    }
                }
            }
        }
    }
}

/// The overview's two pictures: dominant share per role, and cluster utilisation.
pub fn charts(history: &History) -> Markup {
    let samples = history.samples();
    let mut roles: Vec<&String> = samples.iter().flat_map(|s| s.roles.keys()).collect();
    roles.sort();
    roles.dedup();
    // Keep the colours stable and the legend short: the roles largest now first.
    let last = samples.last();
    roles.sort_by(|a, b| {
        let v = |r: &String| last.and_then(|s| s.roles.get(r)).copied().unwrap_or(0.0);
        v(b).total_cmp(&v(a)).then(a.cmp(b))
    });
    roles.truncate(ROLES);
    let role_series: Vec<(String, Vec<Option<f64>>)> = roles
        .iter()
        .map(|r| ((*r).clone(), samples.iter().map(|s| s.roles.get(*r).copied()).collect()))
        .collect();
    let util_series: Vec<(String, Vec<Option<f64>>)> = ["cpus", "mem", "disk"]
        .iter()
        .map(|k| (k.to_string(), samples.iter().map(|s| s.utilisation.get(k).copied()).collect()))
        .collect();
    html! {
        div.charts {
            (chart("Allocation: dominant share per role", &samples, &role_series))
            (chart("Cluster utilisation (used / total)", &samples, &util_series))
        }
    }
}

#[cfg(test)]
mod tests {
    use agora_sdk::proto::{AgentId, FrameworkId};
    use agora_sdk::Attributes;

    use super::*;

    fn agent(resources: &str, used: &str) -> AgentView {
        AgentView {
            id: AgentId::new("A1"),
            hostname: "h".into(),
            resources: Resources::parse(resources).expect("resources"),
            used: Resources::parse(used).expect("used"),
            attributes: Attributes::default(),
            status: agora_sdk::AgentViewStatus::Active,
            tasks: 0,
            drain: None,
        }
    }

    fn framework(role: &str, used: &str) -> FrameworkView {
        FrameworkView {
            id: FrameworkId::new(format!("F-{role}-{used}")),
            name: "f".into(),
            role: role.into(),
            principal: "p".into(),
            status: agora_sdk::FrameworkViewStatus::Active,
            used: Resources::parse(used).expect("used"),
            tasks: 0,
        }
    }

    #[test]
    fn samples_dominant_share_per_role_and_utilisation() {
        let agents = [agent("cpus:4;mem:8GiB", "cpus:2;mem:1GiB")];
        let frameworks = [
            framework("web", "cpus:1;mem:512MiB"),
            framework("web", "cpus:0.5"),
            framework("batch", "cpus:0.5;mem:4GiB"),
        ];
        let s = History::sample(&agents, &frameworks);
        assert_eq!(s.roles["web"], 1.5 / 4.0);
        assert_eq!(s.roles["batch"], 0.5);
        assert_eq!(s.utilisation["cpus"], 0.5);
        assert_eq!(s.utilisation["mem"], 1.0 / 8.0);
    }

    #[test]
    fn the_ring_keeps_the_last_samples_and_role_names_are_escaped() {
        let h = History::default();
        for i in 0..SAMPLES + 5 {
            let mut s = History::sample(&[], &[]);
            s.roles.insert("<b>r</b>".into(), i as f64 / (SAMPLES + 5) as f64);
            h.push(s);
        }
        assert_eq!(h.samples().len(), SAMPLES);
        let html = charts(&h).into_string();
        assert!(html.contains("&lt;b&gt;r&lt;/b&gt;") && !html.contains("<b>r"));
        assert_eq!(html.matches("<polyline").count(), 4); // one role, three kinds
    }
}
