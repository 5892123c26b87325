#!/bin/sh
# Guest side of `cargo xtask vm`: runs as root inside the virtme-ng guest, prepares the kernel
# interfaces the VM tests rely on, runs the command, and leaves its exit code in the shared
# directory because the VM's own exit status does not reliably carry it.
#
# Environment (set by xtask): VM_MONITOR_OUT (host-shared read-write directory),
# VM_MONITOR_KERNEL (kernel line, 6.1 or 6.12).
set -u

out=${VM_MONITOR_OUT:?VM_MONITOR_OUT must name the host-shared output directory}
: "${VM_MONITOR_KERNEL:?VM_MONITOR_KERNEL must name the kernel line}"
# The host times the boot by this file's appearance.
: > "$out/guest-ready"

log() { echo "guest-init: $*"; }

finish() {
    echo "$1" > "$out/exit-code"
    sync
    log "exit code $1"
    exit "$1"
}

fs_type() { stat -f -c %T "$1" 2>/dev/null; }

# tracefs: tracepoint format files and the event list.
if [ -z "$(ls -A /sys/kernel/tracing/events 2>/dev/null)" ]; then
    mount -t tracefs nodev /sys/kernel/tracing || log "warning: could not mount tracefs"
fi

# cgroup v2 with the memory controller available to child cgroups: the tests depend on it.
if [ "$(fs_type /sys/fs/cgroup)" != cgroup2fs ]; then
    mount -t cgroup2 cgroup2 /sys/fs/cgroup || { log "cannot mount cgroup2"; finish 125; }
fi
if ! grep -qw memory /sys/fs/cgroup/cgroup.subtree_control; then
    echo +memory > /sys/fs/cgroup/cgroup.subtree_control ||
        { log "cannot enable the memory controller"; finish 125; }
    log "enabled the memory controller for child cgroups"
fi

# bpffs, for pinning maps while debugging.
if [ "$(fs_type /sys/fs/bpf)" != bpf_fs ]; then
    mount -t bpf bpf /sys/fs/bpf 2>/dev/null || log "warning: could not mount bpffs"
fi

export VM_MONITOR_IN_VM=1
export VM_MONITOR_KERNEL

log "kernel $(uname -r), up $(cut -d' ' -f1 /proc/uptime) s, cgroup controllers: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
log "running: $*"
"$@"
finish $?
