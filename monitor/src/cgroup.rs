//! Locating the watched cgroup (v2) and what the eBPF filter needs to know about it.

use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

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
        if rel.is_empty() || rel.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            bail!("invalid cgroup name {name:?}: expected a path like `neon-postgres` below {}", root.display());
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
            format!("cgroup {name:?} does not exist ({} is missing)", path.display())
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

/// Whether `path` is on a cgroup2 filesystem.
pub fn is_cgroup2(path: &Path) -> anyhow::Result<bool> {
    use std::ffi::CString;
    let c = CString::new(path.as_os_str().as_encoded_bytes()).context("path contains NUL")?;
    // SAFETY: statfs fills the zeroed struct we own; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
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
            assert!(CgroupTarget::resolve_under(&root, bad, false).is_err(), "{bad:?}");
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
