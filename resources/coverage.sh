#!/usr/bin/env bash
# Line coverage of the library crates (crates/*) by their own tests: rustc's
# `-C instrument-coverage` with LLVM's llvm-profdata and llvm-cov (Debian's llvm-19 reads
# what rustc's newer LLVM writes). Fails when the figure is below the threshold kept in
# coverage_config_x86_64.json (rust-vmm's file name and keys: "coverage_score" in percent
# of lines, "exclude_path" a regular expression of files not counted).
#
# Usage: resources/coverage.sh        (run-tests.sh runs it after the tests)
# Knobs: LLVM_BIN=/path/to/llvm/bin; COVERAGE_UPDATE=1 writes the measured figure into
# the configuration instead of checking it.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_DIR"
log() { printf 'coverage: %s\n' "$*" >&2; }
die() { printf 'coverage: error: %s\n' "$*" >&2; exit 1; }

CONFIG=coverage_config_x86_64.json
[[ -f $CONFIG ]] || die "$CONFIG is missing"

# llvm-profdata and llvm-cov of one LLVM, the newest installed (19 or later).
if [[ -z ${LLVM_BIN:-} ]]; then
    for v in 22 21 20 19; do
        if [[ -x /usr/lib/llvm-$v/bin/llvm-cov && -x /usr/lib/llvm-$v/bin/llvm-profdata ]]; then
            LLVM_BIN=/usr/lib/llvm-$v/bin
            break
        fi
    done
fi
if [[ -z ${LLVM_BIN:-} ]]; then
    [[ ${CI:-} == true ]] && die "no LLVM 19+ tools found (apt-get install llvm-19)"
    log "SKIP: no LLVM 19+ tools found (apt-get install llvm-19)"
    exit 0
fi

TARGET="$REPO_DIR/target/coverage"
PROF="$TARGET/profraw"
rm -rf "$PROF"
mkdir -p "$PROF"
PKGS=(-p qcow2 -p dirty-bitmap -p qcow2-bitmaps -p nbd -p qmp)
export CARGO_TARGET_DIR="$TARGET"
export RUSTFLAGS="-C instrument-coverage"
export LLVM_PROFILE_FILE="$PROF/%p-%m.profraw"

log "instrumented tests of the libraries (${PKGS[*]})"
cargo test --release "${PKGS[@]}" --tests
mapfile -t OBJECTS < <(cargo test --release "${PKGS[@]}" --tests --no-run \
    --message-format=json 2>/dev/null \
    | python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])')
((${#OBJECTS[@]} > 0)) || die "no test binaries found"

"$LLVM_BIN/llvm-profdata" merge -sparse "$PROF"/*.profraw -o "$TARGET/coverage.profdata"
EXCLUDE=$(python3 -c 'import json; print(json.load(open("'"$CONFIG"'"))["exclude_path"])')
ARGS=(-instr-profile="$TARGET/coverage.profdata" -ignore-filename-regex="$EXCLUDE")
for o in "${OBJECTS[@]}"; do ARGS+=(-object "$o"); done
"$LLVM_BIN/llvm-cov" export -summary-only "${ARGS[@]}" >"$TARGET/summary.json"

python3 - "$TARGET/summary.json" "$CONFIG" "$REPO_DIR" "${COVERAGE_UPDATE:-0}" <<'EOF'
import json, sys
summary, config_path, repo, update = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
data = json.load(open(summary))["data"][0]
crates = {}
for f in data["files"]:
    name = f["filename"]
    rel = name[len(repo) + 1:] if name.startswith(repo + "/") else name
    crate = "/".join(rel.split("/")[:2])
    c = crates.setdefault(crate, [0, 0])
    c[0] += f["summary"]["lines"]["covered"]
    c[1] += f["summary"]["lines"]["count"]
for crate, (cov, count) in sorted(crates.items()):
    print(f"coverage: {crate:<24} {cov:>6} of {count:>6} lines  {100.0 * cov / max(count, 1):5.1f} %")
lines = data["totals"]["lines"]
score = round(lines["percent"], 1)
print(f"coverage: libraries {lines['covered']} of {lines['count']} lines: {score} %")
config = json.load(open(config_path))
if update:
    config["coverage_score"] = score
    with open(config_path, "w") as out:
        json.dump(config, out, indent=2)
        out.write("\n")
    print(f"coverage: {config_path} now expects {score} %")
elif score < config["coverage_score"]:
    sys.exit(f"coverage: {score} % is below the threshold of {config['coverage_score']} % "
             f"in {config_path}")
else:
    print(f"coverage: at or above the threshold of {config['coverage_score']} %")
EOF
