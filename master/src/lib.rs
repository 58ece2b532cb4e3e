//! # agora-master
//!
//! The master: a sans-IO [`core`] state machine with a pluggable [`allocator`], and the QUIC
//! [`server`] that moves bytes between peers and the core, with the content-addressed
//! [`artifacts`] store (copied between masters by [`replication`]). Everything a peer sends is
//! checked by [`validate`] before the core acts on it.

pub mod acl;
pub mod allocator;
pub mod artifacts;
pub mod core;
pub mod ha;
pub mod http;
pub mod limits;
pub mod metrics;
mod quick;
pub mod registry;
pub mod replication;
pub mod revocation;
pub mod server;
mod state;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod validate;
