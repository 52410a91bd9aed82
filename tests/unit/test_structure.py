"""The package's shape: nothing applied at import, CPU support only on request, and no import cycle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "titan_dsv4"

_PROBE = r"""
import json, logging, sys
import torch
if sys.argv[1] == "accelerator":  # simulate a machine with a GPU: the package must then change nothing
    torch.cuda.is_available = lambda: True
import torch.distributed, torch.profiler
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.distributed.parallel_dims import ParallelDims
from torchtitan.hf_datasets.text_datasets import DATASETS
from torchtitan.tools.logging import logger as titan_logger
import torchtitan.tools.utils as titan_utils
def watched():
    return {
        "CheckpointManager.__init__": CheckpointManager.__init__,
        "CheckpointManager.dcp_save": CheckpointManager.dcp_save,
        "ParallelDims._validate": ParallelDims._validate, "torch.histc": torch.histc,
        "device": torch._utils._get_available_device_type, "device_module": torch._utils._get_device_module,
        "profiler": torch.profiler.profile, "destroy_process_group": torch.distributed.destroy_process_group,
        "DATASETS": tuple(DATASETS), "titan_logger.filters": tuple(titan_logger.filters),
        "titan_logger.handlers": tuple(titan_logger.handlers),
        "root.filters": tuple(logging.getLogger().filters),
        "titan_device": titan_utils.device_type,
    }
before = watched()
for module in sys.argv[2].split(","):
    __import__(module)
after = watched()
print(json.dumps({"changed": sorted(k for k in before if before[k] != after[k] or
                  (callable(before[k]) and before[k] is not after[k])),
                  "applied": list(__import__("titan_dsv4.cpu").cpu.applied())}))
"""


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


EVERY_MODULE = sorted(
    _module_name(p)
    for p in PACKAGE.rglob("*.py")
    if p.name != "stock.py"  # the module whose import is the explicit request (tested below)
)
EVERY_IMPORT = ["titan_dsv4", *EVERY_MODULE, "titan_dsv4.train", "titan_dsv4.dry_run", "titan_dsv4.preflight"]
PROBES = {  # name: (machine, modules imported by a fresh interpreter)
    "every module": ("cpu", EVERY_IMPORT),
    "stock entry": ("cpu", ["titan_dsv4.stock"]),
    "stock entry with an accelerator": ("accelerator", ["titan_dsv4.stock"]),
}


@pytest.fixture(scope="module")
def runs() -> dict[str, tuple[int, str, str]]:
    """Each probe's (exit code, stdout, stderr); the fresh interpreters run side by side (each spends
    seconds importing) and none outlives the fixture."""
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _PROBE, mode, ",".join(modules)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (mode, modules) in PROBES.items()
    }
    try:
        outputs = {name: proc.communicate(timeout=300) for name, proc in procs.items()}
        return {name: (procs[name].returncode, *outputs[name]) for name in procs}
    finally:
        for proc in procs.values():
            proc.kill()


def _probe(runs, name: str) -> dict:
    code, out, err = runs[name]
    assert code == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_importing_the_package_and_every_module_applies_nothing(runs):
    """torch, the profiler, destroy_process_group, Titan's DATASETS, logger and device stay as they were
    (after every module, so after any one of them: a notebook's ``import titan_dsv4.model.kernels`` too)."""
    assert _probe(runs, "every module") == {"changed": [], "applied": []}


def test_the_stock_entry_module_applies_the_cpu_support_and_nothing_else(runs):
    result = _probe(runs, "stock entry")
    assert result["applied"] == ["device", "profiler"]
    # the listed patches (and the device Titan copied at its import) and nothing else
    assert result["changed"] == ["device", "device_module", "profiler", "titan_device"]


def test_the_cpu_support_changes_nothing_with_an_accelerator(runs):
    assert _probe(runs, "stock entry with an accelerator") == {"changed": [], "applied": []}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _all_modules() -> set[str]:
    return {_module_name(p) for p in PACKAGE.rglob("*.py")}


def _runtime_imports(path: Path) -> set[str]:
    """Modules of titan_dsv4 that ``path`` imports at run time (``if TYPE_CHECKING:`` blocks excluded)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    type_only = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            name = (f"{base}.{node.module}" if node.module else base) if node.level else node.module or ""
            submodules = {f"{name}.{a.name}" for a in node.names} & _all_modules()
            # `from . import data` imports the module data; `from .spec import x` the module spec
            found.update(submodules if node.module is None else submodules | {name})
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n.startswith("titan_dsv4") and _is_module(n) and n != module}


def _module_graph() -> dict[str, set[str]]:
    return {_module_name(path): _runtime_imports(path) for path in PACKAGE.rglob("*.py")}


def test_no_import_cycle_between_modules():
    """Module by module (inside packages too), counting function-level imports, not TYPE_CHECKING ones."""
    graph = _module_graph()
    assert len(graph) > 50 and graph["titan_dsv4.spec"], "the graph must see the package's modules"
    cycles = []

    def visit(node: str, path: tuple[str, ...]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == path[0]:
                cycles.append(path + (nxt,))
            elif nxt not in path and nxt > path[0]:  # each cycle once, from its smallest module
                visit(nxt, path + (nxt,))

    for start in sorted(graph):
        visit(start, (start,))
    assert not cycles, cycles


def test_model_imports_nothing_above_it():
    """The model imports only itself and ``titan_dsv4.compat``, the leaf that holds every private torch and
    Titan name (it imports nothing of the package)."""
    graph = _module_graph()
    above = {
        target
        for module, targets in graph.items()
        if module.startswith("titan_dsv4.model")
        for target in targets
        if not target.startswith("titan_dsv4.model") and target != "titan_dsv4.compat"
    }
    assert not above, above
    assert not graph["titan_dsv4.compat"], graph["titan_dsv4.compat"]


LONG = 400


def test_a_module_over_400_lines_says_why_at_its_top():
    """A long module is a place to split; one that stays long says why in a comment of its first lines."""
    unexplained = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        if len(lines) > LONG and not any(line.startswith(f"# Over {LONG} lines: ") for line in lines[:5]):
            unexplained.append(f"{path.relative_to(PACKAGE)} ({len(lines)} lines)")
    assert not unexplained, unexplained
