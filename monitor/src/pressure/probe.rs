//! What this kernel and machine offer, and which signal tier `auto` picks from that.
//! Probing does I/O; the choice itself ([`choose_tier`]) is a pure function.

use std::path::Path;

use serde::Serialize;

use super::Tier;
use crate::cgroup::{CGROUP2_ROOT, CgroupTarget, is_cgroup2};
use crate::cli::SignalChoice;
use crate::tracefs::TraceFs;

/// Everything `doctor` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Capabilities {
    pub kernel_release: String,
    /// Kernel BTF (`/sys/kernel/btf/vmlinux`); not required, reported for kernel developers.
    pub btf: bool,
    /// `net.core.bpf_jit_enable` (None: no JIT configured). Programs run either way.
    pub bpf_jit_enable: Option<u32>,
    /// Where tracefs is mounted, if anywhere.
    pub tracefs: Option<String>,
    /// Each tracepoint the programs use, and whether this kernel has it.
    pub tracepoints: Vec<TracepointPresence>,
    /// BPF ring buffer maps (kernel ≥ 5.8).
    pub ringbuf: bool,
    /// Whether this process could load a tracepoint program (privileges, kernel config).
    pub can_load_bpf: bool,
    /// Why loading is impossible, when it is.
    pub bpf_error: Option<String>,
    /// `/sys/fs/cgroup` is cgroup v2.
    pub cgroup2: bool,
    /// The v2 root offers the memory controller.
    pub memory_controller: bool,
    /// `/proc/pressure/memory` exists (PSI enabled).
    pub psi: bool,
    /// The watched cgroup, when one was named.
    pub cgroup: Option<CgroupStatus>,
    /// `kernel.perf_event_paranoid`. Debian's kernels add a level 3 (their default) at which
    /// attaching to a tracepoint needs CAP_SYS_ADMIN; at 2 (the upstream default) CAP_PERFMON
    /// is enough.
    pub perf_event_paranoid: Option<i32>,
    /// This process's uid, capabilities, no_new_privs and OOM score adjustment.
    pub process: Option<crate::privileges::ProcessPrivileges>,
    /// What `--signal auto` would pick, and why.
    pub auto_tier: Option<Tier>,
    pub auto_reason: String,
}

/// A tracepoint and whether it exists.
#[derive(Clone, Debug, Serialize)]
pub struct TracepointPresence {
    pub name: String,
    pub present: bool,
}

/// The watched cgroup.
#[derive(Clone, Debug, Serialize)]
pub struct CgroupStatus {
    pub name: String,
    /// Resolution error, if it could not be found.
    pub error: Option<String>,
    pub id: Option<u64>,
    pub memory_files: bool,
    pub memory_pressure_file: bool,
}

/// The facts tier selection depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TierInputs {
    pub can_load_bpf: bool,
    pub ringbuf: bool,
    pub memcg_reclaim_tracepoints: bool,
    /// The watched cgroup exists on cgroup v2 with its memory files.
    pub cgroup_memory: bool,
    /// The watched cgroup has `memory.pressure` (PSI).
    pub cgroup_psi: bool,
}

impl Capabilities {
    /// The facts tier selection needs.
    pub fn tier_inputs(&self) -> TierInputs {
        let has = |n: &str| self.tracepoints.iter().any(|t| t.name == n && t.present);
        let cg = self.cgroup.as_ref();
        TierInputs {
            can_load_bpf: self.can_load_bpf,
            ringbuf: self.ringbuf,
            memcg_reclaim_tracepoints: has("vmscan:mm_vmscan_memcg_reclaim_begin")
                && has("vmscan:mm_vmscan_memcg_reclaim_end"),
            cgroup_memory: self.cgroup2 && cg.is_some_and(|c| c.memory_files),
            cgroup_psi: self.cgroup2 && cg.is_some_and(|c| c.memory_pressure_file),
        }
    }
}

