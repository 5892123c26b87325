//! Test support for vm-monitor: a faithful fake autoscaler-agent ([`agent`]), a bare websocket
//! client for malformed traffic ([`raw`]), a runner for the real daemon binary ([`daemon`]) and
//! the guest-side harness of the VM scaling scenarios and the demo ([`scenario`]).

// Test support: a failed lock or a broken fixture is a failed test, so unwrapping is fine here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod agent;
pub mod benchkit;
pub mod daemon;
pub mod hostcg;
pub mod http;
pub mod raw;
pub mod scenario;

pub use agent::{AgentConfig, Alloc, ConnEnd, DownscaleReport, FakeAgent, Timings, Transcript};
pub use daemon::Daemon;
pub use raw::RawClient;
