//! The web UI's pages, rendered on the server with [`maud`] (every value is HTML-escaped:
//! task names, reasons and logs are whatever tasks and frameworks chose). Read-only; the
//! embedded script (`ui.js`) only refreshes what a page shows.

use std::collections::BTreeMap;

use agora_sdk::proto::{
    AgentView, AgentViewStatus, FrameworkView, PendingTaskView, TaskState, TaskTransition, TaskView, Usage,
    WireError,
};
use agora_sdk::resources::{format_milli, Resources};
use maud::{html, Markup, DOCTYPE};

use super::files::Listing;
use super::logs::Piece;

/// Tasks per page of `/tasks`.
pub const PAGE: usize = 100;

/// The page around `body`.
pub fn page(title: &str, nav: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Agora" }
                link rel="stylesheet" href="/ui/ui.css";
                script src="/ui/ui.js" defer {}
            }
            body {
                header {
                    a.brand href="/" { "Agora" }
                    nav {
                        @for (href, label) in [("/", "Overview"), ("/agents", "Agents"), ("/frameworks", "Frameworks"), ("/tasks", "Tasks")] {
                            a.current[label == nav] href=(href) { (label) }
                        }
                    }
                }
                main { (body) }
            }
        }
    }
}

/// Bytes as a short human figure (`1.5 GiB`).
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn ports(r: &Resources) -> u64 {
    r.ports.iter().map(|p| p.len()).sum()
}

/// One bar: `used` of `total`, labelled with `text`.
fn bar(name: &str, used: u64, total: u64, text: String) -> Markup {
    let pct = if total == 0 { 0.0 } else { (used as f64 / total as f64 * 100.0).min(100.0) };
    html! {
        div.bar title=(format!("{name}: {text}")) {
            span.kind { (name) }
            span.track { span.fill style=(format!("width:{pct:.1}%")) {} }
            span.figure { (text) }
        }
    }
}

/// Used/total bars for every kind an agent has.
fn bars(total: &Resources, used: &Resources) -> Markup {
    let (t, u) = (total.flatten(), used.flatten());
    html! {
        div.bars {
            (bar("cpus", u.cpus, t.cpus, format!("{} / {}", format_milli(u.cpus), format_milli(t.cpus))))
            (bar("mem", u.mem, t.mem, format!("{} / {}", bytes(u.mem), bytes(t.mem))))
            @if t.disk > 0 { (bar("disk", u.disk, t.disk, format!("{} / {}", bytes(u.disk), bytes(t.disk)))) }
            @if ports(&t) > 0 { (bar("ports", ports(&u), ports(&t), format!("{} / {}", ports(&u), ports(&t)))) }
            @for (k, v) in &t.scalars {
                @let used = u.scalars.get(k).copied().unwrap_or(0);
                (bar(k, used, *v, format!("{} / {}", format_milli(used), format_milli(*v))))
            }
        }
    }
}

fn state_class(s: TaskState) -> &'static str {
    match s {
        TaskState::Running => "ok",
        TaskState::Finished => "done",
        TaskState::Staging | TaskState::Starting | TaskState::Killing => "pending",
        TaskState::Unreachable | TaskState::Unknown => "warn",
        _ => "bad",
    }
}

fn state_badge(s: TaskState) -> Markup {
    html! { span class=(format!("badge {}", state_class(s))) data-field="state" { (s.as_str()) } }
}

/// Where a task's page is: `framework` tells tasks apart that reuse an id.
pub fn task_href(t: &TaskView) -> String {
    format!("/tasks/{}?framework={}", enc(t.id.as_str()), enc(t.framework_id.as_str()))
}

/// Percent-encodes a path segment or query value.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The total of the active agents (the denominator of dominant shares).
pub fn cluster_total(agents: &[AgentView]) -> Resources {
    let mut total = Resources::default();
    for a in agents.iter().filter(|a| a.status == AgentViewStatus::Active) {
        total.add_assign(&a.resources.flatten());
    }
    total
}

/// Task counts by state in lifecycle order, every state listed (zero included) so that the
/// script can update them.
pub fn counts(tasks: &[TaskView]) -> Vec<(&'static str, u64)> {
    let mut c: BTreeMap<&'static str, u64> = BTreeMap::new();
    for t in tasks {
        *c.entry(t.state.as_str()).or_default() += 1;
    }
    TaskState::ALL.iter().map(|s| (s.as_str(), c.get(s.as_str()).copied().unwrap_or(0))).collect()
}

