//! The simulator of the integration tests: the crate's shared harness
//! (`agora_master::testing`, behind the `testing` feature).

#![allow(unused_imports)]

pub use agora_master::testing::*;
