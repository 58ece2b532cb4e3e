//! A registry in memory: for unit tests and `agora_master::testing`, where a "restart" is a new
//! core built from the same contents.

use super::{new_cluster_name, Registry, RegistryError, RegistryOp, RegistryState};

/// A registry that lives as long as the value; clone its [`state`](Self::state) to hand it
/// to the next incarnation.
#[derive(Clone, Debug, Default)]
pub struct MemoryRegistry {
    /// The contents, as a restarted master would read them.
    pub state: RegistryState,
    /// Every operation applied, in order (tests look at what the core wrote).
    pub log: Vec<RegistryOp>,
}

impl MemoryRegistry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Registry for MemoryRegistry {
    fn open_epoch(&mut self) -> Result<RegistryState, RegistryError> {
        if self.state.cluster.is_empty() {
            self.state.cluster = new_cluster_name();
        }
        self.state.epoch += 1;
        Ok(self.state.clone())
    }

    fn apply(&mut self, ops: &[RegistryOp]) -> Result<(), RegistryError> {
        for op in ops {
            self.state.apply(op);
            self.log.push(op.clone());
        }
        Ok(())
    }

    fn location(&self) -> String {
        "memory".into()
    }
}
