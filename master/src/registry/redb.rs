//! The embedded registry: one redb file (`<work_dir>/registry.redb`), written in one
//! transaction per batch of operations, each committed durably before the driver goes on.
//!
//! Tables map ids to JSON records (readable with any redb tool, and tolerant of added fields);
//! the `meta` table holds the format number and the master record (cluster name, epoch).

use std::path::{Path, PathBuf};

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    new_cluster_name, AgentRecord, ArtifactRecord, FrameworkRecord, Registry, RegistryError, RegistryOp,
    RegistryState,
};

/// The layout this code reads and writes; a file with another is refused.
const FORMAT: u32 = 1;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const FRAMEWORKS: TableDefinition<&str, &[u8]> = TableDefinition::new("frameworks");
const AGENTS: TableDefinition<&str, &[u8]> = TableDefinition::new("agents");
const ARTIFACTS: TableDefinition<&str, &[u8]> = TableDefinition::new("artifacts");

const FORMAT_KEY: &str = "format";
const MASTER_KEY: &str = "master";
/// The allocation policy an operator set (`agora policy set`), in `meta`.
const POLICY_KEY: &str = "policy";

/// The master record in `meta`.
#[derive(Debug, Serialize, Deserialize)]
struct MasterRecord {
    cluster: String,
    epoch: u64,
}

/// The registry in a redb file.
pub struct RedbRegistry {
    db: Database,
    path: PathBuf,
    /// The epoch this process recorded (0 before `open_epoch`).
    epoch: u64,
}

impl std::fmt::Debug for RedbRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbRegistry").field("path", &self.path).field("epoch", &self.epoch).finish()
    }
}

impl RedbRegistry {
    /// Opens (creating if needed) the registry file at `path`. Refuses a file that is not a
    /// redb database, is damaged, is held by another process, or has another format.
    pub fn open(path: &Path) -> Result<Self, RegistryError> {
        let open_err = |reason: String| RegistryError::Open { path: path.to_path_buf(), reason };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create {}: {e}", dir.display())))?;
        }
        let db = Database::create(path).map_err(|e| open_err(e.to_string()))?;
        let reg = RedbRegistry { db, path: path.to_path_buf(), epoch: 0 };
        reg.check_format()?;
        Ok(reg)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn open_err(&self, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Open { path: self.path.clone(), reason: e.to_string() }
    }

    fn write_err(&self, e: impl std::fmt::Display) -> RegistryError {
        RegistryError::Write { path: self.path.clone(), reason: e.to_string() }
    }

