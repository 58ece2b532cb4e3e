//! The agent's checkpoints: what a restarted agent needs to find its executors and tasks again
//! and to deliver every status update the master has not acknowledged.
//!
//! Layout, in `WORK/checkpoint/`: `state`, a snapshot of the whole [`State`] (header: magic,
//! [`VERSION`], generation; then postcard), and `journal-<generation>`, the [`Record`]s applied
//! since that snapshot (header, then length-prefixed postcard frames). The agent core appends
//! the records of a whole loop iteration (possibly thousands of events) with one `write(2)`
//! ([`Checkpointer::flush`]) and only then sends anything that depends on them: status updates
//! to the master and `Acked` to executors. A `write` that returned is in the page cache and
//! survives the agent's death (`kill -9`); only the host's death loses it, and that kills the
//! executors and tasks too. When the journal outgrows the snapshot, a new snapshot is written
//! atomically (temporary file, fsync, rename) and a new journal started; a crash between the two
//! leaves a snapshot without journal, which is complete.
//!
//! Loading tolerates one thing only: a torn last frame of the journal (the agent died inside
//! that `write`; nothing that depended on it was sent). Anything else that does not decode (a
//! bad magic, an unknown version, a truncated snapshot, a frame that is not a record) is a
//! [`CheckpointError`] naming the file.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};

use agora_sdk::proto::{ExecutorId, ExecutorInfo, FrameworkId, TaskId, TaskInfo, TaskState, TaskStatus};
use agora_sdk::{Attributes, Resources};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Format version of the snapshot and the journal; bumped on any incompatible change.
/// Version 2: executors are keyed by the user they run as too (an executor per framework,
/// executor id and user), and a task record names the user of its executor.
pub const VERSION: u32 = 2;
const SNAPSHOT_MAGIC: &[u8; 8] = b"AGORACKP";
const JOURNAL_MAGIC: &[u8; 8] = b"AGORAJNL";
const HEADER_LEN: usize = 8 + 4 + 8;
/// Largest record the journal accepts on reading (a task with its data is far below).
const MAX_RECORD: usize = 16 << 20;
/// The journal is compacted into a new snapshot once it is larger than this and than the
/// snapshot itself.
pub const COMPACT_AFTER: u64 = 16 << 20;

/// A task's key in the checkpoint: its framework and its id.
pub type TaskRef = (FrameworkId, TaskId);
/// An executor's key in the checkpoint: its framework, its id there and the uid it runs as
/// (`None`: the command executor, which serves every user of its framework, or an agent that
/// does not switch users). See [`crate::executors::ExecKey`].
pub type ExecRef = (FrameworkId, ExecutorId, Option<u32>);

/// What the agent told the master about itself (for the log when it changed across a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRecord {
    /// Host name.
    pub hostname: String,
    /// Resources offered.
    pub resources: Resources,
    /// Attributes.
    pub attributes: Attributes,
}

/// The kind of an executor process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExecutorKind {
    /// The built-in Wasm executor.
    Wasm,
    /// The built-in command executor (native tasks).
    Command,
    /// A framework's own executor, with its sandbox.
    Custom {
        /// Its description.
        info: Box<ExecutorInfo>,
        /// Its sandbox (working directory).
        sandbox: PathBuf,
    },
}

/// One executor process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutorRecord {
    /// Its framework.
    pub framework_id: FrameworkId,
    /// Its id there.
    pub executor_id: ExecutorId,
    /// The uid it runs as (part of its key: see [`ExecRef`]).
    pub uid: Option<u32>,
    /// Which program it is.
    pub kind: ExecutorKind,
    /// The agent's number for this process (unique across the agent's restarts).
    pub serial: u64,
    /// Its pid, once spawned (it leads its own session and process group).
    pub pid: Option<u32>,
    /// Its start time (`/proc/PID/stat` field 22), so that a reused pid is never taken for it.
    pub start_time: Option<u64>,
    /// The Unix socket it connects to (again, after the agent restarted).
    pub socket: PathBuf,
    /// Its cgroup, if it has one of its own.
    pub cgroup: Option<String>,
    /// Its log file.
    pub log: PathBuf,
    /// The last update sequence number the agent acknowledged to it.
    pub acked_seq: u64,
}