/// Picks the tier for `choice`: `auto` takes the best available; an explicit choice is checked
/// and refused with the reason when this machine cannot provide it.
pub fn choose_tier(inputs: TierInputs, choice: SignalChoice) -> Result<(Tier, String), String> {
    let ebpf = if !inputs.cgroup_memory {
        Err("the watched cgroup is not a cgroup v2 group with the memory controller")
    } else if !inputs.can_load_bpf {
        Err("this process cannot load BPF programs (needs root or CAP_BPF+CAP_PERFMON)")
    } else if !inputs.ringbuf {
        Err("the kernel has no BPF ring buffer (needs ≥ 5.8)")
    } else if !inputs.memcg_reclaim_tracepoints {
        Err("the kernel lacks the vmscan memcg reclaim tracepoints")
    } else {
        Ok(())
    };
    let psi = if !inputs.cgroup_memory {
        Err("the watched cgroup is not a cgroup v2 group with the memory controller")
    } else if !inputs.cgroup_psi {
        Err("the cgroup has no memory.pressure (PSI disabled: boot with psi=1)")
    } else {
        Ok(())
    };
    let poll = if inputs.cgroup_memory {
        Ok(())
    } else {
        Err("the watched cgroup is not a cgroup v2 group with the memory controller")
    };
    match choice {
        SignalChoice::Ebpf => ebpf
            .map(|()| (Tier::Ebpf, "requested with --signal ebpf".into()))
            .map_err(|e| format!("--signal ebpf is not possible: {e}")),
        SignalChoice::Psi => psi
            .map(|()| (Tier::Psi, "requested with --signal psi".into()))
            .map_err(|e| format!("--signal psi is not possible: {e}")),
        SignalChoice::Poll => poll
            .map(|()| (Tier::Poll, "requested with --signal poll".into()))
            .map_err(|e| format!("--signal poll is not possible: {e}")),
        SignalChoice::Auto => match (ebpf, psi, poll) {
            (Ok(()), _, _) => Ok((
                Tier::Ebpf,
                "eBPF tracepoints and ring buffer available".into(),
            )),
            (Err(e), Ok(()), _) => Ok((Tier::Psi, format!("no eBPF: {e}; using PSI triggers"))),
            (Err(e), Err(p), Ok(())) => Ok((
                Tier::Poll,
                format!("no eBPF: {e}; no PSI: {p}; polling memory.stat every 100 ms"),
            )),
            (Err(_), Err(_), Err(e)) => Err(format!("no signal source: {e}")),
        },
    }
}

