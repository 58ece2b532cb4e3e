//! The registry: the master's durable state, what a restarted master needs to recognise the
//! cluster it ran (Mesos keeps the same in its replicated log).
//!
//! It holds what cannot be rebuilt from the peers: the master's incarnation (so that ids stay
//! unique across restarts), the frameworks (so that they may re-subscribe with their ids), the
//! agents with their standing (admitted, unreachable since when, gone since when) and the
//! artifact index. Tasks are not in it: agents report theirs when they re-register.
//! The allocation policy is kept once an operator sets it, and so is an operator's drain of an
//! agent (in its record).
//!
//! The core stays sans-IO: it queues [`RegistryOp`]s ([`crate::core::Master::poll_registry_op`])
//! and its driver hands them, in order, to a [`Registry`] before it carries out any action the
//! same step produced; so a reply that depends on a write (`Subscribed` with a new framework
//! id, `Registered` for a new agent) goes out only after the write succeeded. A write that
//! fails ends the master: it can no longer vouch for what it promised.
//!
//! Three implementations: [`RedbRegistry`] (a file in the master's work dir, the default),
//! [`EtcdRegistry`] (several masters, `agora master --etcd`: the epoch is the revision at
//! which the master won the election, see [`crate::ha`], and every [`Registry::apply`] is a
//! transaction guarded by it, so a deposed master's writes fail and it steps down) and
//! [`MemoryRegistry`] (unit tests, `agora_master::testing`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub use agora_sdk::proto::AllocationPolicy;
use agora_sdk::proto::{AgentId, ArtifactKind, Digest, DrainView, FrameworkId};
use agora_sdk::{Attributes, Resources};
use serde::{Deserialize, Serialize};

pub mod etcd;
mod memory;
mod redb;

pub use self::etcd::EtcdRegistry;
pub use self::memory::MemoryRegistry;
pub use self::redb::RedbRegistry;

/// The registry's file in the master's work dir.
pub const REGISTRY_FILE: &str = "registry.redb";

/// How many agents marked gone are remembered (oldest forgotten first): enough to refuse
/// every agent a real cluster removes, bounded against a flapping fleet.
pub const MAX_GONE_AGENTS: usize = 10_000;

/// Why the registry cannot be used. Each message names the file (or store) concerned.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The store cannot be opened or read: missing permissions, locked by another master,
    /// corrupt, or not a registry at all.
    #[error("cannot open the master registry {path}: {reason}")]
    Open { path: PathBuf, reason: String },
    /// The store was written by an incompatible version of Agora.
    #[error("the master registry {path} has format {found}, this master reads format {expected}; move it away to start with an empty registry")]
    Incompatible { path: PathBuf, found: u32, expected: u32 },
    /// A record cannot be decoded.
    #[error("the master registry {path} holds a bad {what} record `{key}`: {reason}")]
    Corrupt { path: PathBuf, what: &'static str, key: String, reason: String },
    /// A write failed; the master stops, since it can no longer keep its promises.
    #[error("cannot write the master registry {path}: {reason}")]
    Write { path: PathBuf, reason: String },
    /// Another master took over (a newer epoch is recorded): this one must stop.
    #[error("the master registry {path} belongs to a newer master (epoch {found}, this master has {ours})")]
    Fenced { path: PathBuf, found: u64, ours: u64 },
}

/// A framework as the registry keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrameworkRecord {
    pub id: FrameworkId,
    pub name: String,
    pub role: String,
    pub principal: String,
    pub hostname: String,
    pub failover_timeout: Duration,
}

/// An agent's standing in the cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentStanding {
    /// Registered (or re-registered) with the master.
    Admitted,
    /// Silent past the agent timeout since this Unix time (ms); it may come back.
    Unreachable { since_ms: u64 },
    /// Removed for good at this Unix time (ms): it did not re-register in time after a
    /// restart of the master. It is refused if it comes back.
    Gone { since_ms: u64 },
}

/// An agent as the registry keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    pub id: AgentId,
    pub hostname: String,
    pub principal: String,
    pub resources: Resources,
    pub attributes: Attributes,
    pub standing: AgentStanding,
    /// An operator's drain of the agent (deadline as Unix ms), so that a restarted master or
    /// a new leader keeps draining it. Absent in records written before drains existed.
    #[serde(default)]
    pub drain: Option<DrainView>,
}

