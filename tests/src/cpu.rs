//! CPU accounting from `/proc` for the benchmarks that charge a server its CPU per gigabit
//! (`tunnel_cpu_*`, [`crate::loadgen`]).
//!
//! - a process's user + system time, all its threads (`/proc/PID/stat`, fields 14 and 15);
//! - the same for the threads of this process whose name starts with a prefix
//!   (`/proc/self/task/TID/stat`; the agent's tunnel threads are `wg-*`);
//! - the calling thread's own time (`/proc/thread-self/stat`);
//! - the machine's softirq time, all CPUs (`/proc/stat`, the `cpu` line's 7th value).
//!
//! All of them count clock ticks (`USER_HZ`, 100 per second here). This kernel uses tick
//! accounting without `CONFIG_IRQ_TIME_ACCOUNTING`: a tick that lands in a softirq is charged
//! both to the `softirq` column of `/proc/stat` and to the system time of the task it
//! interrupted (see [`crate::loadgen`] for what that means for a server's bill).

use std::time::Duration;

use anyhow::{Context as _, Result};

/// Clock ticks per second of the `/proc` times (`sysconf(_SC_CLK_TCK)`).
pub fn clk_tck() -> u64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).max(1) as u64
}

/// `ticks` at [`clk_tck`] per second as a duration.
pub fn ticks(ticks: u64) -> Duration {
    Duration::from_micros(ticks * 1_000_000 / clk_tck())
}

/// utime + stime, in ticks, of a `/proc/PID/stat` or `/proc/PID/task/TID/stat` line. The
/// command name (field 2) is in parentheses and may hold spaces and ')': fields are counted
/// from the last ')'.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name (index 11, 12).
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// The softirq ticks of all CPUs: the 7th value of `/proc/stat`'s `cpu` line (user, nice,
/// system, idle, iowait, irq, softirq, …).
pub fn parse_softirq_ticks(proc_stat: &str) -> Option<u64> {
    let line = proc_stat
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))?;
    line.split_whitespace().nth(7)?.parse().ok()
}

/// User + system time of process `pid`, all its threads (live and exited).
pub fn process(pid: u32) -> Result<Duration> {
    let path = format!("/proc/{pid}/stat");
    let stat = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
    Ok(ticks(
        parse_stat_ticks(&stat).with_context(|| format!("parse {path}: {stat:?}"))?,
    ))
}

/// User + system time of this process's live threads whose name starts with `prefix`, and
/// how many there are.
pub fn threads(prefix: &str) -> Result<(Duration, usize)> {
    let mut total = 0;
    let mut n = 0;
    for e in std::fs::read_dir("/proc/self/task").context("read /proc/self/task")? {
        let dir = e?.path();
        // A thread may exit between the listing and the reads: skip it.
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !comm.starts_with(prefix) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(dir.join("stat")) else {
            continue;
        };
        total += parse_stat_ticks(&stat)
            .with_context(|| format!("parse {}/stat: {stat:?}", dir.display()))?;
        n += 1;
    }
    Ok((ticks(total), n))
}

/// User + system time of the calling thread.
pub fn this_thread() -> Result<Duration> {
    let stat =
        std::fs::read_to_string("/proc/thread-self/stat").context("read /proc/thread-self/stat")?;
    Ok(ticks(
        parse_stat_ticks(&stat).context("parse /proc/thread-self/stat")?,
    ))
}

/// Softirq time of all CPUs so far.
pub fn softirq() -> Result<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    Ok(ticks(
        parse_softirq_ticks(&stat).context("no cpu line in /proc/stat")?,
    ))
}

/// CPU seconds per gigabit: `cpu` spent while `bytes` were delivered (NaN for no bytes).
pub fn s_per_gbit(cpu: Duration, bytes: u64) -> f64 {
    if bytes == 0 {
        return f64::NAN;
    }
    cpu.as_secs_f64() / (bytes as f64 * 8.0 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_system_ticks_are_counted_after_the_name() {
        // A real line of a thread named "wg-udp", utime 1234, stime 567.
        let line = "4242 (wg-udp) S 1 4242 4242 0 -1 4194368 120 0 0 0 1234 567 0 0 20 0 5 0 \
                    12345 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 -1 1 0 0 0 0 0";
        assert_eq!(parse_stat_ticks(line), Some(1801));
        // A name with spaces and ')' does not shift the fields.
        let odd = "7 (a) b (c)) R 1 7 7 0 -1 0 0 0 0 0 10 20 0 0 20 0 1 0 1 0 0";
        assert_eq!(parse_stat_ticks(odd), Some(30));
        assert_eq!(parse_stat_ticks("7 (short) R 1 2"), None);
        assert_eq!(parse_stat_ticks("no parenthesis"), None);
    }

    #[test]
    fn softirq_is_the_seventh_value_of_the_cpu_line() {
        let stat = "cpu  6516063 97307 1163706 2864400 67745 0 52807 9019 0 0\n\
                    cpu0 3126386 48321 549073 1609475 22259 0 24486 4558 0 0\n\
                    cpu1 3389676 48986 614633 1254925 45485 0 28320 4460 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(parse_softirq_ticks(stat), Some(52807));
        assert_eq!(parse_softirq_ticks("cpu0 1 2 3 4 5 6 7\n"), None);
        assert_eq!(parse_softirq_ticks("cpu 1 2 3\n"), None);
    }

    #[test]
    fn seconds_per_gigabit() {
        // 1.5 s of CPU for 1.25 GB (10 Gbit): 0.15 s per Gbit.
        let v = s_per_gbit(Duration::from_millis(1500), 1_250_000_000);
        assert!((v - 0.15).abs() < 1e-12, "{v}");
        assert!(s_per_gbit(Duration::from_secs(1), 0).is_nan());
    }

    #[test]
    fn this_threads_time_is_readable_and_grows_with_work() {
        let before = this_thread().unwrap();
        let t = std::time::Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(120) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        let after = this_thread().unwrap();
        // 120 ms of spinning is at least a few ticks even on a loaded machine.
        assert!(after > before, "{before:?} -> {after:?}");
        assert!(threads("no-such-thread-prefix").unwrap().1 == 0);
    }
}
