//! Running external commands visibly: every step is announced, every command line is echoed,
//! and failures name the command that failed.

use std::env;
use std::ffi::OsStr;
use std::fmt::Display;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// Announces a step.
pub(crate) fn step(msg: impl Display) {
    println!("==> {msg}");
}

/// Reports a step that had nothing to do.
pub(crate) fn present(msg: impl Display) {
    println!("    {msg}: present, skipping");
}

/// Prints an indented detail line under the current step.
pub(crate) fn info(msg: impl Display) {
    println!("    {msg}");
}

/// A loud multi-line note, for things that were skipped but should not go unnoticed.
pub(crate) fn loud(msg: impl Display) {
    let bar = "!".repeat(78);
    println!("{bar}\n!!! {msg}\n{bar}");
}

/// Quotes one word for a POSIX shell (only when needed, to keep echoed commands readable).
pub(crate) fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%^".contains(c));
    if plain {
        word.to_owned()
    } else if word.chars().any(|c| c.is_ascii_control()) {
        // Bash's $'...' keeps separators such as CARGO_ENCODED_RUSTFLAGS's \x1f visible.
        let escaped: String = word
            .chars()
            .map(|c| match c {
                '\\' | '\'' => format!("\\{c}"),
                c if c.is_ascii_control() => format!("\\x{:02x}", c as u32),
                c => c.to_string(),
            })
            .collect();
        format!("$'{escaped}'")
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// The command as a shell line, with the environment overrides that were set on it.
pub(crate) fn display(cmd: &Command) -> String {
    let mut words = Vec::new();
    for (key, value) in cmd.get_envs() {
        if let Some(value) = value {
            words.push(shell_quote(&format!(
                "{}={}",
                key.to_string_lossy(),
                value.to_string_lossy()
            )));
        }
    }
    words.push(shell_quote(&cmd.get_program().to_string_lossy()));
    words.extend(cmd.get_args().map(|a| shell_quote(&a.to_string_lossy())));
    words.join(" ")
}

/// Runs a command with inherited stdio and returns its exit status (not checked).
pub(crate) fn status(cmd: &mut Command) -> Result<ExitStatus> {
    let line = display(cmd);
    println!("    $ {line}");
    cmd.status()
        .with_context(|| format!("could not start `{line}`"))
}

/// Runs a command with inherited stdio; a non-zero exit is an error.
pub(crate) fn run(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("`{}` failed ({st})", display(cmd));
    }
    Ok(())
}

/// Runs a noisy installer with its output in `log` instead of the terminal (a first set-up
/// would otherwise print thousands of lines); on failure prints the log's last lines.
pub(crate) fn run_logged(cmd: &mut Command, log: &Path) -> Result<()> {
    let line = display(cmd);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let out = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out
        .try_clone()
        .with_context(|| format!("opening {} twice", log.display()))?;
    println!("    $ {line}  (output: {})", log.display());
    let st = cmd
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .status()
        .with_context(|| format!("could not start `{line}`"))?;
    if !st.success() {
        const TAIL: usize = 40;
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        for l in &lines[lines.len().saturating_sub(TAIL)..] {
            eprintln!("    | {l}");
        }
        bail!("`{line}` failed ({st}); its output is in {}", log.display());
    }
    Ok(())
}

/// Runs a query quietly and returns its stdout; a non-zero exit is an error carrying stderr.
pub(crate) fn output(cmd: &mut Command) -> Result<String> {
    let line = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{line}` printed non-UTF-8 output"))
}

/// Whether a probe command starts and exits 0 (all output discarded).
pub(crate) fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Finds an executable on PATH, then in `extra` directories (e.g. sbin, which a non-login
/// root shell may not have on PATH).
pub(crate) fn find_program(name: &str, extra: &[&str]) -> Option<PathBuf> {
    let path = env::var_os("PATH").unwrap_or_default();
    env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// PATH with `dirs` prepended, for child processes that must find freshly installed tools.
pub(crate) fn path_with(dirs: &[&Path]) -> Result<std::ffi::OsString> {
    let current = env::var_os("PATH").unwrap_or_default();
    let all = dirs
        .iter()
        .map(|d| d.to_path_buf())
        .chain(env::split_paths(&current));
    env::join_paths(all).context("building PATH")
}

/// `cargo` for the toolchain xtask itself runs under (the rustup proxy honours
/// RUSTUP_TOOLCHAIN, which the outer `cargo` invocation passes down).
pub(crate) fn cargo() -> Command {
    Command::new(env::var_os("CARGO").unwrap_or_else(|| OsStr::new("cargo").to_owned()))
}

/// Builds `vm-monitor` and the given `tests` binaries, returning their paths in that order:
/// what every command that runs a guest-side driver needs first. Release builds: what operators
/// run (a debug tokio/axum is several times slower), so what the demo and the bench show.
pub(crate) fn build_guest_binaries(
    root: &Path,
    target: &Path,
    bins: &[&str],
) -> Result<Vec<PathBuf>> {
    let (flag, dir) = (Some("--release"), "release");
    step(format!(
        "building vm-monitor and {} ({dir}; a first build takes several minutes, cargo quiet)",
        bins.join(", ")
    ));
    // Quiet: errors still print; progress and the eBPF build's forwarded output would fill
    // screens.
    run(cargo()
        .current_dir(root)
        .args(["build", "--quiet", "-p", "monitor"])
        .args(flag))?;
    let mut tests = cargo();
    tests
        .current_dir(root)
        .args(["build", "--quiet", "-p", "tests"])
        .args(flag);
    for bin in bins {
        tests.args(["--bin", bin]);
    }
    run(&mut tests)?;
    let paths: Vec<PathBuf> = std::iter::once("vm-monitor")
        .chain(bins.iter().copied())
        .map(|b| target.join(dir).join(b))
        .collect();
    for p in &paths {
        if !p.is_file() {
            bail!("{} was not built", p.display());
        }
    }
    Ok(paths)
}
