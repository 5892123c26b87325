//! Builds the eBPF object (`monitor-ebpf`, for bpfel-unknown-none with nightly and bpf-linker)
//! into OUT_DIR so the daemon can embed it; `cargo xtask setup` installs what this needs.

use std::path::PathBuf;

use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR")
            .ok_or_else(|| anyhow!("CARGO_MANIFEST_DIR unset"))?,
    );
    let ebpf_dir = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("monitor crate has no parent directory"))?
        .join("monitor-ebpf");
    let root_dir = ebpf_dir
        .to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", ebpf_dir.display()))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "monitor-ebpf",
            root_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .context(
        "building the eBPF object failed; run `cargo xtask setup` (nightly rust-src and \
         bpf-linker built against LLVM 22 are needed)",
    )
}
