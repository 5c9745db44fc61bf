//! The user documentation cannot drift from the binary:
//!
//! * every long option of the serving mode (clap's `Cli::command()`, the same definitions
//!   `--help` prints) has a row in the "Options" table of `vhost-device-blk-bitmap/README.md`,
//!   every option a row names exists, and short forms agree (`-s, --socket-path`);
//! * the manual page the hidden `man` subcommand prints is well-formed roff with NAME,
//!   SYNOPSIS and every option, and renders with `groff` and `man -l` (those two checks
//!   are skipped with a note when the tools are not installed, and fail under CI=true);
//! * `man --dir DIR` writes one page per subcommand (`vhost-device-blk-bitmap-bitmap.1`,
//!   `-create.1`, `-check.1`, `-ctl.1`, and the nested ones), each with its own options.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Command, Output};

use clap::CommandFactory;
use vhost_device_blk_bitmap::args::Cli;

const BIN: &str = env!("CARGO_BIN_EXE_vhost-device-blk-bitmap");
const PROG: &str = "vhost-device-blk-bitmap";
const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// A visible option of a command: long name (without `--`) and short form.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Opt {
    long: String,
    short: Option<char>,
    help: String,
}

/// The visible options of `cmd`, without clap's `--help` and `--version`.
fn options(cmd: &clap::Command) -> Vec<Opt> {
    cmd.get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_positional())
        .filter(|a| !matches!(a.get_id().as_str(), "help" | "version"))
        .map(|a| Opt {
            long: a
                .get_long()
                .unwrap_or_else(|| panic!("option {} has no long form", a.get_id()))
                .to_string(),
            short: a.get_short(),
            help: a.get_help().map(|h| h.to_string()).unwrap_or_default(),
        })
        .collect()
}

/// The serving mode's command, built as the binary builds it.
fn cli() -> clap::Command {
    let mut cmd = Cli::command();
    cmd.build();
    cmd
}

/// One row of the README's Options table: its line number and the options of its first
/// cell (longs without `--`, shorts without `-`).
#[derive(Debug)]
struct Row {
    line: usize,
    longs: Vec<String>,
    shorts: Vec<char>,
}

/// Rows of the table under `## Options` in `readme`.
fn options_table(readme: &str) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut in_section = false;
    for (i, line) in readme.lines().enumerate() {
        if line.starts_with("## ") {
            in_section = line.trim() == "## Options";
            continue;
        }
        if !in_section || !line.starts_with('|') {
            continue;
        }
        let first = line[1..].split('|').next().unwrap_or("").trim();
        if first == "option" || first.chars().all(|c| c == '-' || c == ':') {
            continue; // header and delimiter rows
        }
        let mut row = Row {
            line: i + 1,
            longs: Vec::new(),
            shorts: Vec::new(),
        };
        // Options are code spans: `--format`, `-s, --socket-path`, `--a` / `--b`.
        for (n, span) in first.split('`').enumerate() {
            if n % 2 == 0 {
                continue;
            }
            for token in span.split([',', ' ', '/']).filter(|t| !t.is_empty()) {
                if let Some(long) = token.strip_prefix("--") {
                    row.longs.push(long.to_string());
                } else if let Some(short) = token.strip_prefix('-') {
                    let mut c = short.chars();
                    match (c.next(), c.next()) {
                        (Some(s), None) => row.shorts.push(s),
                        _ => panic!("README.md:{}: odd option token {token:?}", row.line),
                    }
                }
            }
        }
        rows.push(row);
    }
    rows
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run the daemon binary")
}

fn stdout_of(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "{BIN} {args:?} failed: {:?}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 output")
}

/// Whether `tool` can be run; prints a note when it cannot.
fn have(tool: &str, probe: &[&str]) -> bool {
    let ok = Command::new(tool)
        .args(probe)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is required when CI=true (Debian packages groff-base and man-db)"
        );
        eprintln!("note: {tool} is not installed; skipping the {tool} rendering check");
    }
    ok
}

/// `--name` as the man page writes it: `\fB\-\-name\fR`.
fn roff_long(long: &str) -> String {
    format!("\\fB\\-\\-{}\\fR", long.replace('-', "\\-"))
}

