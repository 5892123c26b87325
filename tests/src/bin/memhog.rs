//! A controllable anonymous-memory workload for the VM scaling scenarios: started inside the
//! cgroup under test, it touches memory in steps and holds or frees it on command.
//!
//! Commands, one per line on stdin:
//! - `grow TOTAL_MIB STEP_MIB INTERVAL_MS [MARK_BYTES]`: touch memory until TOTAL_MIB are held,
//!   STEP_MIB at a time with INTERVAL_MS between steps; prints `progress N` after each step,
//!   `held N` at the end. With MARK_BYTES, the page fault that brings the held memory to
//!   MARK_BYTES is timestamped (CLOCK_BOOTTIME) and `crossed NS` printed after its step: the
//!   workload's own, poll-free stamp of a threshold crossing;
//! - `free`: release everything (munmap, so the cgroup's anon memory really drops); prints `held 0`;
//! - `churn TOTAL_MIB ROUNDS SECS`: touch TOTAL_MIB then free it, over and over, until ROUNDS
//!   rounds are done or SECS seconds passed (0 = no limit of that kind); prints `churned N` (the
//!   benchmarks' fixed-work and fixed-time reclaim workloads);
//! - `exit` (or end of input).

// Test and bench drivers: a failure ends the run with a message, which is what unwrapping does.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead as _, Write as _};
use std::time::Duration;

const MIB: usize = 1 << 20;
/// Bytes per mapping.
const CHUNK: usize = 64 * MIB;
const PAGE: usize = 4096;

/// Touched memory: whole chunks plus the touched prefix of the last one.
struct Held {
    chunks: Vec<Chunk>,
    /// Bytes touched in the last chunk.
    last_touched: usize,
}

impl Held {
    fn bytes(&self) -> usize {
        match self.chunks.len() {
            0 => 0,
            n => (n - 1) * CHUNK + self.last_touched,
        }
    }

    /// Touches `n` more bytes (whole pages), stamping the moment `mark` bytes are held.
    fn touch(&mut self, mut n: usize, mark: &mut Mark) {
        while n > 0 {
            if self.chunks.is_empty() || self.last_touched == CHUNK {
                // Zeroed allocation of this size is a fresh mmap: nothing is touched yet.
                match Chunk::map() {
                    Some(chunk) => self.chunks.push(chunk),
                    None => {
                        eprintln!("memhog: mmap of {CHUNK} bytes failed");
                        std::process::exit(1);
                    }
                }
                self.last_touched = 0;
            }
            // Bytes held in the chunks before this one.
            let before = (self.chunks.len() - 1) * CHUNK;
            let chunk = self.chunks.last_mut().expect("just pushed");
            let end = (self.last_touched + n).min(CHUNK);
            for i in (self.last_touched..end).step_by(PAGE) {
                // Volatile, so the page fault really happens.
                // SAFETY: `i` is within the chunk.
                unsafe { std::ptr::write_volatile(chunk.ptr.add(i), 1) };
                if let Mark::Armed(at) = *mark
                    && before + i + PAGE >= at
                {
                    *mark = Mark::Crossed(tests::scenario::boottime_ns());
                }
            }
            n -= end - self.last_touched;
            self.last_touched = end;
        }
    }
}

/// One anonymous mapping of [`CHUNK`] bytes, unmapped on drop (so the cgroup's anon memory
/// really drops on `free`), mapped with base pages only: with transparent huge pages (Debian's
/// kernels default to `always`) the first touch of a 2 MiB region charges all of it, so usage
/// would run up to a huge page ahead of the bytes touched and the crossing stamp would be off
/// by up to one growth step. Page by page, usage follows the touches.
struct Chunk {
    ptr: *mut u8,
}

impl Chunk {
    fn map() -> Option<Chunk> {
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                CHUNK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // Before any touch, so no huge page is ever faulted in. A failure only leaves THP on.
        // SAFETY: the range is the mapping just created.
        unsafe { libc::madvise(ptr, CHUNK, libc::MADV_NOHUGEPAGE) };
        Some(Chunk { ptr: ptr.cast() })
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: our own mapping of CHUNK bytes, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), CHUNK) };
    }
}

/// A threshold to timestamp: armed with a byte count, then the time it was reached.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Mark {
    None,
    Armed(usize),
    Crossed(u64),
}

fn main() {
    let mut held = Held {
        chunks: Vec::new(),
        last_touched: 0,
    };
    let stdout = std::io::stdout();
    let say = |line: String| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    };
    say("ready".to_string());
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["grow", total, step, interval, rest @ ..] if rest.len() <= 1 => {
                let (Ok(total), Ok(step), Ok(interval)) = (
                    total.parse::<usize>(),
                    step.parse::<usize>(),
                    interval.parse::<u64>(),
                ) else {
                    say(format!("error bad grow command {line:?}"));
                    continue;
                };
                let mut mark = match rest.first().map(|m| m.parse::<usize>()) {
                    None => Mark::None,
                    Some(Ok(bytes)) => Mark::Armed(bytes),
                    Some(Err(_)) => {
                        say(format!("error bad grow mark {line:?}"));
                        continue;
                    }
                };
                let want = total * MIB;
                while held.bytes() < want {
                    let n = (step.max(1) * MIB).min(want - held.bytes());
                    held.touch(n, &mut mark);
                    if let Mark::Crossed(ns) = mark {
                        say(format!("crossed {ns}"));
                        mark = Mark::None;
                    }
                    say(format!("progress {}", held.bytes() / MIB));
                    if held.bytes() < want {
                        std::thread::sleep(Duration::from_millis(interval));
                    }
                }
                say(format!("held {}", held.bytes() / MIB));
            }
            ["free"] => {
                held.chunks = Vec::new();
                held.last_touched = 0;
                say("held 0".to_string());
            }
            ["churn", total, rounds, secs] => {
                let (Ok(total), Ok(rounds), Ok(secs)) = (
                    total.parse::<usize>(),
                    rounds.parse::<u64>(),
                    secs.parse::<f64>(),
                ) else {
                    say(format!("error bad churn command {line:?}"));
                    continue;
                };
                held.chunks = Vec::new();
                held.last_touched = 0;
                let started = std::time::Instant::now();
                let mut done = 0u64;
                loop {
                    if rounds > 0 && done >= rounds {
                        break;
                    }
                    if secs > 0.0 && started.elapsed().as_secs_f64() >= secs {
                        break;
                    }
                    held.touch(total * MIB, &mut Mark::None);
                    held.chunks = Vec::new();
                    held.last_touched = 0;
                    done += 1;
                }
                say(format!("churned {done}"));
            }
            ["exit"] => break,
            [] => {}
            _ => say(format!("error unknown command {line:?}")),
        }
    }
}
