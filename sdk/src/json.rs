//! The JSON shape of agents, frameworks and tasks shared by `agora … -o json` and the master's
//! HTTP API: resources and attributes in their text form, states in Mesos's spelling.

use serde_json::{json, Value};

use crate::proto::{AgentView, FrameworkView, MasterView, PendingTaskView, TaskView};

pub fn agent_json(a: &AgentView) -> Value {
    json!({
        "id": a.id.as_str(),
        "hostname": a.hostname,
        "resources": a.resources.to_string(),
        "used": a.used.to_string(),
        "attributes": a.attributes.to_string(),
        "status": a.status,
        "tasks": a.tasks,
        "drain": a.drain.as_ref().map(|d| json!({
            "deadline_unix_ms": d.deadline_unix_ms,
            "kill": d.kill,
        })),
    })
}

pub fn framework_json(f: &FrameworkView) -> Value {
    json!({
        "id": f.id.as_str(),
        "name": f.name,
        "role": f.role,
        "principal": f.principal,
        "status": f.status,
        "used": f.used.to_string(),
        "tasks": f.tasks,
    })
}

/// A master as `agora masters -o json` prints it.
pub fn master_json(m: &MasterView) -> Value {
    json!({
        "id": m.id,
        "address": m.address,
        "leader": m.leader,
        "epoch": m.epoch,
    })
}

/// A task that waits for resources ([`PendingTaskView`]), in the keys of [`task_json`]: state
/// `TASK_PENDING`, no agent, the reason it waits, and `count` (more than 1 for tasks the
/// framework did not name, then `id` is null).
pub fn pending_task_json(p: &PendingTaskView) -> Value {
    json!({
        "id": p.task_id.as_ref().map(|t| t.as_str()),
        "name": p.framework_name,
        "framework_id": p.framework_id.as_str(),
        "agent_id": null,
        "state": PENDING_STATE,
        "resources": p.resources.to_string(),
        "exit_code": null,
        "signal": null,
        "reason": p.reason,
        "message": "",
        "usage": null,
        "role": p.role,
        "count": p.count,
    })
}

/// The state name operators see for a task that waits for resources (it is no task state of
/// the master's: the task is not launched yet).
pub const PENDING_STATE: &str = "TASK_PENDING";

pub fn task_json(t: &TaskView) -> Value {
    let usage = t.usage.as_ref().map(|u| {
        json!({
            "cpu_time_secs": u.cpu_time.map(|d| d.as_secs_f64()),
            "peak_mem_bytes": u.peak_mem,
            "fuel": u.fuel,
            "throttled_secs": u.throttled.map(|d| d.as_secs_f64()),
            "mem_current_bytes": u.mem_current,
        })
    });
    json!({
        "id": t.id.as_str(),
        "name": t.name,
        "framework_id": t.framework_id.as_str(),
        "agent_id": t.agent_id.as_str(),
        "state": t.state.as_str(),
        "resources": t.resources.to_string(),
        "exit_code": t.exit_code,
        "signal": t.signal,
        "reason": t.reason,
        "message": t.message,
        "usage": usage,
    })
}
