//! Locating the watched cgroup (v2) and what the eBPF filter needs to know about it.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

use crate::memstat::{
    MemoryEvents, MemoryHigh, MemoryStat, parse_memory_events, parse_memory_high, parse_memory_stat,
};

/// Where cgroup v2 is mounted in the VM.
pub const CGROUP2_ROOT: &str = "/sys/fs/cgroup";
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;

/// The cgroup whose memory we watch, as the kernel identifies it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupTarget {
    /// `NAME` as given on the command line.
    pub name: String,
    /// `/sys/fs/cgroup/NAME`.
    pub path: PathBuf,
    /// cgroup v2 id: the directory's inode number (what `bpf_get_current_cgroup_id` returns).
    pub id: u64,
    /// Depth below the root (`a/b` is 2), for `bpf_get_current_ancestor_cgroup_id`.
    pub level: u32,
}

impl CgroupTarget {
    /// Resolves `NAME` under the cgroup v2 root, with clear errors for the usual mistakes.
    pub fn resolve(name: &str) -> anyhow::Result<CgroupTarget> {
        Self::resolve_under(Path::new(CGROUP2_ROOT), name, true)
    }

    /// As [`CgroupTarget::resolve`] under another root; `require_v2` checks the filesystem type.
    pub fn resolve_under(root: &Path, name: &str, require_v2: bool) -> anyhow::Result<Self> {
        let rel = name.trim_matches('/');
        if rel.is_empty()
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            bail!(
                "invalid cgroup name {name:?}: expected a path like `neon-postgres` below {}",
                root.display()
            );
        }
        if require_v2 && !is_cgroup2(root)? {
            bail!(
                "{} is not a cgroup v2 (unified) mount; vm-monitor needs cgroup v2 \
                 (boot with systemd.unified_cgroup_hierarchy=1 or mount cgroup2 there)",
                root.display()
            );
        }
        let path = root.join(rel);
        let meta = std::fs::metadata(&path).with_context(|| {
            format!(
                "cgroup {name:?} does not exist ({} is missing)",
                path.display()
            )
        })?;
        if !meta.is_dir() {
            bail!("{} is not a cgroup directory", path.display());
        }
        Ok(CgroupTarget {
            name: rel.to_string(),
            id: meta.ino(),
            level: rel.split('/').count() as u32,
            path,
        })
    }

    /// Whether the memory controller is enabled for this cgroup (listed in the parent's
    /// `cgroup.subtree_control`, which is what makes `memory.*` files appear).
    pub fn has_memory_controller(&self) -> bool {
        self.path.join("memory.stat").exists()
    }
}

/// Reads and writes the watched cgroup's memory files.
///
/// `memory.high` is written through cgroups-rs. `memory.stat`/`memory.events`/`memory.current`
/// are read directly and parsed strictly: cgroups-rs' stat reader turns an unreadable or
/// malformed file into zeros (the reference's silent "approve every downscale" failure), and
/// it reads six files where a pressure event needs one.
#[derive(Clone)]
pub struct CgroupMemory {
    target: CgroupTarget,
    memory: cgroups_rs::fs::memory::MemController,
}

impl CgroupMemory {
    /// Opens `target`, checking that it is on cgroup v2 with the memory controller enabled.
    pub fn open(target: &CgroupTarget) -> anyhow::Result<CgroupMemory> {
        if !target.has_memory_controller() {
            bail!(
                "cgroup {} has no memory controller (memory.stat missing): enable it in the \
                 parent with `echo +memory > {}/cgroup.subtree_control`",
                target.name,
                target
                    .path
                    .parent()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            );
        }
        let hierarchy = Box::new(cgroups_rs::fs::hierarchies::V2::new());
        let cg = cgroups_rs::fs::Cgroup::load(hierarchy, target.name.as_str());
        let memory = cg
            .controller_of::<cgroups_rs::fs::memory::MemController>()
            .ok_or_else(|| {
                anyhow::anyhow!("cgroups-rs found no memory controller for {}", target.name)
            })?
            .clone();
        Ok(CgroupMemory {
            target: target.clone(),
            memory,
        })
    }

    /// The cgroup this reads.
    pub fn target(&self) -> &CgroupTarget {
        &self.target
    }

