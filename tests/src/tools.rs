//! Wrappers around the installed QEMU tools (qemu-img, qemu-io, qemu-nbd) used to check
//! images from the outside, plus tool discovery honouring the CI policy.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::error::{E2eError, Result};
use crate::process::{describe, run_cmd, run_ok, wait_for_socket, ChildGuard, CmdOutput};

/// Limit for one short QEMU tool invocation.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);

/// True when running under CI (`CI=true` or `CI=1`): missing tools are test failures there.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Looks `name` up in `PATH`.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Finds a tool a test needs. Under CI a missing tool fails the test (panics naming it);
/// otherwise a note is printed and `None` tells the test to skip.
pub fn require_tool(name: &str) -> Option<PathBuf> {
    match find_tool(name) {
        Some(p) => Some(p),
        None if in_ci() => panic!("required tool `{name}` is not installed (CI=true)"),
        None => {
            eprintln!("note: skipping test, `{name}` is not installed (set CI=true to fail)");
            None
        }
    }
}

/// Finds every tool in `names` (see [`require_tool`]); `None` if any is missing.
pub fn require_tools(names: &[&str]) -> Option<Vec<PathBuf>> {
    names.iter().map(|n| require_tool(n)).collect()
}

fn tool(name: &str) -> Result<Command> {
    let path = find_tool(name).ok_or_else(|| E2eError::ToolMissing(name.to_owned()))?;
    Ok(Command::new(path))
}

/// `qemu-img create -f qcow2 PATH SIZE`.
pub fn qemu_img_create_qcow2(path: &Path, size: u64) -> Result<()> {
    let mut cmd = tool("qemu-img")?;
    cmd.args(["create", "-q", "-f", "qcow2"])
        .arg(path)
        .arg(size.to_string());
    run_ok(&mut cmd, TOOL_TIMEOUT).map(drop)
}

/// `qemu-img bitmap --add -g GRANULARITY PATH NAME` (a persistent, enabled bitmap).
pub fn qemu_img_bitmap_add(path: &Path, name: &str, granularity: u64) -> Result<()> {
    let mut cmd = tool("qemu-img")?;
    cmd.args(["bitmap", "--add", "-g", &granularity.to_string()])
        .arg(path)
        .arg(name);
    run_ok(&mut cmd, TOOL_TIMEOUT).map(drop)
}

/// `qemu-img check PATH`: Ok with the output when the image is consistent (exit 0).
pub fn qemu_img_check(path: &Path) -> Result<CmdOutput> {
    let mut cmd = tool("qemu-img")?;
    cmd.arg("check").arg(path);
    run_ok(&mut cmd, TOOL_TIMEOUT)
}

/// `qemu-img info --output=json [-U] PATH`, parsed.
pub fn qemu_img_info_json(path: &Path, force_share: bool) -> Result<Value> {
    let mut cmd = tool("qemu-img")?;
    cmd.args(["info", "--output=json"]);
    if force_share {
        cmd.arg("-U");
    }
    cmd.arg(path);
    let text = describe(&cmd);
    let out = run_ok(&mut cmd, TOOL_TIMEOUT)?;
    serde_json::from_str(&out.stdout).map_err(|e| E2eError::BadOutput {
        cmd: text,
        detail: format!("not JSON ({e}): {}", out.stdout),
    })
}

/// The persistent bitmaps listed by `qemu-img info` as `(name, granularity, flags)`.
pub fn qemu_img_bitmaps(path: &Path) -> Result<Vec<(String, u64, Vec<String>)>> {
    let info = qemu_img_info_json(path, false)?;
    let list = info
        .pointer("/format-specific/data/bitmaps")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    list.iter()
        .map(|b| {
            let name = b.get("name").and_then(Value::as_str);
            let gran = b.get("granularity").and_then(Value::as_u64);
            let flags = b.get("flags").and_then(Value::as_array);
            match (name, gran, flags) {
                (Some(n), Some(g), Some(f)) => Ok((
                    n.to_owned(),
                    g,
                    f.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect(),
                )),
                _ => Err(E2eError::BadOutput {
                    cmd: format!("qemu-img info --output=json {}", path.display()),
                    detail: format!("malformed bitmap entry {b}"),
                }),
            }
        })
        .collect()
}

/// Runs `qemu-io -f FORMAT [-r] -c CMD... IMAGE`; a non-zero exit (e.g. a failed
/// `read -P` pattern check) is an error.
pub fn qemu_io(image: &Path, format: &str, read_only: bool, cmds: &[&str]) -> Result<CmdOutput> {
    let mut cmd = tool("qemu-io")?;
    cmd.args(["-f", format]);
    if read_only {
        cmd.arg("-r");
    }
    for c in cmds {
        cmd.args(["-c", c]);
    }
    cmd.arg(image);
    let text = describe(&cmd);
    let out = run_ok(&mut cmd, TOOL_TIMEOUT)?;
    // Older qemu-io versions exit 0 after a failed pattern check; look at the text too.
    if out.stdout.contains("Pattern verification failed") || out.stdout.contains("failed:") {
        return Err(E2eError::CommandFailed {
            cmd: text,
            status: out.status.to_string(),
            stdout: out.stdout,
            stderr: out.stderr,
        });
    }
    Ok(out)
}

