"""The package's layers, read from its source: imports run one way, the core never imports PaddleDetection,
and importing ppfuse and converting a model loads no ppdet."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "ppfuse")
# lowest first; a module may import from its own layer or any below it, never from one above
LAYERS = ["facts", "core", "runtime", "deploy", "scale", "ppdet", "measure", "api"]
FACTS = {"ppfuse.errors", "ppfuse.export_format", "ppfuse.cli"}


def layer_of(module: str) -> str:
    if module in FACTS:
        return "facts"
    if module == "ppfuse":
        return "api"
    return module.split(".")[1]


def modules():
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted] = path
    return found


def imports(path: str, module: str, top_level_only: bool = False):
    """``(imported module, line)`` for each ppfuse import (relative ones resolved) and each ppdet import."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            for alias in node.names:  # `from ppfuse.core import layers` imports the module ppfuse.core.layers
                candidate = f"{base}.{alias.name}"
                yield (candidate if candidate in modules() else base), node.lineno


def test_the_layers_are_the_folders():
    assert {layer_of(m) for m in modules()} == set(LAYERS)


def test_imports_run_one_way_and_the_core_never_imports_ppdet():
    upward = []
    for module, path in modules().items():
        rank = LAYERS.index(layer_of(module))
        for target, line in imports(path, module):
            if target == "ppdet" or target.startswith("ppdet."):
                if layer_of(module) not in ("ppdet", "measure", "api"):
                    upward.append(f"{module}:{line} imports {target}")
            elif target.startswith("ppfuse") and target in modules():
                if LAYERS.index(layer_of(target)) > rank:
                    upward.append(f"{module}:{line} imports {target} ({layer_of(target)} is above "
                                  f"{layer_of(module)})")
    assert upward == []


def test_no_import_circles():
    graph = {m: {t for t, _ in imports(p, m, top_level_only=True) if t in modules() and t != m}
             for m, p in modules().items() if m != "ppfuse"}
    state, circles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in graph.get(node, ()):
            if state.get(nxt) == "open":
                circles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"
    for node in graph:
        if node not in state:
            visit(node, [node])
    assert circles == []


def test_core_import_and_convert_load_no_ppdet():
    code = ("import sys, paddle, ppfuse\n"
            "from ppfuse import ConvBN, convert\n"
            "net = paddle.nn.Sequential(ConvBN(3, 4, 3, padding=1), paddle.nn.ReLU()); net.eval()\n"
            "report = convert(net, input_spec=[paddle.static.InputSpec([None, 3, 8, 8], 'float32', 'x')])\n"
            "assert report.batch_norms_folded == 1, report.summary()\n"
            "print('ppdet' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "False"


@pytest.mark.ppdet
def test_ppdet_package_registers_its_layer_types():
    import ppfuse.ppdet  # noqa: F401
    from ppdet.modeling.backbones.cspresnet import RepVggBlock as PPDetRepVggBlock
    from ppfuse import DEFAULT_REGISTRY
    assert PPDetRepVggBlock in DEFAULT_REGISTRY