    fn read(&self, file: &str) -> anyhow::Result<String> {
        let path = self.target.path.join(file);
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// `memory.stat`.
    pub fn stat(&self) -> anyhow::Result<MemoryStat> {
        let text = self.read("memory.stat")?;
        Ok(parse_memory_stat(&text)?)
    }

    /// `memory.current` in bytes.
    pub fn current(&self) -> anyhow::Result<u64> {
        let text = self.read("memory.current")?;
        text.trim().parse().with_context(|| {
            format!(
                "memory.current of {} is {:?}",
                self.target.name,
                text.trim()
            )
        })
    }

    /// `memory.events`.
    pub fn events(&self) -> anyhow::Result<MemoryEvents> {
        let text = self.read("memory.events")?;
        Ok(parse_memory_events(&text)?)
    }

    /// `memory.high`.
    pub fn high(&self) -> anyhow::Result<MemoryHigh> {
        let text = self.read("memory.high")?;
        Ok(parse_memory_high(&text)?)
    }

    /// Writes `memory.high`.
    pub fn set_high(&self, value: MemoryHigh) -> anyhow::Result<()> {
        let v = match value {
            MemoryHigh::Max => cgroups_rs::fs::MaxValue::Max,
            MemoryHigh::Bytes(b) => cgroups_rs::fs::MaxValue::Value(
                i64::try_from(b).context("memory.high value does not fit in i64")?,
            ),
        };
        self.memory
            .set_mem(cgroups_rs::fs::memory::SetMemory {
                high: Some(v),
                low: None,
                min: None,
                max: None,
            })
            .with_context(|| format!("writing {value} to memory.high of {}", self.target.name))
    }
}

/// Writes `memory.high` on a thread of its own. Lowering the limit makes the kernel reclaim
/// down to it inside the write, which can take seconds; on the runtime thread that would stall
/// health-check replies, the ring buffer and `/metrics` meanwhile. The thread sleeps in
/// `recv` between writes (no wake-ups) and ends when the writer is dropped.
pub struct HighWriter {
    tx: std::sync::mpsc::Sender<(MemoryHigh, tokio::sync::oneshot::Sender<anyhow::Result<()>>)>,
}

impl HighWriter {
    pub fn spawn(cgroup: CgroupMemory) -> anyhow::Result<HighWriter> {
        let (tx, rx) = std::sync::mpsc::channel::<(
            MemoryHigh,
            tokio::sync::oneshot::Sender<anyhow::Result<()>>,
        )>();
        std::thread::Builder::new()
            .name("memory.high".into())
            .spawn(move || {
                while let Ok((value, reply)) = rx.recv() {
                    // The engine may have stopped waiting (shutdown); nothing to do then.
                    let _ = reply.send(cgroup.set_high(value));
                }
            })
            .context("starting the memory.high writer thread")?;
        Ok(HighWriter { tx })
    }

    /// Writes `value` and waits for the result without blocking the calling thread.
    pub async fn write(&self, value: MemoryHigh) -> anyhow::Result<()> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((value, reply))
            .map_err(|_| anyhow::anyhow!("the memory.high writer thread is gone"))?;
        rx.await
            .map_err(|_| anyhow::anyhow!("the memory.high writer thread dropped the write"))?
    }
}

/// Whether `path` is on a cgroup2 filesystem.
pub fn is_cgroup2(path: &Path) -> anyhow::Result<bool> {
    use std::ffi::CString;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path contains NUL")?;
    // SAFETY: statfs is plain data, valid all-zero.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: statfs fills the struct we own; the path is a valid C string.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("statfs {}", path.display()));
    }
    Ok(st.f_type as i64 == CGROUP2_SUPER_MAGIC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_nested_names_with_level_and_inode() {
        let root = std::env::temp_dir().join(format!("vmmon-cg-{}", std::process::id()));
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        let t = CgroupTarget::resolve_under(&root, "/a/b/", false).unwrap();
        assert_eq!(t.name, "a/b");
        assert_eq!(t.level, 2);
        assert_eq!(t.id, std::fs::metadata(root.join("a/b")).unwrap().ino());
        assert!(!t.has_memory_controller());
        let err = CgroupTarget::resolve_under(&root, "missing", false).unwrap_err();
        assert!(format!("{err:#}").contains("does not exist"), "{err:#}");
        for bad in ["", "/", "../etc", "a//b", "a/./b"] {
            assert!(
                CgroupTarget::resolve_under(&root, bad, false).is_err(),
                "{bad:?}"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn temp_dir_is_not_cgroup2() {
        assert!(!is_cgroup2(&std::env::temp_dir()).unwrap());
        let err = CgroupTarget::resolve_under(&std::env::temp_dir(), "x", true).unwrap_err();
        assert!(format!("{err:#}").contains("not a cgroup v2"), "{err:#}");
    }
}
