//! tracefs: where it is, which events exist, and the field layout of an event from its `format`
//! file. Layouts come from the running kernel (not BTF, which Neon's kernel lacks), so fields
//! added by stable backports (e.g. `oom:mark_victim`) are handled.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow, bail};

/// One field of a tracepoint record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Field {
    /// C declaration without the name, e.g. `unsigned long`.
    pub c_type: String,
    pub name: String,
    pub offset: u16,
    pub size: u16,
    pub signed: bool,
}

/// The parsed `format` file of one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventFormat {
    pub name: String,
    pub id: u32,
    pub fields: Vec<Field>,
}

impl EventFormat {
    /// The field called `name`, if the event has one.
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|f| f.name == name)
    }
}

/// Parses the text of `events/<category>/<event>/format`.
pub fn parse_format(text: &str) -> anyhow::Result<EventFormat> {
    let mut name = None;
    let mut id = None;
    let mut fields = Vec::new();
    for (lineno, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(v) = line.strip_prefix("name:") {
            name = Some(v.trim().to_string());
        } else if let Some(v) = line.strip_prefix("ID:") {
            id = Some(
                v.trim()
                    .parse::<u32>()
                    .with_context(|| format!("line {}: bad ID {v:?}", lineno + 1))?,
            );
        } else if line.starts_with("field:") {
            fields.push(
                parse_field_line(line).with_context(|| format!("line {}: {line:?}", lineno + 1))?,
            );
        }
    }
    Ok(EventFormat {
        name: name.ok_or_else(|| anyhow!("no `name:` line"))?,
        id: id.ok_or_else(|| anyhow!("no `ID:` line"))?,
        fields,
    })
}

/// `field:unsigned long gfp_flags;\toffset:16;\tsize:8;\tsigned:0;`
fn parse_field_line(line: &str) -> anyhow::Result<Field> {
    let mut decl = None;
    let mut offset = None;
    let mut size = None;
    let mut signed = false;
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part
            .split_once(':')
            .ok_or_else(|| anyhow!("part {part:?} has no `:`"))?;
        match key.trim() {
            "field" => decl = Some(value.trim()),
            "offset" => offset = Some(value.trim().parse::<u16>().context("offset")?),
            "size" => size = Some(value.trim().parse::<u16>().context("size")?),
            "signed" => signed = value.trim() == "1",
            _ => {} // future keys are not ours to reject
        }
    }
    let decl = decl.ok_or_else(|| anyhow!("no declaration"))?;
    // The name is the last identifier, before a trailing array suffix (`char comm[16]`); in
    // `__data_loc char[] comm` the brackets belong to the type.
    let without_array = match (decl.ends_with(']'), decl.rfind('[')) {
        (true, Some(i)) => decl[..i].trim_end(),
        _ => decl,
    };
    let split_at = without_array
        .rfind(|c: char| c.is_whitespace() || c == '*')
        .map(|i| i + 1)
        .unwrap_or(0);
    let name = without_array[split_at..].to_string();
    if name.is_empty() {
        bail!("no field name in {decl:?}");
    }
    Ok(Field {
        c_type: without_array[..split_at].trim().to_string(),
        name,
        offset: offset.ok_or_else(|| anyhow!("no offset"))?,
        size: size.ok_or_else(|| anyhow!("no size"))?,
        signed,
    })
}

/// A located tracefs mount.
#[derive(Clone, Debug)]
pub struct TraceFs {
    root: PathBuf,
}

impl TraceFs {
    /// Finds tracefs, mounting it at `/sys/kernel/tracing` when it exists but is not mounted
    /// (needs privileges; common in minimal VMs).
    pub fn locate() -> anyhow::Result<TraceFs> {
        for root in ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"] {
            if has_events(Path::new(root)) {
                return Ok(TraceFs { root: root.into() });
            }
        }
        mount_tracefs(Path::new("/sys/kernel/tracing"))?;
        if has_events(Path::new("/sys/kernel/tracing")) {
            return Ok(TraceFs {
                root: "/sys/kernel/tracing".into(),
            });
        }
        bail!("tracefs has no events directory (is CONFIG_FTRACE/tracepoints enabled?)")
    }

    /// tracefs rooted at `root` (for tests and unusual mounts).
    pub fn at(root: impl Into<PathBuf>) -> TraceFs {
        TraceFs { root: root.into() }
    }

    /// The mount point.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether `category:event` exists on this kernel.
    pub fn has_event(&self, category: &str, event: &str) -> bool {
        self.event_dir(category, event).join("format").exists()
    }

    /// Layout of `category:event`.
    pub fn format(&self, category: &str, event: &str) -> anyhow::Result<EventFormat> {
        let path = self.event_dir(category, event).join("format");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        parse_format(&text).with_context(|| format!("parsing {}", path.display()))
    }

    fn event_dir(&self, category: &str, event: &str) -> PathBuf {
        self.root.join("events").join(category).join(event)
    }
}

