"""The offline commands: create, info, check, convert, map, resize, commit.

Each command is an ``async`` function (run with :func:`trio.run` by :mod:`qedfuse.cli`)
that returns a result object and prints nothing; ``cli`` formats the output.  The heavy
lifting is the engine's (:mod:`qedfuse.engine`, :mod:`qedfuse.backing`, :mod:`qedfuse.check`);
paths are opened by the composition root, :mod:`qedfuse.opening`.

Errors a user can cause raise :class:`~qedfuse.errors.UserError` (or another
:class:`~qedfuse.errors.QedError`) with a one-line message worded like qemu-img's, e.g.
``Could not open 'x.qed': QED cluster size is invalid``.

One module per job: :mod:`~qedfuse.commands.create` (create, resize),
:mod:`~qedfuse.commands.info`, :mod:`~qedfuse.commands.check`,
:mod:`~qedfuse.commands.copy` (convert, commit), :mod:`~qedfuse.commands.map`, and
:mod:`~qedfuse.commands.common` (sizes and options, chain and target-file helpers).  The
package's names ``create``, ``info`` and ``check`` are the functions, not their modules.
"""

from __future__ import annotations

from qedfuse.commands.check import check
from qedfuse.commands.common import (
    CHUNK_SIZE,
    CreateOptions,
    parse_create_options,
    parse_size,
    round_up_sector,
)
from qedfuse.commands.copy import CommitResult, ConvertResult, commit, convert
from qedfuse.commands.create import CreateResult, create, parse_resize, resize
from qedfuse.commands.info import ImageInfo, feature_names, human_size, info
from qedfuse.commands.map import MapEntry, map_human, map_image, map_json

__all__ = [
    "CHUNK_SIZE",
    "CommitResult",
    "ConvertResult",
    "CreateOptions",
    "CreateResult",
    "ImageInfo",
    "MapEntry",
    "check",
    "commit",
    "convert",
    "create",
    "feature_names",
    "human_size",
    "info",
    "map_human",
    "map_image",
    "map_json",
    "parse_create_options",
    "parse_resize",
    "parse_size",
    "resize",
    "round_up_sector",
]