fn frameworks_table(frameworks: &[FrameworkView], total: &Resources) -> Markup {
    html! {
        table {
            thead { tr { th { "Name" } th { "Role" } th { "Principal" } th { "Status" } th.num { "Dominant share" } th { "Used" } th.num { "Tasks" } th { "Id" } } }
            tbody {
                @for f in frameworks {
                    @let share = f.used.dominant_share(total) * 100.0;
                    tr {
                        td { a href=(format!("/tasks?framework={}", enc(f.id.as_str()))) { (f.name) } }
                        td { (f.role) }
                        td { (f.principal) }
                        td { (f.status) }
                        td.num { span.share { span.fill style=(format!("width:{:.1}%", share.min(100.0))) {} } (format!("{share:.1}%")) }
                        td.mono { (f.used) }
                        td.num { (f.tasks) }
                        td.mono { (f.id) }
                    }
                }
                @if frameworks.is_empty() { tr { td colspan="8" .muted { "No frameworks." } } }
            }
        }
    }
}

fn agents_table(agents: &[AgentView]) -> Markup {
    html! {
        table {
            thead { tr { th { "Hostname" } th { "Status" } th { "Resources (used / total)" } th.num { "Tasks" } th { "Id" } } }
            tbody {
                @for a in agents {
                    tr {
                        td { a href=(format!("/agents/{}", enc(a.id.as_str()))) { (a.hostname) } }
                        td { span class=(format!("badge {}", if a.status == AgentViewStatus::Active { "ok" } else { "warn" })) { (a.status.as_str()) } }
                        td { (bars(&a.resources, &a.used)) }
                        td.num { a href=(format!("/tasks?agent={}", enc(a.id.as_str()))) { (a.tasks) } }
                        td.mono { (a.id) }
                    }
                }
                @if agents.is_empty() { tr { td colspan="5" .muted { "No agents." } } }
            }
        }
    }
}

/// `/`: agents, frameworks, task counts and the pictures; `leader` is false on a standby
/// master (which has no state to show).
pub fn overview(
    leader: bool,
    agents: &[AgentView],
    frameworks: &[FrameworkView],
    tasks: &[TaskView],
    charts: Markup,
) -> Markup {
    let total = cluster_total(agents);
    let counts = counts(tasks);
    page(
        "Overview",
        "Overview",
        html! {
            h1 { "Overview" }
            @if !leader {
                p.error { "This master is a standby: the cluster's state is on the leading master (see `agora masters`)." }
            }
            section #counts data-poll="/ui/api/overview" {
                h2 { "Tasks" }
                ul.counts {
                    li { a href="/tasks" { span.n data-count="total" { (tasks.len()) } " total" } }
                    @for &(state, n) in &counts {
                        li.zero[n == 0] data-state=(state) {
                            a href=(format!("/tasks?state={state}")) { span.n data-count=(state) { (n) } " " (state) }
                        }
                    }
                }
            }
            section { h2 { "Pictures" } (charts) }
            section { h2 { "Agents (" (agents.len()) ")" } (agents_table(agents)) }
            section { h2 { "Frameworks (" (frameworks.len()) ")" } (frameworks_table(frameworks, &total)) }
        },
    )
}

/// `/agents`.
pub fn agents(agents: &[AgentView]) -> Markup {
    page("Agents", "Agents", html! { h1 { "Agents (" (agents.len()) ")" } (agents_table(agents)) })
}

/// `/frameworks`.
pub fn frameworks(frameworks: &[FrameworkView], agents: &[AgentView]) -> Markup {
    let total = cluster_total(agents);
    page(
        "Frameworks",
        "Frameworks",
        html! { h1 { "Frameworks (" (frameworks.len()) ")" } (frameworks_table(frameworks, &total)) },
    )
}

/// The filters of `/tasks`, as given in its query.
#[derive(Debug, Default, serde::Deserialize)]
pub struct TaskFilter {
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub framework: String,
    #[serde(default)]
    pub agent: String,
    /// A substring of the task's name or id.
    #[serde(default)]
    pub name: String,
    /// From 1.
    pub page: Option<usize>,
}