/// The body of section `.SH name` of a page (up to the next `.SH`).
fn section<'a>(roff: &'a str, name: &str) -> &'a str {
    let start = roff
        .find(&format!(".SH {name}\n"))
        .map(|i| i + name.len() + 5)
        .unwrap_or(roff.len());
    let body = &roff[start..];
    &body[..body.find("\n.SH ").map_or(body.len(), |i| i + 1)]
}

/// Whether the OPTIONS section describes `--long` (a `.TP` item naming it).
fn documents(roff: &str, long: &str) -> bool {
    let options = section(roff, "OPTIONS");
    let wanted = roff_long(long);
    options
        .split(".TP\n")
        .skip(1)
        .any(|item| item.lines().next().is_some_and(|l| l.contains(&wanted)))
}

/// Structural roff checks: a `.TH` title with the expected name and section 1, the
/// given sections, only `man` macros and the requests clap_mangen uses, no line that
/// troff would take as a no-break control line, and every font change closed on its
/// line.
fn lint_roff(name: &str, roff: &str, sections: &[&str]) {
    const MACROS: &[&str] = &[
        "TH", "SH", "SS", "TP", "IP", "PP", "LP", "P", "RS", "RE", "br", "sp", "B", "I", "BR",
        "RB", "BI", "IB", "IR", "RI", "nf", "fi", "ie", "el", "ds", "in", "EX", "EE",
    ];
    assert!(!roff.is_empty(), "{name}: empty page");
    let th = roff
        .lines()
        .find(|l| l.starts_with(".TH "))
        .unwrap_or_else(|| panic!("{name}: no .TH line"));
    assert!(
        th.starts_with(&format!(".TH {name} 1 ")),
        "{name}: title line {th:?}"
    );
    let mut seen = BTreeSet::new();
    for (i, line) in roff.lines().enumerate() {
        let at = format!("{name}:{}: {line:?}", i + 1);
        assert!(
            !line.starts_with('\''),
            "{at}: starts with a no-break control"
        );
        if let Some(rest) = line.strip_prefix('.') {
            let mac = rest.split_whitespace().next().unwrap_or("");
            assert!(MACROS.contains(&mac), "{at}: unexpected request .{mac}");
            if mac == "SH" {
                seen.insert(rest[2..].trim().trim_matches('"').to_string());
            }
        }
        // Fonts: \fB / \fI must be back to \fR (or \fP) by the end of the line.
        let mut font = 'R';
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            if c == '\\' {
                match chars.next() {
                    Some('f') => font = chars.next().unwrap_or('?'),
                    Some(_) => {}
                    None => panic!("{at}: line ends with a lone backslash"),
                }
            }
        }
        assert!(font == 'R' || font == 'P', "{at}: font \\f{font} left open");
    }
    for s in sections {
        assert!(seen.contains(*s), "{name}: no .SH {s} (sections: {seen:?})");
    }
}

