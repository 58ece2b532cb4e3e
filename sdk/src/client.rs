//! Connecting to the master: the QUIC handshake, the protocol [`Hello`], and an operator client
//! for the CLI's read and kill commands.

use std::net::SocketAddr;

use quinn::{RecvStream, SendStream};
use tokio::io::AsyncRead;

use crate::config::{ClientConfig, ConfigError};
use crate::frame::{FrameError, FrameReader, FrameWriter};
use crate::proto::*;
use crate::tls::{TlsError, TlsFiles, MASTER_SERVER_NAME};

/// Anything that can go wrong talking to the master.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot resolve master address `{addr}`: {err}")]
    Resolve { addr: String, err: std::io::Error },
    #[error("cannot open a QUIC endpoint: {0}")]
    Endpoint(std::io::Error),
    #[error("cannot connect to the master at {addr}: {err}")]
    Connect { addr: SocketAddr, err: quinn::ConnectError },
    #[error("no answer from the master at {addr} within {}s (is it running, and is the address right?)", .after.as_secs())]
    Unreachable { addr: SocketAddr, after: std::time::Duration },
    /// Not a `#[source]`: the message says it already, and `{:#}` would say it twice.
    #[error("connection to the master failed: {0}")]
    Connection(quinn::ConnectionError),
    /// The TLS handshake failed on a certificate another CA signed (ours or the master's);
    /// `detail` is what TLS said.
    #[error("cannot connect to the master at {addr}: certificate not signed by this cluster's CA ({detail}); check the CA and certificates of client.toml or --tls-dir")]
    ForeignCa { addr: SocketAddr, detail: String },
    #[error("stream to the master failed: {0}")]
    Stream(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("the master refused: {}", .0.message)]
    Refused(WireError),
    #[error("the master closed the connection")]
    Closed,
    /// A master list (`--master`, client.toml) that cannot be used.
    #[error(transparent)]
    Masters(#[from] crate::masters::MasterListError),
    /// The master is a standby; `leader` is where the leader listens, if it knows.
    #[error("the master at {addr} is not the leader{}", .leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { addr: SocketAddr, leader: Option<String> },
    /// The master leads an older epoch than a leader this client saw before: it was deposed
    /// and has not noticed yet.
    #[error(
        "the master at {addr} leads epoch {epoch}, older than epoch {seen} seen before (a deposed leader)"
    )]
    StaleEpoch { addr: String, epoch: u64, seen: u64 },
    /// No master of the list leads; what each one said (`address`, error).
    #[error("no master could be reached as the leader: {}", .tried.iter().map(|(a, e)| format!("{a}: {e}")).collect::<Vec<_>>().join("; "))]
    NoLeader { tried: Vec<(String, String)> },
    #[error("unexpected reply from the master: {0}")]
    Unexpected(String),
    #[error(transparent)]
    Artifact(#[from] crate::artifacts::ArtifactError),
    /// Nothing came from the master for this long (its heartbeats included).
    #[error("the master sent nothing for {}s; giving the connection up", .after.as_secs_f64())]
    Silent { after: std::time::Duration },
    /// The driver could not subscribe again within the framework's failover timeout; the
    /// master has removed the framework and killed its tasks by now.
    #[error("could not reach the master again within the failover timeout ({}s)", .after.as_secs_f64())]
    FailoverExpired { after: std::time::Duration },
}

impl From<quinn::ConnectionError> for ClientError {
    fn from(e: quinn::ConnectionError) -> Self {
        ClientError::Connection(e)
    }
}

/// When a handshake failed because one side's certificate is not signed by the other's CA
/// (rustls's verdicts on our side; the TLS alerts `bad_certificate`, `unknown_ca` or
/// `decrypt_error` from the master's), the TLS layer's words for it.
fn foreign_ca(e: &quinn::ConnectionError) -> Option<String> {
    match e {
        quinn::ConnectionError::TransportError(t) => {
            let text = t.reason.as_str();
            ["BadSignature", "UnknownIssuer", "UnknownCA", "BadCertificate"]
                .iter()
                .any(|s| text.contains(s))
                .then(|| text.to_string())
        }
        quinn::ConnectionError::ConnectionClosed(c) => {
            // CRYPTO_ERROR (0x100) + the alert.
            let alert = u64::from(c.error_code).checked_sub(0x100)?;
            [42, 48, 51].contains(&alert).then(|| String::from_utf8_lossy(&c.reason).into_owned())
        }
        _ => None,
    }
}

