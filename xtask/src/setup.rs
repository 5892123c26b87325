//! `cargo xtask setup`: installs what the build and the tests need, skipping what is present.
//!
//! Every step checks first and acts only when something is missing, so other commands call
//! the steps they depend on unconditionally.

use std::collections::BTreeMap;
use std::env;
use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail, ensure};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::cmd::{self, find_program, info, present, step};

/// Packages the eBPF build needs (bpf-linker links against LLVM 22).
pub(crate) const APT_EBPF: &[&str] = &["llvm-22-dev"];
/// Packages the VM runs need: qemu, depmod for the unpacked kernels, busybox for virtme's initramfs.
pub(crate) const APT_VM: &[&str] = &["qemu-system-x86", "kmod", "busybox-static"];
/// Packages the file-cache tests need (a private cluster and a PGXS test extension).
pub(crate) const APT_POSTGRES: &[&str] = &["postgresql", "postgresql-server-dev-15"];

const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
const BPF_LINKER_VERSION: &str = "0.13.0";
const VIRTME_NG_VERSION: &str = "1.42";
/// Where root's tools live when PATH lacks the sbin directories.
const SBIN: &[&str] = &["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// The kernel lines the VM tests run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize, Deserialize)]
pub(crate) enum KernelLine {
    /// Debian 12's default kernel.
    #[value(name = "6.1")]
    #[serde(rename = "6.1")]
    V6_1,
    /// Debian 12's backported 6.12, the line Neon's VM kernel follows.
    #[value(name = "6.12")]
    #[serde(rename = "6.12")]
    V6_12,
}

impl KernelLine {
    pub(crate) const ALL: [KernelLine; 2] = [KernelLine::V6_1, KernelLine::V6_12];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            KernelLine::V6_1 => "6.1",
            KernelLine::V6_12 => "6.12",
        }
    }
}

/// One unpacked Debian kernel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Kernel {
    /// The apt package it came from.
    pub package: String,
    /// Its release string (`uname -r` in the guest).
    pub release: String,
    /// The `dpkg -x` root holding `boot/` and `lib/modules/`.
    pub root: PathBuf,
    pub vmlinuz: PathBuf,
}

impl Kernel {
    fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.release)
    }

    /// Whether the image and the indexed modules are all still there.
    fn is_complete(&self) -> bool {
        self.vmlinuz.is_file()
            && self.modules_dir().join("modules.dep").is_file()
            && Path::new("/usr/lib/modules")
                .join(&self.release)
                .join("modules.dep")
                .is_file()
    }
}

/// Well-known locations in the workspace.
pub(crate) struct Paths {
    pub root: PathBuf,
    pub target: PathBuf,
}

impl Paths {
    /// xtask's own cache (venv, kernels).
    pub(crate) fn xtask_dir(&self) -> PathBuf {
        self.target.join("xtask")
    }
    pub(crate) fn venv(&self) -> PathBuf {
        self.xtask_dir().join("venv")
    }
    pub(crate) fn kernels_dir(&self) -> PathBuf {
        self.xtask_dir().join("kernels")
    }
    fn kernels_manifest(&self) -> PathBuf {
        self.kernels_dir().join("kernels.json")
    }
}

/// Setup state shared by the steps of one xtask invocation.
pub(crate) struct Setup {
    pub paths: Paths,
    apt_updated: bool,
}

impl Setup {
    pub(crate) fn new() -> Result<Self> {
        // xtask/ sits directly in the workspace root.
        let root = Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .context("xtask's manifest directory has no parent")?
            .to_path_buf();
        let target = target_dir(&root)?;
        Ok(Setup {
            paths: Paths { root, target },
            apt_updated: false,
        })
    }

    /// Everything: `cargo xtask setup` and the first stage of `cargo xtask test`.
    pub(crate) fn all(&mut self) -> Result<()> {
        let packages: Vec<&str> = [APT_EBPF, APT_VM, APT_POSTGRES].concat();
        self.apt_packages(&packages)?;
        self.rust_components()?;
        self.bpf_linker()?;
        self.virtme_ng()?;
        self.kernels(true)?;
        Ok(())
    }

    /// What building or linting the eBPF object needs.
    pub(crate) fn ebpf_toolchain(&mut self) -> Result<()> {
        self.apt_packages(APT_EBPF)?;
        self.rust_components()?;
        self.bpf_linker()
    }