impl TaskFilter {
    /// Whether `t` passes. A state is matched with or without its `TASK_` prefix, any case.
    pub fn matches(&self, t: &TaskView) -> bool {
        let state = self.state.trim().to_ascii_uppercase();
        (state.is_empty()
            || t.state.as_str() == state
            || t.state.as_str().strip_prefix("TASK_") == Some(&state))
            && (self.framework.is_empty() || t.framework_id.as_str() == self.framework)
            && (self.agent.is_empty() || t.agent_id.as_str() == self.agent)
            && (self.name.is_empty() || t.name.contains(&self.name) || t.id.as_str().contains(&self.name))
    }

    fn query(&self, page: usize) -> String {
        format!(
            "/tasks?state={}&framework={}&agent={}&name={}&page={page}",
            enc(&self.state),
            enc(&self.framework),
            enc(&self.agent),
            enc(&self.name)
        )
    }
}

/// The tasks that wait for resources and why (the first [`PAGE`] that pass the filter's
/// framework and name).
fn pending_section(pending: &[PendingTaskView], filter: &TaskFilter) -> Markup {
    let state = filter.state.trim().to_ascii_uppercase();
    let wanted = state.is_empty() || state == "PENDING" || state == agora_sdk::json::PENDING_STATE;
    let matching: Vec<&PendingTaskView> = pending
        .iter()
        .filter(|p| {
            wanted
                && filter.agent.is_empty()
                && (filter.framework.is_empty() || p.framework_id.as_str() == filter.framework)
                && (filter.name.is_empty()
                    || p.framework_name.contains(&filter.name)
                    || p.task_id.as_ref().is_some_and(|t| t.as_str().contains(&filter.name)))
        })
        .collect();
    if matching.is_empty() {
        return html! {};
    }
    html! {
        section #pending {
            h2 { "Waiting for resources (" (matching.iter().map(|p| u64::from(p.count)).sum::<u64>()) ")" }
            table {
                thead { tr { th { "Id" } th { "State" } th { "Why" } th { "Resources" } th { "Framework" } } }
                tbody {
                    @for p in matching.iter().take(PAGE) {
                        tr {
                            td.mono { @match &p.task_id { Some(id) => (id), None => { (p.count) " tasks" } } }
                            td { span.badge.pending { (agora_sdk::json::PENDING_STATE) } }
                            td { (p.reason) }
                            td.mono { (p.resources) }
                            td { a href=(format!("/tasks?framework={}", enc(p.framework_id.as_str()))) { (p.framework_name) } }
                        }
                    }
                }
            }
            @if matching.len() > PAGE { p.muted { "The first " (PAGE) " of " (matching.len()) "." } }
        }
    }
}

/// `/tasks`: the tasks that pass `filter`, [`PAGE`] a page, in the master's order, after those
/// that wait for resources.
pub fn tasks(tasks: &[TaskView], pending: &[PendingTaskView], filter: &TaskFilter) -> Markup {
    let matching: Vec<&TaskView> = tasks.iter().filter(|t| filter.matches(t)).collect();
    let pages = matching.len().div_ceil(PAGE).max(1);
    let page_no = filter.page.unwrap_or(1).clamp(1, pages);
    let shown = matching.iter().skip((page_no - 1) * PAGE).take(PAGE);
    page(
        "Tasks",
        "Tasks",
        html! {
            h1 { "Tasks" }
            form.filters method="get" action="/tasks" {
                label { "State " select name="state" {
                    option value="" { "any" }
                    @for s in TaskState::ALL { option value=(s.as_str()) selected[filter.state.eq_ignore_ascii_case(s.as_str())] { (s.as_str()) } }
                } }
                label { "Framework " input name="framework" value=(filter.framework) placeholder="framework id"; }
                label { "Agent " input name="agent" value=(filter.agent) placeholder="agent id"; }
                label { "Name " input name="name" value=(filter.name) placeholder="name or id contains"; }
                button type="submit" { "Filter" }
                a href="/tasks" { "clear" }
            }
            (pending_section(pending, filter))
            p.muted { (matching.len()) " of " (tasks.len()) " tasks; page " (page_no) " of " (pages) }
            table {
                thead { tr { th { "Name" } th { "Id" } th { "State" } th { "Reason" } th.num { "Exit" } th { "Resources" } th { "Framework" } th { "Agent" } } }
                tbody {
                    @for t in shown {
                        tr {
                            td { a href=(task_href(t)) { (t.name) } }
                            td.mono { a href=(task_href(t)) { (t.id) } }
                            td { (state_badge(t.state)) }
                            td { (t.reason) }
                            td.num { (exit_text(t)) }
                            td.mono { (t.resources) }
                            td.mono { a href=(format!("/tasks?framework={}", enc(t.framework_id.as_str()))) { (t.framework_id) } }
                            td.mono { a href=(format!("/agents/{}", enc(t.agent_id.as_str()))) { (t.agent_id) } }
                        }
                    }
                    @if matching.is_empty() { tr { td colspan="8" .muted { "No tasks match." } } }
                }
            }
            @if pages > 1 {
                nav.pager {
                    @if page_no > 1 { a href=(filter.query(1)) { "« first" } a href=(filter.query(page_no - 1)) { "‹ previous" } }
                    span { "page " (page_no) " of " (pages) }
                    @if page_no < pages { a href=(filter.query(page_no + 1)) { "next ›" } a href=(filter.query(pages)) { "last »" } }
                }
            }
        },
    )
}