impl ExecutorRecord {
    /// Its key.
    pub fn key(&self) -> ExecRef {
        (self.framework_id.clone(), self.executor_id.clone(), self.uid)
    }
}

/// One task the agent knows (running, or ended with updates still unacknowledged).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// Its framework.
    pub framework_id: FrameworkId,
    /// The task as launched.
    pub task: TaskInfo,
    /// Its sandbox.
    pub run_dir: PathBuf,
    /// Its latest state.
    pub state: TaskState,
    /// A native task's process (and process group), once running.
    pub pid: Option<u32>,
    /// That process's start time, against pid reuse.
    pub start_time: Option<u64>,
    /// Its executor is done with it.
    pub ended: bool,
    /// The uid of the Wasm or framework executor that runs it (`None` for a native task, or
    /// on an agent that does not switch users): with its framework and executor id, the key
    /// of that executor.
    pub executor_uid: Option<u32>,
}

/// One change to the [`State`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// The agent's description.
    Agent(AgentRecord),
    /// An executor was started or learnt its pid (replaces the record of the same key).
    Executor(ExecutorRecord),
    /// The agent acknowledged an executor's updates up to `seq`.
    ExecutorAcked {
        /// The executor.
        exec: ExecRef,
        /// Its process's serial.
        serial: u64,
        /// Highest acknowledged sequence number.
        seq: u64,
    },
    /// An executor process ended.
    ExecutorGone {
        /// The executor.
        exec: ExecRef,
        /// Its process's serial.
        serial: u64,
    },
    /// A task was launched.
    Task(Box<TaskRecord>),
    /// A task's state changed.
    TaskState {
        /// The task.
        task: TaskRef,
        /// Its new state.
        state: TaskState,
        /// A native task's pid (RUNNING).
        pid: Option<u32>,
        /// Its start time.
        start_time: Option<u64>,
        /// Its executor is done with it.
        ended: bool,
    },
    /// A task's record is gone (its terminal update was acknowledged).
    TaskForgotten(TaskRef),
    /// A status update was queued for the master.
    Update(Box<TaskStatus>),
    /// The master acknowledged the oldest queued update of a task.
    UpdateAcked {
        /// The task.
        task: TaskRef,
        /// The update.
        uuid: Uuid,
    },
}

/// Everything checkpointed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// The agent's description, as last registered.
    pub agent: Option<AgentRecord>,
    /// Live executor processes.
    pub executors: BTreeMap<ExecRef, ExecutorRecord>,
    /// Known tasks.
    pub tasks: BTreeMap<TaskRef, TaskRecord>,
    /// Unacknowledged status updates per task, oldest first.
    pub updates: BTreeMap<TaskRef, VecDeque<TaskStatus>>,
}

impl State {
    /// Applies one change.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Agent(a) => self.agent = Some(a),
            Record::Executor(e) => {
                self.executors.insert(e.key(), e);
            }
            Record::ExecutorAcked { exec, serial, seq } => {
                if let Some(e) = self.executors.get_mut(&exec).filter(|e| e.serial == serial) {
                    e.acked_seq = e.acked_seq.max(seq);
                }
            }
            Record::ExecutorGone { exec, serial } => {
                if self.executors.get(&exec).is_some_and(|e| e.serial == serial) {
                    self.executors.remove(&exec);
                }
            }
            Record::Task(t) => {
                self.tasks.insert((t.framework_id.clone(), t.task.task_id.clone()), *t);
            }
            Record::TaskState { task, state, pid, start_time, ended } => {
                if let Some(t) = self.tasks.get_mut(&task) {
                    // The agent journals only the moves it made, so a refused one comes from a
                    // journal of an earlier agent that did not check them: the state stays.
                    if let Err(e) = t.state.transition(state) {
                        tracing::warn!(task_id = %task.1, framework_id = %task.0, "checkpoint: {e} ignored");
                    }
                    if pid.is_some() {
                        t.pid = pid;
                        t.start_time = start_time;
                    }
                    t.ended |= ended;
                }
            }
            Record::TaskForgotten(task) => {
                self.tasks.remove(&task);
            }
            Record::Update(s) => {
                self.updates.entry((s.framework_id.clone(), s.task_id.clone())).or_default().push_back(*s);
            }
            Record::UpdateAcked { task, uuid } => {
                if let Some(q) = self.updates.get_mut(&task) {
                    if q.front().and_then(|s| s.uuid) == Some(uuid) {
                        q.pop_front();
                    }
                    if q.is_empty() {
                        self.updates.remove(&task);
                    }
                }
            }
        }
    }
}

