"""The package's import graph runs one way: no module of `keras_mtp` imports,
directly or through others, a module that imports it, so none needs a local
import to dodge a cycle.

Two checks: the graph of the modules' top-level `keras_mtp` imports, read
from their source, has no cycle; and in a fresh interpreter every module
imports first (before the package's `__init__`, which would otherwise
import most of them in its own order), and all of them forwards and
backwards.
"""

import ast
import os
import pkgutil
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "keras_mtp")


def module_names():
    """Every module of the package, found on disk (subpackages too)."""
    walk = pkgutil.walk_packages([PACKAGE], "keras_mtp.")
    return sorted(info.name for info in walk)


def module_path(name):
    path = os.path.join(ROOT, *name.split("."))
    if os.path.exists(path + ".py"):
        return path + ".py"
    return os.path.join(path, "__init__.py")


def top_level_imports(name, names):
    """The package modules `name` imports at its top level (not inside a
    function), as `import a.b`, `from a import b` or `from a.b import c`."""
    with open(module_path(name)) as f:
        tree = ast.parse(f.read())
    package = name if module_path(name).endswith("__init__.py") else None
    package = package or name.rpartition(".")[0]
    found = set()
    for node in tree.body:  # top level only
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return sorted(found & set(names) - {name})


def find_cycle(graph):
    """A list of modules that import each other in a ring, or None."""
    state = {}  # name -> "open" while on the path, "done" after

    def visit(name, path):
        state[name] = "open"
        for other in graph[name]:
            if state.get(other) == "open":
                return path[path.index(other) :] + [other]
            if other not in state:
                cycle = visit(other, path + [other])
                if cycle:
                    return cycle
        state[name] = "done"
        return None

    for name in graph:
        if name not in state:
            cycle = visit(name, [name])
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_ring():
    graph = {"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": ["b"], "b": [], "c": ["a", "b"]}) is None


def test_every_module_is_found():
    names = module_names()
    assert "keras_mtp.mtp_causal_lm" in names
    assert "keras_mtp.validation" in names
    assert len(names) == len(set(names)) > 10


def test_import_graph_has_no_cycle():
    names = module_names()
    # The package itself imports its modules; they never import it back.
    graph = {name: top_level_imports(name, names) for name in names}
    graph["keras_mtp"] = top_level_imports("keras_mtp", names + ["keras_mtp"])
    for name in names:
        assert "keras_mtp" not in graph[name], name
    assert find_cycle(graph) is None, find_cycle(graph)


# Each order imports its modules into a bare `keras_mtp` (its `__init__`
# not run) after every module of an earlier order has been forgotten, so
# each module is imported first once; keras, keras-hub and TensorFlow stay
# loaded (one interpreter: imported once).
_IMPORT_IN_ORDERS = textwrap.dedent(
    """
    import importlib, json, sys, types
    orders = json.loads(sys.argv[1])
    failures = {}
    for order in orders:
        for name in [n for n in sys.modules if n.split(".")[0] == "keras_mtp"]:
            del sys.modules[name]
        bare = types.ModuleType("keras_mtp")
        bare.__path__ = [sys.argv[2]]
        sys.modules["keras_mtp"] = bare
        try:
            for name in order:
                importlib.import_module(name)
        except Exception as e:
            failures[" -> ".join(order)] = f"{type(e).__name__}: {e}"
    for name in [n for n in sys.modules if n.split(".")[0] == "keras_mtp"]:
        del sys.modules[name]
    import keras_mtp  # the real package last
    print(json.dumps(failures))
    """
)


def test_every_module_imports_first_in_a_fresh_interpreter():
    names = module_names()
    orders = [[name] for name in names] + [names, names[::-1]]
    import json

    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_IN_ORDERS, json.dumps(orders), PACKAGE],
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, failures


def test_model_modules_have_no_local_package_imports():
    """Imports of keras_mtp stand at the top of the model's modules."""
    for name in ("keras_mtp.mtp_causal_lm", "keras_mtp.mtp_block"):
        with open(module_path(name)) as f:
            lines = f.read().splitlines()
        local = [
            line
            for line in lines
            if line.startswith((" ", "\t"))
            and line.strip().startswith(("from keras_mtp", "import keras_mtp"))
        ]
        assert not local, (name, local)