impl From<quinn::WriteError> for ClientError {
    fn from(e: quinn::WriteError) -> Self {
        ClientError::Stream(e.to_string())
    }
}

/// How long a client waits for the QUIC handshake with the master.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Resolves `host:port`.
pub async fn resolve(addr: &str) -> Result<SocketAddr, ClientError> {
    let mut it = tokio::net::lookup_host(addr)
        .await
        .map_err(|err| ClientError::Resolve { addr: addr.to_string(), err })?;
    it.next().ok_or_else(|| ClientError::Resolve {
        addr: addr.to_string(),
        err: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
    })
}

/// An open, handshaken connection to the master with its control stream.
pub struct Session {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub writer: FrameWriter<SendStream>,
    pub reader: FrameReader<RecvStream>,
    pub master_id: String,
    /// The leader's epoch from its `Welcome` (see [`crate::masters::MasterSearch::accept_epoch`]).
    pub epoch: u64,
    /// Set when a standby answered a hello that allowed stale answers
    /// ([`Session::connect_allowing_stale`]): only listings are served, from its registry.
    pub stale: Option<StaleSource>,
}

/// The standby that serves a stale session ([`HelloReply::Stale`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StaleSource {
    /// The address this client connected to.
    pub address: String,
    /// The leader's address, as the standby knows it.
    pub leader: Option<String>,
}

impl Session {
    /// Connects to the one master at `addr` with `files` and says hello as `role` (a standby
    /// answers [`ClientError::NotLeader`]; [`crate::masters::MasterSearch`] follows it).
    pub async fn connect(addr: &str, files: &TlsFiles, role: Role) -> Result<Session, ClientError> {
        Self::connect_with(addr, files, Hello::new(role)).await
    }

    /// Like [`Session::connect`], accepting a stale answer: a standby then serves the session
    /// itself (listings only, see [`HelloReply::Stale`]; [`Session::stale`] says so), where it
    /// would answer `NotLeader`. The leader serves it as any session.
    pub async fn connect_allowing_stale(
        addr: &str,
        files: &TlsFiles,
        role: Role,
    ) -> Result<Session, ClientError> {
        Self::connect_with(addr, files, Hello { allow_stale: true, ..Hello::new(role) }).await
    }

    async fn connect_with(addr: &str, files: &TlsFiles, hello: Hello) -> Result<Session, ClientError> {
        let peer = resolve(addr).await?;
        let endpoint =
            crate::transport::client_endpoint(files, peer).map_err(|e| match e.downcast::<TlsError>() {
                Ok(t) => ClientError::Tls(t),
                Err(e) => ClientError::Endpoint(e),
            })?;
        let connecting = endpoint
            .connect(peer, MASTER_SERVER_NAME)
            .map_err(|err| ClientError::Connect { addr: peer, err })?;
        let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => match foreign_ca(&e) {
                Some(detail) => return Err(ClientError::ForeignCa { addr: peer, detail }),
                None => return Err(e.into()),
            },
            Err(_) => return Err(ClientError::Unreachable { addr: peer, after: CONNECT_TIMEOUT }),
        };
        // With TLS 1.3 the master checks our certificate after our side of the handshake is
        // done: its verdict is the reason the connection closes during the hello.
        let allow_stale = hello.allow_stale;
        let reply = match Self::hello(&conn, hello).await {
            Ok(r) => r,
            Err(e) => match conn.close_reason().and_then(|r| foreign_ca(&r)) {
                Some(detail) => return Err(ClientError::ForeignCa { addr: peer, detail }),
                None => return Err(e),
            },
        };
        let (writer, reader, reply) = reply;
        match reply {
            Some(HelloReply::Welcome { master_id, epoch, .. }) => {
                Ok(Session { endpoint, conn, writer, reader, master_id, epoch, stale: None })
            }
            Some(HelloReply::Stale { master_id, leader }) if allow_stale => {
                let stale = Some(StaleSource { address: addr.to_string(), leader });
                Ok(Session { endpoint, conn, writer, reader, master_id, epoch: 0, stale })
            }
            Some(HelloReply::Stale { .. }) => {
                Err(ClientError::Unexpected("a stale session that was not asked for".into()))
            }
            Some(HelloReply::Refused(e)) => Err(ClientError::Refused(e)),
            Some(HelloReply::NotLeader { leader }) => Err(ClientError::NotLeader { addr: peer, leader }),
            None => Err(ClientError::Closed),
        }
    }

    /// Opens the control stream and says hello; the master's answer.
    async fn hello(
        conn: &quinn::Connection,
        hello: Hello,
    ) -> Result<(FrameWriter<SendStream>, FrameReader<RecvStream>, Option<HelloReply>), ClientError> {
        let (send, recv) = conn.open_bi().await?;
        let mut writer = FrameWriter::new(send);
        let mut reader = FrameReader::new(recv);
        writer.send(&hello).await?;
        let reply = reader.recv::<HelloReply>().await?;
        Ok((writer, reader, reply))
    }

    /// Opens a task's output stream (stdout or stderr) through the master.
    pub async fn open_output(
        &self,
        task_id: &TaskId,
        stream: OutputStream,
        offset: u64,
        follow: bool,
    ) -> Result<impl AsyncRead + Unpin + Send + 'static, ClientError> {
        open_output(&self.conn, task_id, stream, offset, follow).await
    }
}

