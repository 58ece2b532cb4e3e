//! An executor written with the SDK ([`agora_sdk::executor`]), run by an agent for
//! `examples/executor_framework.rs`. One process runs every task of its framework that names
//! executor id `echo` on its agent, and keeps a counter across them:
//!
//! * every launched task increments the counter and is reported RUNNING with
//!   `pid=<pid> count=<n>` (so one can check that tasks of one executor share one process);
//! * then, by the task's `data` (UTF-8): `sleep` stays RUNNING until killed (then KILLED),
//!   `crash` exits the process with status 3 at once (the agent then fails the executor's
//!   tasks), `stubborn` makes the executor ignore the agent's shutdown (used by tests: the agent
//!   then kills it after its grace period) and ends FINISHED, anything else ends FINISHED with
//!   `count=<n>` right away;
//! * a framework message is answered `pong <executor_id> tasks=<counter>`.
//!
//! It is not meant to be started by hand: the agent sets the `AGORA_EXECUTOR_*` variables it
//! reads.

use std::collections::HashMap;

use agora_sdk::executor::{run, Executor, ExecutorDriver, ExecutorRegistration};
use agora_sdk::proto::{Reason, TaskId, TaskInfo, TaskKind, TaskState};

/// Exit status of the `crash` task.
const CRASH_STATUS: i32 = 3;

#[derive(Default)]
struct Echo {
    /// Tasks launched so far.
    count: u64,
    /// This executor's id, from the agent's welcome.
    executor_id: String,
    /// Sleeping tasks and their number.
    sleeping: HashMap<TaskId, u64>,
    /// Ignore the agent's shutdown (a misbehaving executor, for tests).
    stubborn: bool,
}

impl Echo {
    /// Sends an update; a failure only means the agent is gone (it then fails the task itself).
    async fn update(
        driver: &ExecutorDriver,
        task_id: TaskId,
        state: TaskState,
        reason: Reason,
        message: String,
    ) {
        if let Err(e) = driver.send_status_update(task_id.clone(), state, reason, message).await {
            eprintln!("echo_executor: cannot report {task_id} {state}: {e}");
        }
    }
}

impl Executor for Echo {
    async fn registered(&mut self, _driver: &ExecutorDriver, info: &ExecutorRegistration) {
        self.executor_id = info.executor_id.to_string();
        let agent = info.agent_id.as_ref().map(|a| a.to_string()).unwrap_or_else(|| "?".into());
        eprintln!(
            "echo_executor: {} registered for framework {} on agent {agent} (pid {})",
            self.executor_id,
            info.framework_id,
            std::process::id()
        );
    }

    async fn launch_task(&mut self, driver: &ExecutorDriver, task: TaskInfo) {
        self.count += 1;
        let n = self.count;
        let id = task.task_id;
        let running = format!("pid={} count={n}", std::process::id());
        Self::update(driver, id.clone(), TaskState::Running, Reason::TaskStarted, running).await;
        let data = match &task.kind {
            TaskKind::Executor(t) => String::from_utf8_lossy(&t.data).into_owned(),
            _ => String::new(),
        };
        match data.as_str() {
            "sleep" => {
                self.sleeping.insert(id, n);
            }
            "stubborn" => {
                self.stubborn = true;
                Self::update(driver, id, TaskState::Finished, "task finished".into(), format!("count={n}"))
                    .await
            }
            "crash" => {
                eprintln!("echo_executor: task {id} asked for a crash; exiting with status {CRASH_STATUS}");
                std::process::exit(CRASH_STATUS);
            }
            _ => {
                Self::update(driver, id, TaskState::Finished, "task finished".into(), format!("count={n}"))
                    .await
            }
        }
    }

    async fn kill_task(&mut self, driver: &ExecutorDriver, task_id: &TaskId) {
        // Only sleeping tasks are still running; a kill of an ended task is ignored.
        if let Some(n) = self.sleeping.remove(task_id) {
            Self::update(driver, task_id.clone(), TaskState::Killed, Reason::Killed, format!("count={n}"))
                .await;
        }
    }

    async fn framework_message(&mut self, driver: &ExecutorDriver, data: &[u8]) {
        eprintln!("echo_executor: message from the scheduler: {}", String::from_utf8_lossy(data));
        let reply = format!("pong {} tasks={}", self.executor_id, self.count);
        if let Err(e) = driver.send_framework_message(reply.into_bytes()).await {
            eprintln!("echo_executor: cannot answer: {e}");
        }
    }

    async fn shutdown(&mut self, driver: &ExecutorDriver) {
        if self.stubborn {
            eprintln!("echo_executor: ignoring the shutdown");
            std::future::pending::<()>().await;
        }
        eprintln!("echo_executor: shutting down after {} task(s)", self.count);
        for (id, n) in std::mem::take(&mut self.sleeping) {
            Self::update(driver, id, TaskState::Killed, "executor shut down".into(), format!("count={n}"))
                .await;
        }
    }
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(&mut Echo::default()).await {
        eprintln!("echo_executor: {e}");
        std::process::exit(1);
    }
}