fn has_events(root: &Path) -> bool {
    std::fs::read_dir(root.join("events"))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

fn mount_tracefs(target: &Path) -> anyhow::Result<()> {
    use std::ffi::CString;
    let target_c =
        CString::new(target.as_os_str().as_encoded_bytes()).context("tracefs path contains NUL")?;
    let fstype = c"tracefs";
    let source = c"nodev";
    // SAFETY: all pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target_c.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(err).with_context(|| format!("mounting tracefs at {}", target.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MEMCG_BEGIN_6_1: &str = "name: mm_vmscan_memcg_reclaim_begin
ID: 539
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int order;\toffset:8;\tsize:4;\tsigned:1;
\tfield:unsigned long gfp_flags;\toffset:16;\tsize:8;\tsigned:0;

print fmt: \"order=%d gfp_flags=%s\", REC->order, (REC->gfp_flags) ? __print_flags(REC->gfp_flags, \"|\", {}) : \"none\"
";

    const MARK_VICTIM_BACKPORTED: &str = "name: mark_victim
ID: 171
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int pid;\toffset:8;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] comm;\toffset:12;\tsize:4;\tsigned:0;
\tfield:unsigned long total_vm;\toffset:16;\tsize:8;\tsigned:0;
\tfield:char comm2[16];\toffset:24;\tsize:16;\tsigned:0;
\tfield:struct page *page;\toffset:40;\tsize:8;\tsigned:0;

print fmt: \"pid=%d\", REC->pid
";

    #[test]
    fn parses_memcg_reclaim_begin() {
        let f = parse_format(MEMCG_BEGIN_6_1).unwrap();
        assert_eq!(f.name, "mm_vmscan_memcg_reclaim_begin");
        assert_eq!(f.id, 539);
        assert_eq!(f.fields.len(), 6);
        let order = f.field("order").unwrap();
        assert_eq!((order.offset, order.size, order.signed), (8, 4, true));
        assert_eq!(order.c_type, "int");
        let gfp = f.field("gfp_flags").unwrap();
        assert_eq!((gfp.offset, gfp.size, gfp.signed), (16, 8, false));
        assert_eq!(gfp.c_type, "unsigned long");
    }

    #[test]
    fn parses_arrays_pointers_and_data_loc() {
        let f = parse_format(MARK_VICTIM_BACKPORTED).unwrap();
        assert_eq!(f.field("pid").unwrap().offset, 8);
        assert_eq!(f.field("comm").unwrap().c_type, "__data_loc char[]");
        let comm2 = f.field("comm2").unwrap();
        assert_eq!((comm2.offset, comm2.size), (24, 16));
        let page = f.field("page").unwrap();
        assert_eq!(page.c_type, "struct page *");
        assert_eq!(page.offset, 40);
    }

    #[test]
    fn rejects_broken_files() {
        assert!(parse_format("ID: 3\n").is_err(), "missing name");
        assert!(parse_format("name: x\n").is_err(), "missing ID");
        assert!(parse_format("name: x\nID: y\n").is_err(), "bad ID");
        let bad_offset = "name: x\nID: 1\n\tfield:int a;\toffset:zz;\tsize:4;\tsigned:1;\n";
        assert!(parse_format(bad_offset).is_err());
        let no_size = "name: x\nID: 1\n\tfield:int a;\toffset:8;\tsigned:1;\n";
        assert!(parse_format(no_size).is_err());
        let no_name = "name: x\nID: 1\n\tfield: ;\toffset:8;\tsize:4;\tsigned:1;\n";
        assert!(parse_format(no_name).is_err());
    }

    #[test]
    fn reads_a_format_file_through_tracefs() {
        let dir = std::env::temp_dir().join(format!("vmmon-tracefs-{}", std::process::id()));
        let ev = dir.join("events/vmscan/mm_vmscan_memcg_reclaim_begin");
        std::fs::create_dir_all(&ev).unwrap();
        std::fs::write(ev.join("format"), MEMCG_BEGIN_6_1).unwrap();
        let fs = TraceFs::at(&dir);
        assert!(fs.has_event("vmscan", "mm_vmscan_memcg_reclaim_begin"));
        assert!(!fs.has_event("vmscan", "mm_vmscan_memcg_reclaim_end"));
        let f = fs
            .format("vmscan", "mm_vmscan_memcg_reclaim_begin")
            .unwrap();
        assert_eq!(f.field("order").unwrap().offset, 8);
        let err = fs.format("oom", "mark_victim").unwrap_err();
        assert!(format!("{err:#}").contains("mark_victim/format"), "{err:#}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