/// Why checkpoints cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file cannot be read, written or removed.
    #[error("checkpoint {path}: {err}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        err: std::io::Error,
    },
    /// A file does not decode.
    #[error("checkpoint {path} is corrupt: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
    /// A file was written by an incompatible agent.
    #[error("checkpoint {path} has format version {found}; this agent reads version {VERSION}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
    },
}

impl CheckpointError {
    /// The file concerned.
    pub fn path(&self) -> &Path {
        match self {
            CheckpointError::Io { path, .. }
            | CheckpointError::Corrupt { path, .. }
            | CheckpointError::Version { path, .. } => path,
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |err| CheckpointError::Io { path: path.to_path_buf(), err }
}

fn header(magic: &[u8; 8], generation: u64) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER_LEN);
    h.extend_from_slice(magic);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&generation.to_le_bytes());
    h
}

/// Checks a file's header; returns its generation and the rest.
fn parse_header<'a>(
    path: &Path,
    magic: &[u8; 8],
    data: &'a [u8],
) -> Result<(u64, &'a [u8]), CheckpointError> {
    let corrupt = |what: &str| CheckpointError::Corrupt { path: path.to_path_buf(), what: what.into() };
    if data.len() < HEADER_LEN {
        return Err(corrupt("truncated header"));
    }
    if &data[..8] != magic {
        return Err(corrupt("not an agent checkpoint (bad magic)"));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().map_err(|_| corrupt("header"))?);
    if version != VERSION {
        return Err(CheckpointError::Version { path: path.to_path_buf(), found: version });
    }
    let generation = u64::from_le_bytes(data[12..20].try_into().map_err(|_| corrupt("header"))?);
    Ok((generation, &data[HEADER_LEN..]))
}

/// The checkpoint directory of work dir `work`.
pub fn dir(work: &Path) -> PathBuf {
    work.join("checkpoint")
}

fn snapshot_path(dir: &Path) -> PathBuf {
    dir.join("state")
}

fn journal_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("journal-{generation}"))
}

/// What [`load`] found.
#[derive(Debug)]
pub struct Loaded {
    /// The state.
    pub state: State,
    /// The snapshot's generation.
    pub generation: u64,
    /// The journal ended in a torn frame (the agent died while writing it).
    pub torn_tail: bool,
}

/// Reads the checkpoints in `dir`: `Ok(None)` when there are none (a fresh work dir).
pub fn load(dir: &Path) -> Result<Option<Loaded>, CheckpointError> {
    let snap = snapshot_path(dir);
    let data = match std::fs::read(&snap) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match journals(dir)?.first() {
                Some((_, j)) => Err(CheckpointError::Corrupt {
                    path: j.clone(),
                    what: format!("a journal without its snapshot {}", snap.display()),
                }),
                None => Ok(None),
            };
        }
        Err(err) => return Err(CheckpointError::Io { path: snap, err }),
    };
    let (generation, body) = parse_header(&snap, SNAPSHOT_MAGIC, &data)?;
    let mut state: State = postcard::from_bytes(body)
        .map_err(|e| CheckpointError::Corrupt { path: snap.clone(), what: format!("state: {e}") })?;
    let jpath = journal_path(dir, generation);
    let torn_tail = match std::fs::read(&jpath) {
        Ok(j) => replay(&jpath, &j, generation, &mut state)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(err) => return Err(CheckpointError::Io { path: jpath, err }),
    };
    Ok(Some(Loaded { state, generation, torn_tail }))
}

/// Applies the records of journal `data` to `state`; `Ok(true)` when its last frame is torn.
fn replay(path: &Path, data: &[u8], generation: u64, state: &mut State) -> Result<bool, CheckpointError> {
    let corrupt = |what: String| CheckpointError::Corrupt { path: path.to_path_buf(), what };
    let (jgen, mut rest) = parse_header(path, JOURNAL_MAGIC, data)?;
    if jgen != generation {
        return Err(corrupt(format!("generation {jgen}, its snapshot's is {generation}")));
    }
    let mut n = 0usize;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Ok(true);
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len == 0 || len > MAX_RECORD {
            return Err(corrupt(format!("record {n} has an impossible length {len}")));
        }
        if rest.len() < 4 + len {
            return Ok(true);
        }
        let record: Record =
            postcard::from_bytes(&rest[4..4 + len]).map_err(|e| corrupt(format!("record {n}: {e}")))?;
        state.apply(record);
        rest = &rest[4 + len..];
        n += 1;
    }
    Ok(false)
}

