"""The package's shape: one-way layers, no import cycles, no function-local imports of ddjax,
modules under 600 lines, and the entry layer the only reader of the config."""

from __future__ import annotations

import ast
import os

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "ddjax")
MAX_LINES = 600

# Lowest first; a module may import its own layer and the layers below, never above.
LAYERS = [
    ("ddjax.__init__", "ddjax.utils", "ddjax.kernels", "ddjax.sharding", "ddjax.configs_path"),
    ("ddjax.teacher", "ddjax.evaluate.fid", "ddjax.evaluate.prdc", "ddjax.evaluate.inception",
     "ddjax.evaluate.features", "ddjax.evaluate.digits", "ddjax.evaluate.lpips",
     "ddjax.evaluate.scoring", "ddjax.evaluate.reference", "ddjax.evaluate.__init__"),
    ("ddjax.mapper",),
    ("ddjax.student",),
    ("ddjax.evaluate.methods", "ddjax.evaluate.report", "ddjax.convert", "ddjax.dd2"),
    ("ddjax.demo",),
    ("ddjax.app", "ddjax.main"),
]


def modules() -> dict[str, str]:
    out = {}
    for dirpath, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                package_init = f == "__init__.py" and rel != "ddjax.__init__"
                out[rel.removesuffix(".__init__") if package_init else rel] = path
    return out


def layer_of(name: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (name == p or name.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    if name == "ddjax.evaluate":
        return 1
    assert best is not None, f"{name} is in no layer of tests/test_architecture.py"
    return best


def imports(path: str) -> list[tuple[str, bool]]:
    """(imported ddjax module, at module level?) for every import in the file."""
    tree = ast.parse(open(path).read())
    top = set(map(id, tree.body))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddjax"):
            # `from pkg import sub` imports the submodule (and pkg's __init__ first, which the
            # graph does not count as a dependency of pkg's own modules)
            out += [(f"{node.module}.{a.name}", id(node) in top) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name, id(node) in top) for a in node.names if a.name.startswith("ddjax")]
    return out


def resolve(name: str, known: dict[str, str]) -> str | None:
    """The module `name` lives in: `a.b.c` is module a.b.c, or attribute c of module a.b."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def graph() -> dict[str, set[str]]:
    known = modules()
    g: dict[str, set[str]] = {m: set() for m in known}
    for m, path in known.items():
        for name, _ in imports(path):
            target = resolve(name, known)
            if target and target != m and target != "ddjax" and not m.startswith(target + "."):
                g[m].add(target)
    return g


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(g[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n, stack + [n])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_imports_go_one_way_only():
    bad = [f"{m} (layer {layer_of(m)}) imports {n} (layer {layer_of(n)})"
           for m, targets in graph().items() for n in targets if layer_of(n) > layer_of(m)]
    assert not bad, "\n".join(bad)


def test_no_function_local_imports_of_ddjax():
    bad = [f"{path}: {name}" for path in modules().values() for name, top in imports(path) if not top]
    assert not bad, "\n".join(bad)


def test_modules_stay_small():
    long = {p: n for p in modules().values() if (n := len(open(p).read().splitlines())) > MAX_LINES}
    assert not long, long


CONFIG_BLOCKS = {"teacher", "vq", "sampling", "flow", "data", "dd", "train", "eval", "student",
                 "mesh", "seed", "mode"}


def test_only_the_entry_layer_reads_the_config():
    """Stages take settings objects; `config.<block>` is read in ddjax.app (and by the digits
    demo teacher's own trainer, an entry of its own)."""
    bad = []
    for m, path in modules().items():
        if layer_of(m) >= layer_of("ddjax.demo"):
            continue
        for node in ast.walk(ast.parse(open(path).read())):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id == "config" and node.attr in CONFIG_BLOCKS):
                bad.append(f"{path}:{node.lineno}: config.{node.attr}")
    assert not bad, "\n".join(bad)


def test_every_package_folder_is_installed():
    """setup.py's find_packages only installs folders with an __init__.py."""
    missing = [d for d, _, files in os.walk(PACKAGE)
               if any(f.endswith(".py") for f in files) and "__init__.py" not in files]
    assert not missing, missing