    /// What booting a VM needs, returning the `vng` executable.
    pub(crate) fn vm_tools(&mut self) -> Result<PathBuf> {
        self.apt_packages(APT_VM)?;
        self.virtme_ng()
    }

    /// `apt-get update`, at most once per invocation (lists may be absent on a fresh machine).
    fn apt_update(&mut self) -> Result<()> {
        if !self.apt_updated {
            info("refreshing apt package lists (waits for the Debian mirrors)");
            cmd::run_logged(
                Command::new("apt-get").arg("update"),
                &self.paths.xtask_dir().join("logs/apt-update.log"),
            )
            .context("apt-get update failed (setup must run as root)")?;
            self.apt_updated = true;
        }
        Ok(())
    }

    /// Installs the Debian packages in `wanted` that are not installed yet.
    pub(crate) fn apt_packages(&mut self, wanted: &[&str]) -> Result<()> {
        step(format!("apt packages: {}", wanted.join(" ")));
        ensure!(
            find_program("dpkg-query", &[]).is_some(),
            "dpkg-query not found: setup supports Debian 12 (bookworm) only"
        );
        let missing: Vec<&str> = wanted
            .iter()
            .copied()
            .filter(|p| !dpkg_installed(p))
            .collect();
        if missing.is_empty() {
            present("all installed");
            return Ok(());
        }
        info(format!("installing {}", missing.join(" ")));
        self.apt_update()?;
        cmd::run_logged(
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y"])
                .args(&missing),
            &self.paths.xtask_dir().join("logs/apt-install.log"),
        )
        .with_context(|| format!("installing {}", missing.join(" ")))
    }