/// `qemu-img compare -f FMT_A -F FMT_B A B`: `Ok(true)` if the guest-visible contents are
/// identical, `Ok(false)` if they differ (the output says where).
pub fn qemu_img_compare(a: &Path, fmt_a: &str, b: &Path, fmt_b: &str) -> Result<(bool, String)> {
    let mut cmd = tool("qemu-img")?;
    cmd.args(["compare", "-f", fmt_a, "-F", fmt_b])
        .arg(a)
        .arg(b);
    let text = describe(&cmd);
    let out = run_cmd(&mut cmd, TOOL_TIMEOUT)?;
    match out.status.code() {
        Some(0) => Ok((true, out.stdout)),
        Some(1) => Ok((false, out.stdout)),
        _ => Err(E2eError::CommandFailed {
            cmd: text,
            status: out.status.to_string(),
            stdout: out.stdout,
            stderr: out.stderr,
        }),
    }
}

/// Dirty extents `(offset, length)` of persistent bitmap `bitmap` in the qcow2 `image`,
/// read by QEMU itself: the image is exported read-only with `qemu-nbd -B`, and
/// `qemu-img map` with `x-dirty-bitmap` reports dirty areas as `"data": false`.
/// Adjacent extents are merged; lengths are multiples of the granularity.
pub fn bitmap_dirty_extents(image: &Path, bitmap: &str) -> Result<Vec<(u64, u64)>> {
    let dir = tempfile::tempdir().map_err(|source| E2eError::Io {
        path: std::env::temp_dir(),
        source,
    })?;
    let sock = dir.path().join("nbd.sock");
    let log = dir.path().join("qemu-nbd.log");
    let log_file = std::fs::File::create(&log).map_err(|source| E2eError::Io {
        path: log.clone(),
        source,
    })?;
    let log_err = log_file.try_clone().map_err(|source| E2eError::Io {
        path: log.clone(),
        source,
    })?;
    let mut nbd = tool("qemu-nbd")?;
    nbd.args(["-r", "-t", "-f", "qcow2", "-B", bitmap, "-k"])
        .arg(&sock)
        .arg(image)
        .stdin(std::process::Stdio::null())
        .stdout(log_file)
        .stderr(log_err);
    let text = describe(&nbd);
    let child = nbd.spawn().map_err(|source| E2eError::Spawn {
        cmd: text.clone(),
        source,
    })?;
    let mut guard = ChildGuard::new(child, &text);
    wait_for_socket(&sock, Duration::from_secs(20), Some(&mut guard), Some(&log))?;

    let mut map = tool("qemu-img")?;
    map.args(["map", "--output=json", "--image-opts"])
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{bitmap}",
            sock.display()
        ));
    let map_text = describe(&map);
    let out = run_ok(&mut map, TOOL_TIMEOUT)?;
    guard.kill();
    parse_dirty_map(&out.stdout).map_err(|detail| E2eError::BadOutput {
        cmd: map_text,
        detail,
    })
}

/// Extracts merged `"data": false` extents from `qemu-img map --output=json` text.
pub fn parse_dirty_map(json: &str) -> std::result::Result<Vec<(u64, u64)>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("not JSON ({e}): {json}"))?;
    let arr = v
        .as_array()
        .ok_or_else(|| format!("not a JSON array: {json}"))?;
    let mut extents = Vec::new();
    for e in arr {
        let start = e.get("start").and_then(Value::as_u64);
        let len = e.get("length").and_then(Value::as_u64);
        let data = e.get("data").and_then(Value::as_bool);
        let (Some(start), Some(len), Some(data)) = (start, len, data) else {
            return Err(format!("malformed map entry {e}"));
        };
        if !data && len > 0 {
            extents.push((start, len));
        }
    }
    Ok(merge_extents(extents))
}

/// Sorts extents and merges overlapping or touching ones.
pub fn merge_extents(mut v: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, l) in v.into_iter().filter(|e| e.1 > 0) {
        match out.last_mut() {
            Some((ps, pl)) if *ps + *pl >= s => *pl = (*pl).max(s + l - *ps),
            _ => out.push((s, l)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dirty_map_keeps_data_false_and_merges() {
        let json = r#"[{"start":0,"length":65536,"data":true},
            {"start":65536,"length":65536,"data":false},
            {"start":131072,"length":65536,"data":false},
            {"start":196608,"length":1000,"data":true},
            {"start":262144,"length":65536,"data":false}]"#;
        assert_eq!(
            parse_dirty_map(json).unwrap(),
            vec![(65536, 131072), (262144, 65536)]
        );
    }

    #[test]
    fn dirty_map_rejects_garbage() {
        assert!(parse_dirty_map("nope").is_err());
        assert!(parse_dirty_map(r#"[{"start":0}]"#).is_err());
    }

    #[test]
    fn merge_handles_overlap_and_order() {
        assert_eq!(
            merge_extents(vec![(10, 5), (0, 4), (4, 2), (12, 10), (30, 0)]),
            vec![(0, 6), (10, 12)]
        );
    }
}
