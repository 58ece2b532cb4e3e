//! # agora-sdk
//!
//! Everything a program needs to talk to an Agora cluster: the wire protocol ([`proto`]) and its
//! framing ([`frame`]), resources and attributes, the TLS/QUIC transport, client configuration,
//! the [`scheduler`] API for writing frameworks and the [`executor`] API for writing executors.

pub mod artifacts;
pub mod attributes;
pub mod client;
pub mod config;
pub mod executor;
pub mod executor_link;
pub mod executor_proto;
pub mod frame;
pub mod json;
pub mod locality;
pub mod masters;
pub mod proto;
pub mod reason;
pub mod resources;
pub mod scheduler;
pub mod tls;
pub mod transport;
pub mod units;

pub use attributes::{AttrValue, Attributes};
pub use proto::*;
pub use resources::Resources;
