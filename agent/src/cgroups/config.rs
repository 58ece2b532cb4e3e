//! The agent's isolation settings: `--isolation`, `--cpu-limit` and the rest of
//! [`IsolationConfig`], with their parsing.

use super::*;

/// `--isolation`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IsolationMode {
    /// Cgroups when available; otherwise one warning and no isolation.
    #[default]
    Auto,
    /// Cgroups or refuse to start.
    Cgroups,
    /// No isolation.
    None,
}

/// `--cpu-limit`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CpuLimit {
    /// A CFS quota of `cpus` on top of the weight.
    #[default]
    Hard,
    /// Only the weight: idle CPU may be used beyond `cpus`.
    Soft,
}

/// A flag value that is not one of the choices.
#[derive(Debug, thiserror::Error)]
#[error("invalid {flag} `{value}`: expected one of {choices}")]
pub struct ParseChoiceError {
    flag: &'static str,
    value: String,
    choices: &'static str,
}

impl ParseChoiceError {
    /// `value` is not one of `choices` (comma-separated) for `flag`.
    pub fn new(flag: &'static str, value: &str, choices: &'static str) -> Self {
        Self { flag, value: value.into(), choices }
    }
}

impl FromStr for IsolationMode {
    type Err = ParseChoiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::Auto),
            "cgroups" => Ok(Self::Cgroups),
            "none" => Ok(Self::None),
            _ => {
                Err(ParseChoiceError { flag: "--isolation", value: s.into(), choices: "auto, cgroups, none" })
            }
        }
    }
}

impl fmt::Display for IsolationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Cgroups => "cgroups",
            Self::None => "none",
        })
    }
}

impl FromStr for CpuLimit {
    type Err = ParseChoiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hard" => Ok(Self::Hard),
            "soft" => Ok(Self::Soft),
            _ => Err(ParseChoiceError { flag: "--cpu-limit", value: s.into(), choices: "hard, soft" }),
        }
    }
}

impl fmt::Display for CpuLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Hard => "hard",
            Self::Soft => "soft",
        })
    }
}

/// How the agent isolates tasks (part of [`crate::AgentConfig`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IsolationConfig {
    /// `--isolation`.
    pub mode: IsolationMode,
    /// `--cgroup-root`: a cgroup path (as in `/proc/self/cgroup`, e.g. `/agora`) used as the
    /// agent's root in every hierarchy instead of `<own group>/agora-<hash>`.
    pub cgroup_root: Option<PathBuf>,
    /// `--cpu-limit`.
    pub cpu_limit: CpuLimit,
    /// `--max-pids-per-task` (0: no limit).
    pub max_pids_per_task: u64,
    /// `--cgroup-favordynmods`: on cgroup v1, make sure a cgroup root mounted with
    /// `favordynmods` exists (mounting [`dynmods::DEFAULT_DIR`] if needed), which makes moving
    /// tasks into their groups cheaper ([`dynmods`]). Nothing is done on v2.
    pub favordynmods: bool,
}

impl Default for IsolationConfig {
    fn default() -> Self {
        Self {
            mode: IsolationMode::Auto,
            cgroup_root: None,
            cpu_limit: CpuLimit::Hard,
            max_pids_per_task: DEFAULT_MAX_PIDS_PER_TASK,
            favordynmods: true,
        }
    }
}
