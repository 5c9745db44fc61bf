//! Interoperability with QEMU's own Python client library, `qemu.qmp` 0.0.6
//! (the async `QMPClient` and the `qmp-shell` tool built on its legacy
//! synchronous client).
//!
//! The library is installed with pip into a venv under the target directory,
//! once (a marker file records a complete install; a lock file serializes
//! concurrent test processes). Without python3, its venv module, pip or
//! network access the tests are skipped, or fail under `CI=true`.

mod common;

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{require, start};

const QEMU_QMP: &str = "qemu.qmp==0.0.6";

fn run_ok(cmd: &mut Command) -> bool {
    match cmd.stdout(Stdio::null()).stderr(Stdio::piped()).output() {
        Ok(out) if out.status.success() => true,
        Ok(out) => {
            eprintln!(
                "{cmd:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            );
            false
        }
        Err(e) => {
            eprintln!("{cmd:?}: {e}");
            false
        }
    }
}

/// The venv with qemu.qmp, or `None` when it cannot be had (test skipped).
fn venv() -> Option<PathBuf> {
    let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(base).unwrap();
    let dir = base.join("qmp-venv-qemu.qmp-0.0.6");
    let lock = File::create(base.join("qmp-venv.lock")).unwrap();
    // SAFETY: flock on an open descriptor; released when `lock` is closed.
    let r = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(r, 0, "flock");
    let marker = dir.join("installed-ok");
    if marker.exists() {
        return Some(dir);
    }
    if !require(run_ok(Command::new("python3").arg("--version")), "python3") {
        return None;
    }
    let _ = std::fs::remove_dir_all(&dir);
    if !require(
        run_ok(Command::new("python3").args(["-m", "venv"]).arg(&dir)),
        "python3's venv module (Debian: apt-get install python3-venv)",
    ) {
        return None;
    }
    let py = dir.join("bin/python");
    if !require(
        run_ok(Command::new(&py).args(["-m", "pip", "--version"])),
        "pip inside the venv",
    ) {
        return None;
    }
    if !require(
        run_ok(Command::new(&py).args(["-m", "pip", "install", "-q", QEMU_QMP])),
        "`pip install qemu.qmp==0.0.6` (PyPI reachable?)",
    ) {
        return None;
    }
    std::fs::write(&marker, QEMU_QMP).unwrap();
    Some(dir)
}

const ASYNC_SCRIPT: &str = r#"
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(path):
    qmp = QMPClient('interop-test')
    await qmp.connect(path)
    g = qmp.greeting
    assert g.QMP.version['qemu']['major'] == 10, g
    assert g.QMP.capabilities == [], g

    assert await qmp.execute('echo', {'a': 1, 's': 'é'}) == {'a': 1, 's': 'é'}
    assert await qmp.execute('query-named-block-nodes') == []

    async def error_of(cmd, args=None):
        try:
            await qmp.execute(cmd, args)
        except ExecuteError as e:
            return (e.error_class, str(e))
        raise AssertionError(f'{cmd} did not fail')

    assert await error_of('block-dirty-bitmap-add', {'node': 'disk0'}) == \
        ('GenericError', "Parameter 'name' is missing")
    assert await error_of('block-dirty-bitmap-add', {'node': 'disk0', 'name': 'b', 'persistent': 1}) == \
        ('GenericError', "Invalid parameter type for 'persistent', expected: boolean")
    assert await error_of('no-such-cmd') == \
        ('CommandNotFound', 'The command no-such-cmd has not been found')
    assert await error_of('not-found') == ('DeviceNotFound', "Device 'x' not found")
    assert await error_of('qmp_capabilities') == \
        ('CommandNotFound', 'Capabilities negotiation is already complete, command ignored')

    names = {c['name'] for c in await qmp.execute('query-commands')}
    assert {'echo', 'quit', 'query-commands', 'qmp_capabilities'} <= names, names

    # Many commands in flight at once, matched by id.
    results = await asyncio.gather(*(qmp.execute('echo', {'i': i}) for i in range(100)))
    assert results == [{'i': i} for i in range(100)]

    with qmp.listener('PY_EVENT') as listener:
        await qmp.execute('emit', {'event': 'PY_EVENT'})
        event = await asyncio.wait_for(listener.get(), 10)
    assert event['event'] == 'PY_EVENT', event
    assert event['data'] == {'from': 'handler'}, event
    assert set(event['timestamp']) == {'seconds', 'microseconds'}, event

    assert await qmp.execute('quit') == {}
    # The server closes the connection after `quit`, as QEMU does when it
    # exits; qemu.qmp then reports EOF on disconnect (QEMU's own
    # machine.py ignores EOFError after issuing quit).
    try:
        await qmp.disconnect()
    except EOFError:
        pass
    print('PYTHON-OK')

asyncio.run(main(sys.argv[1]))
"#;

#[test]
fn qemu_qmp_async_client() {
    let Some(venv) = venv() else { return };
    let s = start();
    let script = s.dir.path().join("interop.py");
    std::fs::write(&script, ASYNC_SCRIPT).unwrap();
    let out = Command::new(venv.join("bin/python"))
        .arg(&script)
        .arg(&s.path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.contains("PYTHON-OK"),
        "python failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    // `quit` stopped the server.
    s.handle.wait();
    assert!(!s.path.exists());
}

#[test]
fn qmp_shell_non_interactive() {
    let Some(venv) = venv() else { return };
    let s = start();
    let mut child = Command::new(venv.join("bin/qmp-shell"))
        .arg(&s.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // An empty line makes qmp-shell print the events received so far.
    child
        .stdin
        .take()
        .unwrap()
        .write_all(
            b"echo a=1 b=foo\n\
              block-dirty-bitmap-add node=disk0\n\
              nonesuch\n\
              emit event=SHELL_EVENT\n\
              \n\
              query-commands\n",
        )
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "Connected to QEMU 10.0.2",
        r#"{"return": {"a": 1, "b": "foo"}}"#,
        r#"{"error": {"class": "GenericError", "desc": "Parameter 'name' is missing"}}"#,
        r#"{"error": {"class": "CommandNotFound", "desc": "The command nonesuch has not been found"}}"#,
        "'event': 'SHELL_EVENT'",
        r#"{"name": "query-commands"}"#,
    ] {
        assert!(stdout.contains(want), "missing {want:?} in:\n{stdout}");
    }
}
