//! `cargo xtask build-ebpf`: the eBPF object, built exactly as aya-build builds it for the daemon.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, ensure};

use crate::cmd::{self, step};
use crate::setup::Setup;

/// The eBPF crate and its program binary.
const EBPF_PACKAGE: &str = "monitor-ebpf";
const EBPF_BIN: &str = "vm-monitor-ebpf";
const TARGET: &str = "bpfel-unknown-none";

/// `rustup run nightly cargo <subcommand>` for the BPF target, with aya-build's rustflags and
/// none of the outer (stable) cargo's compiler overrides leaking in.
pub(crate) fn nightly_cargo(setup: &Setup, subcommand: &str) -> Command {
    let mut cargo = Command::new("rustup");
    cargo
        .current_dir(&setup.paths.root)
        .args(["run", "nightly", "cargo", subcommand])
        .args(["--package", EBPF_PACKAGE, "--target", TARGET])
        .args(["-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(setup.paths.target.join("ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            [
                r#"--cfg=bpf_target_arch="x86_64""#,
                "-Cdebuginfo=2",
                "-Clink-arg=--btf",
            ]
            .join("\x1f"),
        );
    for var in [
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_BUILD_RUSTFLAGS",
        "CARGO_TARGET_DIR",
    ] {
        cargo.env_remove(var);
    }
    cargo
}

/// Builds the object and returns its path.
pub(crate) fn build(setup: &mut Setup) -> Result<PathBuf> {
    setup.ebpf_toolchain()?;
    step(format!(
        "building the eBPF object ({EBPF_PACKAGE}, {TARGET}, nightly)"
    ));
    cmd::run(nightly_cargo(setup, "build").args(["--bins", "--release"]))
        .context("building the eBPF programs")?;
    let object = setup
        .paths
        .target
        .join("ebpf")
        .join(TARGET)
        .join("release")
        .join(EBPF_BIN);
    ensure!(
        object.is_file(),
        "the build succeeded but {} is missing",
        object.display()
    );
    step(format!("eBPF object: {}", object.display()));
    Ok(object)
}
