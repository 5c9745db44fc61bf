//! CPU time of a process (all its threads) from `/proc/PID/stat`.

use crate::error::{BenchError, Result};

/// utime + stime of `pid` in seconds.
pub fn process_cpu_seconds(pid: u32) -> Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).map_err(|e| BenchError::Os {
        what: format!("reading {path}"),
        source: e,
    })?;
    let ticks = parse_stat_ticks(&text)
        .ok_or_else(|| BenchError::Invalid(format!("cannot parse {path}: '{text}'")))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Ok(ticks as f64 / hz)
}

/// utime + stime (fields 14 and 15) in clock ticks; the command name (field 2) may
/// contain spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state): field n is f[n - 3].
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fields_after_the_command_name() {
        let s = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 37 5 0 0 20 0 3 0 12 0 0";
        assert_eq!(parse_stat_ticks(s), Some(42));
        assert_eq!(parse_stat_ticks("garbage"), None);
    }

    #[test]
    fn reads_our_own_process() {
        let t = process_cpu_seconds(std::process::id()).unwrap();
        assert!(t >= 0.0);
    }
}
