//! Least privilege for the daemon: protect it from the OOM killer (it reports the very pressure
//! that summons the killer), and once the programs are attached and every privileged file is
//! open, drop every capability and forbid regaining any (no_new_privs).
//!
//! Nothing privileged is left to do by then: the ring buffer, the maps (counters, the
//! growth-hint threshold), the programs (their statistics), the PSI trigger and the
//! memory.events watch are open fds, and since Linux 5.19 `kernel.unprivileged_bpf_disabled`
//! only restricts creating BPF objects, not using the fds one holds. The cgroup files are
//! written through their owner's permission bits (the daemon runs as the owner: root, or the
//! user the cgroup was delegated to), so not even CAP_DAC_OVERRIDE is kept.

use std::fmt;

use anyhow::Context as _;
use caps::{CapSet, Capability, CapsHashSet};
use serde::Serialize;
use tracing::{info, warn};

/// The capabilities each tier needs to *start* (load, attach, register); none is needed once
/// started.
pub fn needed_to_start(tier: crate::pressure::Tier) -> &'static [Capability] {
    match tier {
        // CAP_DAC_READ_SEARCH: tracepoint ids are in tracefs, which only root may read.
        crate::pressure::Tier::Ebpf => &[
            Capability::CAP_BPF,
            Capability::CAP_PERFMON,
            Capability::CAP_DAC_READ_SEARCH,
        ],
        // Without CAP_SYS_RESOURCE the kernel (since 6.5, and stable kernels with the change
        // backported) accepts only PSI windows that are multiples of 2 s; the psi tier then
        // uses a 2 s window (see pressure::psi).
        crate::pressure::Tier::Psi | crate::pressure::Tier::Poll => &[],
    }
}

/// The process's privileges as `doctor` and the start-up log report them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProcessPrivileges {
    pub uid: u32,
    /// Effective capabilities, by name (`CAP_BPF`, ...), sorted.
    pub effective: Vec<String>,
    /// Whether every capability is effective (what root normally has).
    pub all_capabilities: bool,
    pub no_new_privs: bool,
    /// `/proc/self/oom_score_adj`.
    pub oom_score_adj: Option<i32>,
}

impl fmt::Display for ProcessPrivileges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let caps = if self.all_capabilities {
            "all".to_owned()
        } else if self.effective.is_empty() {
            "none".to_owned()
        } else {
            self.effective.join(",")
        };
        write!(
            f,
            "uid {}, capabilities {caps}, no_new_privs {}",
            self.uid, self.no_new_privs
        )?;
        if let Some(adj) = self.oom_score_adj {
            write!(f, ", oom_score_adj {adj}")?;
        }
        Ok(())
    }
}

/// Reads this process's privileges from `/proc/self/status` and `/proc/self/oom_score_adj`.
pub fn current() -> anyhow::Result<ProcessPrivileges> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let oom = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok());
    let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        .context("reading /proc/sys/kernel/cap_last_cap")?
        .trim()
        .parse()
        .context("parsing /proc/sys/kernel/cap_last_cap")?;
    parse_status(&status, last_cap, oom)
}

/// Parses the `Uid`, `CapEff` and `NoNewPrivs` lines of a `/proc/PID/status`; `last_cap` is the
/// kernel's highest capability number (`/proc/sys/kernel/cap_last_cap`).
pub fn parse_status(
    status: &str,
    last_cap: u8,
    oom_score_adj: Option<i32>,
) -> anyhow::Result<ProcessPrivileges> {
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .map(str::trim)
            .with_context(|| format!("no {name} line in the process status"))
    };
    let uid = field("Uid")?
        .split_whitespace()
        .nth(1)
        .context("the Uid line has no effective uid")?
        .parse()
        .context("parsing the effective uid")?;
    let mask = u64::from_str_radix(field("CapEff")?, 16).context("parsing CapEff")?;
    let no_new_privs = field("NoNewPrivs").map(|v| v == "1").unwrap_or(false);
    let known = caps::all();
    let all_capabilities = known
        .iter()
        .filter(|c| c.index() <= last_cap)
        .all(|c| mask & c.bitmask() != 0);
    let mut effective: Vec<String> = known
        .iter()
        .filter(|c| mask & c.bitmask() != 0)
        .map(|c| c.to_string())
        .collect();
    effective.sort();
    Ok(ProcessPrivileges {
        uid,
        effective,
        all_capabilities,
        no_new_privs,
        oom_score_adj,
    })
}

