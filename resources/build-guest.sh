#!/usr/bin/env bash
# Build (or reuse) the pieces needed to boot a tiny Linux guest under QEMU as a
# vhost-user-blk test client:
#   CACHE_DIR/qemu/          qemu-system-x86_64 7.2 + firmware + libraries (dpkg -x, not installed)
#   CACHE_DIR/vmlinux        uncompressed Debian 12 kernel (PVH entry, boots fast with qboot.rom)
#   CACHE_DIR/initramfs.gz   busybox + virtio/virtio_blk/qemu_fw_cfg modules + /init
#   CACHE_DIR/env.sh         exports QEMU_SYSTEM, QEMU_LD_LIBRARY_PATH, QEMU_DATADIRS,
#                            GUEST_KERNEL, GUEST_INITRD
#
# Usage: resources/build-guest.sh [CACHE_DIR]      (default: <repo>/target/guest)
#
# Needs a Debian 12 (bookworm) host with apt-get, dpkg-deb and python3; run as root
# (apt-get update is run only when the package lists are missing). Nothing is installed:
# `apt-get install qemu-system-x86` would replace the qemu-utils 10.x backport, so the
# packages are downloaded and unpacked into the cache instead.
# Idempotent: a finished cache (stamp matching this script) is reused as is.
set -euo pipefail

REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE_DIR="${1:-$REPO_DIR/target/guest}"
SCRIPT_HASH="$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-16)"

log() { printf 'build-guest: %s\n' "$*" >&2; }
die() { printf 'build-guest: error: %s\n' "$*" >&2; exit 1; }

mkdir -p "$CACHE_DIR"
CACHE_DIR="$(cd "$CACHE_DIR" && pwd)"

# One builder at a time per cache (parallel test binaries may race here).
exec 9>"$CACHE_DIR/.lock"
flock -w 1800 9 || die "timed out waiting for the lock on $CACHE_DIR/.lock"

if [[ -f "$CACHE_DIR/.complete" && "$(cat "$CACHE_DIR/.complete")" == "$SCRIPT_HASH" \
      && -f "$CACHE_DIR/env.sh" && -f "$CACHE_DIR/vmlinux" && -f "$CACHE_DIR/initramfs.gz" ]]; then
    log "cache up to date: $CACHE_DIR"
    exit 0
fi

for tool in apt-get apt-cache dpkg-deb dpkg-query python3 sha256sum; do
    command -v "$tool" >/dev/null || die "'$tool' is required (Debian 12 host expected)"
done
python3 -c 'import lzma' 2>/dev/null || die "python3 lacks the lzma module"

start_ts=$(date +%s)
rm -f "$CACHE_DIR/.complete"
WORK="$CACHE_DIR/work"
rm -rf "$WORK" "$CACHE_DIR/qemu" "$CACHE_DIR/initramfs" "$CACHE_DIR/vmlinux" \
       "$CACHE_DIR/initramfs.gz" "$CACHE_DIR/env.sh"
mkdir -p "$WORK/debs"

APT_OPTS=(-q -o APT::Sandbox::User=root)

candidate() { apt-cache policy "$1" 2>/dev/null | awk '/Candidate:/ {print $2}'; }
if [[ -z "$(candidate qemu-system-x86)" || "$(candidate qemu-system-x86)" == "(none)" ]]; then
    log "apt lists lack qemu-system-x86; running apt-get update"
    apt-get "${APT_OPTS[@]}" update >/dev/null || die "apt-get update failed"
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }

# The kernel package behind the linux-image-amd64 meta package.
KPKG="$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')"
[[ -n "$KPKG" ]] || die "cannot resolve linux-image-amd64 to a kernel package"