/// groff's own check (all warnings on) when groff is installed.
fn groff_check(path: &Path) {
    let out = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(path)
        .output()
        .expect("run groff");
    assert!(
        out.status.success() && out.stderr.is_empty(),
        "groff warns about {}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Text without backspace overstriking (`X\bX`, `_\bX`).
fn plain(text: &str) -> String {
    let mut out: Vec<char> = Vec::new();
    for c in text.chars() {
        if c == '\u{8}' {
            out.pop();
        } else {
            out.push(c);
        }
    }
    out.into_iter().collect()
}

/// Every visible subcommand at any depth, as its page's name.
fn subcommand_pages(cmd: &clap::Command, prefix: &str, out: &mut BTreeMap<String, Vec<Opt>>) {
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        if sub.get_name() == "help" {
            continue;
        }
        let name = format!("{prefix}-{}", sub.get_name());
        out.insert(name.clone(), options(sub));
        subcommand_pages(sub, &name, out);
    }
}

// ---------------------------------------------------------------------------------------
// (a) README Options table <-> the serving mode's options
// ---------------------------------------------------------------------------------------

#[test]
fn clap_definitions_are_consistent() {
    Cli::command().debug_assert();
}

#[test]
fn readme_options_table_matches_the_serving_options() {
    let readme = std::fs::read_to_string(README).expect("read README.md");
    let rows = options_table(&readme);
    assert!(
        rows.len() > 10,
        "README.md: no Options table found under '## Options'"
    );
    let opts = options(&cli());
    assert!(opts.len() > 10, "clap lists only {} options", opts.len());

    let mut table: BTreeMap<&str, &Row> = BTreeMap::new();
    for row in &rows {
        for long in &row.longs {
            if let Some(prev) = table.insert(long, row) {
                panic!(
                    "README.md:{} and :{} both have a row for --{long}",
                    prev.line, row.line
                );
            }
        }
    }

    let missing: Vec<String> = opts
        .iter()
        .filter(|o| !table.contains_key(o.long.as_str()))
        .map(|o| format!("| `--{}` | {} |", o.long, o.help))
        .collect();
    assert!(
        missing.is_empty(),
        "options of --help without a row in the Options table of README.md:\n{}",
        missing.join("\n")
    );

    let known: BTreeMap<&str, &Opt> = opts.iter().map(|o| (o.long.as_str(), o)).collect();
    let unknown: Vec<String> = table
        .iter()
        .filter(|(long, _)| !known.contains_key(*long) && !matches!(**long, "help" | "version"))
        .map(|(long, row)| format!("README.md:{}: --{long}", row.line))
        .collect();
    assert!(
        unknown.is_empty(),
        "rows of the Options table naming options the binary does not have:\n{}",
        unknown.join("\n")
    );

    // Short forms: a row names `-s, --socket-path` exactly when the option has `-s`.
    for o in &opts {
        let row = table[o.long.as_str()];
        if let Some(s) = o.short {
            assert!(
                row.shorts.contains(&s),
                "README.md:{}: --{} has the short form -{s}: write `-{s}, --{}`",
                row.line,
                o.long,
                o.long
            );
        }
    }
    for row in &rows {
        for s in &row.shorts {
            assert!(
                row.longs
                    .iter()
                    .any(|l| known.get(l.as_str()).and_then(|o| o.short) == Some(*s)),
                "README.md:{}: -{s} is not the short form of {:?}",
                row.line,
                row.longs
            );
        }
    }
}

/// The binary's `--help` lists exactly the options of the library's `Cli` (the test
/// above reads them from the library), and not the hidden `man` subcommand.
#[test]
fn help_output_lists_the_library_options() {
    let help = stdout_of(&["--help"]);
    let from_help: BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|t| t.trim_end_matches(',').strip_prefix("--"))
                .map(str::to_string)
        })
        .filter(|l| l != "help" && l != "version")
        .collect();
    let from_cli: BTreeSet<String> = options(&cli()).into_iter().map(|o| o.long).collect();
    assert_eq!(from_help, from_cli, "--help and Cli::command() differ");

    let commands: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for c in ["bitmap", "create", "check", "ctl"] {
        assert!(commands.contains(&c), "--help lacks {c}: {commands:?}");
    }
    assert!(
        !commands.contains(&"man"),
        "the man subcommand must stay hidden: {commands:?}"
    );
}

// ---------------------------------------------------------------------------------------
// (b) the daemon's manual page
// ---------------------------------------------------------------------------------------

