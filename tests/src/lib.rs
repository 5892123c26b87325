//! Test support for vm-monitor: a faithful fake autoscaler-agent ([`agent`]), a bare websocket
//! client for malformed traffic ([`raw`]) and a runner for the real daemon binary ([`daemon`]).

pub mod agent;
pub mod daemon;
pub mod raw;

pub use agent::{AgentConfig, Alloc, ConnEnd, DownscaleReport, FakeAgent, Timings, Transcript};
pub use daemon::Daemon;
pub use raw::RawClient;
