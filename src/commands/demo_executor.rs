//! `agora demo-executor`: the custom executor of `agora demo` (internal). A framework's own
//! executor written with the SDK ([`agora_sdk::executor`]), shipped the way any framework ships
//! one: the demo uploads this very binary to the master's artifact store and its tasks name it
//! in their `ExecutorInfo`; each agent fetches it by digest, verifies it and starts it in a
//! sandbox of its own as the task user. One process runs every `counter` task of the framework
//! on its agent and keeps a count across them; a framework message is answered with the count.
//! (`examples/echo_executor.rs` is the same idea as a program of its own.)

use std::process::ExitCode;

use agora_sdk::executor::{run, Executor, ExecutorDriver, ExecutorRegistration};
use agora_sdk::proto::{Reason, TaskId, TaskInfo, TaskKind, TaskState};
use clap::Args;

#[derive(Args)]
pub struct DemoExecutorCommand {}

#[derive(Default)]
struct Counter {
    count: u64,
    executor_id: String,
}

impl Executor for Counter {
    async fn registered(&mut self, _driver: &ExecutorDriver, info: &ExecutorRegistration) {
        self.executor_id = info.executor_id.to_string();
    }

    async fn launch_task(&mut self, driver: &ExecutorDriver, task: TaskInfo) {
        self.count += 1;
        let pid = std::process::id();
        let word = match &task.kind {
            TaskKind::Executor(t) => String::from_utf8_lossy(&t.data).into_owned(),
            _ => String::new(),
        };
        let id = task.task_id;
        let _ = driver
            .send_status_update(id.clone(), TaskState::Running, Reason::TaskStarted, format!("pid={pid}"))
            .await;
        let message = format!("{word} is task #{} of executor pid {pid}", self.count);
        let _ = driver.send_status_update(id, TaskState::Finished, "task finished", message).await;
    }

    async fn kill_task(&mut self, driver: &ExecutorDriver, task_id: &TaskId) {
        // Tasks finish as they are launched; a kill can only name one that already ended.
        let _ = (driver, task_id);
    }

    async fn framework_message(&mut self, driver: &ExecutorDriver, _data: &[u8]) {
        let reply = format!("{} in pid {} ran {} task(s)", self.executor_id, std::process::id(), self.count);
        let _ = driver.send_framework_message(reply.into_bytes()).await;
    }
}

impl DemoExecutorCommand {
    pub async fn execute(self) -> anyhow::Result<ExitCode> {
        run(&mut Counter::default()).await?;
        Ok(ExitCode::SUCCESS)
    }
}
