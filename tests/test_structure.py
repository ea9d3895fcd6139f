"""The package's shape, checked: no module over 400 lines, no import cycle between its modules
(module-level imports; a package's own import counts as an edge to it), config, model and the
metrics import no Ray."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aisd_ray"
LIMIT = 400


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aisd_ray"):
                graph[name] |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
                if node.module in modules:
                    graph[name].add(node.module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
    return graph


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, long


def test_no_import_cycle():
    modules = _modules()
    graph = _imports(modules)
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for module in sorted(modules):
        if module not in state:
            visit(module, [])
    assert not cycles, cycles
    assert graph["aisd_ray.stages.pipeline"] and graph["aisd_ray.config.load"]  # the checker sees imports


def test_config_model_metrics_and_formats_import_no_ray():
    for name in ("config/schema.py", "config/load.py", "config/rules.py", "config/space.py", "model.py", "metrics.py",
                 "volume_metrics.py", "data/volume.py", "data/windows.py", "data/shards.py"):
        body = ast.parse((PACKAGE / name).read_text()).body
        roots = {a.name.split(".")[0] for n in body if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in body if isinstance(n, ast.ImportFrom) and n.module}
        assert "ray" not in roots, name
