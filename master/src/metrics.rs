//! The master's metrics (the `metrics` facade; the binary installs the Prometheus exporter).
//! Names follow `agora_master_<name>_<unit|total>`.

use ::metrics::{describe_counter, describe_gauge, Unit};

/// Times this master stepped down from leading (`--etcd`).
pub const STEP_DOWNS: &str = "agora_master_step_downs_total";
/// Offers sent to frameworks.
pub const OFFERS_SENT: &str = "agora_master_offers_sent_total";
/// Offers declined by frameworks.
pub const OFFERS_DECLINED: &str = "agora_master_offers_declined_total";
/// Offers rescinded by the master (agent gone, framework failed over).
pub const OFFERS_RESCINDED: &str = "agora_master_offers_rescinded_total";
/// Offers accepted by frameworks.
pub const OFFERS_ACCEPTED: &str = "agora_master_offers_accepted_total";
/// Tasks sent to agents.
pub const TASKS_LAUNCHED: &str = "agora_master_tasks_launched_total";
/// Tasks refused at launch (TASK_ERROR or TASK_DROPPED).
pub const TASKS_INVALID: &str = "agora_master_tasks_invalid_total";
/// Calls and messages refused on receipt by [`crate::validate`].
pub const CALLS_INVALID: &str = "agora_master_calls_invalid_total";
/// Calls, subscriptions, launches and uploads the ACLs (`--acls`) denied.
pub const ACL_DENIALS: &str = "agora_master_acl_denials_total";
/// Tasks that reached a terminal state (label `state`).
pub const TASKS_TERMINAL: &str = "agora_master_tasks_terminal_total";
/// Status updates received from agents.
pub const STATUS_UPDATES: &str = "agora_master_status_updates_total";
/// Allocation cycles run.
pub const ALLOCATION_RUNS: &str = "agora_master_allocation_runs_total";
/// Agents that timed out and became unreachable.
pub const AGENTS_UNREACHABLE_EVENTS: &str = "agora_master_agents_unreachable_total";
/// Agents removed for not re-registering in time after a restart of the master.
pub const AGENTS_REMOVED: &str = "agora_master_agents_removed_total";
/// Frameworks removed (teardown or failover timeout).
pub const FRAMEWORKS_REMOVED: &str = "agora_master_frameworks_removed_total";
/// Framework messages relayed (label `direction`: `to_executor`, `to_scheduler`).
pub const FRAMEWORK_MESSAGES: &str = "agora_master_framework_messages_total";
/// Connected agents (refreshed every allocation cycle).
pub const AGENTS_ACTIVE: &str = "agora_master_agents_active";
/// Agents known but not connected (refreshed every allocation cycle).
pub const AGENTS_INACTIVE: &str = "agora_master_agents_inactive";
/// Connected frameworks (refreshed every allocation cycle).
pub const FRAMEWORKS_ACTIVE: &str = "agora_master_frameworks_active";
/// Outstanding offers (refreshed every allocation cycle).
pub const OFFERS_OUTSTANDING: &str = "agora_master_offers_outstanding";
/// Known non-completed tasks (refreshed every allocation cycle).
pub const TASKS_KNOWN: &str = "agora_master_tasks_known";
/// Artifact uploads by outcome (label `outcome`: `stored`, `present`, `rejected`).
pub const ARTIFACT_UPLOADS: &str = "agora_master_artifact_uploads_total";
/// Bytes of artifacts stored (new artifacts only).
pub const ARTIFACT_BYTES: &str = "agora_master_artifact_bytes_total";
/// Artifacts sent to agents.
pub const ARTIFACT_FETCHES: &str = "agora_master_artifact_fetches_total";
/// Artifacts in the store.
pub const ARTIFACTS_STORED: &str = "agora_master_artifacts_stored";
/// Artifacts evicted past `--artifact-store-size`.
pub const ARTIFACTS_EVICTED: &str = "agora_master_artifacts_evicted_total";
/// Peers disconnected because they did not read their stream while their outbox grew past its
/// bound (label `role`).
pub const SLOW_PEERS_DISCONNECTED: &str = "agora_master_slow_peers_disconnected_total";
/// Connections and bulk streams refused by a per-principal limit (label `what`: `connection`,
/// `stream`).
pub const PEERS_REFUSED: &str = "agora_master_peer_limit_refusals_total";

/// Registers descriptions of every metric with the installed recorder (call once at start).
pub fn describe() {
    describe_counter!(STEP_DOWNS, Unit::Count, "Times this master stepped down from leading");
    describe_counter!(OFFERS_SENT, Unit::Count, "Offers sent to frameworks");
    describe_counter!(OFFERS_DECLINED, Unit::Count, "Offers declined by frameworks");
    describe_counter!(OFFERS_RESCINDED, Unit::Count, "Offers rescinded by the master");
    describe_counter!(OFFERS_ACCEPTED, Unit::Count, "Offers accepted by frameworks");
    describe_counter!(TASKS_LAUNCHED, Unit::Count, "Tasks sent to agents");
    describe_counter!(TASKS_INVALID, Unit::Count, "Tasks refused at launch");
    describe_counter!(CALLS_INVALID, Unit::Count, "Peer calls and messages refused on receipt as invalid");
    describe_counter!(ACL_DENIALS, Unit::Count, "Actions the ACLs denied");
    describe_counter!(TASKS_TERMINAL, Unit::Count, "Tasks that reached a terminal state");
    describe_counter!(STATUS_UPDATES, Unit::Count, "Status updates received from agents");
    describe_counter!(ALLOCATION_RUNS, Unit::Count, "Allocation cycles run");
    describe_counter!(AGENTS_UNREACHABLE_EVENTS, Unit::Count, "Agents marked unreachable");
    describe_counter!(FRAMEWORKS_REMOVED, Unit::Count, "Frameworks removed");
    describe_counter!(FRAMEWORK_MESSAGES, Unit::Count, "Framework messages relayed by direction");
    describe_gauge!(AGENTS_ACTIVE, Unit::Count, "Connected agents");
    describe_gauge!(AGENTS_INACTIVE, Unit::Count, "Disconnected or unreachable agents");
    describe_gauge!(FRAMEWORKS_ACTIVE, Unit::Count, "Connected frameworks");
    describe_gauge!(OFFERS_OUTSTANDING, Unit::Count, "Outstanding offers");
    describe_gauge!(TASKS_KNOWN, Unit::Count, "Known tasks that are not completed");
    describe_counter!(ARTIFACT_UPLOADS, Unit::Count, "Artifact uploads by outcome");
    describe_counter!(ARTIFACT_BYTES, Unit::Bytes, "Bytes of new artifacts stored");
    describe_counter!(ARTIFACT_FETCHES, Unit::Count, "Artifacts sent to agents");
    describe_gauge!(ARTIFACTS_STORED, Unit::Count, "Artifacts in the store");
    describe_counter!(ARTIFACTS_EVICTED, Unit::Count, "Unused artifacts evicted past the store's size");
    describe_counter!(
        SLOW_PEERS_DISCONNECTED,
        Unit::Count,
        "Peers disconnected for not reading their stream"
    );
    describe_counter!(PEERS_REFUSED, Unit::Count, "Connections and streams refused by a per-principal limit");
}
