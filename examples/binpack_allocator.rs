//! An allocation module written outside the master crate: **bin packing**. It offers the
//! fullest agents first, so load concentrates on few agents and the others stay empty (for
//! large tasks, or to be powered down). Frameworks are served first come, first served; a
//! framework with a stated demand gets its tasks placed first-fit on the fullest agents, one
//! without gets one whole agent (the fullest) per cycle.
//!
//! It is registered by name the way the built-ins are, in a [`Registry`], and a master is
//! started with it:
//!
//! ```text
//! agora tls init --dir tls
//! cargo run --example binpack_allocator -- --tls-dir tls --listen 127.0.0.1:5050
//! agora agent --master 127.0.0.1:5050 --tls-dir tls --resources "cpus:4;mem:8GiB"
//! ```
//!
//! `master/tests/binpack_example.rs` drives it on the sans-IO core.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use agora_master::allocator::{
    Allocation, Allocator, AllocatorOptions, Candidate, Eligibility, Registry, RegistryError,
};
use agora_sdk::proto::{AgentId, Demand, FrameworkId};
use agora_sdk::Resources;

/// The name it is registered under.
pub const NAME: &str = "binpack";

/// Adds the bin-packing allocator to `registry` as [`NAME`].
pub fn register(registry: &mut Registry) -> Result<(), RegistryError> {
    registry.register(NAME, |_options: &AllocatorOptions| Box::new(BinPack::default()))
}

#[derive(Debug)]
struct Fw {
    id: FrameworkId,
    role: String,
    active: bool,
    suppressed: bool,
    /// Pending tasks by shape; `None`: no stated demand.
    demand: Option<Vec<(Resources, u32)>>,
}

/// Bin packing: fullest agents first, frameworks first come, first served.
///
/// It keeps whole allocation cycles (it does not override [`Allocator::sliced`]): "the
/// fullest agent" and "one agent per framework per cycle" are about all of a cycle's agents,
/// which a slice of them would not see. The price: the master answers nobody while it packs.
#[derive(Debug, Default)]
pub struct BinPack {
    totals: HashMap<AgentId, Resources>,
    /// By subscription order.
    frameworks: BTreeMap<u64, Fw>,
    seq_of: HashMap<FrameworkId, u64>,
    next_seq: u64,
}

impl BinPack {
    fn fw_mut(&mut self, id: &FrameworkId) -> Option<&mut Fw> {
        let seq = self.seq_of.get(id)?;
        self.frameworks.get_mut(seq)
    }

    /// How free an agent is: the largest fraction of its total still available.
    fn freeness(&self, c: &Candidate<'_>) -> f64 {
        self.totals.get(c.agent).map_or(1.0, |t| c.available.dominant_share(t))
    }
}

impl Allocator for BinPack {
    fn name(&self) -> &str {
        NAME
    }

    fn add_framework(&mut self, framework: &FrameworkId, role: &str) {
        if self.seq_of.contains_key(framework) {
            return;
        }
        self.next_seq += 1;
        self.seq_of.insert(framework.clone(), self.next_seq);
        let fw =
            Fw { id: framework.clone(), role: role.into(), active: true, suppressed: false, demand: None };
        self.frameworks.insert(self.next_seq, fw);
    }

    fn remove_framework(&mut self, framework: &FrameworkId) {
        if let Some(seq) = self.seq_of.remove(framework) {
            self.frameworks.remove(&seq);
        }
    }

    fn activate_framework(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.fw_mut(framework) {
            f.active = true;
        }
    }

    fn deactivate_framework(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.fw_mut(framework) {
            f.active = false;
        }
    }

    fn suppress(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.fw_mut(framework) {
            f.suppressed = true;
        }
    }

    fn revive(&mut self, framework: &FrameworkId) {
        if let Some(f) = self.fw_mut(framework) {
            f.suppressed = false;
        }
    }

    fn set_demand(&mut self, framework: &FrameworkId, demands: &[Demand]) {
        if let Some(f) = self.fw_mut(framework) {
            f.demand = Some(demands.iter().map(|d| (d.resources.flatten(), d.count)).collect());
        }
    }

    fn add_agent(&mut self, agent: &AgentId, total: &Resources) {
        self.totals.insert(agent.clone(), total.clone());
    }

