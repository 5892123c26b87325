//! vm-monitor: an event-driven memory-pressure monitor for autoscaled Postgres VMs, wire
//! compatible with Neon's vm-monitor.
//!
//! Data flows one way: kernel → [`pressure`] stream → engine → policy → actions (websocket
//! [`server`]/[`session`], cgroup, Postgres).

pub mod admission;
pub mod backend;
pub mod cgroup;
pub mod cli;
pub mod daemon;
pub mod decisions;
pub mod doctor;
pub mod engine;
pub mod export;
pub mod filecache;
pub mod logging;
pub mod memstat;
pub mod metrics;
pub mod plot;
pub mod policy;
pub mod pressure;
pub mod privileges;
pub mod protocol;
pub mod record;
pub mod replay;
pub mod server;
pub mod session;
pub mod trace;
pub mod tracefs;
