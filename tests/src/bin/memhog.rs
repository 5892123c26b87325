//! A controllable anonymous-memory workload for the VM scaling scenarios: started inside the
//! cgroup under test, it touches memory in steps and holds or frees it on command.
//!
//! Commands, one per line on stdin:
//! - `grow TOTAL_MIB STEP_MIB INTERVAL_MS`: touch memory until TOTAL_MIB are held, STEP_MIB at a
//!   time with INTERVAL_MS between steps; prints `progress N` after each step, `held N` at the end;
//! - `free`: release everything (munmap, so the cgroup's anon memory really drops); prints `held 0`;
//! - `exit` (or end of input).

use std::io::{BufRead as _, Write as _};
use std::time::Duration;

const MIB: usize = 1 << 20;
/// Above glibc's largest dynamic mmap threshold (32 MiB), so every chunk is its own mapping
/// and dropping it unmaps it instead of leaving it in the heap.
const CHUNK: usize = 64 * MIB;
const PAGE: usize = 4096;

/// Touched memory: whole chunks plus the touched prefix of the last one.
struct Held {
    chunks: Vec<Vec<u8>>,
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

    /// Touches `n` more bytes (whole pages).
    fn touch(&mut self, mut n: usize) {
        while n > 0 {
            if self.chunks.is_empty() || self.last_touched == CHUNK {
                // Zeroed allocation of this size is a fresh mmap: nothing is touched yet.
                self.chunks.push(vec![0u8; CHUNK]);
                self.last_touched = 0;
            }
            let chunk = self.chunks.last_mut().expect("just pushed");
            let end = (self.last_touched + n).min(CHUNK);
            for i in (self.last_touched..end).step_by(PAGE) {
                // Volatile, so the page fault really happens.
                // SAFETY: `i` is within the chunk.
                unsafe { std::ptr::write_volatile(chunk.as_mut_ptr().add(i), 1) };
            }
            n -= end - self.last_touched;
            self.last_touched = end;
        }
    }
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
            ["grow", total, step, interval] => {
                let (Ok(total), Ok(step), Ok(interval)) = (
                    total.parse::<usize>(),
                    step.parse::<usize>(),
                    interval.parse::<u64>(),
                ) else {
                    say(format!("error bad grow command {line:?}"));
                    continue;
                };
                let want = total * MIB;
                while held.bytes() < want {
                    let n = (step.max(1) * MIB).min(want - held.bytes());
                    held.touch(n);
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
            ["exit"] => break,
            [] => {}
            _ => say(format!("error unknown command {line:?}")),
        }
    }
}
