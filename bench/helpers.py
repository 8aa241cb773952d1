#!/usr/bin/env python3
"""Deterministic helpers for bench/run.sh (stdlib only).

  helpers.py select TARGET_BYTES MAX_BYTES SEED ROOT... > list0
      Pick whole directories (their regular files and symlinks, not their
      subdirectories) from ROOTs in a seeded random order until the picked
      bytes reach TARGET_BYTES, skipping any directory that would push the
      total past MAX_BYTES.  Prints NUL-separated absolute paths, for
      `tar --null --no-recursion -T -`.  Spreading the pick over many
      directories gives a realistic mix (binaries, libraries, text,
      already-compressed files) rather than one big subtree.

  helpers.py writes FILE MODE SEED
      Overwrite 1% of FILE in place with random data (os.pwrite), at
      offsets chosen with a fixed seed, so every tool sees the same bytes:
        scattered  4 KiB blocks at random 4 KiB-aligned offsets
        clustered  1 MiB extents at random 1 MiB-aligned offsets
      Prints the number of bytes written.
"""
import os
import random
import stat
import sys

KIB = 1024
MIB = 1024 * KIB


def select(target, limit, seed, roots):
    dirs = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
            dirnames.sort()
            entries = []
            size = 0
            # Symlinked directories show up in dirnames; keep them as links.
            for name in sorted(filenames) + [d for d in dirnames
                                             if os.path.islink(os.path.join(dirpath, d))]:
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
                elif not stat.S_ISLNK(st.st_mode):
                    continue  # sockets, fifos, devices
                entries.append(path)
            if entries:
                dirs.append((dirpath, size, entries))
    random.Random(seed).shuffle(dirs)
    total = 0
    out = sys.stdout.buffer
    for _dirpath, size, entries in dirs:
        if total >= target:
            break
        if total + size > limit:
            continue
        total += size
        for path in entries:
            out.write(os.fsencode(path) + b"\0")
    sys.stderr.write("selected %d bytes of files\n" % total)


def writes(path, mode, seed):
    unit = {"scattered": 4 * KIB, "clustered": MIB}[mode]
    size = os.path.getsize(path)
    count = max(1, round(size * 0.01 / unit))
    rng = random.Random(seed)
    offsets = sorted(rng.sample(range(size // unit), count))
    fd = os.open(path, os.O_WRONLY)
    try:
        for idx in offsets:
            os.pwrite(fd, rng.randbytes(unit), idx * unit)
        os.fsync(fd)
    finally:
        os.close(fd)
    print(count * unit)


def main(argv):
    if len(argv) >= 5 and argv[1] == "select":
        select(int(argv[2]), int(argv[3]), int(argv[4]), argv[5:])
    elif len(argv) == 5 and argv[1] == "writes":
        writes(argv[2], argv[3], int(argv[4]))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv)
