"""CPU support for TorchTitan 0.2.2, applied only when the machine has no accelerator.

TorchTitan 0.2.2 assumes CUDA in a few places. Each patch below fixes exactly one of them:
  1. device type: ``torchtitan.tools.utils`` picks "cuda" when no accelerator is found, at import time;
  2. device module: the memory monitor and PG timeouts call CUDA-only functions (peak RSS stands in
     for peak device memory);
  3. ``torch.histc`` has no CPU kernel for integer input, which Titan's MoE token reorderer uses;
  4. the profiler is handed ``[CPU, None]`` activities when there is no GPU;
  5. teardown: every DeviceMesh keeps its ProcessGroups in ``_pg_registry``, so the gloo world group
     outlives ``destroy_process_group`` with its worker threads running; when interpreter exit finally
     destroys it, a joinable std::thread calls std::terminate and the rank dies with SIGABRT after a
     successful run (about one run in five). Destroying the world group now drops those references first.
FSDP's PREMUL_SUM (which gloo lacks) is handled in ``parallelize_deepseek_v4`` itself.
"""

from __future__ import annotations

import resource
import sys
import types

import torch

_APPLIED = False


def has_accelerator() -> bool:
    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _total_memory_bytes() -> int:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _cpu_device_module() -> types.SimpleNamespace:
    """torch.cpu plus the handful of CUDA-style calls Titan's Trainer makes on its device module."""
    ns = types.SimpleNamespace(**{k: getattr(torch.cpu, k) for k in dir(torch.cpu) if not k.startswith("__")})
    props = types.SimpleNamespace(total_memory=_total_memory_bytes(), name="cpu")
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


def _histc_integer_on_cpu(orig):
    def histc(input, bins=100, min=0, max=0, *, out=None):  # noqa: A002 - torch's signature
        if input.device.type == "cpu" and not input.is_floating_point():
            return orig(input.float(), bins=bins, min=min, max=max).to(input.dtype)
        return orig(input, bins=bins, min=min, max=max, out=out) if out is not None else orig(
            input, bins=bins, min=min, max=max
        )

    return histc


def _profile_without_none(orig_cls):
    class profile(orig_cls):  # noqa: N801 - keeps torch's name
        def __init__(self, *args, activities=None, **kwargs):
            if activities is not None:
                activities = [a for a in activities if a is not None]
            super().__init__(*args, activities=activities, **kwargs)

    return profile


def _release_mesh_groups_first(orig):
    def destroy_process_group(group=None):
        if group is None or group is torch.distributed.GroupMember.WORLD:
            import gc

            from torch.distributed.device_mesh import DeviceMesh

            for obj in gc.get_objects():
                if issubclass(type(obj), DeviceMesh):  # type() never runs user code, unlike isinstance
                    getattr(obj, "_pg_registry", {}).clear()
        return orig(group)

    return destroy_process_group


def apply_cpu_support() -> bool:
    """Patch the process for CPU-only TorchTitan runs; a no-op (False) when an accelerator exists."""
    global _APPLIED
    if _APPLIED:
        return True
    if has_accelerator():
        return False
    cpu_module = _cpu_device_module()
    orig_get_module = torch._utils._get_device_module
    torch._utils._get_available_device_type = lambda: "cpu"
    torch._utils._get_device_module = lambda t="cuda": cpu_module if t == "cpu" else orig_get_module(t)
    torch.histc = _histc_integer_on_cpu(torch.histc)
    torch.profiler.profile = _profile_without_none(torch.profiler.profile)
    torch.distributed.destroy_process_group = _release_mesh_groups_first(torch.distributed.destroy_process_group)
    # If torchtitan was imported first (e.g. `python -m torchtitan.train --experimental.custom_import
    # titan_dsv4`), fix the device globals its modules copied at import time.
    for name, mod in list(sys.modules.items()):
        if name.startswith("torchtitan") and mod is not None:
            if getattr(mod, "device_type", None) == "cuda":
                mod.device_type = "cpu"
            if getattr(mod, "device_module", None) is torch.cuda:
                mod.device_module = cpu_module
    _APPLIED = True
    return True