/// `exit 3`, `signal 9` or nothing.
pub fn exit_text(t: &TaskView) -> String {
    match (t.exit_code, t.signal) {
        (Some(c), _) => format!("exit {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => String::new(),
    }
}

/// The usage lines of a task (fuel for Wasm tasks).
pub fn usage_text(u: &Option<Usage>) -> Vec<(&'static str, String)> {
    let Some(u) = u else { return Vec::new() };
    let mut out = Vec::new();
    if let Some(d) = u.cpu_time {
        out.push(("CPU time", format!("{:.3} s", d.as_secs_f64())));
    }
    if let Some(m) = u.peak_mem {
        out.push(("Peak memory", bytes(m)));
    }
    if let Some(m) = u.mem_current {
        out.push(("Memory now", bytes(m)));
    }
    if let Some(d) = u.throttled {
        out.push(("CPU throttled", format!("{:.3} s", d.as_secs_f64())));
    }
    if let Some(f) = u.fuel {
        out.push(("Fuel", f.to_string()));
    }
    out
}

fn log_block(id: &str, label: &str, log: &Result<Piece, WireError>, live: bool) -> Markup {
    html! {
        section.log {
            h2 { (label) }
            @match log {
                Ok(p) => {
                    @if p.offset > 0 { p.muted { "The last " (bytes(p.next - p.offset)) " of " (bytes(p.next)) "." } }
                    pre #(id) data-next=(p.next) data-follow=(if live { "1" } else { "0" }) { (p.text) }
                }
                Err(e) => { p.error { "Not available: " (e.message) } }
            }
        }
    }
}

/// `/tasks/{id}`: what the master knows of one task, and the tail of its output.
pub fn task(
    t: &TaskView,
    history: &[TaskTransition],
    stdout: Result<Piece, WireError>,
    stderr: Result<Piece, WireError>,
    sandbox: Result<Listing, WireError>,
) -> Markup {
    let live = !t.state.is_terminal();
    let api = format!("/ui/api/tasks/{}?framework={}", enc(t.id.as_str()), enc(t.framework_id.as_str()));
    page(
        &format!("Task {}", t.name),
        "Tasks",
        html! {
            h1 { "Task " (t.name) }
            div #task data-poll=(api) data-live=(if live { "1" } else { "0" }) {
                dl.facts {
                    dt { "State" } dd { (state_badge(t.state)) }
                    dt { "Reason" } dd data-field="reason" { (t.reason) }
                    dt { "Message" } dd data-field="message" { (t.message) }
                    dt { "Exit" } dd data-field="exit" { (exit_text(t)) }
                    dt { "Id" } dd.mono { (t.id) }
                    dt { "Framework" } dd.mono { a href=(format!("/tasks?framework={}", enc(t.framework_id.as_str()))) { (t.framework_id) } }
                    dt { "Agent" } dd.mono { a href=(format!("/agents/{}", enc(t.agent_id.as_str()))) { (t.agent_id) } }
                    dt { "Executor" } dd.mono { (t.executor_id) }
                    dt { "Resources" } dd.mono { (t.resources) }
                    dt { "Usage" } dd data-field="usage" {
                        @for (k, v) in usage_text(&t.usage) { span.usage { (k) ": " (v) } }
                    }
                }
                h2 { "Status updates" }
                @if history.is_empty() {
                    p.muted { "No state change recorded by this master." }
                } @else {
                    table.timeline {
                        thead { tr { th { "Time" } th { "State" } th { "Reason" } } }
                        tbody {
                            @for h in history {
                                tr { td.mono { (agora_sdk::units::format_unix_ms(h.timestamp_ms)) } td { (state_badge(h.state)) } td { (h.reason) } }
                            }
                        }
                    }
                    p.muted { "The last " (history.len()) " state changes the master applied (it keeps 16); the state above follows the task live." }
                }
            }
            (log_block("stdout", "stdout", &stdout, live))
            (log_block("stderr", "stderr", &stderr, live))
            section #sandbox {
                h2 { "Sandbox files" }
                (files_table(t, "", &sandbox))
            }
        },
    )
}