/// An artifact in the master's content-addressed store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub digest: Digest,
    pub kind: Option<ArtifactKind>,
    pub size: u64,
    /// The principal that uploaded it first (`None`: adopted from the store, or indexed
    /// before uploaders were recorded); its upload quota counts the size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uploader: Option<String>,
}

/// One change to the registry. The core produces them; drivers apply them in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegistryOp {
    /// Adds a framework or replaces its record.
    PutFramework(FrameworkRecord),
    /// Forgets a framework (torn down, or its failover timeout passed).
    RemoveFramework(FrameworkId),
    /// Adds an agent or replaces its record (its standing included).
    PutAgent(AgentRecord),
    /// Forgets an agent entirely (a gone agent beyond [`MAX_GONE_AGENTS`]).
    RemoveAgent(AgentId),
    /// Adds an artifact to the index (after the store published its file).
    PutArtifact(ArtifactRecord),
    /// Drops an artifact from the index (its file is missing or damaged).
    RemoveArtifact(Digest),
    /// Records the allocation policy an operator set (replacing the one before).
    PutPolicy(AllocationPolicy),
}

/// Everything a registry holds, as read at startup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegistryState {
    /// This master's epoch: 1 on the first start, one more on every start since. It makes the
    /// master's id (and so new framework, agent and offer ids) differ from every earlier
    /// incarnation's, and fences the writes of a deposed master.
    pub epoch: u64,
    /// A random name made on the first start, kept forever: the stable part of master ids.
    pub cluster: String,
    pub frameworks: BTreeMap<FrameworkId, FrameworkRecord>,
    pub agents: BTreeMap<AgentId, AgentRecord>,
    pub artifacts: BTreeMap<Digest, ArtifactRecord>,
    /// The allocation policy an operator set, if one did.
    pub policy: Option<AllocationPolicy>,
}

impl RegistryState {
    /// The master id of this incarnation: `{cluster}-{epoch}`.
    pub fn master_id(&self) -> String {
        format!("{}-{}", self.cluster, self.epoch)
    }

    /// Applies one operation to this in-memory copy.
    pub fn apply(&mut self, op: &RegistryOp) {
        match op {
            RegistryOp::PutFramework(f) => {
                self.frameworks.insert(f.id.clone(), f.clone());
            }
            RegistryOp::RemoveFramework(id) => {
                self.frameworks.remove(id);
            }
            RegistryOp::PutAgent(a) => {
                self.agents.insert(a.id.clone(), a.clone());
            }
            RegistryOp::RemoveAgent(id) => {
                self.agents.remove(id);
            }
            RegistryOp::PutArtifact(a) => {
                self.artifacts.insert(a.digest.clone(), a.clone());
            }
            RegistryOp::RemoveArtifact(d) => {
                self.artifacts.remove(d);
            }
            RegistryOp::PutPolicy(p) => self.policy = Some(p.clone()),
        }
    }
}

/// A durable store of [`RegistryState`].
pub trait Registry: Send {
    /// Starts an incarnation: reads the state, records a new epoch (one more than the last;
    /// a fresh store gets a new cluster name and epoch 1) and returns the state with it.
    /// A replicated implementation wins the leadership here.
    fn open_epoch(&mut self) -> Result<RegistryState, RegistryError>;

    /// Writes `ops` in order, all or none, fenced by the epoch `open_epoch` returned. On
    /// `Ok` they are durable.
    fn apply(&mut self, ops: &[RegistryOp]) -> Result<(), RegistryError>;

    /// Where the registry lives, for messages.
    fn location(&self) -> String;
}

/// A new random cluster name (`m` and six hex digits, as master ids always looked).
pub(crate) fn new_cluster_name() -> String {
    format!("m{}", &uuid::Uuid::new_v4().simple().to_string()[..6])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_record_written_before_drains_still_loads() {
        let record = AgentRecord {
            id: AgentId::new("m-1-A1"),
            hostname: "h".into(),
            principal: "agent".into(),
            resources: Resources::cpus(1000),
            attributes: Attributes::default(),
            standing: AgentStanding::Admitted,
            drain: Some(DrainView { deadline_unix_ms: Some(7), kill: true }),
        };
        let mut old = serde_json::to_value(&record).expect("encode");
        old.as_object_mut().expect("an object").remove("drain");
        let loaded: AgentRecord = serde_json::from_value(old).expect("an old record loads");
        assert_eq!(loaded, AgentRecord { drain: None, ..record });
    }
}