    /// Nightly rust-src (for `-Z build-std=core`) and clippy on both toolchains (for lint).
    pub(crate) fn rust_components(&mut self) -> Result<()> {
        step("rust toolchains: nightly with rust-src and clippy; stable clippy and rustfmt");
        if !cmd::succeeds(Command::new("rustup").args(["run", "nightly", "rustc", "--version"])) {
            info("no nightly toolchain: installing one (waits for the download)");
            cmd::run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
            ]))?;
        }
        for (toolchain, components) in [
            ("nightly", &["rust-src", "clippy"][..]),
            ("stable", &["clippy", "rustfmt"][..]),
        ] {
            let installed = cmd::output(Command::new("rustup").args([
                "component",
                "list",
                "--toolchain",
                toolchain,
                "--installed",
            ]))?;
            for component in components {
                // Lines are either `rust-src` or `clippy-x86_64-unknown-linux-gnu`.
                let have = installed.lines().any(|l| {
                    l == *component
                        || l.strip_prefix(component)
                            .is_some_and(|rest| rest.starts_with("-x86_64"))
                });
                if have {
                    present(format!("{toolchain} {component}"));
                } else {
                    cmd::run(Command::new("rustup").args([
                        "component",
                        "add",
                        component,
                        "--toolchain",
                        toolchain,
                    ]))?;
                }
            }
        }
        Ok(())
    }

    /// bpf-linker built against Debian's LLVM 22 (its default feature wants LLVM 23).
    pub(crate) fn bpf_linker(&mut self) -> Result<()> {
        step(format!("bpf-linker {BPF_LINKER_VERSION} (LLVM 22)"));
        let cargo_bin = cargo_home().join("bin");
        let installed = [PathBuf::from("bpf-linker"), cargo_bin.join("bpf-linker")]
            .iter()
            .find_map(|p| {
                cmd::output(Command::new(p).arg("--version"))
                    .ok()
                    .map(|v| v.trim().to_owned())
            });
        if let Some(version) = installed {
            present(version);
            return Ok(());
        }
        info("building bpf-linker from crates.io (one to two minutes)");
        cmd::run_logged(
            cmd::cargo()
                .env("PATH", cmd::path_with(&[Path::new(LLVM_BIN)])?)
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--no-default-features",
                    "--features",
                    "llvm-22",
                ]),
            &self.paths.xtask_dir().join("logs/bpf-linker.log"),
        )
        .context("building bpf-linker")?;
        if find_program("bpf-linker", &[]).is_none() {
            cmd::loud(format!(
                "bpf-linker was installed into {} which is not on PATH; add it, or the eBPF build will not find the linker",
                cargo_bin.display()
            ));
        }
        Ok(())
    }

    /// virtme-ng in a private venv; returns the `vng` executable.
    pub(crate) fn virtme_ng(&mut self) -> Result<PathBuf> {
        let venv = self.paths.venv();
        let vng = venv.join("bin/vng");
        step(format!(
            "virtme-ng {VIRTME_NG_VERSION} in {}",
            venv.display()
        ));
        if cmd::succeeds(Command::new(&vng).arg("--version")) {
            present(vng.display());
            return Ok(vng);
        }
        if !venv.join("bin/pip").is_file() {
            // `python3 -m venv` needs ensurepip, which Debian splits into python3-venv.
            if !cmd::succeeds(Command::new("python3").args(["-c", "import ensurepip, venv"])) {
                self.apt_packages(&["python3-venv"])?;
            }
            fs::create_dir_all(self.paths.xtask_dir())
                .with_context(|| format!("creating {}", self.paths.xtask_dir().display()))?;
            cmd::run(Command::new("python3").args(["-m", "venv"]).arg(&venv))
                .context("creating the virtme-ng venv")?;
        }
        info("installing virtme-ng from PyPI");
        cmd::run(
            Command::new(venv.join("bin/pip"))
                .args(["install", "--disable-pip-version-check", "--quiet"])
                .arg(format!("virtme-ng=={VIRTME_NG_VERSION}")),
        )
        .context("installing virtme-ng")?;
        ensure!(
            vng.is_file(),
            "pip installed virtme-ng but {} is missing",
            vng.display()
        );
        Ok(vng)
    }

    /// The unpacked kernel for `line`: recorded one if still complete, else set up afresh.
    pub(crate) fn kernel(&mut self, line: KernelLine) -> Result<Kernel> {
        if let Some(kernel) = read_manifest(&self.paths.kernels_manifest())
            .remove(&line)
            .filter(Kernel::is_complete)
        {
            return Ok(kernel);
        }
        self.kernels(false)?
            .remove(&line)
            .with_context(|| format!("no {} kernel after setup", line.as_str()))
    }

    /// Resolves the current Debian kernels of both lines, downloads and unpacks what is missing,
    /// and records them. With `refresh` false a complete recorded set is used without asking apt.
    pub(crate) fn kernels(&mut self, refresh: bool) -> Result<BTreeMap<KernelLine, Kernel>> {
        let manifest_path = self.paths.kernels_manifest();
        let recorded = read_manifest(&manifest_path);
        if !refresh
            && KernelLine::ALL
                .iter()
                .all(|l| recorded.get(l).is_some_and(Kernel::is_complete))
        {
            return Ok(recorded);
        }
        let mut kernels = BTreeMap::new();
        for line in KernelLine::ALL {
            let package = self.resolve_kernel_package(line)?;
            step(format!("kernel {}: {package}", line.as_str()));
            let kernel = self.unpack_kernel(&package)?;
            info(format!("vmlinuz {}", kernel.vmlinuz.display()));
            kernels.insert(line, kernel);
        }
        let json = serde_json::to_string_pretty(&kernels).context("serialising kernels")?;
        fs::write(&manifest_path, json + "\n")
            .with_context(|| format!("writing {}", manifest_path.display()))?;
        Ok(kernels)
    }

    /// The apt package name of the current kernel of `line` (refreshing apt lists once if the
    /// local lists do not name one, as on a fresh machine).
    fn resolve_kernel_package(&mut self, line: KernelLine) -> Result<String> {
        loop {
            let found = match line {
                KernelLine::V6_1 => {
                    // The metapackage points at the current ABI, e.g. linux-image-6.1.0-56-amd64.
                    let deps = cmd::output(
                        Command::new("apt-cache").args(["depends", "linux-image-amd64"]),
                    )
                    .unwrap_or_default();
                    deps.lines()
                        .filter_map(|l| l.trim().strip_prefix("Depends: "))
                        .find(|p| p.starts_with("linux-image-6.1.") && p.ends_with("-amd64"))
                        .map(str::to_owned)
                }
                KernelLine::V6_12 => {
                    let list = cmd::output(Command::new("apt-cache").args([
                        "search",
                        "--names-only",
                        r"^linux-image-6\.12\.[0-9]+\+deb12-amd64(-unsigned)?$",
                    ]))
                    .unwrap_or_default();
                    newest_6_12(&list)
                }
            };
            match found {
                Some(package) => return Ok(package),
                None if !self.apt_updated => self.apt_update()?,
                None => bail!(
                    "apt knows no {} kernel package (checked after apt-get update)",
                    line.as_str()
                ),
            }
        }
    }

    /// Downloads and unpacks one kernel package into the cache, with indexed modules visible
    /// under /usr/lib/modules/<release>.
    fn unpack_kernel(&mut self, package: &str) -> Result<Kernel> {
        // Package names are the release plus an optional `-unsigned` suffix.
        let release = package
            .strip_prefix("linux-image-")
            .map(|r| r.strip_suffix("-unsigned").unwrap_or(r))
            .with_context(|| format!("unexpected kernel package name {package}"))?
            .to_owned();
        let dir = self.paths.kernels_dir();
        let root = dir.join(&release);
        let kernel = Kernel {
            package: package.to_owned(),
            vmlinuz: root.join("boot").join(format!("vmlinuz-{release}")),
            root,
            release,
        };
        let modules = kernel.modules_dir();

        if kernel.vmlinuz.is_file() && modules.join("modules.dep").is_file() {
            present(format!("unpacked in {}", kernel.root.display()));
        } else {
            let debs = dir.join("debs");
            fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
            let deb = match find_deb(&debs, package)? {
                Some(deb) => deb,
                None => self.download_deb(&debs, package)?,
            };
            // Unpack beside the final place and rename, so an interrupted run leaves no
            // half-unpacked kernel that looks complete.
            let tmp = dir.join(format!(".{}.unpacking", kernel.release));
            remove_dir_if_exists(&tmp)?;
            remove_dir_if_exists(&kernel.root)?;
            info(format!("unpacking {} (about 100 MB)", deb.display()));
            if let Err(err) = cmd::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp)) {
                // A truncated download would fail every later run too.
                let _ = fs::remove_file(&deb);
                return Err(err.context(format!("unpacking {} (removed it; rerun)", deb.display())));
            }
            ensure!(
                tmp.join("boot")
                    .join(format!("vmlinuz-{}", kernel.release))
                    .is_file()
                    && tmp.join("lib/modules").join(&kernel.release).is_dir(),
                "{} does not contain boot/vmlinuz-{r} and lib/modules/{r}",
                deb.display(),
                r = kernel.release
            );
            let depmod = find_program("depmod", SBIN).context("depmod not found (package kmod)")?;
            // Debian generates modules.dep in postinst, which dpkg -x does not run.
            cmd::run(
                Command::new(depmod)
                    .arg("-b")
                    .arg(&tmp)
                    .arg(&kernel.release),
            )?;
            fs::rename(&tmp, &kernel.root).with_context(|| {
                format!("moving {} to {}", tmp.display(), kernel.root.display())
            })?;
            // The unpacked tree is the cache; the package would only double the disk use.
            fs::remove_file(&deb).with_context(|| format!("removing {}", deb.display()))?;
        }

        link_system_modules(&kernel.release, &modules)?;
        Ok(kernel)
    }

    fn download_deb(&mut self, debs: &Path, package: &str) -> Result<PathBuf> {
        info(format!(
            "downloading {package} (70-110 MB from the Debian mirrors)"
        ));
        let mut download = Command::new("apt-get");
        download.current_dir(debs).args(["download", package]);
        if !cmd::status(&mut download)?.success() {
            // The lists may name a version the mirror no longer carries.
            ensure!(!self.apt_updated, "apt-get download {package} failed");
            self.apt_update()?;
            cmd::run(&mut download).with_context(|| format!("downloading {package}"))?;
        }
        find_deb(debs, package)?.with_context(|| {
            format!(
                "apt-get download left no {package}_*.deb in {}",
                debs.display()
            )
        })
    }
}