/// The journals in `dir`, by generation.
fn journals(dir: &Path) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(CheckpointError::Io { path: dir.to_path_buf(), err }),
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let g = name.to_str()?.strip_prefix("journal-")?.parse().ok()?;
            Some((g, e.path()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// What can be read of checkpoints that do not load (for `--recover cleanup`): the snapshot if
/// it decodes, plus every journal record that decodes before the first that does not.
pub fn salvage(dir: &Path) -> State {
    let mut state = State::default();
    let snap = snapshot_path(dir);
    if let Ok(data) = std::fs::read(&snap) {
        if let Some(s) = data.get(HEADER_LEN..).and_then(|b| postcard::from_bytes::<State>(b).ok()) {
            state = s;
        }
    }
    for (_, path) in journals(dir).unwrap_or_default() {
        let Ok(data) = std::fs::read(&path) else { continue };
        let mut rest = data.get(HEADER_LEN..).unwrap_or_default();
        while rest.len() >= 4 {
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(frame) = rest.get(4..4 + len) else { break };
            let Ok(record) = postcard::from_bytes::<Record>(frame) else { break };
            // Only what says where processes are: the rest is of no use to a cleanup.
            if matches!(record, Record::Executor(_) | Record::Task(_) | Record::TaskState { .. }) {
                state.apply(record);
            }
            rest = &rest[4 + len..];
        }
    }
    state
}

/// Removes every checkpoint in `dir`.
pub fn remove(dir: &Path) -> Result<(), CheckpointError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(CheckpointError::Io { path: dir.to_path_buf(), err }),
    }
}

/// Writes the checkpoints: the journal of the running agent, compacted now and then.
#[derive(Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    generation: u64,
    journal: std::fs::File,
    journal_len: u64,
    snapshot_len: u64,
    /// Encoded records not written yet.
    buf: Vec<u8>,
    /// The state the files describe once `buf` is written (for compaction).
    state: State,
}

