"""``python -m dsv4_bench.run_section <name> --out result.json [--quick]``: one section, own process.

Sections run in separate processes so that each starts from a clean heap (peak-memory figures are
per process) and so the orchestrator never imports torch. The result (or the traceback) is written
as JSON with the section's wall time and the library versions it used.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback

SECTIONS = {
    "training": "dsv4_bench.training",  # a + b + the step profile
    "attention": "dsv4_bench.attention",  # c
    "hf": "dsv4_bench.hf_compare",  # d
    "titan": "dsv4_bench.titan_compare",  # e
    "ep": "dsv4_bench.expert_parallel",  # f
}


def versions() -> dict:
    """Versions of the libraries this section actually loaded (nothing is imported for it)."""
    out = {}
    for name in ("torch", "torchtitan", "transformers"):
        mod = sys.modules.get(name)
        if mod is not None:
            out[name] = getattr(mod, "__version__", "?")
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("section", choices=sorted(SECTIONS))
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true")
    opts = parser.parse_args()
    record = {"section": opts.section, "quick": opts.quick}
    start = time.perf_counter()
    try:
        record["result"] = importlib.import_module(SECTIONS[opts.section]).run(opts.quick)
    except BaseException:
        record["error"] = traceback.format_exc()
    record["wall_s"] = time.perf_counter() - start
    record["versions"] = versions()
    with open(opts.out, "w") as f:
        json.dump(record, f)
    sys.exit(1 if "error" in record else 0)


if __name__ == "__main__":
    main()