/// Whether dpkg has `package` fully installed.
fn dpkg_installed(package: &str) -> bool {
    cmd::output(Command::new("dpkg-query").args(["-W", "-f=${Status}", package]))
        .is_ok_and(|s| s.trim() == "install ok installed")
}

/// The newest plain `linux-image-6.12.N+deb12-amd64` in `apt-cache search` output, or the
/// `-unsigned` build of the newest version when no signed one is listed.
fn newest_6_12(search_output: &str) -> Option<String> {
    search_output
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|name| {
            let rest = name.strip_prefix("linux-image-6.12.")?;
            let (patch, flavour) = rest.split_once('+')?;
            let signed = match flavour {
                "deb12-amd64" => true,
                "deb12-amd64-unsigned" => false,
                _ => return None,
            };
            Some((patch.parse::<u32>().ok()?, signed, name.to_owned()))
        })
        .max_by_key(|(patch, signed, _)| (*patch, *signed))
        .map(|(_, _, name)| name)
}

/// virtme-ng finds the modules next to the image by itself; /usr/lib/modules/<release> makes
/// them visible to tools in the guest that look in the standard place. A symlink keeps 400 MB
/// of modules from being copied; an existing directory (someone installed it) is left alone.
fn link_system_modules(release: &str, modules: &Path) -> Result<()> {
    let system = Path::new("/usr/lib/modules").join(release);
    if system.join("modules.dep").is_file() {
        present(format!("{}", system.display()));
        return Ok(());
    }
    match fs::symlink_metadata(&system) {
        Ok(meta) if meta.file_type().is_symlink() => {
            // Dangling: it points into a target dir that was cleaned.
            fs::remove_file(&system)
                .with_context(|| format!("removing stale {}", system.display()))?;
        }
        Ok(_) => {
            let depmod = find_program("depmod", SBIN).context("depmod not found (package kmod)")?;
            return cmd::run(Command::new(depmod).arg(release));
        }
        Err(err) if err.kind() == ErrorKind::NotFound => {}
        Err(err) => return Err(err).with_context(|| format!("inspecting {}", system.display())),
    }
    let parent = Path::new("/usr/lib/modules");
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    info(format!(
        "linking {} -> {}",
        system.display(),
        modules.display()
    ));
    symlink(modules, &system).with_context(|| format!("creating symlink {}", system.display()))
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(entry.path()));
        }
    }
    Ok(None)
}

