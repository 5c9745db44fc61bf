#!/usr/bin/python3
"""Full and incremental backups of a disk served by vhost-device-blk-bitmap, while the
guest runs, as a chain of qcow2 files (full.qcow2 <- inc-1.qcow2 <- inc-2.qcow2 ...).

Each backup is one QMP `transaction` on the daemon's control socket: it adds a new
persistent bitmap (which records the writes from that instant on), stops the previous
one, and starts a point-in-time NBD export (`x-snapshot`) exporting the previous bitmap
-- all at the same instant for every guest write. The script then copies the whole
export (full) or the extents the previous bitmap marks dirty (incremental) out of the
point-in-time view, deletes the export and removes the previous bitmap.

    backup.py --qmp QMP.sock --dir BACKUPS full
    backup.py --qmp QMP.sock --dir BACKUPS inc
    backup.py --dir BACKUPS restore OUT.raw      # the disk as of the last backup

Needs qemu-img and qemu-nbd (qemu-utils) and libnbd's python binding (Debian:
python3-libnbd, hence /usr/bin/python3). State: BACKUPS/chain.json.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import nbd  # python3-libnbd

EXPORT_ID = "backup"
# Reads of at most this many bytes (NBD servers accept 32 MiB).
MAX_READ = 4 << 20


class Qmp:
    """A minimal QMP client: greeting, capabilities, one command at a time."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self):
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, command, **args):
        self.file.write(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"{command}: {reply['error']['desc']}")
        return reply["return"]


def load_chain(d):
    try:
        with open(os.path.join(d, "chain.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return []


def save_chain(d, chain):
    tmp = os.path.join(d, "chain.json.tmp")
    with open(tmp, "w") as f:
        json.dump(chain, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(d, "chain.json"))


def run(*cmd):
    subprocess.run(cmd, check=True)


def copy_dirty(src_uri, bitmap, dst_sock, size):
    """Copies the extents of `bitmap` that are dirty from the source export into the
    target (an NBD server of the overlay); returns the bytes copied."""
    ctx = "qemu:dirty-bitmap:" + bitmap
    src = nbd.NBD()
    src.add_meta_context(ctx)
    src.connect_uri(src_uri)
    if not src.can_meta_context(ctx):
        raise RuntimeError(f"the export does not offer {ctx}")
    dst = nbd.NBD()
    dst.connect_uri(f"nbd+unix:///?socket={dst_sock}")
    extents = []

    def collect(metacontext, offset, entries, err):
        if metacontext != ctx:
            return 0
        pos = offset
        for i in range(0, len(entries), 2):
            length, flags = entries[i], entries[i + 1]
            if flags & 1:
                extents.append((pos, length))
            pos += length
        collect.next = pos
        return 0

    offset = 0
    while offset < size:
        collect.next = offset
        src.block_status(min(size - offset, 1 << 30), offset, collect)
        if collect.next <= offset:
            raise RuntimeError(f"block status made no progress at {offset}")
        offset = collect.next
    copied = 0
    for off, length in extents:
        end = min(off + length, size)
        while off < end:
            n = min(MAX_READ, end - off)
            dst.pwrite(src.pread(n, off), off)
            off += n
            copied += n
    dst.flush()
    dst.shutdown()
    src.shutdown()
    return copied


def backup(args, incremental):
    d = args.dir
    os.makedirs(d, exist_ok=True)
    chain = load_chain(d)
    if incremental and not chain:
        sys.exit("backup.py: no full backup yet in " + d)
    qmp = Qmp(args.qmp)
    own_server = args.nbd_socket is None
    sock = args.nbd_socket or os.path.join(d, "nbd.sock")
    if own_server:
        qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": sock}})
    new = "backup-%d" % time.time_ns()
    prev = chain[-1]["bitmap"] if chain else None
    export = {"type": "nbd", "id": EXPORT_ID, "node-name": args.node,
              "name": EXPORT_ID, "x-snapshot": True}
    actions = [{"type": "block-dirty-bitmap-add",
                "data": {"node": args.node, "name": new, "persistent": True}}]
    if incremental:
        actions.append({"type": "block-dirty-bitmap-disable",
                        "data": {"node": args.node, "name": prev}})
        export["bitmaps"] = [prev]
    actions.append({"type": "block-export-add", "data": export})
    qmp.cmd("transaction", actions=actions)
    uri = f"nbd+unix:///{EXPORT_ID}?socket={sock}"
    try:
        if not incremental:
            name = "full.qcow2"
            path = os.path.join(d, name)
            run("qemu-img", "convert", "-f", "raw", uri, "-O", "qcow2", path)
            copied = None
        else:
            name = "inc-%d.qcow2" % len(chain)
            path = os.path.join(d, name)
            h = nbd.NBD()
            h.connect_uri(uri)
            size = h.get_size()
            h.shutdown()
            run("qemu-img", "create", "-q", "-f", "qcow2", "-b", chain[-1]["file"],
                "-F", "qcow2", path, str(size))
            tgt = os.path.join(d, "target.sock")
            nbd_proc = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--socket", tgt,
                                         "--cache=none", path])
            try:
                for _ in range(200):
                    if os.path.exists(tgt):
                        break
                    time.sleep(0.05)
                copied = copy_dirty(uri, prev, tgt, size)
            finally:
                nbd_proc.terminate()
                nbd_proc.wait()
    finally:
        # Our clients are done (qemu-img exited, the libnbd handles shut down), but the
        # server may not have seen them go yet: a "safe" deletion could still find them
        # and fail with "export 'backup' still in use".
        qmp.cmd("block-export-del", id=EXPORT_ID, mode="hard")
        if own_server:
            qmp.cmd("nbd-server-stop")
    if prev is not None:
        qmp.cmd("block-dirty-bitmap-remove", node=args.node, name=prev)
    chain.append({"file": name, "bitmap": new})
    save_chain(d, chain)
    what = "full" if copied is None else f"incremental, {copied} bytes copied"
    print(f"backup.py: {name} ({what}); bitmap {new} records what comes next")


def restore(args):
    chain = load_chain(args.dir)
    if not chain:
        sys.exit("backup.py: nothing to restore in " + args.dir)
    top = os.path.join(args.dir, chain[-1]["file"])
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", top, args.out)
    print(f"backup.py: restored {top} to {args.out}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--qmp", help="the daemon's QMP socket (--qmp-socket)")
    p.add_argument("--dir", required=True, help="backup directory")
    p.add_argument("--node", default="disk0", help="node name (--node-name)")
    p.add_argument("--nbd-socket", help="use the daemon's running NBD server on this socket")
    sub = p.add_subparsers(dest="what", required=True)
    sub.add_parser("full")
    sub.add_parser("inc")
    r = sub.add_parser("restore")
    r.add_argument("out")
    args = p.parse_args()
    if args.what == "restore":
        return restore(args)
    if not args.qmp:
        p.error("--qmp is required for backups")
    args.dir = os.path.abspath(args.dir)
    backup(args, args.what == "inc")


if __name__ == "__main__":
    main()