/// Where a sandbox directory (`files`) or file (`file`, `download`) of `t` is.
fn sandbox_href(t: &TaskView, route: &str, path: &str, download: bool) -> String {
    format!(
        "/tasks/{}/{route}?framework={}&path={}{}",
        enc(t.id.as_str()),
        enc(t.framework_id.as_str()),
        enc(path),
        if download { "&download=1" } else { "" }
    )
}

/// A sandbox directory's entries: directories open their listing, files are shown (those
/// over the view limit downloaded) and downloaded.
fn files_table(t: &TaskView, dir: &str, listing: &Result<Listing, WireError>) -> Markup {
    let child = |name: &str| if dir.is_empty() { name.to_string() } else { format!("{dir}/{name}") };
    html! {
        @match listing {
            Err(e) => { p.error { "Not available: " (e.message) } }
            Ok(l) if l.entries.is_empty() => { p.muted { "Empty." } }
            Ok(l) => {
                table.files {
                    thead { tr { th { "Name" } th.num { "Size" } th { "Modified (UTC)" } th {} } }
                    tbody {
                        @for e in &l.entries {
                            @let path = child(&e.name);
                            tr {
                                @match e.kind {
                                    agora_sdk::proto::FileKind::Dir => {
                                        td.mono { a href=(sandbox_href(t, "files", &path, false)) { (e.name) "/" } }
                                        td.num { "-" }
                                    }
                                    agora_sdk::proto::FileKind::File | agora_sdk::proto::FileKind::Link => {
                                        td.mono { a href=(sandbox_href(t, "file", &path, false)) { (e.name) } }
                                        td.num { (bytes(e.size)) }
                                    }
                                    agora_sdk::proto::FileKind::Other => {
                                        td.mono { (e.name) }
                                        td.num { (bytes(e.size)) }
                                    }
                                }
                                td.mono { (agora_sdk::units::format_unix_ms(e.modified_ms)) }
                                td {
                                    @if matches!(e.kind, agora_sdk::proto::FileKind::File | agora_sdk::proto::FileKind::Link) {
                                        a href=(sandbox_href(t, "file", &path, true)) { "download" }
                                    }
                                }
                            }
                        }
                    }
                }
                @if l.truncated { p.muted { "The first " (l.entries.len()) " entries." } }
            }
        }
    }
}

/// `/tasks/{id}/files?path=DIR`: one directory of a task's sandbox.
pub fn files(t: &TaskView, dir: &str, listing: Result<Listing, WireError>) -> Markup {
    let parent = dir.rsplit_once('/').map(|(p, _)| p).unwrap_or("");
    page(
        &format!("Sandbox of {}", t.name),
        "Tasks",
        html! {
            h1 { "Sandbox of " a href=(task_href(t)) { (t.name) } }
            p.mono {
                a href=(sandbox_href(t, "files", "", false)) { "sandbox" }
                @for (i, part) in dir.split('/').filter(|p| !p.is_empty()).enumerate() {
                    " / "
                    a href=(sandbox_href(t, "files", &dir.split('/').filter(|p| !p.is_empty()).take(i + 1).collect::<Vec<_>>().join("/"), false)) { (part) }
                }
            }
            @if !dir.is_empty() { p { a href=(sandbox_href(t, "files", parent, false)) { "‹ up" } } }
            (files_table(t, dir, &listing))
        },
    )
}

