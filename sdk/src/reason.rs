//! Why a task is in its state: one [`Reason`] for every reason Agora itself gives (agent,
//! executors, master, SDK, CLI), plus [`Reason::Other`] for the text a framework chooses (its
//! own executor's reasons, a teardown's reason).
//!
//! On every wire and in every file a reason is its text ([`Reason::as_str`]): JSON shows
//! `"reason": "command exited"` as it always did, and postcard carries the same string bytes
//! as the former `String` field, so peers, checkpoints and registries written before the enum
//! read the same. Reading parses the text back: known words become their variant (never
//! [`Reason::Other`]), the empty text is [`Reason::None`], anything else is `Other`, cut to
//! [`MAX_REASON_LEN`] bytes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::executor_proto::MAX_REASON_LEN;

macro_rules! reasons {
    ($($(#[$m:meta])* $variant:ident => $text:literal,)*) => {
        /// Why a task is in its state (see the [module docs](self)).
        #[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
        pub enum Reason {
            /// No reason: the transitions of a launch (`TASK_STAGING`), shown as the empty text.
            #[default]
            None,
            $($(#[$m])* $variant,)*
            /// Text chosen by a framework (its executor's reason, its teardown's reason) that is
            /// none of the known ones.
            Other(OtherReason),
        }

        impl Reason {
            /// Every reason but [`Reason::Other`], for tests and docs.
            pub const KNOWN: &'static [Reason] = &[Reason::None, $(Reason::$variant,)*];

            /// The reason's text, exactly as Agora has always shown it (empty for
            /// [`Reason::None`]).
            pub fn as_str(&self) -> &str {
                match self {
                    Reason::None => "",
                    $(Reason::$variant => $text,)*
                    Reason::Other(o) => &o.0,
                }
            }

            /// The text of a known reason (`None` for [`Reason::Other`]), for callers that
            /// need it for good.
            pub fn static_str(&self) -> Option<&'static str> {
                match self {
                    Reason::None => Some(""),
                    $(Reason::$variant => Some($text),)*
                    Reason::Other(_) => None,
                }
            }

            /// The known reason spelled `text`, if any (the empty text is [`Reason::None`]).
            fn known(text: &str) -> Option<Reason> {
                match text {
                    "" => Some(Reason::None),
                    $($text => Some(Reason::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

reasons! {
    // Native (command) tasks, from the agent and its command executor.
    /// A native task's process exited (with its exit code).
    CommandExited => "command exited",
    /// A native task's process was ended by a signal it was not sent by Agora.
    KilledBySignal => "killed by signal",
    /// The task was killed as asked (by its framework, an operator or the agent).
    Killed => "killed",
    /// A kill was asked and is under way (`TASK_KILLING`).
    Killing => "killing",
    /// A native task's process could not be started.
    FailedToStart => "failed to start",
    /// A native task ended while the agent was away and its end is not known.
    UnknownExit => "unknown exit",
    /// The task went over its memory limit.
    MemoryLimitExceeded => "memory limit exceeded",
    /// The task hit its process limit.
    ProcessLimitReached => "process limit reached",
    /// The agent could not put the task under its resource limits.
    IsolationFailed => "isolation failed",
    /// The task wrote more than its disk allows.
    DiskLimitExceeded => "disk limit exceeded",
    /// The executor started the task (`TASK_RUNNING`).
    TaskStarted => "task started",
    /// The executor could not start the task.
    LaunchFailed => "launch failed",
    /// The agent refused the task as it stands (bad spec, no executor for it).
    InvalidTask => "invalid task",
    /// The agent refused the user the task asks to run as.
    InvalidTaskUser => "invalid task user",
    /// The agent already runs a task of that id for that framework.
    DuplicateTaskId => "duplicate task id",
    /// The agent does not know the task (a kill or reconciliation of it).
    UnknownTask => "unknown task",
    /// The task's executor ended before the task did.
    ExecutorTerminated => "executor terminated",
    /// A file the task or its executor needs could not be fetched.
    FetchFailed => "fetch failed",
    // Wasm tasks, from the Wasm executor.
    /// A Wasm task's module exited (with its exit code).
    ModuleExited => "module exited",
    /// The Wasm executor failed the task for an error of its own.
    ExecutorError => "executor error",
    /// A Wasm task used up its fuel (CPU budget).
    FuelExhausted => "fuel exhausted",
    /// A Wasm task ran past its timeout.
    Timeout => "timeout",
    /// A Wasm task trapped.
    Trap => "trap",
    // From the master.
    /// The master launched the task (its history's `TASK_STAGING`).
    Launched => "launched",
    /// The task's agent reported it on re-registering (its history, for a task the master did
    /// not know).
    ReportedByAgent => "reported by its agent",
    /// The master refused a launch (see its message).
    InvalidLaunch => "invalid launch",
    /// A launch too large for one frame (refused by the SDK or the master).
    LaunchTooLarge => "launch too large",
    /// A launch on an offer that was rescinded or used.
    OfferNoLongerValid => "offer no longer valid",
    /// The task's agent re-registered and reports the task.
    AgentReregistered => "agent re-registered",
    /// The task's agent re-registered without the task.
    TaskNotReported => "task not reported by re-registered agent",
    /// The task's agent is unreachable.
    AgentUnreachable => "agent unreachable",
    /// Killed at the deadline of its agent's drain.
    AgentDrained => "agent drained",
    /// The task's agent has not re-registered since the master restarted.
    AgentRecovering => "agent has not re-registered since the master restarted",
    /// A reconciliation answer about a task the master knows no update of.
    Reconciliation => "reconciliation",
    /// Reconciliation: the task's agent is registered and does not run it.
    ReconciliationTaskNotOnAgent => "reconciliation: task not on its agent",
    /// Reconciliation: the task's agent is unreachable.
    ReconciliationAgentUnreachable => "reconciliation: agent unreachable",
    /// Reconciliation: the task's agent was removed from the cluster.
    ReconciliationAgentRemoved => "reconciliation: agent removed",
    /// Reconciliation: the master knows neither the task nor its agent.
    ReconciliationUnknownAgent => "reconciliation: unknown agent",
    /// Reconciliation: the master does not know the task.
    ReconciliationUnknownTask => "reconciliation: unknown task",
    // From the SDK and the CLI.
    /// The scheduler lost its master with the task's launch unanswered.
    MasterDisconnected => "master disconnected",
    /// `agora run` was interrupted (Ctrl-C, SIGTERM) and tore its framework down.
    RunInterrupted => "run interrupted",
}

/// The text of a [`Reason::Other`]: never one of the known reasons' texts, never empty, at
/// most [`MAX_REASON_LEN`] bytes. Made only through [`Reason::from`] / [`Reason::parse`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct OtherReason(String);

impl OtherReason {
    /// The text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Reason {
    /// The reason `text` spells: its known variant, or [`Reason::Other`] with the text cut to
    /// [`MAX_REASON_LEN`] bytes (at a character boundary).
    pub fn parse(text: &str) -> Reason {
        let text = &text[..floor_char_boundary(text, MAX_REASON_LEN)];
        Reason::known(text).unwrap_or_else(|| Reason::Other(OtherReason(text.to_string())))
    }

    /// Whether this is [`Reason::None`].
    pub fn is_empty(&self) -> bool {
        matches!(self, Reason::None)
    }
}

/// The largest character boundary of `s` at or below `max`.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    if s.len() <= max {
        return s.len();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    end
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<&str> for Reason {
    fn from(text: &str) -> Self {
        Reason::parse(text)
    }
}

impl From<String> for Reason {
    fn from(text: String) -> Self {
        match Reason::known(&text) {
            Some(r) => r,
            None if text.len() <= MAX_REASON_LEN => Reason::Other(OtherReason(text)),
            None => Reason::parse(&text),
        }
    }
}

impl std::str::FromStr for Reason {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Reason::parse(s))
    }
}

impl PartialEq<str> for Reason {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl serde::de::Visitor<'_> for Text {
            type Value = Reason;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a task status reason (text)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Reason, E> {
                Ok(Reason::parse(v))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Reason, E> {
                Ok(Reason::from(v))
            }
        }
        d.deserialize_str(Text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The field as it was before the enum, to compare encodings with.
    #[derive(Serialize, Deserialize)]
    struct Before {
        reason: String,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct After {
        reason: Reason,
    }

    fn others() -> Vec<Reason> {
        vec![
            Reason::from("run interrupted by the operator"),
            Reason::from("done"),
            Reason::from("é".repeat(10)),
        ]
    }

    #[test]
    fn every_reason_round_trips_as_its_text_in_json_and_postcard() {
        let mut texts = std::collections::HashSet::new();
        for r in Reason::KNOWN.iter().cloned().chain(others()) {
            assert!(texts.insert(r.as_str().to_string()), "two reasons spell `{r}`");
            // JSON: the bare text, as the `String` field was.
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, serde_json::to_string(r.as_str()).unwrap());
            assert_eq!(serde_json::from_str::<Reason>(&json).unwrap(), r);
            // postcard: the same bytes as the `String` field, so old peers and files read it.
            let after = After { reason: r.clone() };
            let bytes = postcard::to_allocvec(&after).unwrap();
            assert_eq!(bytes, postcard::to_allocvec(&Before { reason: r.to_string() }).unwrap(), "{r}");
            assert_eq!(postcard::from_bytes::<After>(&bytes).unwrap(), after);
            assert_eq!(r.as_str().parse::<Reason>().unwrap(), r);
            assert_eq!(r.to_string(), r.as_str());
        }
        assert_eq!(Reason::KNOWN.len() + 3, texts.len());
    }

    #[test]
    fn known_words_are_never_other() {
        for r in Reason::KNOWN {
            assert_eq!(Reason::from(r.as_str()), *r);
            assert_eq!(Reason::from(r.as_str().to_string()), *r);
            let old = postcard::to_allocvec(&Before { reason: r.as_str().into() }).unwrap();
            assert_eq!(postcard::from_bytes::<After>(&old).unwrap().reason, *r);
            assert!(!matches!(r, Reason::Other(_)));
        }
        assert_eq!(Reason::from(""), Reason::None);
        assert_eq!(Reason::from("killed"), Reason::Killed);
        assert_eq!(serde_json::from_str::<Reason>("\"agent drained\"").unwrap(), Reason::AgentDrained);
        assert!(matches!(Reason::from("Killed"), Reason::Other(_)), "case matters, as it did");
    }

    #[test]
    fn other_text_is_bounded_whatever_the_peer_sends() {
        let long = "é".repeat(1000);
        for r in [
            Reason::from(long.as_str()),
            Reason::from(long.clone()),
            serde_json::from_str::<Reason>(&serde_json::to_string(&long).unwrap()).unwrap(),
            postcard::from_bytes::<After>(&postcard::to_allocvec(&Before { reason: long.clone() }).unwrap())
                .unwrap()
                .reason,
        ] {
            let Reason::Other(o) = &r else { panic!("{r:?}") };
            assert!(o.as_str().len() <= MAX_REASON_LEN && o.as_str().len() >= MAX_REASON_LEN - 1);
            assert!(long.starts_with(o.as_str()));
        }
    }
}
