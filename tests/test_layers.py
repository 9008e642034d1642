"""The layer rules of docs/architecture.md, checked on the source's imports.

Every module of the ``qedfuse`` package is parsed with :mod:`ast` (never imported), and every
``import`` counts: at module top level, inside functions, inside ``try``.  Imports under
``if TYPE_CHECKING:`` never run, so they count for the name rules but not for cycles.

The allow-lists below are the remaining debt of issue 13, each with its reason.  An entry
that no longer matches the code fails too, so the lists can only shrink: when the debt is
paid, delete the entry.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "qedfuse"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE

#: Standard-library and third-party modules that do I/O or run an event loop; the pure
#: codec layer (qedfuse/format.py) imports none of them.
IO_MODULES = frozenset(
    {"os", "io", "socket", "trio", "fcntl", "mmap", "select", "selectors", "subprocess"}
    | {"pathlib", "shutil", "tempfile", "asyncio", "threading", "signal", "pyfuse3"}
)

#: qedfuse modules qedfuse/format.py may import, with the reason.
FORMAT_ALLOWED = {
    "qedfuse.errors": "format raises FormatError/LimitError, defined with the other user-facing "
    "errors; imported inside functions. errors.py does no I/O beyond say() (one line on "
    "stderr, which format never calls; its only qedfuse import is under TYPE_CHECKING). "
    "Issue 13's single user-error type may move it.",
}

#: Modules other than qedfuse/imagefile.py (the I/O seam) that import qedfuse.uring.
URING_DEBT: dict[str, str] = {}

#: The modules that may name the concrete FileImage class: the I/O seam that defines it and
#: the composition root that opens files (everything else holds a BlockFile).
FILEIMAGE_NAMERS = frozenset({"qedfuse.imagefile", "qedfuse.opening"})

#: Import edges (importer, imported) that close a cycle today, with the reason.  With them
#: removed the graph of run-time imports (functions included) must have no cycle, so a new
#: circle fails the test.
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Import:
    """One imported module, as written in ``importer``."""

    importer: str
    module: str
    line: int
    top_level: bool  # not inside a function (runs when the importer is imported)
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs


def module_name(path: Path) -> str:
    """Dotted name of the module in ``path`` (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


MODULES = package_modules()


def _resolve_from(importer: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """Modules a ``from X import a, b`` names: ``X.a`` where that is a module, else ``X``."""
    if node.level:
        base_parts = importer.split(".")
        if not is_package:
            base_parts.pop()
        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in MODULES else base)
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(name: str) -> list[Import]:
    """Every import statement of module ``name``, wherever it is."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, top_level: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(name, alias.name, node.lineno, top_level, type_checking))
        elif isinstance(node, ast.ImportFrom):
            for module in _resolve_from(name, is_package, node):
                found.append(Import(name, module, node.lineno, top_level, type_checking))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for stmt in node.body:
                visit(stmt, top_level, True)
            for stmt in node.orelse:
                visit(stmt, top_level, type_checking)
            return
        in_function = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, top_level and not in_function, type_checking)

    visit(tree, True, False)
    return found


ALL_IMPORTS = [imp for name in MODULES for imp in imports_of(name)]


def top_package(module: str) -> str:
    return module.split(".")[0]


def names_in(name: str, target: str) -> Iterator[int]:
    """Lines of module ``name`` that mention the identifier ``target``."""
    tree = ast.parse(MODULES[name].read_text())
    for node in ast.walk(tree):
        if (
            (isinstance(node, ast.Name) and node.id == target)
            or (isinstance(node, ast.Attribute) and node.attr == target)
            or (isinstance(node, ast.alias) and node.name == target)
        ):
            yield node.lineno
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and node.value.replace(" ", "").split("|").count(target)
        ):
            yield node.lineno  # a string annotation such as "FileImage | None"


def describe(imports: list[Import]) -> str:
    return "\n".join(
        f"  qedfuse/{imp.importer.removeprefix('qedfuse.').replace('.', '/')}.py:{imp.line} "
        f"imports {imp.module}{'' if imp.top_level else ' (inside a function)'}"
        for imp in imports
    )


def test_the_parser_sees_the_package() -> None:
    """Guards the guards: the package and a few known imports are found."""
    assert {"qedfuse.fs", "qedfuse.format", "qedfuse.imagefile", "qedfuse.engine"} <= set(MODULES)
    fs_imports = {imp.module for imp in imports_of("qedfuse.fs")}
    assert {"pyfuse3", "qedfuse.engine", "qedfuse.imagefile"} <= fs_imports
    inner = [i for i in imports_of("qedfuse.serve") if i.module == "qedfuse.opening"]
    assert inner
    assert not any(i.top_level for i in inner)  # the function-level import is seen as such
    # subpackages are walked too, and their imports resolve to the package's modules
    assert {"qedfuse.commands", "qedfuse.commands.copy"} <= set(MODULES)
    copy_imports = {imp.module for imp in imports_of("qedfuse.commands.copy")}
    assert {"qedfuse.commands.common", "qedfuse.opening"} <= copy_imports
    relative = [
        node
        for node in ast.parse("from .common import parse_size\nfrom .. import format").body
        if isinstance(node, ast.ImportFrom)
    ]
    assert [_resolve_from("qedfuse.commands.copy", False, node) for node in relative] == [
        ["qedfuse.commands.common"],
        ["qedfuse.format"],
    ]


#: The FUSE layer, the only modules that import pyfuse3: the protocol adapter (fs.py) and the
#: session with pyfuse3's request-loop replacement (fuseloop.py, which swaps a pyfuse3
#: internal and so must sit next to pyfuse3, not above it).
FUSE_LAYER = frozenset({"qedfuse.fs", "qedfuse.fuseloop"})


def test_only_fs_imports_pyfuse3() -> None:
    """Only the FUSE layer (qedfuse/fs.py, qedfuse/fuseloop.py) talks to pyfuse3."""
    offenders = [
        imp
        for imp in ALL_IMPORTS
        if top_package(imp.module) == "pyfuse3" and imp.importer not in FUSE_LAYER
    ]
    assert not offenders, "pyfuse3 imported outside the FUSE layer:\n" + describe(offenders)
    users = {imp.importer for imp in ALL_IMPORTS if top_package(imp.module) == "pyfuse3"}
    assert users == FUSE_LAYER, f"FUSE_LAYER lists modules that no longer import pyfuse3: {users}"


def test_format_is_pure() -> None:
    """The codec layer imports no I/O module and no qedfuse module beyond its allow-list."""
    imports = imports_of("qedfuse.format")
    io = [imp for imp in imports if top_package(imp.module) in IO_MODULES]
    assert not io, "qedfuse/format.py must do no I/O:\n" + describe(io)
    own = [
        imp
        for imp in imports
        if top_package(imp.module) == PACKAGE and imp.module not in FORMAT_ALLOWED
    ]
    assert not own, "qedfuse/format.py imports other qedfuse modules:\n" + describe(own)
    stale = set(FORMAT_ALLOWED) - {imp.module for imp in imports}
    assert not stale, f"FORMAT_ALLOWED lists imports format.py no longer has: {sorted(stale)}"


def test_uring_only_behind_the_io_seam() -> None:
    """io_uring is imagefile's business; other importers are listed debt, never new."""
    target, debt = "qedfuse.uring", URING_DEBT
    importers = {imp.importer for imp in ALL_IMPORTS if imp.module == target}
    importers -= {"qedfuse.imagefile", target}
    new = sorted(importers - set(debt))
    assert not new, f"{target} imported outside qedfuse/imagefile.py: {new}\n" + describe(
        [imp for imp in ALL_IMPORTS if imp.module == target and imp.importer in new]
    )
    stale = sorted(set(debt) - importers)
    assert not stale, f"no longer import {target}; delete them from the allow-list: {stale}"


def test_fileimage_named_only_by_the_seam_and_the_root() -> None:
    """Only the I/O seam and the composition root name the concrete file class; everything
    else works on the BlockFile protocol (and the root's openers)."""
    users = {name for name in MODULES if any(names_in(name, "FileImage"))}
    assert "qedfuse.opening" in users  # the guard sees the name where it is
    new = sorted(users - FILEIMAGE_NAMERS)
    assert not new, f"FileImage named above the I/O seam in {new} (use the BlockFile protocol)"


def test_the_engine_never_repairs_or_opens_paths() -> None:
    """Repair-on-open and path opening are the composition root's: the engine imports
    neither check nor the openers, and backing.py (the chain's policy) opens nothing."""
    up = {"qedfuse.check", "qedfuse.opening", "qedfuse.backing", "qedfuse.locking"}
    bad = [imp for imp in imports_of("qedfuse.engine") if imp.module in up]
    assert not bad, "qedfuse/engine.py reaches up:\n" + describe(bad)
    opener = [
        imp
        for imp in imports_of("qedfuse.backing")
        if imp.module
        in ("qedfuse.engine", "qedfuse.locking", "qedfuse.tables", "qedfuse.imagefile")
        and not imp.type_checking
    ]
    assert not opener, "qedfuse/backing.py opens files:\n" + describe(opener)


#: What the table-layout layer (qedfuse/tables.py) may import: it sits under both engine and
#: check, so neither needs the other for the header or the tables.
TABLES_ALLOWED = frozenset({"qedfuse.format", "qedfuse.errors", "qedfuse.imagefile"})


def test_tables_layer_under_engine_and_check() -> None:
    """tables imports only the codec, errors and the I/O seam; check never imports engine;
    the write plan is pure."""
    own = [
        imp
        for imp in imports_of("qedfuse.tables")
        if top_package(imp.module) == PACKAGE and imp.module not in TABLES_ALLOWED
    ]
    assert not own, "qedfuse/tables.py imports above its layer:\n" + describe(own)
    up = [imp for imp in imports_of("qedfuse.check") if imp.module == "qedfuse.engine"]
    assert not up, "qedfuse/check.py imports the engine:\n" + describe(up)
    plan = [imp for imp in imports_of("qedfuse.writeplan") if top_package(imp.module) != "typing"]
    plan = [imp for imp in plan if imp.module not in ("__future__", "enum")]
    assert not plan, "qedfuse/writeplan.py must stay pure:\n" + describe(plan)


def _graph(imports: list[Import]) -> dict[str, set[str]]:
    """Edges between qedfuse submodules (the package itself excluded: every submodule's
    import runs ``qedfuse/__init__.py`` first anyway, and it imports cli only lazily)."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES if name != PACKAGE}
    for imp in imports:
        if (
            imp.importer != PACKAGE
            and imp.module in MODULES
            and imp.module not in (PACKAGE, imp.importer)
        ):
            graph[imp.importer].add(imp.module)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := dfs(nxt)) is not None:
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)) is not None:
            return cycle
    return None


def test_no_import_cycle_at_top_level() -> None:
    """Importing any module never needs a module that is still half-imported."""
    runtime = [imp for imp in ALL_IMPORTS if imp.top_level and not imp.type_checking]
    cycle = find_cycle(_graph(runtime))
    assert cycle is None, "import cycle at module top level: " + " -> ".join(cycle or [])


def test_no_new_import_cycle() -> None:
    """With function-level imports too, the only circles are the listed ones."""
    runtime = [imp for imp in ALL_IMPORTS if not imp.type_checking]
    graph = _graph(runtime)
    stale = sorted(edge for edge in KNOWN_CYCLE_EDGES if edge[1] not in graph[edge[0]])
    assert not stale, f"KNOWN_CYCLE_EDGES lists imports that are gone; delete them: {stale}"
    for importer, imported in KNOWN_CYCLE_EDGES:
        graph[importer].discard(imported)
    cycle = find_cycle(graph)
    assert cycle is None, "new import cycle: " + " -> ".join(cycle or [])
    for importer, imported in KNOWN_CYCLE_EDGES:
        graph[importer].add(imported)
        assert find_cycle(graph) is not None, (
            f"{importer} -> {imported} no longer closes a cycle; delete it from KNOWN_CYCLE_EDGES"
        )
        graph[importer].discard(imported)


REPO = PACKAGE_DIR.parent
DIFFERENCES = REPO / "docs" / "qemu-differences.md"


def _anchors(markdown: str) -> set[str]:
    return set(re.findall(r'<a id="([a-z0-9-]+)"></a>', markdown))


def _cited_sources() -> list[Path]:
    """Every module of the package (subpackages too) and the test and bench files."""
    tests_bench = [p for d in ("tests", "bench") for p in (REPO / d).glob("*.py") if p.is_file()]
    return sorted({*MODULES.values(), *tests_bench})


def test_qemu_difference_citations_resolve() -> None:
    """Every ``docs/qemu-differences.md#<name>`` in the code names an anchor of that page, and
    no comment cites a QEMU bug by its bare letter (the letters are defined only there)."""
    anchors = _anchors(DIFFERENCES.read_text())
    assert {f"bug-{c}" for c in "abcdefghijk"} <= anchors
    missing, bare = [], []
    for path in _cited_sources():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(REPO)}:{number}"
            for name in re.findall(r"qemu-differences\.md#([a-z0-9-]+)", line):
                if name not in anchors:
                    missing.append(f"{where}: #{name}")
            if re.search(r"\bbugs? [A-K]\b", line) and "qemu-differences.md" not in line:
                bare.append(f"{where}: {line.strip()}")
    assert not missing, "cited anchors missing from docs/qemu-differences.md:\n" + "\n".join(
        missing
    )
    assert not bare, "QEMU bug letters cited without docs/qemu-differences.md:\n" + "\n".join(bare)


#: Every module's layer, bottom up, as docs/architecture.md draws them.  A module imports
#: (at run time, functions included) only from its own layer or below; within one layer the
#: cycle tests above keep the order.  A new module must be placed here.
LAYERS: dict[str, int] = {
    # 0: leaves and the pure codecs
    **dict.fromkeys(
        ["errors", "format", "records", "procfs", "logsetup", "sdnotify", "options", "uring"], 0
    ),
    "locking": 0,
    # 1: the I/O seam
    "imagefile": 1,
    # 2: the table layout under both engine and check
    "tables": 2,
    # 3: the engine's parts, and check/repair
    **dict.fromkeys(["l2cache", "l1table", "clustermap", "writeplan", "allocator"], 3),
    **dict.fromkeys(["foreign", "enginestats", "check", "checkreport"], 3),
    # 4: the engine, and the backing chain's policy
    **dict.fromkeys(["engine", "backing"], 4),
    # 5: the composition root
    "opening": 5,
    # 6: the FUSE layer
    **dict.fromkeys(["fs", "fuseloop"], 6),
    # 7-12: the offline commands, and the mount's modules in the order they use each other
    **dict.fromkeys(["commands", "control", "mounttable"], 7),
    "registry": 8,
    "umount": 9,
    "daemonize": 10,
    "serve": 11,
    "mount": 12,
    # 13-14: the command line, and what is generated from it
    **dict.fromkeys(["cli", "cliparser"], 13),
    **dict.fromkeys(["docgen", "__main__"], 14),
}

#: Run-time imports that go up a layer, with the reason.  Only shrinks.
UPWARD_IMPORTS = {
    ("qedfuse.locking", "qedfuse.registry"): "a lock conflict names the mount whose daemon "
    "holds the image (registry.mountpoint_of_daemon), inside the function that words the error",
}


def _layer(module: str) -> int:
    return LAYERS[module.removeprefix(PACKAGE + ".").split(".")[0]]


def test_every_module_has_a_layer() -> None:
    """A new module is placed in LAYERS (and in docs/architecture.md); a gone one is removed."""
    placed = {f"{PACKAGE}.{name}" for name in LAYERS}
    top = {".".join(name.split(".")[:2]) for name in MODULES if name != PACKAGE}
    assert not top - placed, f"modules without a layer in LAYERS: {sorted(top - placed)}"
    assert not placed - top, f"LAYERS names modules that are gone: {sorted(placed - top)}"


def test_imports_go_down_the_layers() -> None:
    """No run-time import (functions included) reaches a higher layer, except the listed."""
    up = {
        (imp.importer, imp.module)
        for imp in ALL_IMPORTS
        if not imp.type_checking
        and imp.importer != PACKAGE
        and imp.module in MODULES
        and imp.module != PACKAGE
        and _layer(imp.module) > _layer(imp.importer)
    }
    new = sorted(up - set(UPWARD_IMPORTS))
    assert not new, "imports that reach a higher layer:\n" + "\n".join(
        f"  {a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})" for a, b in new
    )
    stale = sorted(set(UPWARD_IMPORTS) - up)
    assert not stale, f"UPWARD_IMPORTS lists imports that are gone or no longer upward: {stale}"