impl Checkpointer {
    /// Starts a new generation in `dir` from `state` (the one loaded, or an empty one): a
    /// snapshot of it and an empty journal; older files are removed.
    pub fn open(dir: &Path, previous_generation: u64, state: State) -> Result<Self, CheckpointError> {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io_err(dir))?;
        }
        let (journal, snapshot_len) = Self::start_generation(dir, previous_generation + 1, &state)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            generation: previous_generation + 1,
            journal,
            journal_len: HEADER_LEN as u64,
            snapshot_len,
            buf: Vec::with_capacity(64 << 10),
            state,
        })
    }

    fn start_generation(
        dir: &Path,
        generation: u64,
        state: &State,
    ) -> Result<(std::fs::File, u64), CheckpointError> {
        let snap = snapshot_path(dir);
        let mut data = header(SNAPSHOT_MAGIC, generation);
        postcard::to_io(state, &mut data)
            .map_err(|e| CheckpointError::Corrupt { path: snap.clone(), what: format!("encoding: {e}") })?;
        // A journal of this generation cannot exist (generations only grow); start it before
        // the snapshot names it, so that the snapshot is never without its journal's header.
        let jpath = journal_path(dir, generation);
        let mut journal = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&jpath)
                .map_err(io_err(&jpath))?
        };
        journal.write_all(&header(JOURNAL_MAGIC, generation)).map_err(io_err(&jpath))?;
        crate::sandbox::write_atomic(&snap, &data).map_err(io_err(&snap))?;
        for (g, old) in journals(dir)? {
            if g != generation {
                let _ = std::fs::remove_file(old);
            }
        }
        Ok((journal, data.len() as u64))
    }

    /// Queues `record` (written by the next [`Self::flush`]).
    pub fn record(&mut self, record: Record) {
        let start = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        match postcard::to_io(&record, &mut self.buf) {
            Ok(_) => {
                let len = u32::try_from(self.buf.len() - start - 4).unwrap_or(u32::MAX);
                self.buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
                self.state.apply(record);
            }
            Err(e) => {
                // Only an I/O error of the Vec could get here.
                self.buf.truncate(start);
                tracing::error!(error = %e, "cannot encode a checkpoint record");
            }
        }
    }

    /// Whether records wait for [`Self::flush`].
    pub fn dirty(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Writes the queued records (one `write`), and compacts when the journal has grown.
    pub fn flush(&mut self) -> Result<(), CheckpointError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let path = journal_path(&self.dir, self.generation);
        self.journal.write_all(&self.buf).map_err(io_err(&path))?;
        self.journal_len += self.buf.len() as u64;
        self.buf.clear();
        if self.buf.capacity() > (4 << 20) {
            self.buf.shrink_to(64 << 10);
        }
        if self.journal_len > COMPACT_AFTER && self.journal_len > self.snapshot_len {
            self.compact()?;
        }
        Ok(())
    }

    /// A new snapshot of the whole state, and a new empty journal.
    pub fn compact(&mut self) -> Result<(), CheckpointError> {
        self.flush_buf_only()?;
        let generation = self.generation + 1;
        let (journal, snapshot_len) = Self::start_generation(&self.dir, generation, &self.state)?;
        self.generation = generation;
        self.journal = journal;
        self.journal_len = HEADER_LEN as u64;
        self.snapshot_len = snapshot_len;
        Ok(())
    }

    fn flush_buf_only(&mut self) -> Result<(), CheckpointError> {
        if !self.buf.is_empty() {
            let path = journal_path(&self.dir, self.generation);
            self.journal.write_all(&self.buf).map_err(io_err(&path))?;
            self.journal_len += self.buf.len() as u64;
            self.buf.clear();
        }
        Ok(())
    }

    /// The state as recorded so far.
    pub fn state(&self) -> &State {
        &self.state
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat` field 22), or `None`
/// when it does not exist.
pub fn process_start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: fields follow the last `)`.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state).
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Whether `pid` is still the process that started at `start_time` (and not a zombie).
pub fn same_process(pid: u32, start_time: Option<u64>) -> bool {
    match (process_start_time(pid), start_time) {
        (Some(now), Some(then)) => now == then,
        _ => false,
    }
}

/// The session id of a process (`/proc/PID/stat` field 6).
pub fn session_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(3)?.parse().ok()
}

/// Every process id on the host.
pub fn all_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| d.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// SIGKILLs every process of session `sid` (an executor's session: the executor and
/// everything it started that did not leave it), then the process group `sid`.
pub fn kill_session(sid: u32) {
    let Ok(group) = libc::pid_t::try_from(sid) else { return };
    if group <= 1 {
        return;
    }
    for pid in all_pids() {
        if session_of(pid) == Some(sid) {
            if let Ok(p) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) of a process of the executor's session.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
    }
    // SAFETY: kill(2) of the executor's process group.
    unsafe { libc::killpg(group, libc::SIGKILL) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tasks::tests::command_task as task_with;
    use agora_sdk::proto::UpdateSource;

    fn task(id: &str) -> TaskInfo {
        task_with(id, "sleep 1")
    }

    fn status(id: &str, state: TaskState) -> TaskStatus {
        TaskStatus {
            task_id: TaskId::new(id),
            framework_id: FrameworkId::new("fw"),
            agent_id: None,
            state,
            uuid: Some(Uuid::new_v4()),
            source: UpdateSource::Agent,
            reason: "r".into(),
            message: "m".into(),
            exit_code: None,
            signal: None,
            usage: None,
            timestamp_ms: 1,
        }
    }

    fn executor(serial: u64) -> ExecutorRecord {
        ExecutorRecord {
            framework_id: FrameworkId::new("fw"),
            executor_id: ExecutorId::new("agora-command"),
            uid: None,
            kind: ExecutorKind::Command,
            serial,
            pid: Some(42),
            start_time: Some(7),
            socket: PathBuf::from("/x.sock"),
            cgroup: None,
            log: PathBuf::from("/x.log"),
            acked_seq: 0,
        }
    }

    fn key(id: &str) -> TaskRef {
        (FrameworkId::new("fw"), TaskId::new(id))
    }

    /// A journal written by an agent that did not check its moves (an ended task said to run
    /// again) keeps the state; the record's pid and end are still taken.
    #[test]
    fn a_refused_move_in_a_journal_keeps_the_state() {
        let mut s = State::default();
        s.apply(Record::Task(Box::new(TaskRecord {
            framework_id: FrameworkId::new("fw"),
            task: task("a"),
            run_dir: PathBuf::from("/run/a"),
            state: TaskState::Killed,
            pid: None,
            start_time: None,
            ended: false,
            executor_uid: None,
        })));
        s.apply(Record::TaskState {
            task: key("a"),
            state: TaskState::Running,
            pid: Some(9),
            start_time: Some(3),
            ended: true,
        });
        let t = &s.tasks[&key("a")];
        assert_eq!((t.state, t.pid, t.start_time, t.ended), (TaskState::Killed, Some(9), Some(3), true));
    }

    /// The records of a few events, flushed in batches, read back as the same state; a new
    /// generation starts from it and leaves one journal.
    #[test]
    fn journal_round_trip_and_compaction() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("checkpoint");
        assert!(load(&dir).expect("empty").is_none());
        let mut c = Checkpointer::open(&dir, 0, State::default()).expect("open");
        c.record(Record::Executor(executor(5)));
        let t = TaskRecord {
            framework_id: FrameworkId::new("fw"),
            task: task("a"),
            run_dir: PathBuf::from("/run/a"),
            state: TaskState::Staging,
            pid: None,
            start_time: None,
            ended: false,
            executor_uid: None,
        };
        c.record(Record::Task(Box::new(t.clone())));
        let (r, f) = (status("a", TaskState::Running), status("a", TaskState::Finished));
        c.record(Record::Update(Box::new(r.clone())));
        c.flush().expect("flush");
        c.record(Record::TaskState {
            task: key("a"),
            state: TaskState::Running,
            pid: Some(9),
            start_time: Some(3),
            ended: false,
        });
        c.record(Record::Update(Box::new(f.clone())));
        c.record(Record::UpdateAcked { task: key("a"), uuid: r.uuid.expect("uuid") });
        c.record(Record::ExecutorAcked { exec: executor(5).key(), serial: 5, seq: 12 });
        // A stale ack of another process of the same executor changes nothing.
        c.record(Record::ExecutorAcked { exec: executor(5).key(), serial: 4, seq: 99 });
        c.flush().expect("flush");
        let loaded = load(&dir).expect("load").expect("some");
        assert!(!loaded.torn_tail);
        assert_eq!(&loaded.state, c.state());
        let s = &loaded.state;
        assert_eq!(s.executors[&executor(5).key()].acked_seq, 12);
        assert_eq!((s.tasks[&key("a")].state, s.tasks[&key("a")].pid), (TaskState::Running, Some(9)));
        assert_eq!(s.updates[&key("a")].iter().cloned().collect::<Vec<_>>(), vec![f.clone()]);
        // A restart compacts into a new generation; the old journal goes.
        let c2 = Checkpointer::open(&dir, loaded.generation, loaded.state.clone()).expect("reopen");
        drop(c2);
        let again = load(&dir).expect("load").expect("some");
        assert_eq!(again.generation, loaded.generation + 1);
        assert_eq!(again.state, loaded.state);
        assert_eq!(journals(&dir).expect("list").len(), 1);
        // Forgetting and executor ends.
        let mut c3 = Checkpointer::open(&dir, again.generation, again.state).expect("reopen");
        c3.record(Record::UpdateAcked { task: key("a"), uuid: f.uuid.expect("uuid") });
        c3.record(Record::TaskForgotten(key("a")));
        c3.record(Record::ExecutorGone { exec: executor(5).key(), serial: 5 });
        c3.compact().expect("compact");
        let last = load(&dir).expect("load").expect("some").state;
        assert!(last.tasks.is_empty() && last.updates.is_empty() && last.executors.is_empty(), "{last:?}");
    }

    /// Two users' processes of one framework executor are two records, acknowledged and
    /// ended apart, and come back from disk with their users.
    #[test]
    fn executors_of_one_id_under_two_users_are_kept_apart() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("checkpoint");
        let mut c = Checkpointer::open(&dir, 0, State::default()).expect("open");
        let (mut a, mut b) = (executor(5), executor(6));
        a.uid = Some(1001);
        b.uid = Some(1002);
        c.record(Record::Executor(a.clone()));
        c.record(Record::Executor(b.clone()));
        c.record(Record::ExecutorAcked { exec: b.key(), serial: 6, seq: 3 });
        // The key carries the user: an ack naming another user's process changes nothing.
        c.record(Record::ExecutorAcked {
            exec: (a.framework_id.clone(), a.executor_id.clone(), None),
            serial: 5,
            seq: 9,
        });
        c.flush().expect("flush");
        let loaded = load(&dir).expect("load").expect("some");
        let state = loaded.state;
        assert_eq!(state.executors.len(), 2);
        assert_eq!(state.executors[&a.key()].acked_seq, 0);
        assert_eq!(state.executors[&b.key()].acked_seq, 3);
        let mut c = Checkpointer::open(&dir, loaded.generation, state).expect("reopen");
        c.record(Record::ExecutorGone { exec: a.key(), serial: 5 });
        c.flush().expect("flush");
        let state = load(&dir).expect("load").expect("some").state;
        assert_eq!(state.executors.keys().cloned().collect::<Vec<_>>(), vec![b.key()]);
    }

    /// A torn last frame (the agent died inside a write) is dropped; a bad magic, an unknown
    /// version, a truncated snapshot and an undecodable record are errors naming the file.
    #[test]
    fn torn_tails_are_dropped_and_corruption_is_named() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("checkpoint");
        let mut c = Checkpointer::open(&dir, 0, State::default()).expect("open");
        c.record(Record::Executor(executor(1)));
        c.record(Record::Executor(executor(2)));
        c.flush().expect("flush");
        let jpath = journal_path(&dir, 1);
        let full = std::fs::read(&jpath).expect("journal");
        // Torn inside the last frame.
        std::fs::write(&jpath, &full[..full.len() - 3]).expect("write");
        let l = load(&dir).expect("torn tail tolerated").expect("some");
        assert!(l.torn_tail);
        assert_eq!(l.state.executors.values().map(|e| e.serial).collect::<Vec<_>>(), vec![1]);
        // A complete frame that is not a record.
        let mut bad = full.clone();
        let n = bad.len();
        bad[n - 10..].fill(0xff);
        std::fs::write(&jpath, &bad).expect("write");
        let e = load(&dir).expect_err("garbage record");
        assert_eq!(e.path(), jpath);
        assert!(e.to_string().contains("corrupt"), "{e}");
        std::fs::write(&jpath, &full).expect("restore");
        // The snapshot: bad magic, unknown version, truncated.
        let snap = snapshot_path(&dir);
        let good = std::fs::read(&snap).expect("snapshot");
        let mut other = good.clone();
        other[..8].copy_from_slice(b"NOTAGORA");
        std::fs::write(&snap, &other).expect("write");
        let e = load(&dir).expect_err("bad magic");
        assert!(e.to_string().contains("bad magic") && e.path() == snap, "{e}");
        let mut newer = good.clone();
        newer[8..12].copy_from_slice(&99u32.to_le_bytes());
        std::fs::write(&snap, &newer).expect("write");
        let e = load(&dir).expect_err("version");
        assert!(matches!(e, CheckpointError::Version { found: 99, .. }), "{e}");
        std::fs::write(&snap, &good[..10]).expect("write");
        assert!(matches!(load(&dir), Err(CheckpointError::Corrupt { .. })));
        // What can be salvaged for a cleanup still names the executors.
        let s = salvage(&dir);
        assert_eq!(s.executors.len(), 1, "{s:?}");
        // A journal without its snapshot.
        std::fs::remove_file(&snap).expect("rm");
        let e = load(&dir).expect_err("orphan journal");
        assert!(e.to_string().contains("without its snapshot"), "{e}");
        remove(&dir).expect("remove");
        assert!(load(&dir).expect("gone").is_none());
    }

    #[test]
    fn start_times_tell_processes_apart() {
        let me = std::process::id();
        let t = process_start_time(me);
        assert!(t.is_some());
        assert!(same_process(me, t));
        assert!(!same_process(me, t.map(|t| t + 1)));
        assert!(!same_process(me, None));
        assert!(session_of(me).is_some());
    }
}