/// A file too large to show in the browser: a link to download it.
pub fn too_large(t: &TaskView, path: &str, size: u64, max: u64) -> Markup {
    page(
        &format!("{path} of {}", t.name),
        "Tasks",
        html! {
            h1 { (path) }
            p { "This file has " (bytes(size)) ", more than the " (bytes(max)) " shown in the browser." }
            p { a href=(sandbox_href(t, "file", path, true)) { "Download it" } " or use " code { "agora cp " (t.id) ":" (path) " ." } }
            p { a href=(task_href(t)) { "‹ task " (t.name) } }
        },
    )
}

/// Several tasks share the id: a list to choose from.
pub fn ambiguous(id: &str, matching: &[&TaskView]) -> Markup {
    page(
        "Task",
        "Tasks",
        html! {
            h1 { "Task " (id) }
            p { "Several frameworks have a task with this id:" }
            ul { @for t in matching { li { a href=(task_href(t)) { (t.name) " (" (t.framework_id) ")" } } } }
        },
    )
}

/// `/agents/{id}`.
pub fn agent(a: &AgentView, tasks: &[&TaskView]) -> Markup {
    page(
        &format!("Agent {}", a.hostname),
        "Agents",
        html! {
            h1 { "Agent " (a.hostname) }
            dl.facts {
                dt { "Status" } dd { span class=(format!("badge {}", if a.status == AgentViewStatus::Active { "ok" } else { "warn" })) { (a.status.as_str()) } }
                dt { "Id" } dd.mono { (a.id) }
                dt { "Resources" } dd.mono { (a.resources) }
                dt { "Used" } dd.mono { (a.used) }
                dt { "Tasks" } dd { (a.tasks) }
                dt { "Drain" } dd {
                    @match &a.drain {
                        None => "not draining",
                        Some(d) => {
                            @match d.deadline_unix_ms {
                                Some(ms) => { "draining; deadline " (agora_sdk::units::format_unix_ms(ms)) @if d.kill { ", tasks left then are killed" } @else { ", tasks are not killed" } },
                                None => "draining, no deadline (tasks are not killed)",
                            }
                        }
                    }
                }
            }
            (bars(&a.resources, &a.used))
            h2 { "Attributes" }
            @if a.attributes.0.is_empty() { p.muted { "None." } } @else {
                table.kv { tbody { @for (k, v) in &a.attributes.0 { tr { th { (k) } td.mono { (v.to_string()) } } } } }
            }
            h2 { "Reservations" }
            @if a.resources.reserved.is_empty() { p.muted { "None: every resource is unreserved." } } @else {
                table.kv {
                    thead { tr { th { "Role" } th { "Reserved" } } }
                    tbody { @for (role, r) in &a.resources.reserved { tr { td { (role) } td.mono { (r) } } } }
                }
            }
            h2 { "Tasks (" (tasks.len()) ")" }
            table {
                thead { tr { th { "Name" } th { "State" } th { "Reason" } th { "Resources" } th { "Framework" } } }
                tbody {
                    @for t in tasks.iter().take(PAGE) {
                        tr {
                            td { a href=(task_href(t)) { (t.name) } }
                            td { (state_badge(t.state)) }
                            td { (t.reason) }
                            td.mono { (t.resources) }
                            td.mono { (t.framework_id) }
                        }
                    }
                }
            }
            @if tasks.len() > PAGE {
                p { a href=(format!("/tasks?agent={}", enc(a.id.as_str()))) { "All " (tasks.len()) " tasks of this agent" } }
            }
        },
    )
}

/// A page for a missing agent or task.
pub fn not_found(what: &str) -> Markup {
    page("Not found", "", html! { h1 { "Not found" } p { (what) } p { a href="/" { "Overview" } } })
}

#[cfg(test)]
mod tests {
    use agora_sdk::proto::{AgentId, ExecutorId, FrameworkId, TaskId, COMMAND_EXECUTOR_ID};

    use super::*;

    fn task(i: usize, state: TaskState, name: &str) -> TaskView {
        TaskView {
            id: TaskId::new(format!("t{i}")),
            name: name.to_string(),
            framework_id: FrameworkId::new(if i.is_multiple_of(2) { "F-even" } else { "F-odd" }),
            agent_id: AgentId::new("A1"),
            state,
            resources: Resources::parse("cpus:0.1;mem:64MiB").expect("resources"),
            exit_code: None,
            signal: None,
            reason: agora_sdk::Reason::None,
            message: String::new(),
            usage: None,
            executor_id: ExecutorId::new(COMMAND_EXECUTOR_ID),
        }
    }