fn remove_dir_if_exists(dir: &Path) -> Result<()> {
    match fs::remove_dir_all(dir) {
        Err(err) if err.kind() != ErrorKind::NotFound => {
            Err(err).with_context(|| format!("removing {}", dir.display()))
        }
        _ => Ok(()),
    }
}

/// A missing or unreadable manifest just means "resolve again".
fn read_manifest(path: &Path) -> BTreeMap<KernelLine, Kernel> {
    fs::read_to_string(path)
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default()
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

/// The workspace's target directory as cargo sees it (honours CARGO_TARGET_DIR and config).
fn target_dir(root: &Path) -> Result<PathBuf> {
    let out = cmd::output(cmd::cargo().current_dir(root).args([
        "metadata",
        "--no-deps",
        "--format-version",
        "1",
    ]))?;
    let meta: serde_json::Value = serde_json::from_str(&out).context("parsing cargo metadata")?;
    meta["target_directory"]
        .as_str()
        .map(PathBuf::from)
        .context("cargo metadata has no target_directory")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_newest_signed_6_12() {
        let list = "\
linux-image-6.12.115+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.117+deb12-amd64-unsigned - Linux 6.12 for 64-bit PCs
linux-image-6.12.100+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-amd64 - Linux 6.12 for 64-bit PCs (signed)
linux-image-6.12.117+deb12-cloud-amd64 - cloud
";
        assert_eq!(
            newest_6_12(list).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64")
        );
    }

    #[test]
    fn falls_back_to_unsigned_of_newest() {
        let list = "\
linux-image-6.12.115+deb12-amd64 - signed
linux-image-6.12.117+deb12-amd64-unsigned - unsigned
";
        assert_eq!(
            newest_6_12(list).as_deref(),
            Some("linux-image-6.12.117+deb12-amd64-unsigned")
        );
        assert_eq!(newest_6_12(""), None);
    }

    #[test]
    fn quotes_for_the_shell() {
        assert_eq!(cmd::shell_quote("a/b-c=1"), "a/b-c=1");
        assert_eq!(cmd::shell_quote("it's"), r"'it'\''s'");
        assert_eq!(cmd::shell_quote(""), "''");
        assert_eq!(cmd::shell_quote("a\x1fb'"), r"$'a\x1fb\''");
    }
}
