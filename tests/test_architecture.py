"""The package's architecture: no import cycles and no import pointing up the layer order.

Every `import` of kd_keras code is counted, also the ones inside functions (kd_keras imports
TensorFlow lazily, so many imports are local; they are dependencies all the same).
"""

import ast
import os

import pytest

import kd_keras

PACKAGE_DIR = os.path.dirname(kd_keras.__file__)

# The layer order, lowest first: a component (a top-level module or subpackage of kd_keras)
# may import its own modules and those of components in earlier layers, never a later layer
# nor another component of its own layer. Written down here once; docs/architecture.md
# explains it.
LAYERS = (
    ("choices",),
    ("losses", "optim", "nets"),
    ("artifacts",),
    ("data",),
    ("teachers",),
    ("methods",),
    ("config",),
    ("eval",),
    ("training",),
    ("experiments",),
    ("api", "distillation"),
    ("cli",),
    ("train", "evaluate", "convert", "cache_teacher", "experiment", "launch"),
)
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules():
    """{dotted module name: file path} of every module of the package."""
    found = {}
    root = os.path.dirname(PACKAGE_DIR)
    for dirpath, _, files in os.walk(PACKAGE_DIR):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(dirpath, name)
                dotted = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                found[dotted.removesuffix(".__init__")] = path
    return found


def _imported(module, path, modules):
    """The kd_keras modules `module` imports (a name imported from a package counts as the
    submodule when one exists, else as the package)."""
    tree = ast.parse(open(path).read(), path)
    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.add(sub if sub in modules else source)
    return {m for m in out if m in modules and m != module and m != "kd_keras"}


def import_graph():
    modules = _modules()
    return {m: _imported(m, p, modules) for m, p in modules.items()}


def component(module):
    """`kd_keras.nets.heads` -> "nets"; the package itself -> None."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def find_cycle(graph):
    """One import cycle as a list of modules (first == last), or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return stack[stack.index(dep) :] + [dep]
            if dep not in state:
                cycle = visit(dep, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def upward_imports(graph):
    """["a -> b", ...]: imports from a component to one of the same or a later layer."""
    bad = []
    for module, deps in graph.items():
        own = component(module)
        if own is None:
            continue
        for dep in deps:
            other = component(dep)
            if other != own and LEVEL[other] >= LEVEL[own]:
                bad.append(f"{module} -> {dep}")
    return sorted(bad)


def test_every_component_has_a_layer():
    graph = import_graph()
    missing = {component(m) for m in graph} - set(LEVEL) - {None}
    assert not missing, f"components without a layer in LAYERS: {sorted(missing)}"


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_upward_imports():
    assert upward_imports(import_graph()) == []


def test_subpackages_say_what_they_own_and_may_import():
    for name in sorted(os.listdir(PACKAGE_DIR)):
        init = os.path.join(PACKAGE_DIR, name, "__init__.py")
        if os.path.isfile(init):
            doc = ast.get_docstring(ast.parse(open(init).read()))
            assert doc and "import" in doc, f"kd_keras.{name} needs a docstring on its imports"


@pytest.mark.parametrize(
    "graph, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
        ({"a": {"b"}, "b": set()}, None),
    ],
)
def test_cycle_finder(graph, expected):
    assert find_cycle(graph) == expected


def test_upward_import_is_found():
    graph = {"kd_keras.nets.heads": {"kd_keras.training.run"}, "kd_keras.training.run": set()}
    assert upward_imports(graph) == ["kd_keras.nets.heads -> kd_keras.training.run"]
