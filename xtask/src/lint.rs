//! `cargo xtask lint`: formatting and clippy for the host crates and, separately, the eBPF crate
//! (which only builds for the BPF target with nightly).

use anyhow::{Result, bail};

use crate::cmd::{self, step};
use crate::ebpf;
use crate::setup::Setup;

/// Runs every check, even after one fails, so one run reports all problems.
pub(crate) fn run(setup: &mut Setup) -> Result<()> {
    // monitor's build script builds the eBPF object, so host clippy needs the eBPF toolchain too.
    setup.ebpf_toolchain()?;
    let root = &setup.paths.root;
    let mut failed = Vec::new();

    step("rustfmt check (all crates)");
    if let Err(err) = cmd::run(
        cmd::cargo()
            .current_dir(root)
            .args(["fmt", "--all", "--", "--check"]),
    ) {
        eprintln!("error: {err:#}");
        failed.push("rustfmt (run `cargo fmt --all`)");
    }

    step("clippy on the host crates");
    if let Err(err) = cmd::run(cmd::cargo().current_dir(root).args([
        "clippy",
        "--workspace",
        "--exclude",
        "monitor-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])) {
        eprintln!("error: {err:#}");
        failed.push("clippy on the host crates");
    }

    step("clippy on the eBPF crate (nightly, bpfel-unknown-none)");
    if let Err(err) = cmd::run(
        ebpf::nightly_cargo(setup, "clippy")
            .arg("--release")
            .args(["--", "-D", "warnings"]),
    ) {
        eprintln!("error: {err:#}");
        failed.push("clippy on the eBPF crate");
    }

    if !failed.is_empty() {
        bail!("lint failed: {}", failed.join(", "));
    }
    Ok(())
}
