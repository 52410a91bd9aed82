"""The package's shape: nothing patched behind the user's back, and no import cycles between its parts."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "titan_dsv4"

_PROBE = r"""
import json, sys
import torch
if sys.argv[1] == "accelerator":  # simulate a machine with a GPU: the package must then change nothing
    torch.cuda.is_available = lambda: True
import torch.distributed, torch.profiler
from torchtitan.components.checkpoint import CheckpointManager
from torchtitan.distributed.parallel_dims import ParallelDims
import torchtitan.tools.utils as titan_utils
def watched():
    return {
        "CheckpointManager.__init__": CheckpointManager.__init__,
        "CheckpointManager.dcp_save": CheckpointManager.dcp_save,
        "CheckpointManager._save_last_step": CheckpointManager._save_last_step,
        "ParallelDims._validate": ParallelDims._validate, "torch.histc": torch.histc,
        "device": torch._utils._get_available_device_type, "profiler": torch.profiler.profile,
        "teardown": torch.distributed.destroy_process_group,
    }
before = watched()
import titan_dsv4
import titan_dsv4.cpu
after = watched()
print(json.dumps({"changed": sorted(k for k in before if before[k] is not after[k]),
                  "applied": list(titan_dsv4.cpu.applied()), "titan_device": titan_utils.device_type}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_patches_only_the_listed_cpu_support():
    result = _probe("cpu")
    assert result["applied"] == ["device", "profiler", "teardown"]
    # TorchTitan's classes and torch.histc are the originals; only the listed CPU patches changed anything
    assert result["changed"] == sorted(result["applied"])
    assert result["titan_device"] == "cpu"  # fixed even though torchtitan was imported first


def test_import_changes_nothing_with_an_accelerator():
    result = _probe("accelerator")
    assert result["applied"] == [] and result["changed"] == []


def _imports(path: Path) -> set[str]:
    """Modules of titan_dsv4 that ``path`` imports (absolute or relative), as dotted names."""
    module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n.startswith("titan_dsv4")}


PARTS = ("model", "checkpoint", "infra", "flavors")


def _part(module: str) -> str | None:
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 and pieces[1] in PARTS else None


def test_no_import_cycle_between_model_checkpoint_infra_and_flavors():
    edges: dict[str, set[str]] = {p: set() for p in PARTS}
    for path in PACKAGE.rglob("*.py"):
        src = _part(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for target in map(_part, _imports(path)):
            if src and target and target != src:
                edges[src].add(target)
    assert "checkpoint" not in edges["model"], "model must never import checkpoint"

    def reaches(a: str, b: str, seen=()) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen + (n,))) for n in edges[a])

    cycles = [p for p in PARTS if reaches(p, p)]
    assert not cycles, {p: sorted(edges[p]) for p in PARTS}


@pytest.mark.parametrize("module", ["titan_dsv4.model.kernels", "titan_dsv4.model"])
def test_importing_a_model_module_alone_applies_nothing_to_titan(module):
    """A notebook's ``from titan_dsv4.model.kernels import ...`` still imports the package (Python's rule),
    but what it applies is the listed CPU support and nothing else."""
    code = (
        f"import torch; h = torch.histc; import {module}; import titan_dsv4.cpu as c; "
        "print(h is torch.histc, list(c.applied()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["True", "['device',", "'profiler',", "'teardown']"]
