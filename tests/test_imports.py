"""Import structure of lift3d: no circular imports between modules, and ``import lift3d`` stays light.

The import graph is read statically (ast) from every module under lift3d/. A module-level circle is
an error anywhere; in the layered packages (zero123, training, priors, guidance, systems) imports inside
functions count too, so no circle hides behind a deferred import.
"""

import ast
import os
import subprocess
import sys

import lift3d

ROOT = os.path.dirname(lift3d.__file__)
LAYERED = ("lift3d.zero123", "lift3d.training", "lift3d.priors", "lift3d.guidance", "lift3d.systems")


def _modules() -> dict:
    out = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def _imports(path: str, modules: dict, module_level_only: bool) -> set:
    tree = ast.parse(open(path).read())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in modules:
            for a in node.names:  # "from package import submodule" depends on the submodule only
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, ()):
                result.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return result


def test_no_module_level_import_cycles():
    modules = _modules()
    graph = {m: _imports(p, modules, module_level_only=True) - {m} for m, p in modules.items()}
    assert _cycles(graph) == []


def test_no_import_cycles_in_layered_packages_even_inside_functions():
    modules = {m: p for m, p in _modules().items() if m.startswith(LAYERED)}
    graph = {m: {d for d in _imports(p, modules, module_level_only=False) if d != m} for m, p in modules.items()}
    assert _cycles(graph) == []


def test_import_lift3d_is_light_and_every_module_imports():
    code = ("import sys, lift3d; heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]; "
            "assert not heavy, heavy; import lift3d.zero123, lift3d.training.loop; "
            "heavy = [m for m in ('diffusers', 'transformers') if m in sys.modules]; assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(ROOT))
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = "import importlib; [importlib.import_module(m) for m in %r]" % names
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(ROOT))


def test_config_and_recipes_form_no_cycle_even_inside_functions():
    """lift3d.config imports lift3d.recipes (load_config applies its blocks); nothing recipes imports, at any
    depth and inside functions too, leads back to lift3d.config (issue 23)."""
    modules = _modules()
    reached, todo = set(), ["lift3d.recipes"]
    while todo:
        for dep in _imports(modules[todo.pop()], modules, module_level_only=False):
            if dep not in reached:
                reached.add(dep)
                todo.append(dep)
    assert "lift3d.config" not in reached and "lift3d.recipes" not in reached, sorted(reached)
    assert "lift3d.recipes" in _imports(modules["lift3d.config"], modules, module_level_only=True)
