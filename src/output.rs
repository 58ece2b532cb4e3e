//! Tables for the list commands (their JSON comes from `agora_sdk::json`).

use agora_sdk::proto::{AgentView, DrainView, FrameworkView, MasterView, TaskView};
use agora_sdk::units::format_size;

/// Renders rows as an aligned table with a header.
pub fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let n = cells.len();
        for (i, c) in cells.into_iter().enumerate() {
            if i + 1 == n {
                out.push_str(&c);
            } else {
                out.push_str(&format!("{:w$}  ", c, w = widths[i]));
            }
        }
        out.push('\n');
    };
    line(header.iter().map(|s| s.to_string()).collect(), &mut out);
    for r in rows {
        line(r, &mut out);
    }
    out
}

pub fn agents_table(agents: &[AgentView]) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    table(
        &["ID", "HOSTNAME", "STATUS", "DRAIN", "TASKS", "RESOURCES", "USED", "ATTRIBUTES"],
        agents
            .iter()
            .map(|a| {
                vec![
                    a.id.to_string(),
                    a.hostname.clone(),
                    a.status.to_string(),
                    drain_cell(a.drain.as_ref(), now_ms),
                    a.tasks.to_string(),
                    a.resources.to_string(),
                    a.used.to_string(),
                    a.attributes.to_string(),
                ]
            })
            .collect(),
    )
}

pub fn frameworks_table(fws: &[FrameworkView]) -> String {
    table(
        &["ID", "NAME", "ROLE", "PRINCIPAL", "STATUS", "TASKS", "USED"],
        fws.iter()
            .map(|f| {
                vec![
                    f.id.to_string(),
                    f.name.clone(),
                    f.role.clone(),
                    f.principal.clone(),
                    f.status.to_string(),
                    f.tasks.to_string(),
                    f.used.to_string(),
                ]
            })
            .collect(),
    )
}

pub fn masters_table(masters: &[MasterView]) -> String {
    table(
        &["ID", "ADDRESS", "ROLE", "EPOCH"],
        masters
            .iter()
            .map(|m| {
                vec![
                    m.id.clone(),
                    m.address.clone(),
                    if m.leader { "leader" } else { "standby" }.to_string(),
                    m.epoch.to_string(),
                ]
            })
            .collect(),
    )
}

const TASK_COLUMNS: [&str; 10] =
    ["ID", "NAME", "STATE", "EXIT", "AGENT", "FRAMEWORK", "RESOURCES", "CPU", "PEAK MEM", "REASON"];

pub fn tasks_table(tasks: &[TaskView]) -> String {
    table(&TASK_COLUMNS, task_rows(tasks))
}

fn task_rows(tasks: &[TaskView]) -> Vec<Vec<String>> {
    tasks
        .iter()
        .map(|t| {
            let exit = match (t.exit_code, t.signal) {
                (_, Some(s)) => format!("sig {s}"),
                (Some(c), _) => c.to_string(),
                _ => "-".into(),
            };
            let (cpu, mem) = match &t.usage {
                Some(u) => (
                    // Wasm tasks are metered in fuel (about one unit per instruction).
                    match (u.cpu_time, u.fuel) {
                        (Some(d), _) => format!("{:.2}s", d.as_secs_f64()),
                        (None, Some(f)) => format!("{} fuel", compact(f)),
                        (None, None) => "-".into(),
                    },
                    u.peak_mem.map(format_size).unwrap_or_else(|| "-".into()),
                ),
                None => ("-".into(), "-".into()),
            };
            vec![
                t.id.to_string(),
                t.name.clone(),
                t.state.to_string(),
                exit,
                t.agent_id.to_string(),
                t.framework_id.to_string(),
                t.resources.to_string(),
                cpu,
                mem,
                t.reason.to_string(),
            ]
        })
        .collect()
}

/// [`tasks_table`] followed by the tasks that wait for resources (state `TASK_PENDING`, the
/// reason they wait; `N tasks` for tasks the framework did not name).
pub fn tasks_table_with_pending(tasks: &[TaskView], pending: &[agora_sdk::proto::PendingTaskView]) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    for p in pending {
        rows.push(vec![
            p.task_id.as_ref().map(ToString::to_string).unwrap_or_else(|| format!("({} tasks)", p.count)),
            p.framework_name.clone(),
            agora_sdk::json::PENDING_STATE.to_string(),
            "-".into(),
            "-".into(),
            p.framework_id.to_string(),
            p.resources.to_string(),
            "-".into(),
            "-".into(),
            p.reason.clone(),
        ]);
    }
    let mut all = task_rows(tasks);
    all.extend(rows);
    table(&TASK_COLUMNS, all)
}

/// 1234 → `1.2k`, 5_000_000 → `5.0M`.
fn compact(n: u64) -> String {
    match n {
        0..1_000 => n.to_string(),
        1_000..1_000_000 => format!("{:.1}k", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

/// An agent's drain in a table: `-`, `no deadline`, or what happens at the deadline and when.
fn drain_cell(drain: Option<&DrainView>, now_ms: u64) -> String {
    let Some(d) = drain else { return "-".into() };
    let Some(at) = d.deadline_unix_ms else { return "no deadline".into() };
    let what = if d.kill { "kill" } else { "deadline" };
    match at.checked_sub(now_ms).filter(|left| *left > 0) {
        Some(left) => format!("{what} in {}", short_duration(left / 1000)),
        None => format!("{what} passed"),
    }
}

/// `1h2m3s`, `4m0s`, `7s`.
fn short_duration(secs: u64) -> String {
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    match (h, m) {
        (0, 0) => format!("{s}s"),
        (0, _) => format!("{m}m{s}s"),
        _ => format!("{h}h{m}m{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_read_in_a_table() {
        let d = |deadline_unix_ms, kill| DrainView { deadline_unix_ms, kill };
        assert_eq!(drain_cell(None, 0), "-");
        assert_eq!(drain_cell(Some(&d(None, true)), 0), "no deadline");
        assert_eq!(drain_cell(Some(&d(Some(1_000 + 3_723_000), true)), 1_000), "kill in 1h2m3s");
        assert_eq!(drain_cell(Some(&d(Some(61_500), false)), 1_000), "deadline in 1m0s");
        assert_eq!(drain_cell(Some(&d(Some(1_000), true)), 2_000), "kill passed");
    }
}
