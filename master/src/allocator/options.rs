//! The operator's allocation policy: options, their parsing from flags, and the policy as the
//! wire and the registry carry it.

use super::*;

/// Why a new allocation policy cannot be put in force.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// An entry of the policy cannot be read (see [`policy_options`]).
    #[error(transparent)]
    Options(#[from] OptionError),
    /// The allocator cannot change its policy while running (the default of
    /// [`Allocator::set_options`]).
    #[error("the {allocator} allocator cannot change its policy while running")]
    Fixed {
        /// The allocator's name.
        allocator: String,
    },
    /// An allocator written outside this crate refuses the options, saying why.
    #[error("{reason}")]
    Refused {
        /// Its reason, shown to the operator as is.
        reason: String,
    },
}

/// Settings of the allocation policy (`--weights`, `--priorities`, `--quota`, `--quota-limit`,
/// `--min-allocatable`). Allocators use what applies to them.
#[derive(Clone, Debug, Default)]
pub struct AllocatorOptions {
    /// Role weights for weighted fair sharing (a missing role weighs 1; a weight that is not
    /// a positive finite number counts as 1).
    pub role_weights: BTreeMap<String, f64>,
    /// Role priorities for strict priority (higher first; a missing role has 0).
    pub role_priorities: BTreeMap<String, i64>,
    /// Guaranteed minimum per role, satisfied before fair sharing and kept free for the role
    /// while it is not met.
    pub quota_guarantees: BTreeMap<String, Resources>,
    /// Maximum per role, never exceeded (only the kinds named are capped).
    pub quota_limits: BTreeMap<String, Resources>,
    /// Alternatives, any of which makes resources worth offering (`cpus:0.01|mem:32MiB`);
    /// empty: anything non-empty is.
    pub min_allocatable: Vec<Resources>,
}

/// Whether `r` is worth offering under `min` (see [`AllocatorOptions::min_allocatable`]).
pub fn is_allocatable(r: &Resources, min: &[Resources]) -> bool {
    if r.is_empty() {
        return false;
    }
    min.is_empty() || min.iter().any(|m| r.contains(m))
}

