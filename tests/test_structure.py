"""The package's shape, checked: one layer order (LAYERS, below: the README's package map says the same
in words), every import from a higher layer to a lower or the same one, no import cycle between
modules, no module over 400 lines, and config, model, scoring and the data formats import no Ray.

Imports count wherever they are written: at module level and inside functions (the whole AST is
walked), since an import inside a function is still a dependency, only a later one. A package's
own import counts as an edge to it (``from aisd_ray.data.store import shards`` runs
``aisd_ray/data/store/__init__.py``)."""

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aisd_ray"
LIMIT = 400

# The one layer order, lowest first: a module may import its own layer and the layers before it,
# never one after it. A module's layer is the longest entry its dotted name starts with.
LAYERS = [
    "aisd_ray.config",  # the typed config tree, its loading and rules
    "aisd_ray.core",  # storage, quiet TensorFlow, progress bars, provenance: no stage of their own
    "aisd_ray.data.sources",  # readers of what users have (PNG, DICOM, NIfTI, nnU-Net) and the writer back
    "aisd_ray.data.ct",  # HU windows, input channels, the head model, the QA gate
    "aisd_ray.data.synthetic",  # the synthetic stand-in: PNG slices and HU volumes
    "aisd_ray.data.store",  # shards and manifest, prepare, epoch order, feed, Ray Data, tf.data, augmentation
    "aisd_ray.model",  # FlexUNet and the losses
    "aisd_ray.scoring",  # slice and volume metrics, the scores from counts they share
    "aisd_ray.report",  # pictures, plots, MLflow tracking
    "aisd_ray.train",  # the loop, checkpoints, local and Ray Train backends
    "aisd_ray.inference",  # the export (TTA, ensembles), post-processing, infer on images and patients
    "aisd_ray.evaluation",  # an export scored on a split; NIfTI folders scored in mm and mL
    "aisd_ray.stages",  # the stages as functions: the one door of the CLI and the jobs
    "aisd_ray.studies",  # many runs above the door: tune, crossval, sweep, sweep variants
    "aisd_ray.bench",  # the benchmark and the GPU probe
    "aisd_ray.cli",  # the commands and their flags
]
NO_RAY = ("aisd_ray.config", "aisd_ray.core.storage", "aisd_ray.core.progress", "aisd_ray.core.provenance",
          "aisd_ray.data.sources", "aisd_ray.data.ct", "aisd_ray.data.synthetic", "aisd_ray.data.store.shards",
          "aisd_ray.model", "aisd_ray.scoring")


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        out[name.removesuffix(".__init__")] = path
    return out


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package's modules it imports, anywhere in its body (functions included)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level:  # relative: from the module's own package up
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    module = ".".join(base + ([module] if module else []))
                if not module.startswith("aisd_ray"):
                    continue
                graph[name] |= {f"{module}.{a.name}" for a in node.names if f"{module}.{a.name}" in modules}
                if module in modules:
                    graph[name].add(module)
            elif isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in modules}
    return graph


def _layer(module: str) -> int | None:
    found = [i for i, prefix in enumerate(LAYERS) if module == prefix or module.startswith(prefix + ".")]
    return max(found, key=lambda i: len(LAYERS[i])) if found else None


def _cycles(graph: dict[str, set[str]], modules) -> list[list[str]]:
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
    return cycles


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > LIMIT}
    assert not long, long


def test_no_import_cycle():
    modules = _modules()
    graph = _imports(modules)
    assert not _cycles(graph, modules), _cycles(graph, modules)
    # the checker sees imports, at module level and inside functions
    assert graph["aisd_ray.stages.pipeline"] and graph["aisd_ray.config.load"]
    assert "aisd_ray.studies.tune" in graph["aisd_ray.cli.commands"]  # imported inside cmd_tune


def test_every_module_has_a_layer_and_imports_only_down():
    modules = _modules()
    graph = _imports(modules)
    # a module outside every layer may only be an empty package (aisd_ray, aisd_ray.data): nothing to order
    loose = [m for m in modules if _layer(m) is None and graph[m]]
    assert not loose, loose
    assert all(m in modules for m in LAYERS), [m for m in LAYERS if m not in modules]
    up = sorted(f"{m} -> {n} ({LAYERS[_layer(m)]} imports {LAYERS[_layer(n)]})" for m in modules
                for n in graph[m] if _layer(n) is not None and _layer(n) > _layer(m))
    assert not up, up


def test_config_model_scoring_and_formats_import_no_ray():
    """At module level, as before: importing them loads no Ray (the GPU probe's chain, the readers)."""
    for name, path in _modules().items():
        if not any(name == p or name.startswith(p + ".") for p in NO_RAY):
            continue
        body = ast.parse(path.read_text()).body
        roots = {a.name.split(".")[0] for n in body if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in body if isinstance(n, ast.ImportFrom) and n.module}
        assert "ray" not in roots, name