# Library closure of qemu-system-x86: follow Depends of packages that are not installed.
declare -A SEEN=([qemu-system-x86]=1)
QUEUE=(qemu-system-x86)
LIBS=()
while ((${#QUEUE[@]})); do
    pkg="${QUEUE[0]}"; QUEUE=("${QUEUE[@]:1}")
    while read -r dep; do
        [[ "$dep" == lib* ]] || continue
        [[ -n "${SEEN[$dep]:-}" ]] && continue
        installed "$dep" && continue
        SEEN[$dep]=1; LIBS+=("$dep"); QUEUE+=("$dep")
    done < <(apt-cache depends --no-recommends --no-suggests --no-conflicts --no-breaks \
                 --no-replaces --no-enhances "$pkg" | awk '$1 == "Depends:" && $2 !~ /^</ {print $2}')
done
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
log "downloading ${QEMU_PKGS[*]} ${LIBS[*]} busybox-static util-linux libblkid1 libc6 $KPKG"
(cd "$WORK/debs" && apt-get "${APT_OPTS[@]}" download "${QEMU_PKGS[@]}" "${LIBS[@]}" \
     busybox-static util-linux libblkid1 libc6 "$KPKG" >/dev/null) || die "apt-get download failed"

# --- QEMU ------------------------------------------------------------------------------
QROOT="$CACHE_DIR/qemu"
mkdir -p "$QROOT"
for pkg in "${QEMU_PKGS[@]}" "${LIBS[@]}"; do
    deb=("$WORK/debs/${pkg}"_*.deb)
    [[ -f "${deb[0]}" ]] || die "downloaded package for $pkg not found"
    dpkg-deb -x "${deb[0]}" "$QROOT"
done
# Keep only what the guest runs need (the unpacked 7.2 qemu-storage-daemon must not be
# mistaken for the installed 10.x one).
rm -rf "$QROOT/usr/share/doc" "$QROOT/usr/share/man" "$QROOT/usr/bin/qemu-storage-daemon" \
       "$QROOT/usr/bin/qemu-pr-helper" "$QROOT/usr/bin/qemu-system-x86_64-microvm"
QEMU_SYSTEM="$QROOT/usr/bin/qemu-system-x86_64"
QEMU_LD_LIBRARY_PATH="$QROOT/usr/lib/x86_64-linux-gnu:$QROOT/lib/x86_64-linux-gnu"
QEMU_DATADIRS="-L $QROOT/usr/share/qemu -L $QROOT/usr/share/seabios"
[[ -x "$QEMU_SYSTEM" ]] || die "qemu-system-x86_64 missing after unpacking"
[[ -f "$QROOT/usr/share/qemu/qboot.rom" ]] || die "qboot.rom missing after unpacking"
missing="$(LD_LIBRARY_PATH="$QEMU_LD_LIBRARY_PATH" ldd "$QEMU_SYSTEM" | grep 'not found' || true)"
[[ -z "$missing" ]] || die "qemu-system-x86_64 still lacks libraries: $missing"
LD_LIBRARY_PATH="$QEMU_LD_LIBRARY_PATH" "$QEMU_SYSTEM" --version >/dev/null \
    || die "unpacked qemu-system-x86_64 does not run"

# --- Kernel and modules ---------------------------------------------------------------
MODS=(virtio virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk qemu_fw_cfg)
KX="$WORK/kernel"
mkdir -p "$KX"
kdeb=("$WORK/debs/${KPKG}"_*.deb)
patterns=('./boot/vmlinuz-*')
for m in "${MODS[@]}"; do patterns+=("*/$m.ko"); done
dpkg-deb --fsys-tarfile "${kdeb[0]}" | tar -x -C "$KX" --wildcards "${patterns[@]}"

python3 - "$KX" "$CACHE_DIR/vmlinux" <<'PY'
import glob, lzma, sys
src = glob.glob(sys.argv[1] + "/boot/vmlinuz-*")[0]
data = open(src, "rb").read()
magic = b"\xfd7zXZ\x00"
pos = data.find(magic)
while pos >= 0:
    try:
        out = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[pos:])
        if out[:4] == b"\x7fELF":
            open(sys.argv[2], "wb").write(out)
            sys.exit(0)
    except lzma.LZMAError:
        pass
    pos = data.find(magic, pos + 1)
sys.exit("no xz-compressed ELF payload found in " + src)
PY

# --- initramfs ------------------------------------------------------------------------
IR="$WORK/initramfs"
mkdir -p "$IR"/{bin,dev,proc,sys,tmp,mnt,lib/modules}
bbdeb=("$WORK/debs/busybox-static"_*.deb)
dpkg-deb -x "${bbdeb[0]}" "$WORK/busybox"
BB="$WORK/busybox/bin/busybox"
cp "$BB" "$IR/bin/busybox"
for applet in $("$BB" --list); do
    [[ "$applet" == busybox ]] && continue
    ln -sf busybox "$IR/bin/$applet"
done
# util-linux blkdiscard as /usr/sbin/blkdiscard (busybox's lacks -z, i.e. BLKZEROOUT),
# with the libraries it links, taken from the same Debian release.
UL="$WORK/util-linux"
for pkg in util-linux libblkid1 libc6; do
    deb=("$WORK/debs/${pkg}"_*.deb)
    dpkg-deb -x "${deb[0]}" "$UL"
done
mkdir -p "$IR/usr/sbin" "$IR/lib/x86_64-linux-gnu" "$IR/lib64"
cp "$UL/sbin/blkdiscard" "$IR/usr/sbin/blkdiscard"
cp -L "$UL/usr/lib/x86_64-linux-gnu/libblkid.so.1" "$UL/lib/x86_64-linux-gnu/libc.so.6" \
    "$UL/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" "$IR/lib/x86_64-linux-gnu/"
ln -sf /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$IR/lib64/ld-linux-x86-64.so.2"
"$IR/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$IR/lib/x86_64-linux-gnu" \
    "$IR/usr/sbin/blkdiscard" --version >/dev/null || die "util-linux blkdiscard does not run"
missing="$("$IR/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$IR/lib/x86_64-linux-gnu" \
    --list "$IR/usr/sbin/blkdiscard" | grep 'not found' || true)"
[[ -z "$missing" ]] || die "util-linux blkdiscard lacks libraries: $missing"

for m in "${MODS[@]}"; do
    ko="$(find "$KX/lib/modules" -name "$m.ko" | head -n1)"
    [[ -n "$ko" ]] || die "module $m.ko not found in $KPKG"
    cp "$ko" "$IR/lib/modules/"
done
# Load order from each module's depends= field (the package ships no modules.dep).
ORDER="$(python3 - "$IR/lib/modules" <<'PY'
import os, re, sys
d = sys.argv[1]
deps = {}
for f in sorted(os.listdir(d)):
    name = f[:-3]
    m = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", open(os.path.join(d, f), "rb").read())
    deps[name] = [x for x in (m.group(1).decode().split(",") if m else []) if x]
order, done = [], set()
def visit(n, stack=()):
    if n in done:
        return
    if n in stack:
        sys.exit("module dependency cycle at " + n)
    if n not in deps:
        sys.exit("module %s needs %s, which is not packed" % (stack[-1] if stack else "?", n))
    for x in deps[n]:
        visit(x, stack + (n,))
    done.add(n)
    order.append(n)
for n in deps:
    visit(n)
print(" ".join(order))
PY
)"
log "module load order: $ORDER"

cat >"$IR/init" <<EOF
#!/bin/sh
# Test client init: run the script handed in through fw_cfg (opt/test/script),
# report "E2E-EXIT <status>" on the serial console and power off.
export PATH=/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $ORDER; do
    insmod /lib/modules/\$m.ko || echo "E2E-WARN insmod \$m failed"
done
SCRIPT=/sys/firmware/qemu_fw_cfg/by_name/opt/test/script/raw
i=0
while [ ! -r \$SCRIPT ] && [ \$i -lt 50 ]; do sleep 0.1; i=\$((i + 1)); done
if [ -r \$SCRIPT ]; then
    cat \$SCRIPT > /tmp/test.sh
    echo "E2E-START"
    sh /tmp/test.sh
    status=\$?
else
    echo "E2E-ERROR no test script at \$SCRIPT"
    status=125
fi
sync
echo "E2E-EXIT \$status"
poweroff -f
EOF
chmod 755 "$IR/init"
(cd "$IR" && find . | LC_ALL=C sort | "$BB" cpio -o -H newc 2>/dev/null | "$BB" gzip -9) \
    >"$CACHE_DIR/initramfs.gz"

cat >"$CACHE_DIR/env.sh" <<EOF
# Generated by resources/build-guest.sh; source it to boot the e2e test guest.
export QEMU_SYSTEM="$QEMU_SYSTEM"
export QEMU_LD_LIBRARY_PATH="$QEMU_LD_LIBRARY_PATH"
export QEMU_DATADIRS="$QEMU_DATADIRS"
export GUEST_KERNEL="$CACHE_DIR/vmlinux"
export GUEST_INITRD="$CACHE_DIR/initramfs.gz"
EOF

rm -rf "$WORK"
echo "$SCRIPT_HASH" >"$CACHE_DIR/.complete"
log "done in $(($(date +%s) - start_ts)) s: $CACHE_DIR ($(du -sh "$CACHE_DIR" | cut -f1))"