/// Threads of this process whose effective capabilities exceed the calling thread's, by name,
/// with their `CapEff` (capabilities are per thread: one started before the drop keeps its own).
pub fn threads_holding_more() -> Vec<(String, String)> {
    let cap_eff = |status: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix("CapEff:"))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
    };
    let Some(mine) = std::fs::read_to_string("/proc/thread-self/status")
        .ok()
        .as_deref()
        .and_then(cap_eff)
    else {
        return Vec::new();
    };
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        if let Some(theirs) = cap_eff(&status)
            && theirs & !mine != 0
        {
            let name = status
                .lines()
                .find_map(|l| l.strip_prefix("Name:"))
                .map_or_else(String::new, |n| n.trim().to_owned());
            out.push((
                format!("{name} ({})", task.file_name().to_string_lossy()),
                format!("{theirs:016x}"),
            ));
        }
    }
    out
}

/// Sets `/proc/self/oom_score_adj`. Lowering it needs CAP_SYS_RESOURCE; without it the kernel
/// refuses and the daemon goes on (logged), as killable as any process.
pub fn set_oom_score_adj(adj: i32) {
    match std::fs::write("/proc/self/oom_score_adj", adj.to_string()) {
        Ok(()) => info!(oom_score_adj = adj, "OOM score adjusted"),
        Err(err) => warn!(
            oom_score_adj = adj,
            error = %err,
            "cannot adjust the OOM score (lowering it needs CAP_SYS_RESOURCE); the kernel may pick this daemon under memory pressure"
        ),
    }
}

/// Drops every capability from all sets (bounding and ambient included when the process may
/// change them, so not even an exec as root gets them back) and sets no_new_privs.
pub fn drop_all_after_start() -> anyhow::Result<()> {
    let none = CapsHashSet::new();
    let permitted = caps::read(None, CapSet::Permitted).context("reading the permitted set")?;
    // The bounding set first: dropping from it needs CAP_SETPCAP, which goes below. Without it
    // (a non-root daemon) the service manager's bounding set stays, and no_new_privs makes it
    // moot: nothing can be gained through exec.
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::all() {
            if caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap)
                    .with_context(|| format!("dropping {cap} from the bounding set"))?;
            }
        }
    }
    caps::clear(None, CapSet::Ambient).context("clearing the ambient set")?;
    caps::set(None, CapSet::Inheritable, &none).context("clearing the inheritable set")?;
    caps::set(None, CapSet::Effective, &none).context("clearing the effective set")?;
    caps::set(None, CapSet::Permitted, &none).context("clearing the permitted set")?;
    // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integer arguments only and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("prctl(PR_SET_NO_NEW_PRIVS)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROOT: &str = "Name:\tvm-monitor\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n\
        CapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n\
        CapBnd:\t000001ffffffffff\nCapAmb:\t0000000000000000\nNoNewPrivs:\t0\n";

    #[test]
    fn root_has_every_capability() {
        let p = parse_status(ROOT, 40, Some(0)).unwrap();
        assert_eq!(p.uid, 0);
        assert!(p.all_capabilities);
        assert!(!p.no_new_privs);
        assert!(p.to_string().contains("capabilities all"));
    }

    #[test]
    fn a_dropped_daemon_shows_only_cap_bpf() {
        let bpf = Capability::CAP_BPF.bitmask();
        let status = format!("Uid:\t0\t0\t0\t0\nCapEff:\t{bpf:016x}\nNoNewPrivs:\t1\n");
        let p = parse_status(&status, 40, Some(-900)).unwrap();
        assert_eq!(p.effective, vec!["CAP_BPF".to_string()]);
        assert!(!p.all_capabilities && p.no_new_privs);
        assert_eq!(
            p.to_string(),
            "uid 0, capabilities CAP_BPF, no_new_privs true, oom_score_adj -900"
        );
    }

    #[test]
    fn malformed_status_is_an_error() {
        assert!(parse_status("Uid:\t0\t0\n", 40, None).is_err());
        assert!(parse_status("Uid:\t0\t0\t0\t0\nCapEff:\tzz\n", 40, None).is_err());
    }

    #[test]
    fn only_the_ebpf_tier_needs_capabilities_to_start() {
        use crate::pressure::Tier;
        assert!(needed_to_start(Tier::Ebpf).contains(&Capability::CAP_BPF));
        assert!(needed_to_start(Tier::Psi).is_empty() && needed_to_start(Tier::Poll).is_empty());
    }
}