/// Opens a task's output stream on any connection to the master.
pub async fn open_output(
    conn: &quinn::Connection,
    task_id: &TaskId,
    stream: OutputStream,
    offset: u64,
    follow: bool,
) -> Result<impl AsyncRead + Unpin + Send + 'static, ClientError> {
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let req = OutputRequest { task_id: task_id.clone(), framework_id: None, stream, offset, follow };
    w.send(&StreamRequest::Output(req)).await?;
    let mut send = w.into_inner();
    let _ = send.finish();
    let mut r = FrameReader::new(recv);
    match r.recv::<OutputReply>().await? {
        Some(OutputReply::Streaming) => {}
        Some(OutputReply::Error(e)) => return Err(ClientError::Refused(e)),
        None => return Err(ClientError::Closed),
    }
    let (recv, buffered) = r.into_parts();
    Ok(std::io::Cursor::new(buffered.freeze()).chain_async(recv))
}

/// Sends a files request on a new stream and reads the reply frame; the stream's rest.
async fn files_request(
    conn: &quinn::Connection,
    task_id: &TaskId,
    path: &str,
    read: bool,
) -> Result<(FilesReply, FrameReader<RecvStream>), ClientError> {
    let (send, recv) = conn.open_bi().await?;
    let mut w = FrameWriter::new(send);
    let req = FilesRequest { task_id: task_id.clone(), framework_id: None, path: path.to_string(), read };
    w.send(&StreamRequest::Files(req)).await?;
    let mut send = w.into_inner();
    let _ = send.finish();
    let mut r = FrameReader::new(recv);
    match r.recv::<FilesReply>().await? {
        Some(FilesReply::Error(e)) => Err(ClientError::Refused(e)),
        Some(reply) => Ok((reply, r)),
        None => Err(ClientError::Closed),
    }
}

