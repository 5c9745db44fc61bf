//! Manual pages generated from the clap definitions (`clap_mangen`), so they cannot drift
//! from `--help`: the hidden `man` subcommand prints the daemon's page, or with `--dir`
//! writes it and one page per subcommand (`vhost-device-blk-bitmap-bitmap.1`,
//! `vhost-device-blk-bitmap-bitmap-add.1`, `vhost-device-blk-bitmap-ctl.1`, …).

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use clap::{Args, CommandFactory};
use clap_mangen::Man;

use crate::args::Cli;

/// Manual section of every page (user commands).
pub const SECTION: &str = "1";

/// `man`: the manual pages (hidden from `--help`).
#[derive(Args, Debug, Clone, PartialEq, Eq)]
pub struct ManArgs {
    /// Write every page (the daemon's and one per subcommand, as
    /// `vhost-device-blk-bitmap-SUBCOMMAND.1`) into this directory (created if missing)
    /// instead of printing the daemon's page to stdout; the files written are listed.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// One rendered manual page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// File name, e.g. `vhost-device-blk-bitmap-check.1`.
    pub file_name: String,
    /// The page, roff with the `man` macros.
    pub roff: Vec<u8>,
}

/// The command the pages describe: the daemon's, built (so subcommands carry their
/// full names), without clap's `help` subcommand.
pub fn command() -> clap::Command {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    cmd
}

/// The daemon's own page (what `vhost-device-blk-bitmap man` prints).
pub fn main_page() -> io::Result<Page> {
    render(&command(), None)
}

/// Every page: the daemon's first, then each visible subcommand at any depth.
pub fn pages() -> io::Result<Vec<Page>> {
    fn walk(cmd: &clap::Command, parent: Option<&str>, out: &mut Vec<Page>) -> io::Result<()> {
        out.push(render(cmd, parent)?);
        let name = display_name(cmd);
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            walk(sub, Some(name), out)?;
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(&command(), None, &mut out)?;
    Ok(out)
}

/// Writes every page into `dir` (created if missing); returns the files written.
pub fn write_pages(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let context = |what: &str, path: &Path, e: io::Error| {
        io::Error::new(e.kind(), format!("cannot {what} '{}': {e}", path.display()))
    };
    std::fs::create_dir_all(dir).map_err(|e| context("create", dir, e))?;
    let mut written = Vec::new();
    for page in pages()? {
        let path = dir.join(&page.file_name);
        std::fs::write(&path, &page.roff).map_err(|e| context("write", &path, e))?;
        written.push(path);
    }
    Ok(written)
}

/// Runs `man`; returns the process exit code (0, or 1 with the reason on stderr).
pub fn run(a: &ManArgs) -> u8 {
    let result = match &a.dir {
        None => main_page().and_then(|p| {
            let mut out = io::stdout().lock();
            out.write_all(&p.roff)?;
            out.flush()
        }),
        Some(dir) => write_pages(dir).and_then(|files| {
            let mut out = io::stdout().lock();
            for f in files {
                writeln!(out, "{}", f.display())?;
            }
            out.flush()
        }),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("{}: man: {e}", super::PROG);
            1
        }
    }
}

/// A built command's full name (`vhost-device-blk-bitmap-bitmap-add`).
fn display_name(cmd: &clap::Command) -> &str {
    cmd.get_display_name().unwrap_or(cmd.get_name())
}

/// Renders one page (`parent`: the page of the enclosing command, `None` for the
/// daemon's): clap_mangen's sections, plus ours before VERSION.
fn render(cmd: &clap::Command, parent: Option<&str>) -> io::Result<Page> {
    let man = Man::new(cmd.clone())
        .section(SECTION)
        .source(format!("{} {}", super::PROG, env!("CARGO_PKG_VERSION")))
        .manual("User Commands");
    let mut roff = Vec::new();
    man.render_title(&mut roff)?;
    man.render_name_section(&mut roff)?;
    man.render_synopsis_section(&mut roff)?;
    man.render_description_section(&mut roff)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut roff)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut roff)?;
    }
    if parent.is_none() {
        roff.extend_from_slice(ROOT_SECTIONS.as_bytes());
        roff.extend_from_slice(b".SH \"SEE ALSO\"\n");
        let mut refs: Vec<String> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| man_ref(display_name(s)))
            .collect();
        refs.extend(
            ["qemu-img", "qemu-storage-daemon", "qemu-nbd"]
                .iter()
                .map(|n| man_ref(n)),
        );
        refs.push("\\fBsystemd.socket\\fR(5)".into());
        refs.push("\\fBsd_notify\\fR(3)".into());
        roff.extend_from_slice(refs.join(",\n").as_bytes());
        roff.push(b'\n');
    } else {
        let mut refs = vec![man_ref(super::PROG)];
        refs.extend(parent.filter(|p| *p != super::PROG).map(man_ref));
        roff.extend_from_slice(b".SH \"SEE ALSO\"\n");
        roff.extend_from_slice(refs.join(",\n").as_bytes());
        roff.push(b'\n');
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut roff)?;
    }
    Ok(Page {
        file_name: man.get_filename(),
        roff,
    })
}

/// `\fBname\fR(1)` with roff's hyphens.
fn man_ref(name: &str) -> String {
    format!("\\fB{}\\fR({SECTION})", name.replace('-', "\\-"))
}

/// Sections of the daemon's page that clap does not know (roff, `man` macros).
const ROOT_SECTIONS: &str = r#".SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
Log filter of the daemon (\fBenv_logger\fR syntax); default \fBinfo\fR.
.TP
\fBLISTEN_PID\fR, \fBLISTEN_FDS\fR, \fBLISTEN_FDNAMES\fR
systemd socket activation: when \fBLISTEN_PID\fR is the daemon's pid and \fBLISTEN_FDS\fR is 1 or more, the passed socket named \fBvhost\-user\fR (else the first) is served as with \fB\-\-socket\-fd\fR, and the variables are removed from the environment.
Giving \fB\-\-socket\-path\fR or \fB\-\-socket\-fd\fR as well is an error.
.TP
\fBNOTIFY_SOCKET\fR
systemd notification socket (\fBType=notify\fR): \fBREADY=1\fR once the sockets listen, \fBSTATUS=\fR on frontend connect and disconnect, \fBSTOPPING=1\fR on SIGTERM.
.SH SIGNALS
SIGTERM and SIGINT stop accepting requests, finish the requests already taken from the rings, flush the image, store the persistent bitmaps, remove the socket and exit 0.
.SH "EXIT STATUS"
Serving: 0 after SIGTERM, SIGINT or the QMP \fBquit\fR command with the bitmaps stored; 1 on an error while serving (also when the bitmaps could not be stored at exit); 2 for invalid arguments or settings.
The offline subcommands exit 0 on success and 1 on failure, with the reason on stderr; \fBcheck\fR also exits 2 (corruptions) and 3 (leaked clusters only), as \fBqemu\-img check\fR.
"#;