    fn remove_agent(&mut self, agent: &AgentId) {
        self.totals.remove(agent);
    }

    // Bin packing looks at what is free now, not at who holds what.
    fn allocated(&mut self, _framework: &FrameworkId, _agent: &AgentId, _resources: &Resources) {}

    fn recover(&mut self, _framework: &FrameworkId, _agent: &AgentId, _resources: &Resources) {}

    fn allocate(
        &mut self,
        _now: Instant,
        candidates: &[Candidate<'_>],
        eligible: &Eligibility<'_>,
    ) -> Vec<Allocation> {
        // Fullest first (least free), ties by agent id.
        let mut order: Vec<(f64, usize)> =
            candidates.iter().enumerate().map(|(i, c)| (self.freeness(c), i)).collect();
        order.sort_by(|a, b| {
            a.0.total_cmp(&b.0).then_with(|| candidates[a.1].agent.cmp(candidates[b.1].agent))
        });
        let mut remaining: Vec<Resources> = candidates.iter().map(|c| c.available.clone()).collect();
        let mut out: Vec<Allocation> = Vec::new();
        let give = |fw: &FrameworkId, i: usize, r: Resources, out: &mut Vec<Allocation>| {
            let agent = candidates[i].agent;
            match out.iter_mut().find(|a| a.framework == *fw && a.agent == *agent) {
                Some(a) => a.resources.add_assign(&r),
                None => out.push(Allocation { framework: fw.clone(), agent: agent.clone(), resources: r }),
            }
        };
        for f in self.frameworks.values_mut().filter(|f| f.active && !f.suppressed) {
            match f.demand.as_mut() {
                None => {
                    // One whole agent: the fullest one it may use.
                    let pick = order.iter().map(|(_, i)| *i).find(|i| {
                        let r = remaining[*i].for_role(&f.role);
                        !r.is_empty() && eligible(&f.id, candidates[*i].agent, &r)
                    });
                    if let Some(i) = pick {
                        let r = remaining[i].for_role(&f.role);
                        remaining[i] = remaining[i].saturating_sub(&r);
                        give(&f.id, i, r, &mut out);
                    }
                }
                Some(demand) => {
                    // First fit, task by task, on the fullest agents.
                    for (shape, count) in demand.iter_mut() {
                        while *count > 0 {
                            let fit = order.iter().map(|(_, i)| *i).find_map(|i| {
                                let usable = remaining[i].for_role(&f.role);
                                let slice = usable.take_for_role(&f.role, shape)?;
                                eligible(&f.id, candidates[i].agent, &usable).then_some((i, slice))
                            });
                            let Some((i, slice)) = fit else { break };
                            remaining[i] = remaining[i].saturating_sub(&slice);
                            *count -= 1;
                            give(&f.id, i, slice, &mut out);
                        }
                    }
                }
            }
        }
        out
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    use agora_master::core::MasterConfig;
    use agora_master::server::{self, ServerConfig};
    use agora_sdk::tls::TlsFiles;

    let args: Vec<String> = std::env::args().skip(1).collect();
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let Some(tls_dir) = value("--tls-dir") else {
        eprintln!("usage: binpack_allocator --tls-dir DIR [--listen ADDR]");
        std::process::exit(2);
    };
    let listen = value("--listen").unwrap_or_else(|| "127.0.0.1:5050".into()).parse()?;
    let mut registry = Registry::builtin();
    register(&mut registry)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let config = ServerConfig {
        listen,
        tls: TlsFiles::in_dir(std::path::Path::new(&tls_dir), "master"),
        core: MasterConfig::default(),
        allocator: NAME.into(),
        work_dir: std::env::temp_dir().join(format!("agora-binpack-master-{}", std::process::id())),
        max_artifact_size: agora_master::artifacts::DEFAULT_MAX_ARTIFACT_SIZE,
        eviction: agora_master::artifacts::EvictionConfig::default(),
        limits: Default::default(),
    };
    let handle = server::spawn_with_registry(config, &registry, shutdown.clone())?;
    eprintln!(
        "master with the `{NAME}` allocator on {} (known: {})",
        handle.addr,
        registry.names().join(", ")
    );
    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    Ok(())
}
