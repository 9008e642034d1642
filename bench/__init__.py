"""`make bench`: qedfuse vs qemu-storage-daemon's FUSE export vs a raw file, side by side.

Run ``.venv/bin/python -m bench --help``.  Modules:

* :mod:`bench.system` — machine facts, tool versions, /proc accounting, tmpfs, drop_caches;
* :mod:`bench.targets` — the three things measured (qedfuse mount, qsd FUSE export, raw file);
* :mod:`bench.jobs` — the fixed fio job set and its JSON parsing;
* :mod:`bench.runner` — the interleaved rounds and the command line;
* :mod:`bench.report` — Markdown table and PNG chart;
* :mod:`bench.micro` — inline ``os.pread``/``os.pwrite`` vs ``trio.to_thread`` micro-benchmark;
* :mod:`bench.memory` — daemon peak RSS while scattering 8 GiB over a 1 TiB image.
"""