/// Probes the running system. `cgroup` is the watched cgroup's name, if any.
pub fn probe(cgroup: Option<&str>) -> Capabilities {
    let tracefs = TraceFs::locate().ok();
    let tracepoints = monitor_ebpf::TRACEPOINTS
        .iter()
        .map(|(_, cat, ev)| TracepointPresence {
            name: format!("{cat}:{ev}"),
            present: tracefs.as_ref().is_some_and(|t| t.has_event(cat, ev)),
        })
        .collect();
    let ringbuf = aya::sys::is_map_supported(aya::maps::MapType::RingBuf).unwrap_or(false);
    let (can_load_bpf, bpf_error) =
        match aya::sys::is_program_supported(aya::programs::ProgramType::TracePoint) {
            Ok(true) => (true, None),
            Ok(false) => (
                false,
                Some("tracepoint programs are not supported".to_string()),
            ),
            Err(err) => (false, Some(format!("{err}"))),
        };
    let cgroup2 = is_cgroup2(Path::new(CGROUP2_ROOT)).unwrap_or(false);
    let memory_controller = cgroup2
        && std::fs::read_to_string(Path::new(CGROUP2_ROOT).join("cgroup.controllers"))
            .map(|s| s.split_whitespace().any(|c| c == "memory"))
            .unwrap_or(false);
    let cgroup = cgroup.map(|name| match CgroupTarget::resolve(name) {
        Ok(t) => CgroupStatus {
            name: t.name.clone(),
            error: None,
            id: Some(t.id),
            memory_files: t.has_memory_controller(),
            memory_pressure_file: t.path.join("memory.pressure").exists(),
        },
        Err(err) => CgroupStatus {
            name: name.to_string(),
            error: Some(format!("{err:#}")),
            id: None,
            memory_files: false,
            memory_pressure_file: false,
        },
    });
    let mut caps = Capabilities {
        kernel_release: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        bpf_jit_enable: std::fs::read_to_string("/proc/sys/net/core/bpf_jit_enable")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        tracefs: tracefs.map(|t| t.root().display().to_string()),
        tracepoints,
        ringbuf,
        can_load_bpf,
        bpf_error,
        cgroup2,
        memory_controller,
        psi: Path::new("/proc/pressure/memory").exists(),
        cgroup,
        perf_event_paranoid: std::fs::read_to_string("/proc/sys/kernel/perf_event_paranoid")
            .ok()
            .and_then(|s| s.trim().parse().ok()),
        process: crate::privileges::current().ok(),
        auto_tier: None,
        auto_reason: String::new(),
    };
    match (
        &caps.cgroup,
        choose_tier(caps.tier_inputs(), SignalChoice::Auto),
    ) {
        (None, _) => {
            caps.auto_reason = "no --cgroup given: only the protocol is served".into();
        }
        (Some(_), Ok((tier, reason))) => {
            caps.auto_tier = Some(tier);
            caps.auto_reason = reason;
        }
        (Some(_), Err(reason)) => caps.auto_reason = reason,
    }
    caps
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> TierInputs {
        TierInputs {
            can_load_bpf: true,
            ringbuf: true,
            memcg_reclaim_tracepoints: true,
            cgroup_memory: true,
            cgroup_psi: true,
        }
    }

    #[test]
    fn auto_prefers_ebpf_then_psi_then_poll() {
        assert_eq!(
            choose_tier(all(), SignalChoice::Auto).unwrap().0,
            Tier::Ebpf
        );
        let no_bpf = TierInputs {
            can_load_bpf: false,
            ..all()
        };
        let (tier, why) = choose_tier(no_bpf, SignalChoice::Auto).unwrap();
        assert_eq!(tier, Tier::Psi);
        assert!(why.contains("cannot load BPF"), "{why}");
        let old_kernel = TierInputs {
            ringbuf: false,
            cgroup_psi: false,
            ..all()
        };
        let (tier, why) = choose_tier(old_kernel, SignalChoice::Auto).unwrap();
        assert_eq!(tier, Tier::Poll);
        assert!(why.contains("ring buffer") && why.contains("PSI"), "{why}");
        let no_tp = TierInputs {
            memcg_reclaim_tracepoints: false,
            ..all()
        };
        assert_eq!(choose_tier(no_tp, SignalChoice::Auto).unwrap().0, Tier::Psi);
    }

    #[test]
    fn nothing_without_a_v2_memory_cgroup() {
        let v1 = TierInputs {
            cgroup_memory: false,
            ..all()
        };
        for choice in [
            SignalChoice::Auto,
            SignalChoice::Ebpf,
            SignalChoice::Psi,
            SignalChoice::Poll,
        ] {
            let err = choose_tier(v1, choice).unwrap_err();
            assert!(err.contains("cgroup v2"), "{choice:?}: {err}");
        }
    }

    #[test]
    fn explicit_choices_are_checked_not_silently_replaced() {
        let no_bpf = TierInputs {
            can_load_bpf: false,
            ..all()
        };
        let err = choose_tier(no_bpf, SignalChoice::Ebpf).unwrap_err();
        assert!(err.starts_with("--signal ebpf is not possible"), "{err}");
        let no_psi = TierInputs {
            cgroup_psi: false,
            ..all()
        };
        assert!(choose_tier(no_psi, SignalChoice::Psi).is_err());
        assert_eq!(
            choose_tier(no_psi, SignalChoice::Poll).unwrap().0,
            Tier::Poll
        );
        assert_eq!(
            choose_tier(all(), SignalChoice::Poll).unwrap().0,
            Tier::Poll
        );
        assert_eq!(choose_tier(all(), SignalChoice::Psi).unwrap().0, Tier::Psi);
    }
}