    fn rows(html: &str) -> usize {
        html.matches("<tr>").count() - 1 // the header's row
    }

    #[test]
    fn ten_thousand_tasks_render_one_page_of_a_hundred_with_a_pager() {
        let tasks: Vec<TaskView> =
            (0..10_000).map(|i| task(i, TaskState::Running, &format!("job-{i}"))).collect();
        let first = tasks_page(&tasks, &TaskFilter::default());
        assert_eq!(rows(&first), PAGE);
        assert!(
            first.contains("page 1 of 100") && first.contains(">job-99<") && !first.contains(">job-100<")
        );
        let last = tasks_page(&tasks, &TaskFilter { page: Some(100), ..Default::default() });
        assert_eq!(rows(&last), PAGE);
        assert!(last.contains(">job-9999<") && last.contains("page 100 of 100"));
        // Past the end: the last page, not an empty one.
        let past = tasks_page(&tasks, &TaskFilter { page: Some(5000), ..Default::default() });
        assert!(past.contains("page 100 of 100"));
    }

    fn tasks_page(t: &[TaskView], f: &TaskFilter) -> String {
        tasks(t, &[], f).into_string()
    }

    #[test]
    fn filters_by_state_framework_agent_and_name() {
        let all = [
            task(0, TaskState::Running, "web-1"),
            task(1, TaskState::Failed, "web-2"),
            task(2, TaskState::Finished, "batch-1"),
        ];
        let pick = |f: TaskFilter| -> Vec<String> {
            all.iter().filter(|t| f.matches(t)).map(|t| t.name.clone()).collect()
        };
        assert_eq!(pick(TaskFilter { state: "failed".into(), ..Default::default() }), ["web-2"]);
        assert_eq!(pick(TaskFilter { state: "TASK_RUNNING".into(), ..Default::default() }), ["web-1"]);
        assert_eq!(
            pick(TaskFilter { framework: "F-even".into(), ..Default::default() }),
            ["web-1", "batch-1"]
        );
        assert_eq!(
            pick(TaskFilter { name: "web".into(), agent: "A1".into(), ..Default::default() }),
            ["web-1", "web-2"]
        );
        assert!(pick(TaskFilter { agent: "A2".into(), ..Default::default() }).is_empty());
    }

    #[test]
    fn hostile_names_reasons_and_logs_stay_text() {
        let mut t = task(1, TaskState::Failed, "<script>alert(1)</script>");
        t.reason = "<img src=x onerror=alert(2)>".into();
        t.message = "\"quoted\" & <b>".into();
        let log = Piece { offset: 0, next: 20, text: "</pre><script>x</script>".into() };
        let history =
            [TaskTransition { state: TaskState::Failed, reason: "<b>bad</b>".into(), timestamp_ms: 0 }];
        let sandbox = Listing {
            entries: vec![agora_sdk::proto::FileEntry {
                name: "<b>x\".txt".into(),
                kind: agora_sdk::proto::FileKind::File,
                size: 3,
                modified_ms: 0,
            }],
            truncated: false,
        };
        let page = super::task(
            &t,
            &history,
            Ok(log),
            Err(WireError::new(agora_sdk::proto::ErrorCode::NotFound, "<i>gone</i>")),
            Ok(sandbox),
        )
        .into_string();
        assert!(!page.contains("<b>x") && page.contains("&lt;b&gt;x&quot;.txt"), "a file name broke out");
        assert!(page.contains("path=%3Cb%3Ex%22.txt"), "file links percent-encode the path");
        assert!(!page.contains("<b>bad") && page.contains("&lt;b&gt;bad"), "a history reason broke out");
        assert!(!page.contains("<script>alert") && page.contains("&lt;script&gt;alert(1)"));
        assert!(!page.contains("<img") && !page.contains("</pre><script>") && !page.contains("<i>gone"));
        assert!(page.contains("&quot;quoted&quot; &amp; &lt;b&gt;"));
        let list = tasks_page(&[t], &TaskFilter { name: "\"><script>".into(), ..Default::default() });
        assert!(!list.contains("\"><script>"), "a filter value broke out of its attribute");
    }

    #[test]
    fn links_percent_encode_ids() {
        let mut t = task(0, TaskState::Running, "x");
        t.id = TaskId::new("a b&c/d");
        assert_eq!(task_href(&t), "/tasks/a%20b%26c%2Fd?framework=F-even");
    }
}
