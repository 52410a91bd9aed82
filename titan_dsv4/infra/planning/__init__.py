"""Planning at scale: one rank's memory and traffic for a DeepSeek-V4 layout, whether it fits, what would.

Arithmetic on the model's shapes (``DeepSeekV4ModelArgs``), the layout (``Layout``: data-parallel degrees and
expert parallelism) and the step (``Training``): nothing is built or allocated, so the trainer runs it before
Titan allocates and the dry run and the layout search run it for thousands of ranks.

Per rank, at the peak of a step (conservative: every part at its own maximum at once):
  * parameters, gradients and AdamW's two moments: FSDP shards in the storage dtype (``training.dtype``);
    non-expert units are sharded over dp_shard, routed experts over efsdp x ep (= dp_shard as well);
  * FSDP's unsharded copies in the compute dtype: units not resharded after forward (the root, the holders)
    stay gathered; on top, the largest unit and the next one (prefetch), and in backward the largest
    unit's unsharded gradient and its reduce-scatter buffer (reduce dtype);
  * activations (``activations.py``, where the activation model is written out): what autograd keeps from
    forward into backward under the AC mode, plus the worst moment of backward on top of it.
A layout fits when that peak is at most the device memory less ``RESERVED_FRACTION`` (CUDA context, NCCL
buffers, allocator fragmentation). Per rank per step (ring collectives: a rank receives (n-1)/n of what is
gathered and sends (n-1)/n of what is reduced): all-gathers (forward, and again in backward for resharded
units), reduce-scatters of every gradient in the reduce dtype, HSDP's all-reduce of the shards across
replicas, and under EP the all-to-all dispatch and combine of every MoE layer (forward, backward, recompute).

Modules, by concern: ``layout`` (Layout, Training, Pipeline, the experts' shard-dim rule ``parallelize``
shares), ``units`` (FSDP units from the shapes ``model.accounting`` counts, or from the built model through
``infra.unit_plan``, the one reader of FSDP2's state), ``activations``, ``stages`` (pipeline stages, in-flight
microbatches, bubble, what crosses a stage boundary), ``estimate`` (the named terms and their sums),
``search`` (the layouts that fit, the layout to recommend), ``refusal`` (the device, probed in one place, and
the trainer's check), ``report`` (text tables).

Context parallelism is a term of each concern: ``Layout.fsdp`` and ``efsdp`` count cp (Titan's meshes); a CP
rank holds ``Training.local_tokens`` = tokens / cp, while what a query sees (entries, picks) still spans
seq_len, and a block also saves the gathered entries and its halo (``activations.cp_exchange_saved``); the
exchanges are ``Estimate.collectives["cp_exchange"]``; the search tries every cp that splits seq_len.

Pipeline parallelism too (``estimate.pipeline_estimate``): a rank holds its stages' units only
(``analytic_units(..., modules=)``, the stage split of ``infra.pipeline``); its activations are its stages'
per microbatch times the microbatches the schedule keeps in flight (``stages.in_flight``); FSDP keeps its
units gathered across the microbatches (Titan's default under PP) and their unsharded gradients, in the
reduce dtype, until the step's one reduce-scatter; the stage-to-stage sends are
``Estimate.collectives["p2p"]``; the figures are the worst pipeline rank's (each collective at its busiest
rank); the search tries pp with 1F1B and Interleaved1F1B. Without a data-parallel mesh a pipeline computes in
the storage dtype (Titan turns mixed precision off). Pipeline with context parallelism is refused, as the
trainer refuses it.
"""

from .activations import Activations, BlockActivations, activation_estimate, running_mtp_layers
from .estimate import RESERVED_FRACTION, Estimate, estimate, usable_bytes
from .layout import GIB, Layout, Pipeline, Training, experts_shard_dim, experts_shardable
from .refusal import (
    DRY_RUN_GPU_MEMORY_GIB,
    device_memory,
    dry_run_device,
    host_memory_bytes,
    refuse_layout_that_cannot_fit,
)
from .report import format_memory, format_traffic
from .search import (
    GPUS_PER_NODE,
    MAX_SEARCH_PP,
    MAX_SEARCH_WORLD,
    candidate_layouts,
    context_parallel_degrees,
    fits,
    fitting_layout,
    pipeline_degrees,
    pipeline_training,
    recommended_layouts,
    smallest_layouts,
)
from .stages import PipelinePlan, bubble_fraction, in_flight
from .units import Unit, analytic_units, built_mtp_layers, built_units, padded_shard

__all__ = [
    "DRY_RUN_GPU_MEMORY_GIB",
    "GIB",
    "GPUS_PER_NODE",
    "MAX_SEARCH_PP",
    "MAX_SEARCH_WORLD",
    "RESERVED_FRACTION",
    "Activations",
    "BlockActivations",
    "Estimate",
    "Layout",
    "Pipeline",
    "PipelinePlan",
    "Training",
    "Unit",
    "activation_estimate",
    "analytic_units",
    "bubble_fraction",
    "built_mtp_layers",
    "built_units",
    "candidate_layouts",
    "context_parallel_degrees",
    "device_memory",
    "dry_run_device",
    "estimate",
    "experts_shard_dim",
    "experts_shardable",
    "fits",
    "fitting_layout",
    "format_memory",
    "format_traffic",
    "host_memory_bytes",
    "in_flight",
    "padded_shard",
    "pipeline_degrees",
    "pipeline_training",
    "recommended_layouts",
    "refuse_layout_that_cannot_fit",
    "running_mtp_layers",
    "smallest_layouts",
    "usable_bytes",
]
