//! The master's sans-IO core: a state machine that takes events with the time passed in and
//! produces actions. No sockets, no clock, no tasks: the QUIC layer (`server.rs`) and the tests
//! drive it (the shape of `quinn-proto`).
//!
//! Usage by a driver:
//! ```text
//! core.handle(now, event);              // for every input
//! while let Some(a) = core.poll_action() { carry it out }
//! sleep until core.poll_timeout(), then core.handle_timeout(now)
//! ```

use std::time::{Duration, Instant};

use agora_sdk::proto::*;

/// Identifies one connection (assigned by the driver, never reused).
pub type ConnId = u64;

/// Master settings.
#[derive(Clone, Debug)]
pub struct MasterConfig {
    pub master_id: String,
    /// A full allocation cycle over every agent runs at least this often (Mesos default 1 s).
    pub allocation_interval: Duration,
    /// After an event that frees or asks for resources (task ended, framework subscribed,
    /// revive, decline, agent added), an allocation runs within this delay, batching events.
    pub allocation_batch: Duration,
    /// Told to agents; they send `Heartbeat` this often.
    pub agent_heartbeat_interval: Duration,
    /// An agent silent (no message at all) this long is marked unreachable.
    pub agent_timeout: Duration,
    /// Sent to frameworks as `SchedulerEvent::Heartbeat` this often.
    pub framework_heartbeat_interval: Duration,
    /// Filter length of a DECLINE without `refuse_seconds`.
    pub default_refuse: Duration,
}

impl Default for MasterConfig {
    fn default() -> Self {
        MasterConfig {
            master_id: "master".into(),
            allocation_interval: Duration::from_secs(1),
            allocation_batch: Duration::from_millis(2),
            agent_heartbeat_interval: Duration::from_secs(5),
            agent_timeout: Duration::from_secs(20),
            framework_heartbeat_interval: Duration::from_secs(15),
            default_refuse: Duration::from_secs(5),
        }
    }
}

/// An input to the core.
#[derive(Clone, Debug)]
pub enum Event {
    /// A message from an agent connection (the first must be `Register`). `principal` comes
    /// from the connection's verified certificate.
    Agent { conn: ConnId, principal: String, msg: AgentMessage },
    AgentDisconnected { conn: ConnId },
    /// A call from a framework connection (the first must be `Subscribe`).
    Framework { conn: ConnId, principal: String, call: SchedulerCall },
    FrameworkDisconnected { conn: ConnId },
}

/// An output of the core, for the driver to carry out.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    ToAgent { conn: ConnId, msg: MasterToAgent },
    ToFramework { conn: ConnId, event: SchedulerEvent },
    /// Send the error (where the peer can take it) and close this connection only.
    Close { conn: ConnId, error: WireError },
}

/// Who asks to read a task's output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requester {
    Operator,
    Framework(ConnId),
}

/// Where a task's output can be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputLocation {
    pub agent_conn: ConnId,
    pub agent_id: AgentId,
    pub framework_id: FrameworkId,
}

/// The master's state machine.
pub struct Master {
    // filled in by the implementation
}

impl Master {
    pub fn new(config: MasterConfig, now: Instant) -> Self {
        let _ = (config, now);
        todo!()
    }

    pub fn handle(&mut self, now: Instant, event: Event) {
        let _ = (now, event);
        todo!()
    }

    /// The earliest time `handle_timeout` must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        todo!()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = now;
        todo!()
    }

    pub fn poll_action(&mut self) -> Option<Action> {
        todo!()
    }

    pub fn agents(&self) -> Vec<AgentView> {
        todo!()
    }

    pub fn frameworks(&self) -> Vec<FrameworkView> {
        todo!()
    }

    pub fn tasks(&self) -> Vec<TaskView> {
        todo!()
    }

    /// Operator kill: the same path as a framework's KILL.
    pub fn kill_task(&mut self, now: Instant, task_id: &TaskId) -> Result<(), WireError> {
        let _ = (now, task_id);
        todo!()
    }

    /// Where to read a task's output, if `who` may read it (frameworks: only their own tasks).
    pub fn locate_output(&self, who: &Requester, task_id: &TaskId) -> Result<OutputLocation, WireError> {
        let _ = (who, task_id);
        todo!()
    }
}