/// Lists directory `path` of a task's sandbox (`""`: the sandbox), on any connection to the
/// master (a framework's for its own tasks, an operator's for any): the entries and whether
/// the listing was cut at [`MAX_LISTING`].
pub async fn list_sandbox(
    conn: &quinn::Connection,
    task_id: &TaskId,
    path: &str,
) -> Result<(Vec<FileEntry>, bool), ClientError> {
    match files_request(conn, task_id, path, false).await? {
        (FilesReply::Listing { entries, truncated }, _) => Ok((entries, truncated)),
        (other, _) => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

/// Reads file `path` of a task's sandbox: its size and its bytes (exactly `size` of them, or
/// an error if the stream ends early).
pub async fn read_sandbox_file(
    conn: &quinn::Connection,
    task_id: &TaskId,
    path: &str,
) -> Result<(u64, impl AsyncRead + Unpin + Send + 'static), ClientError> {
    match files_request(conn, task_id, path, true).await? {
        (FilesReply::Sending { size }, r) => {
            let (recv, buffered) = r.into_parts();
            Ok((size, std::io::Cursor::new(buffered.freeze()).chain_async(recv)))
        }
        (other, _) => Err(ClientError::Unexpected(format!("{other:?}"))),
    }
}

trait ChainAsync: AsyncRead + Sized {
    fn chain_async<B: AsyncRead>(self, next: B) -> tokio::io::Chain<Self, B>;
}

impl<A: AsyncRead> ChainAsync for A {
    fn chain_async<B: AsyncRead>(self, next: B) -> tokio::io::Chain<Self, B> {
        tokio::io::AsyncReadExt::chain(self, next)
    }
}

/// Which items a reply of a listing carries and whether it is the last part; `Err` gives back
/// a reply of another kind.
type SplitReply<T> = fn(OperatorReply) -> Result<(Vec<T>, bool), OperatorReply>;

/// The operator's view of the cluster: list agents, frameworks and tasks; kill; read output.
pub struct OperatorClient {
    session: Session,
}

impl OperatorClient {
    /// Connects to the leader among `cfg`'s masters.
    pub async fn connect(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let files = cfg.operator_identity()?;
        let mut search = crate::masters::MasterSearch::new(&cfg.master)?;
        Ok(Self { session: search.connect_patiently(&files, Role::Operator).await? })
    }

    /// Connects to the first of `cfg`'s masters (in list order) that answers, leader or
    /// standby, accepting a stale answer from a standby (`--allow-stale`): see
    /// [`OperatorClient::stale`]. No master answering: [`ClientError::NoLeader`] naming what
    /// each said (a list of one: that master's own error).
    pub async fn connect_allowing_stale(cfg: &ClientConfig) -> Result<Self, ClientError> {
        let files = cfg.operator_identity()?;
        let masters = crate::masters::MasterSearch::new(&cfg.master)?.candidates().await?;
        let mut tried = Vec::new();
        for addr in &masters {
            match Session::connect_allowing_stale(addr, &files, Role::Operator).await {
                Ok(session) => return Ok(Self { session }),
                // Our own files or the master's refusal: the same everywhere.
                Err(e @ (ClientError::Tls(_) | ClientError::Refused(_))) => return Err(e),
                Err(e) => tried.push((addr.clone(), e)),
            }
        }
        if tried.len() == 1 {
            if let Some((_, e)) = tried.pop() {
                return Err(e);
            }
        }
        Err(ClientError::NoLeader { tried: tried.into_iter().map(|(a, e)| (a, e.to_string())).collect() })
    }

    /// The id of the master this client talks to (the leader, or the standby of a stale
    /// session).
    pub fn master_id(&self) -> &str {
        &self.session.master_id
    }

    /// The standby answering, when this session is stale (only a client made by
    /// [`OperatorClient::connect_allowing_stale`] can be).
    pub fn stale(&self) -> Option<&StaleSource> {
        self.session.stale.as_ref()
    }

    async fn call(&mut self, call: OperatorCall) -> Result<OperatorReply, ClientError> {
        self.session.writer.send(&call).await?;
        match self.session.reader.recv::<OperatorReply>().await? {
            Some(OperatorReply::Error(e)) => Err(ClientError::Refused(e)),
            Some(r) => Ok(r),
            None => Err(ClientError::Closed),
        }
    }

    /// A list that may come in parts: `split` says which items a reply carries and whether it
    /// is the last one (`Err` gives back a reply of the wrong kind).
    async fn list<T>(&mut self, call: OperatorCall, split: SplitReply<T>) -> Result<Vec<T>, ClientError> {
        let mut all = Vec::new();
        let mut reply = self.call(call).await?;
        loop {
            match split(reply) {
                Ok((items, last)) => {
                    all.extend(items);
                    if last {
                        return Ok(all);
                    }
                }
                Err(other) => return Err(ClientError::Unexpected(format!("{other:?}"))),
            }
            reply = match self.session.reader.recv::<OperatorReply>().await? {
                Some(OperatorReply::Error(e)) => return Err(ClientError::Refused(e)),
                Some(r) => r,
                None => return Err(ClientError::Closed),
            };
        }
    }

    pub async fn agents(&mut self) -> Result<Vec<AgentView>, ClientError> {
        self.list(OperatorCall::GetAgents, |r| match r {
            OperatorReply::AgentsPart(a) => Ok((a, false)),
            OperatorReply::Agents(a) => Ok((a, true)),
            other => Err(other),
        })
        .await
    }

    pub async fn frameworks(&mut self) -> Result<Vec<FrameworkView>, ClientError> {
        self.list(OperatorCall::GetFrameworks, |r| match r {
            OperatorReply::FrameworksPart(f) => Ok((f, false)),
            OperatorReply::Frameworks(f) => Ok((f, true)),
            other => Err(other),
        })
        .await
    }

    /// The frameworks that ended since the master started (its bounded history).
    pub async fn completed_frameworks(&mut self) -> Result<Vec<FrameworkView>, ClientError> {
        self.list(OperatorCall::GetCompletedFrameworks, |r| match r {
            OperatorReply::FrameworksPart(f) => Ok((f, false)),
            OperatorReply::Frameworks(f) => Ok((f, true)),
            other => Err(other),
        })
        .await
    }

    pub async fn tasks(&mut self) -> Result<Vec<TaskView>, ClientError> {
        self.list(OperatorCall::GetTasks, |r| match r {
            OperatorReply::TasksPart(t) => Ok((t, false)),
            OperatorReply::Tasks(t) => Ok((t, true)),
            other => Err(other),
        })
        .await
    }

    /// The tasks of frameworks' stated demands that wait for resources, with why.
    pub async fn pending_tasks(&mut self) -> Result<Vec<PendingTaskView>, ClientError> {
        match self.call(OperatorCall::GetPendingTasks).await? {
            OperatorReply::PendingTasks(p) => Ok(p),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Every master of the cluster, and which one leads.
    pub async fn masters(&mut self) -> Result<Vec<MasterView>, ClientError> {
        match self.call(OperatorCall::GetMasters).await? {
            OperatorReply::Masters(m) => Ok(m),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Lists directory `path` of a task's sandbox (see [`list_sandbox`]).
    pub async fn list_files(
        &self,
        task_id: &TaskId,
        path: &str,
    ) -> Result<(Vec<FileEntry>, bool), ClientError> {
        list_sandbox(&self.session.conn, task_id, path).await
    }

    /// Reads file `path` of a task's sandbox (see [`read_sandbox_file`]).
    pub async fn read_file(
        &self,
        task_id: &TaskId,
        path: &str,
    ) -> Result<(u64, impl AsyncRead + Unpin + Send + 'static), ClientError> {
        read_sandbox_file(&self.session.conn, task_id, path).await
    }

    /// The allocation policy in force and where it comes from (`registry` or `flags`).
    pub async fn policy(&mut self) -> Result<(AllocationPolicy, String), ClientError> {
        match self.call(OperatorCall::GetPolicy).await? {
            OperatorReply::Policy { policy, source } => Ok((policy, source)),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Replaces the allocation policy; `Ok` once the master's registry holds it.
    pub async fn set_policy(&mut self, policy: AllocationPolicy) -> Result<(), ClientError> {
        match self.call(OperatorCall::SetPolicy(policy)).await? {
            OperatorReply::Ok => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// A task's last state changes, oldest first (the master keeps a bounded history).
    pub async fn task_history(
        &mut self,
        framework_id: &FrameworkId,
        task_id: &TaskId,
    ) -> Result<Vec<TaskTransition>, ClientError> {
        let call =
            OperatorCall::GetTaskHistory { framework_id: framework_id.clone(), task_id: task_id.clone() };
        match self.call(call).await? {
            OperatorReply::TaskHistory(h) => Ok(h),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Drains an agent (see [`OperatorCall::DrainAgent`]); `Ok` once the master's registry
    /// holds the drain.
    pub async fn drain_agent(
        &mut self,
        agent_id: &AgentId,
        deadline: Option<std::time::Duration>,
        kill: bool,
    ) -> Result<(), ClientError> {
        let call = OperatorCall::DrainAgent { agent_id: agent_id.clone(), deadline, kill };
        match self.call(call).await? {
            OperatorReply::Ok => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    /// Ends an agent's drain (see [`OperatorCall::UndrainAgent`]).
    pub async fn undrain_agent(&mut self, agent_id: &AgentId) -> Result<(), ClientError> {
        match self.call(OperatorCall::UndrainAgent { agent_id: agent_id.clone() }).await? {
            OperatorReply::Ok => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn kill(&mut self, task_id: &TaskId) -> Result<(), ClientError> {
        match self.call(OperatorCall::KillTask { task_id: task_id.clone() }).await? {
            OperatorReply::Ok => Ok(()),
            other => Err(ClientError::Unexpected(format!("{other:?}"))),
        }
    }

    pub async fn output(
        &self,
        task_id: &TaskId,
        stream: OutputStream,
        follow: bool,
    ) -> Result<impl AsyncRead + Unpin + Send + 'static, ClientError> {
        self.session.open_output(task_id, stream, 0, follow).await
    }

    pub fn close(&self) {
        self.session.conn.close(0u32.into(), b"bye");
    }
}
