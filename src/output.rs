//! Tables for the list commands (their JSON comes from `agora_sdk::json`).

use agora_sdk::proto::{AgentView, FrameworkView, MasterView, TaskView};
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
    table(
        &["ID", "HOSTNAME", "STATUS", "TASKS", "RESOURCES", "USED", "ATTRIBUTES"],
        agents
            .iter()
            .map(|a| {
                vec![
                    a.id.to_string(),
                    a.hostname.clone(),
                    a.status.clone(),
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
                    f.status.clone(),
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

pub fn tasks_table(tasks: &[TaskView]) -> String {
    table(
        &["ID", "NAME", "STATE", "EXIT", "AGENT", "FRAMEWORK", "RESOURCES", "CPU", "PEAK MEM", "REASON"],
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
                    t.reason.clone(),
                ]
            })
            .collect(),
    )
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