/// Reading the operator's spelling of these options.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OptionError {
    #[error("invalid {flag} entry `{entry}`: expected ROLE=VALUE")]
    Entry { flag: &'static str, entry: String },
    #[error("invalid role `{role}` in {flag}")]
    Role { flag: &'static str, role: String },
    #[error("invalid weight `{value}` for role {role}: a positive number")]
    Weight { role: String, value: String },
    #[error("invalid priority `{value}` for role {role}: an integer")]
    Priority { role: String, value: String },
    #[error("invalid resources `{value}` for role {role} in {flag}: {why}")]
    Resources { flag: &'static str, role: String, value: String, why: String },
    #[error("role {role} is given twice in {flag}")]
    Duplicate { flag: &'static str, role: String },
    #[error("invalid --min-allocatable `{value}`: {why}")]
    MinAllocatable { value: String, why: String },
    #[error("a policy names {count} roles; at most {MAX_POLICY_ROLES} are accepted")]
    TooManyRoles { count: usize },
}

fn role_pairs<'a>(flag: &'static str, text: &'a str) -> Result<Vec<(&'a str, &'a str)>, OptionError> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for entry in text.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (role, value) =
            entry.split_once('=').ok_or_else(|| OptionError::Entry { flag, entry: entry.to_string() })?;
        let role = role.trim();
        if !agora_sdk::resources::valid_role(role) {
            return Err(OptionError::Role { flag, role: role.to_string() });
        }
        if out.iter().any(|(r, _)| *r == role) {
            return Err(OptionError::Duplicate { flag, role: role.to_string() });
        }
        out.push((role, value.trim()));
    }
    Ok(out)
}

/// Parses `--weights analytics=2,web=1`.
pub fn parse_weights(text: &str) -> Result<BTreeMap<String, f64>, OptionError> {
    role_pairs("--weights", text)?
        .into_iter()
        .map(|(role, v)| match v.parse::<f64>() {
            Ok(w) if w.is_finite() && w > 0.0 => Ok((role.to_string(), w)),
            _ => Err(OptionError::Weight { role: role.to_string(), value: v.to_string() }),
        })
        .collect()
}

/// Parses `--priorities analytics=10,web=1`.
pub fn parse_priorities(text: &str) -> Result<BTreeMap<String, i64>, OptionError> {
    role_pairs("--priorities", text)?
        .into_iter()
        .map(|(role, v)| {
            v.parse::<i64>()
                .map(|p| (role.to_string(), p))
                .map_err(|_| OptionError::Priority { role: role.to_string(), value: v.to_string() })
        })
        .collect()
}

/// Parses one `--quota` / `--quota-limit` value, `analytics=cpus:4;mem:8GiB` (one role per
/// flag; repeat the flag for more roles).
pub fn parse_role_resources(flag: &'static str, text: &str) -> Result<(String, Resources), OptionError> {
    let (role, value) =
        text.split_once('=').ok_or_else(|| OptionError::Entry { flag, entry: text.to_string() })?;
    let role = role.trim();
    if !agora_sdk::resources::valid_role(role) {
        return Err(OptionError::Role { flag, role: role.to_string() });
    }
    let bad =
        |why: String| OptionError::Resources { flag, role: role.to_string(), value: value.to_string(), why };
    let r = Resources::parse(value).map_err(|e| bad(e.to_string()))?;
    if !r.reserved.is_empty() || !r.ports.is_empty() {
        return Err(bad("a quota names plain scalar quantities (no ports, no reservations)".into()));
    }
    Ok((role.to_string(), r))
}

/// Most roles one policy may name (weights, priorities, quotas and limits each).
pub const MAX_POLICY_ROLES: usize = 1000;

/// The options `policy` gives, on top of `base` (whose `min_allocatable` is kept): the same
/// reading, and the same errors, as the master's flags.
pub fn policy_options(
    policy: &agora_sdk::proto::AllocationPolicy,
    base: &AllocatorOptions,
) -> Result<AllocatorOptions, OptionError> {
    let mut o = base.clone();
    o.role_weights = parse_weights(&policy.weights)?;
    o.role_priorities = parse_priorities(&policy.priorities)?;
    let per_role =
        |flag: &'static str, values: &[String]| -> Result<BTreeMap<String, Resources>, OptionError> {
            let mut out = BTreeMap::new();
            for v in values {
                let (role, r) = parse_role_resources(flag, v)?;
                if out.insert(role.clone(), r).is_some() {
                    return Err(OptionError::Duplicate { flag, role });
                }
            }
            Ok(out)
        };
    o.quota_guarantees = per_role("--quota", &policy.quotas)?;
    o.quota_limits = per_role("--quota-limit", &policy.quota_limits)?;
    let most =
        [o.role_weights.len(), o.role_priorities.len(), o.quota_guarantees.len(), o.quota_limits.len()];
    if let Some(&n) = most.iter().max().filter(|n| **n > MAX_POLICY_ROLES) {
        return Err(OptionError::TooManyRoles { count: n });
    }
    Ok(o)
}

/// `options`' policy in the flags' spelling (what [`policy_options`] reads back).
pub fn policy_of(options: &AllocatorOptions) -> agora_sdk::proto::AllocationPolicy {
    let join = |it: Vec<String>| it.join(",");
    agora_sdk::proto::AllocationPolicy {
        weights: join(options.role_weights.iter().map(|(r, w)| format!("{r}={w}")).collect()),
        priorities: join(options.role_priorities.iter().map(|(r, p)| format!("{r}={p}")).collect()),
        quotas: options.quota_guarantees.iter().map(|(r, q)| format!("{r}={q}")).collect(),
        quota_limits: options.quota_limits.iter().map(|(r, q)| format!("{r}={q}")).collect(),
    }
}

/// Parses `--min-allocatable cpus:0.01|mem:32MiB` (alternatives separated by `|`, each a
/// resource set that must fit).
pub fn parse_min_allocatable(text: &str) -> Result<Vec<Resources>, OptionError> {
    let mut out = Vec::new();
    for alt in text.split('|').map(str::trim).filter(|a| !a.is_empty()) {
        let r = Resources::parse(alt)
            .map_err(|e| OptionError::MinAllocatable { value: text.to_string(), why: e.to_string() })?;
        if !r.reserved.is_empty() || !r.ports.is_empty() || r.is_empty() {
            return Err(OptionError::MinAllocatable {
                value: text.to_string(),
                why: format!("`{alt}` must name plain non-zero scalar quantities"),
            });
        }
        out.push(r);
    }
    Ok(out)
}
