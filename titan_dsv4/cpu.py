"""CPU support for TorchTitan 0.2.2: what its CPU path lacks, applied only when asked and only without an
accelerator.

Nothing here runs at import. ``apply_cpu_support()`` is called explicitly by our entry points
(``./run_train.sh`` and ``python -m titan_dsv4.train``, the dry run, the multi-rank helper, the tests) and by
``titan_dsv4.stock``, the module TorchTitan's stock entry names (``--experimental.custom_import
titan_dsv4.stock``). With an accelerator it changes nothing. Each patch is one function, applied once;
``applied()`` lists the ones in effect:
  * ``device``: ``torchtitan.tools.utils`` picks "cuda" when no accelerator is found, at import time, and
    the memory monitor and PG timeouts call CUDA-only functions (peak RSS stands in for device memory);
  * ``profiler``: Titan hands the profiler ``[CPU, None]`` activities when there is no GPU.
What our own code can do locally it does: the MoE counts expert loads with ``bincount`` (Titan's reorderer
uses ``torch.histc``, which has no CPU kernel for integers), expert-parallel dispatch permutes tokens in
PyTorch on CPU (``infra/expert_parallel.py``), ``parallelize_deepseek_v4`` reduces with SUM on gloo (which
has no PREMUL_SUM), and the metrics processor releases the meshes' gloo groups before Titan destroys the world
group (``refusals.shut_down_process_groups`` says why).
"""

from __future__ import annotations

import resource
import sys
import types

import torch

from .infra.planning import host_memory_bytes

_APPLIED: list[str] = []


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def applied() -> tuple[str, ...]:
    """The names of the CPU patches in effect in this process (empty with an accelerator)."""
    return tuple(_APPLIED)


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_device_module() -> types.SimpleNamespace:
    """torch.cpu plus the handful of CUDA-style calls Titan's Trainer makes on its device module."""
    ns = types.SimpleNamespace(**{k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")})
    props = types.SimpleNamespace(total_memory=host_memory_bytes(), name="cpu")
    ns.get_device_name = lambda *a, **k: "CPU"
    ns.current_device = lambda: 0
    ns.set_device = lambda *a, **k: None
    ns.device_count = lambda: 1
    ns.get_device_properties = lambda *a, **k: props
    ns.reset_peak_memory_stats = lambda *a, **k: None
    ns.empty_cache = lambda *a, **k: None
    ns.synchronize = lambda *a, **k: None
    ns.is_available = lambda: True
    ns.memory_stats = lambda *a, **k: {
        "active_bytes.all.peak": _peak_rss_bytes(),
        "reserved_bytes.all.peak": _peak_rss_bytes(),
        "num_alloc_retries": 0,
        "num_ooms": 0,
    }
    return ns


def _patch_device() -> None:
    """Titan's device type and module resolve to the CPU (process groups then use gloo)."""
    cpu_module = _cpu_device_module()
    from .compat import torch_utils

    orig_get_module = torch_utils._get_device_module
    torch_utils._get_available_device_type = lambda: "cpu"
    torch_utils._get_device_module = lambda t="cuda": cpu_module if t == "cpu" else orig_get_module(t)
    # Titan's modules copied the device at their import: fix the copies of those already imported.
    for name, mod in list(sys.modules.items()):
        if name.startswith("torchtitan") and mod is not None:
            if getattr(mod, "device_type", None) == "cuda":
                mod.device_type = "cpu"
            if getattr(mod, "device_module", None) is torch.cuda:
                mod.device_module = cpu_module


def _patch_profiler() -> None:
    """The profiler ignores the ``None`` activity Titan adds when there is no GPU."""
    orig_cls = torch.profiler.profile

    class profile(orig_cls):
        def __init__(self, *args, activities=None, **kwargs):
            if activities is not None:
                activities = [a for a in activities if a is not None]
            super().__init__(*args, activities=activities, **kwargs)

    torch.profiler.profile = profile


_PATCHES = {"device": _patch_device, "profiler": _patch_profiler}


def apply_cpu_support() -> tuple[str, ...]:
    """Apply each CPU patch once when there is no accelerator (the explicit call); returns what is applied."""
    if not _APPLIED and not has_accelerator():
        for name, patch in _PATCHES.items():
            patch()
            _APPLIED.append(name)
    return applied()