#[test]
fn man_page_is_roff_with_every_option() {
    let roff = stdout_of(&["man"]);
    assert_eq!(
        roff.as_bytes(),
        vhost_device_blk_bitmap::tool::man::main_page()
            .expect("render")
            .roff
            .as_slice(),
        "the binary prints the library's page"
    );
    lint_roff(
        PROG,
        &roff,
        &[
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "OPTIONS",
            "SUBCOMMANDS",
            "ENVIRONMENT",
            "EXIT STATUS",
            "SEE ALSO",
        ],
    );
    let name = roff
        .split(".SH NAME\n")
        .nth(1)
        .and_then(|r| r.lines().next())
        .expect("a line after .SH NAME");
    assert!(
        name.starts_with("vhost\\-device\\-blk\\-bitmap \\- "),
        "NAME line {name:?}"
    );
    let opts = options(&cli());
    let missing: Vec<&str> = opts
        .iter()
        .filter(|o| !documents(&roff, &o.long))
        .map(|o| o.long.as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "options missing from the man page: {missing:?}"
    );
    for sub in ["bitmap", "create", "check", "ctl"] {
        assert!(
            roff.contains(&format!("{PROG}-{sub}(1)").replace('-', "\\-")),
            "no reference to the {sub} page"
        );
    }
    assert!(
        !roff.contains("\\-man("),
        "the hidden man subcommand is listed"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join(format!("{PROG}.1"));
    std::fs::write(&file, &roff).expect("write page");
    if have("groff", &["--version"]) {
        groff_check(&file);
    }
    if have("man", &["--version"]) {
        let out = Command::new("man")
            .args(["--nh", "--nj", "-P", "cat", "-l"])
            .arg(&file)
            .env("MANWIDTH", "200")
            .env("LC_ALL", "C.UTF-8")
            .output()
            .expect("run man");
        assert!(
            out.status.success(),
            "man -l failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = plain(&String::from_utf8_lossy(&out.stdout));
        for heading in ["NAME", "SYNOPSIS", "OPTIONS", "ENVIRONMENT"] {
            assert!(
                text.lines().any(|l| l == heading),
                "man -l output lacks {heading}:\n{text}"
            );
        }
        for o in &opts {
            assert!(
                text.contains(&format!("--{}", o.long)),
                "man -l output lacks --{}",
                o.long
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// (c) one page per subcommand with --dir
// ---------------------------------------------------------------------------------------

#[test]
fn man_dir_writes_a_page_per_subcommand() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out_dir = dir.path().join("man1"); // created by the subcommand
    let listed = stdout_of(&["man", "--dir", out_dir.to_str().expect("utf-8 path")]);

    let mut expected = BTreeMap::new();
    expected.insert(PROG.to_string(), options(&cli()));
    subcommand_pages(&cli(), PROG, &mut expected);
    for must in [
        "bitmap",
        "create",
        "check",
        "ctl",
        "bitmap-add",
        "ctl-bitmap",
    ] {
        assert!(
            expected.contains_key(&format!("{PROG}-{must}")),
            "no {must} subcommand in clap's definitions"
        );
    }

    let written: BTreeSet<String> = std::fs::read_dir(&out_dir)
        .expect("read the man directory")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .into_string()
                .expect("utf-8")
        })
        .collect();
    let wanted: BTreeSet<String> = expected.keys().map(|n| format!("{n}.1")).collect();
    assert_eq!(written, wanted, "pages written by man --dir");
    let listed: BTreeSet<String> = listed
        .lines()
        .map(|l| {
            Path::new(l)
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(listed, wanted, "files listed on stdout");

    let groff = have("groff", &["--version"]);
    let library = vhost_device_blk_bitmap::tool::man::pages().expect("render pages");
    assert_eq!(library.len(), wanted.len());
    for page in &library {
        let path = out_dir.join(&page.file_name);
        let roff = std::fs::read_to_string(&path).expect("read page");
        assert_eq!(roff.as_bytes(), page.roff.as_slice(), "{}", page.file_name);
        let name = page.file_name.trim_end_matches(".1");
        lint_roff(name, &roff, &["NAME", "SYNOPSIS", "SEE ALSO"]);
        for o in &expected[name] {
            assert!(
                documents(&roff, &o.long),
                "{}: its OPTIONS section lacks --{}",
                page.file_name,
                o.long
            );
        }
        if groff {
            groff_check(&path);
        }
    }

    // A file where the directory should be: exit 1 with the path in the message.
    let blocker = dir.path().join("not-a-dir");
    std::fs::write(&blocker, b"x").expect("write file");
    let o = run(&["man", "--dir", blocker.to_str().expect("utf-8 path")]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with(&format!("{PROG}: man: ")) && err.contains("not-a-dir"),
        "{err}"
    );
}
