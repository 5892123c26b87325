//! A throw-away cgroup v1 memory child on the host. The host's memory controller is v1 and
//! belongs to the machine: only a child of *this process's own* memory cgroup is ever created,
//! with a small limit, and it is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::Duration;

use anyhow::{Context as _, bail};

/// A v1 memory child of this process's own memory cgroup; removed on drop.
pub struct ScratchMemcg {
    pub dir: PathBuf,
}

impl ScratchMemcg {
    /// `vmmon-<tag>-<pid>` under our own memory cgroup, limited to `limit_bytes`.
    pub fn create(tag: &str, limit_bytes: u64) -> anyhow::Result<ScratchMemcg> {
        let own =
            std::fs::read_to_string("/proc/self/cgroup").context("reading /proc/self/cgroup")?;
        let Some(rel) = own.lines().find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            controllers
                .split(',')
                .any(|c| c == "memory")
                .then(|| path.to_string())
        }) else {
            bail!("no cgroup v1 memory controller for this process (the host's layout is v1)");
        };
        let dir = Path::new("/sys/fs/cgroup/memory")
            .join(rel.trim_start_matches('/'))
            .join(format!("vmmon-{tag}-{}", std::process::id()));
        std::fs::create_dir(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let cg = ScratchMemcg { dir };
        cg.write("memory.limit_in_bytes", &limit_bytes.to_string())?;
        Ok(cg)
    }

    pub fn write(&self, file: &str, value: &str) -> anyhow::Result<()> {
        let path = self.dir.join(file);
        std::fs::write(&path, value)
            .with_context(|| format!("writing {value} to {}", path.display()))
    }

    /// Starts `script` with `sh` inside the cgroup.
    pub fn spawn(&self, script: &str) -> anyhow::Result<Child> {
        let procs = self.dir.join("cgroup.procs");
        Command::new("sh")
            .arg("-c")
            .arg(format!("echo $$ > {} && exec {script}", procs.display()))
            .spawn()
            .with_context(|| format!("starting `{script}`"))
    }

    /// Runs `script` with `sh` inside the cgroup; returns (pid, exit status).
    pub fn run(&self, script: &str) -> anyhow::Result<(u32, ExitStatus)> {
        let mut child = self.spawn(script)?;
        let pid = child.id();
        let status = child
            .wait()
            .with_context(|| format!("waiting for `{script}`"))?;
        Ok((pid, status))
    }
}

impl Drop for ScratchMemcg {
    fn drop(&mut self) {
        // Every task has exited by now; the kernel keeps charged page cache as a zombie memcg.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove {}", self.dir.display());
    }
}