    /// Checks the format number, writing it into a fresh file.
    fn check_format(&self) -> Result<(), RegistryError> {
        let txn = self.db.begin_write().map_err(|e| self.open_err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.open_err(e))?;
            let found = meta.get(FORMAT_KEY).map_err(|e| self.open_err(e))?.map(|v| v.value().to_vec());
            match found {
                None => {
                    let empty = ReadableTable::iter(&meta).map_err(|e| self.open_err(e))?.next().is_none();
                    if !empty {
                        return Err(self.open_err("its meta table has no format number"));
                    }
                    let bytes = FORMAT.to_le_bytes();
                    meta.insert(FORMAT_KEY, bytes.as_slice()).map_err(|e| self.open_err(e))?;
                }
                Some(bytes) => {
                    let found = <[u8; 4]>::try_from(bytes.as_slice())
                        .map(u32::from_le_bytes)
                        .map_err(|_| self.open_err("its format number is not 4 bytes"))?;
                    if found != FORMAT {
                        return Err(RegistryError::Incompatible {
                            path: self.path.clone(),
                            found,
                            expected: FORMAT,
                        });
                    }
                }
            }
            for table in [FRAMEWORKS, AGENTS, ARTIFACTS] {
                txn.open_table(table).map_err(|e| self.open_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.open_err(e))
    }

    fn decode<T: DeserializeOwned>(
        &self,
        what: &'static str,
        key: &str,
        bytes: &[u8],
    ) -> Result<T, RegistryError> {
        serde_json::from_slice(bytes).map_err(|e| RegistryError::Corrupt {
            path: self.path.clone(),
            what,
            key: key.chars().take(100).collect(),
            reason: e.to_string(),
        })
    }

    /// Reads every record.
    fn read(&self) -> Result<RegistryState, RegistryError> {
        let txn = self.db.begin_read().map_err(|e| self.open_err(e))?;
        let mut state = RegistryState::default();
        let meta = txn.open_table(META).map_err(|e| self.open_err(e))?;
        if let Some(v) = meta.get(MASTER_KEY).map_err(|e| self.open_err(e))? {
            let m: MasterRecord = self.decode("master", MASTER_KEY, v.value())?;
            state.cluster = m.cluster;
            state.epoch = m.epoch;
        }
        if let Some(v) = meta.get(POLICY_KEY).map_err(|e| self.open_err(e))? {
            state.policy = Some(self.decode("allocation policy", POLICY_KEY, v.value())?);
        }
        let frameworks = txn.open_table(FRAMEWORKS).map_err(|e| self.open_err(e))?;
        for item in frameworks.iter().map_err(|e| self.open_err(e))? {
            let (k, v) = item.map_err(|e| self.open_err(e))?;
            let f: FrameworkRecord = self.decode("framework", k.value(), v.value())?;
            state.frameworks.insert(f.id.clone(), f);
        }
        let agents = txn.open_table(AGENTS).map_err(|e| self.open_err(e))?;
        for item in agents.iter().map_err(|e| self.open_err(e))? {
            let (k, v) = item.map_err(|e| self.open_err(e))?;
            let a: AgentRecord = self.decode("agent", k.value(), v.value())?;
            state.agents.insert(a.id.clone(), a);
        }
        let artifacts = txn.open_table(ARTIFACTS).map_err(|e| self.open_err(e))?;
        for item in artifacts.iter().map_err(|e| self.open_err(e))? {
            let (k, v) = item.map_err(|e| self.open_err(e))?;
            let a: ArtifactRecord = self.decode("artifact", k.value(), v.value())?;
            state.artifacts.insert(a.digest.clone(), a);
        }
        Ok(state)
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Records are plain data (strings, numbers, maps with string keys): encoding cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Registry for RedbRegistry {
    fn open_epoch(&mut self) -> Result<RegistryState, RegistryError> {
        let mut state = self.read()?;
        if state.cluster.is_empty() {
            state.cluster = new_cluster_name();
        }
        state.epoch += 1;
        let txn = self.db.begin_write().map_err(|e| self.write_err(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.write_err(e))?;
            let record = json(&MasterRecord { cluster: state.cluster.clone(), epoch: state.epoch });
            meta.insert(MASTER_KEY, record.as_slice()).map_err(|e| self.write_err(e))?;
        }
        txn.commit().map_err(|e| self.write_err(e))?;
        self.epoch = state.epoch;
        Ok(state)
    }

    fn apply(&mut self, ops: &[RegistryOp]) -> Result<(), RegistryError> {
        if ops.is_empty() {
            return Ok(());
        }
        let txn = self.db.begin_write().map_err(|e| self.write_err(e))?;
        {
            // The fence: a file that another incarnation opened since refuses this one.
            let mut meta = txn.open_table(META).map_err(|e| self.write_err(e))?;
            let recorded = match meta.get(MASTER_KEY).map_err(|e| self.write_err(e))? {
                Some(v) => self.decode::<MasterRecord>("master", MASTER_KEY, v.value())?.epoch,
                None => 0,
            };
            if recorded != self.epoch {
                return Err(RegistryError::Fenced {
                    path: self.path.clone(),
                    found: recorded,
                    ours: self.epoch,
                });
            }
            let mut frameworks = txn.open_table(FRAMEWORKS).map_err(|e| self.write_err(e))?;
            let mut agents = txn.open_table(AGENTS).map_err(|e| self.write_err(e))?;
            let mut artifacts = txn.open_table(ARTIFACTS).map_err(|e| self.write_err(e))?;
            for op in ops {
                let done = match op {
                    RegistryOp::PutFramework(f) => {
                        frameworks.insert(f.id.as_str(), json(f).as_slice()).map(drop)
                    }
                    RegistryOp::RemoveFramework(id) => frameworks.remove(id.as_str()).map(drop),
                    RegistryOp::PutAgent(a) => agents.insert(a.id.as_str(), json(a).as_slice()).map(drop),
                    RegistryOp::RemoveAgent(id) => agents.remove(id.as_str()).map(drop),
                    RegistryOp::PutArtifact(a) => {
                        artifacts.insert(a.digest.as_str(), json(a).as_slice()).map(drop)
                    }
                    RegistryOp::RemoveArtifact(d) => artifacts.remove(d.as_str()).map(drop),
                    RegistryOp::PutPolicy(p) => meta.insert(POLICY_KEY, json(p).as_slice()).map(drop),
                };
                done.map_err(|e| self.write_err(e))?;
            }
        }
        txn.commit().map_err(|e| self.write_err(e))
    }

    fn location(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use agora_sdk::proto::{AgentId, FrameworkId};
    use agora_sdk::Resources;

    use super::*;
    use crate::registry::AgentStanding;

    fn framework(n: u32) -> FrameworkRecord {
        FrameworkRecord {
            id: FrameworkId::new(format!("m1-1-F{n}")),
            name: format!("fw{n}"),
            role: "web".into(),
            principal: "alice".into(),
            hostname: "h".into(),
            failover_timeout: Duration::from_secs(60),
        }
    }

    fn agent(n: u32, standing: AgentStanding) -> AgentRecord {
        AgentRecord {
            id: AgentId::new(format!("m1-1-A{n}")),
            hostname: format!("host{n}"),
            principal: "agent".into(),
            resources: Resources::parse("cpus:2;mem:1GiB").expect("resources"),
            attributes: Default::default(),
            standing,
            // One drained agent: the drain must survive the round trip.
            drain: (n == 2)
                .then_some(agora_sdk::proto::DrainView { deadline_unix_ms: Some(5_000), kill: true }),
        }
    }

    #[test]
    fn round_trip_across_reopen_with_a_new_epoch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.redb");
        let first = {
            let mut reg = RedbRegistry::open(&path).expect("open");
            let state = reg.open_epoch().expect("epoch");
            assert_eq!(state.epoch, 1);
            assert!(state.frameworks.is_empty());
            reg.apply(&[
                RegistryOp::PutFramework(framework(1)),
                RegistryOp::PutFramework(framework(2)),
                RegistryOp::PutAgent(agent(1, AgentStanding::Admitted)),
                RegistryOp::PutAgent(agent(2, AgentStanding::Admitted)),
                RegistryOp::PutArtifact(ArtifactRecord {
                    digest: agora_sdk::proto::Digest::parse(&"ab".repeat(32)).expect("digest"),
                    kind: None,
                    size: 7,
                    uploader: Some("alice".into()),
                }),
            ])
            .expect("apply");
            reg.apply(&[
                RegistryOp::RemoveFramework(framework(2).id),
                RegistryOp::PutAgent(agent(2, AgentStanding::Unreachable { since_ms: 5 })),
                RegistryOp::PutPolicy(policy()),
            ])
            .expect("apply");
            state
        };
        let mut reg = RedbRegistry::open(&path).expect("reopen");
        let state = reg.open_epoch().expect("epoch");
        assert_eq!(state.epoch, 2);
        assert_eq!(state.cluster, first.cluster);
        assert_ne!(state.master_id(), first.master_id());
        assert_eq!(state.frameworks.values().cloned().collect::<Vec<_>>(), vec![framework(1)]);
        assert_eq!(
            state.agents.values().cloned().collect::<Vec<_>>(),
            vec![agent(1, AgentStanding::Admitted), agent(2, AgentStanding::Unreachable { since_ms: 5 })]
        );
        assert_eq!(state.artifacts.len(), 1);
        assert_eq!(state.policy, Some(policy()));
    }

    fn policy() -> crate::registry::AllocationPolicy {
        crate::registry::AllocationPolicy {
            weights: "analytics=2".into(),
            priorities: "prod=10".into(),
            quotas: vec!["analytics=cpus:1".into()],
            quota_limits: vec!["batch=cpus:4".into()],
        }
    }

    #[test]
    fn a_file_that_is_not_a_registry_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.redb");
        std::fs::write(&path, vec![0x5a; 64 * 1024]).expect("write garbage");
        let err = RedbRegistry::open(&path).expect_err("garbage must not open");
        let msg = err.to_string();
        assert!(matches!(err, RegistryError::Open { .. }), "{err:?}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.redb");
        {
            let db = Database::create(&path).expect("create");
            let txn = db.begin_write().expect("txn");
            {
                let mut meta = txn.open_table(META).expect("meta");
                meta.insert(FORMAT_KEY, 99u32.to_le_bytes().as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let err = RedbRegistry::open(&path).expect_err("format 99");
        assert!(matches!(err, RegistryError::Incompatible { found: 99, expected: FORMAT, .. }), "{err:?}");
    }

    #[test]
    fn a_bad_record_is_refused_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.redb");
        {
            let mut reg = RedbRegistry::open(&path).expect("open");
            reg.open_epoch().expect("epoch");
            let txn = reg.db.begin_write().expect("txn");
            {
                let mut t = txn.open_table(FRAMEWORKS).expect("table");
                t.insert("m1-1-F9", b"{not json".as_slice()).expect("insert");
            }
            txn.commit().expect("commit");
        }
        let mut reg = RedbRegistry::open(&path).expect("reopen");
        let err = reg.open_epoch().expect_err("bad record");
        assert!(err.to_string().contains("m1-1-F9"), "{err}");
        assert!(matches!(err, RegistryError::Corrupt { what: "framework", .. }), "{err:?}");
    }

    #[test]
    fn a_second_open_of_the_same_file_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("registry.redb");
        let _first = RedbRegistry::open(&path).expect("open");
        let err = RedbRegistry::open(&path).expect_err("second open");
        assert!(matches!(err, RegistryError::Open { .. }), "{err:?}");
    }
}
