"""``pipeline_deepseek_v4``: the train spec's ``pipelining_fn``, DeepSeek-V4 stages on TorchTitan's schedules.

Titan's parts as they are: its schedules (``get_schedule_class``, ``build_pipeline_schedule``), its stage
split (``pipeline_module_split``: a deep copy per stage with the other stages' modules removed) and its
layer distribution (``generate_llm_fqn_per_model_part``, with ``pipeline_parallel_layers_per_stage`` and the
first/last-stage weights). Ours where V4 differs:
  * the modules of a stage: rotary tables on every stage; the HyperHead, norm, lm_head and MTP depths on
    the last; what crosses a stage boundary, the stage's forward and the loss handoff
    (``infra/pipeline_stage.py``: the model's forward knows no pipeline);
  * the loss divided by the step's global token count inside the schedule: Titan 0.2.2 backpropagates the
    summed loss under pipelining (its trainer divides only the logged value), which would scale every
    gradient by the token count and change gradient clipping and AdamW's epsilon;
  * each stage's indexer KL reaching backward on its own stage, and the zero gradients of the indexer's
    dense warm-up dropped as the schedule's step ends, before Titan clips (without pipelining they are never
    created; ``drop_warmup_gradients``).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining.schedules import (
    PipelineScheduleSingle,
    get_schedule_class,
)
from torchtitan.components.loss import IGNORE_INDEX
from torchtitan.config import JobConfig
from torchtitan.distributed import ParallelDims
from torchtitan.distributed.pipeline_parallel import (
    build_pipeline_schedule,
    generate_llm_fqn_per_model_part,
    pipeline_module_split,
)
from torchtitan.tools.logging import logger

from ..compat import PipelineStage
from ..model.errors import ConfigError
from ..model.indexer import Indexer
from ..refusals import refuses_at_entry_points
from .pipeline_stage import DeepSeekV4Stage, PipelineStep

FIRST_STAGE = ["tok_embeddings"]
LAST_STAGE = ["hc_head", "norm", "lm_head", "mtp"]
EVERY_STAGE = ["rope"]
# Schedules run by the tests against a single process (tests/distributed/test_pipeline.py, tests/e2e/).
SUPPORTED_SCHEDULES = (
    "1F1B",
    "GPipe",
    "Interleaved1F1B",
    "LoopedBFS",
    "InterleavedZeroBubble",
    "ZBVZeroBubble",
)
# DualPipeV is refused: no test here runs it (it needs as many microbatches as stages, and Titan pairs it with
# an expert-parallel overlap written for its own MoE modules). ZBVZeroBubble is the V-shaped schedule here.


def stages_per_rank(job_config: JobConfig, n_layers: int) -> int:
    """Virtual stages on each pipeline rank: Titan's rule (1 for single-stage schedules, else 2, or from
    ``pipeline_parallel_layers_per_stage``)."""
    p = job_config.parallelism
    single = issubclass(schedule_class(p.pipeline_parallel_schedule), PipelineScheduleSingle)
    if p.pipeline_parallel_layers_per_stage is None:
        return 1 if single else 2
    effective = (
        n_layers + p.pipeline_parallel_first_stage_less_layers + p.pipeline_parallel_last_stage_less_layers
    )
    n_stages = math.ceil(effective / p.pipeline_parallel_layers_per_stage)
    per_rank, left = divmod(n_stages, p.pipeline_parallel_degree)
    wanted = "exactly 1" if single else "at least 2"
    if left or (per_rank != 1 if single else per_rank < 2):
        raise ConfigError(
            f"pipeline_parallel_layers_per_stage={p.pipeline_parallel_layers_per_stage} makes {n_stages} "
            f"stages ({n_layers} layers + the first/last-stage weights) for pipeline_parallel_degree="
            f"{p.pipeline_parallel_degree}; the schedule {p.pipeline_parallel_schedule} needs {wanted} per "
            "rank. Pick a layers-per-stage that gives that, or leave it unset"
        )
    return per_rank


def stage_module_names(n_layers: int, job_config: JobConfig) -> list[list[str]]:
    """Module names of every (virtual) stage, Titan's distribution of the layers renamed for V4."""
    p = job_config.parallelism
    if p.module_fqns_per_model_part is not None:
        return [list(names) for names in p.module_fqns_per_model_part]
    n_stages = p.pipeline_parallel_degree * stages_per_rank(job_config, n_layers)
    try:
        names = generate_llm_fqn_per_model_part(
            n_stages,
            n_layers,
            p.pipeline_parallel_first_stage_less_layers,
            p.pipeline_parallel_last_stage_less_layers,
        )
    except ValueError as e:
        raise ConfigError(
            f"{n_layers} layers do not split into {n_stages} pipeline stages: {e} Lower "
            "pipeline_parallel_degree, use a single-stage schedule (1F1B), or lower "
            "pipeline_parallel_first_stage_less_layers / pipeline_parallel_last_stage_less_layers"
        ) from None
    renamed = []
    for stage in names:
        modules = [m for m in stage if m not in ("tok_embeddings", "norm", "output")]
        first = FIRST_STAGE if "tok_embeddings" in stage else []
        last = LAST_STAGE if "output" in stage else []
        renamed.append(first + EVERY_STAGE + modules + last)
    return renamed


def schedule_class(name: str):
    """Titan's schedule class by name, or a refusal listing the ones it has."""
    try:
        return get_schedule_class(name)
    except ValueError:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={name!r} is not a schedule TorchTitan has; use one of "
            f"{', '.join(SUPPORTED_SCHEDULES)}"
        ) from None


def refuse_pipeline_problems(n_layers: int, job_config: JobConfig, dp_degree: int) -> None:
    """Everything a pipelined job would fail on later (or silently get wrong), refused before any work."""
    p, t = job_config.parallelism, job_config.training
    if p.pipeline_parallel_degree <= 1:
        return
    schedule_class(p.pipeline_parallel_schedule)
    if p.pipeline_parallel_schedule not in SUPPORTED_SCHEDULES:
        raise ConfigError(
            f"parallelism.pipeline_parallel_schedule={p.pipeline_parallel_schedule!r} is not run by "
            f"DeepSeek-V4's pipeline; use one of {', '.join(SUPPORTED_SCHEDULES)}"
        )
    if p.pipeline_parallel_schedule_csv:
        raise ConfigError(
            "parallelism.pipeline_parallel_schedule_csv is not run by DeepSeek-V4's pipeline; name a "
            "schedule with pipeline_parallel_schedule instead"
        )
    if p.pipeline_parallel_microbatch_size < 1 or t.local_batch_size % p.pipeline_parallel_microbatch_size:
        raise ConfigError(
            f"pipeline_parallel_microbatch_size={p.pipeline_parallel_microbatch_size} does not divide "
            f"training.local_batch_size={t.local_batch_size}: the pipeline cuts each local batch into "
            f"microbatches of that size. Pick a microbatch size dividing {t.local_batch_size}"
        )
    if p.context_parallel_degree > 1:
        raise ConfigError(
            "pipeline parallelism with context parallelism is not implemented yet: set "
            "--parallelism.context_parallel_degree 1 or --parallelism.pipeline_parallel_degree 1"
        )
    global_batch = t.global_batch_size if t.global_batch_size > 0 else t.local_batch_size * dp_degree
    if global_batch != t.local_batch_size * dp_degree:
        raise ConfigError(
            f"training.global_batch_size={t.global_batch_size} asks for gradient accumulation "
            f"({global_batch} / ({t.local_batch_size} x {dp_degree} data-parallel ranks)), which a pipeline "
            "does through its microbatches: raise training.local_batch_size instead (and keep "
            "global_batch_size -1)"
        )
    stage_module_names(n_layers, job_config)


@refuses_at_entry_points
def pipeline_deepseek_v4(
    model: nn.Module,
    parallel_dims: ParallelDims,
    job_config: JobConfig,
    device: torch.device,
    model_args,
    parallelize_fn,
    loss_fn,
):
    """Split the model into stages, parallelize each by the fp32 unit rules, and drive them with Titan's
    schedule; returns (schedule, model parts, has first stage, has last stage) as Titan's trainer expects."""
    refuse_pipeline_problems(
        model_args.n_layers, job_config, parallel_dims.dp_replicate * parallel_dims.dp_shard
    )
    names = stage_module_names(model_args.n_layers, job_config)
    pp_mesh = parallel_dims.get_mesh("pp")
    stages, parts = pipeline_module_split(
        model, pp_mesh, job_config.parallelism.pipeline_parallel_schedule, device, names
    )
    stages = [
        DeepSeekV4PipelineStage(s.submod, s.stage_index, s.num_stages, device, group=pp_mesh.get_group())
        for s in stages
    ]
    step = PipelineStep()
    mtp_trains = model.mtp is not None and model.mtp.trains
    for i, (stage, part) in enumerate(zip(stages, parts)):
        DeepSeekV4Stage.as_stage(part, step, mtp_aheads=model_args.mtp_layers if mtp_trains else 0)
        parts[i] = stage.submod = parallelize_fn(part, parallel_dims, job_config)
        logger.info(f"Pipeline stage {stage.stage_index}: {', '.join(names[stage.stage_index])}")
    schedule = build_pipeline_schedule(job_config, stages, pipeline_loss(step, loss_fn))
    has_first = any(s.is_first for s in stages)
    has_last = any(s.is_last for s in stages)
    return ScheduleOverGlobalTokens(schedule, step, device, parts), parts, has_first, has_last


class DeepSeekV4PipelineStage(PipelineStage):
    """torch's PipelineStage, whose metadata inference leaves no trace in the step.

    torch 2.13 infers a stage's tensors at the first step (and at each train/eval switch) by running the
    stage's forward, and the last stage's loss and a backward, once on placeholder inputs: ``torch.empty``
    for a stage after the first (arbitrary ids and values). V4's forward and loss have effects beyond their
    outputs (the experts' token counts for the bias update, the step's metrics, the loss's handoff), so the
    placeholders here are zeros (valid token ids) and those effects are undone after inference.
    """

    def _to_tensor(self, arg):
        placeholder = super()._to_tensor(arg)
        if not isinstance(arg, torch.Tensor):  # made from metadata (torch.empty), not a real input
            with torch.no_grad():
                placeholder.zero_()
        return placeholder

    def _forward_metadata_inference(self, *args, **kwargs):
        # its training outputs stay for the loss of the backward inference, which takes them
        with effects_undone(self.submod, keep_outputs=True):
            return super()._forward_metadata_inference(*args, **kwargs)

    def _backward_metadata_inference(self, *args, **kwargs):
        with effects_undone(self.submod):
            return super()._backward_metadata_inference(*args, **kwargs)


@contextlib.contextmanager
def effects_undone(part: nn.Module, keep_outputs: bool = False):
    """Restore the expert token counts and the step's open metrics; empty the loss handoff unless kept
    (inference runs before any microbatch of a step, when it is empty)."""
    counts = {name: b.clone() for name, b in part.named_buffers() if name.endswith("tokens_per_expert")}
    metrics = dict(part.step_metrics._open)
    try:
        yield
    finally:
        buffers = dict(part.named_buffers())
        with torch.no_grad():
            for name, value in counts.items():
                buffers[name].copy_(value)
        part.step_metrics._open = metrics
        if not keep_outputs:
            part.step.outputs.clear()


def pipeline_loss(step: PipelineStep, loss_fn):
    """The spec's loss of the last stage's logits and training outputs, over the step's global target tokens
    (as Titan divides it without pipelining)."""

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if not step.outputs:  # validation (eval): the plain logits
            return loss_fn(logits, labels) / step.tokens
        outputs = step.outputs.pop(0)
        # the stage joined its heads along the sequence (main, then each MTP depth)
        main, *mtp = logits.split(labels.shape[1], dim=1) if logits.shape[1] > labels.shape[1] else [logits]
        outputs.mtp_logits = mtp
        return loss_fn((main, outputs), labels) / step.tokens

    return loss


class ScheduleOverGlobalTokens:
    """Titan's schedule, whose training ``step`` first counts the step's target tokens over every rank, and
    at its end drops the dense warm-up's gradients of the parameters that do not learn
    (``drop_warmup_gradients``): Titan's trainer clips right after this step, so they never reach clipping.

    The losses it hands back are sums again (Titan's trainer divides them for logging). Every other
    attribute (``eval`` for validation, ...) is the schedule's own; there the loss is not divided.
    """

    def __init__(self, schedule, step: PipelineStep, device: torch.device, model_parts=()):
        self.schedule, self.pipeline_step, self.device = schedule, step, device
        self.model_parts = model_parts  # this rank's stages (the list Titan's trainer holds)

    def step(self, *args, target=None, losses=None, **kwargs):
        count = torch.zeros((), dtype=torch.float32, device=self.device)
        if target is not None:  # the last stage's ranks; the others add 0
            count += (target != IGNORE_INDEX).sum()
        dist.all_reduce(count)  # pipeline x data-parallel ranks: the world (no TP or CP under PP here)
        self.pipeline_step.tokens = count
        try:
            result = self.schedule.step(*args, target=target, losses=losses, **kwargs)
        finally:
            self.pipeline_step.tokens = 1.0
            self.pipeline_step.outputs.clear()
        drop_warmup_gradients(self.model_parts, placeholder=True)
        if losses is not None:
            losses[:] = [loss * count for loss in losses]
        return result

    def __getattr__(self, name):
        return getattr(self.schedule, name)


def in_dense_warmup(part: nn.Module) -> bool:
    """The part trains its indexers alone this step (the forward's ``indexer_dense``), as a pipeline stage."""
    args = part.model_args
    return (
        isinstance(part, DeepSeekV4Stage)
        and part.training
        and args.indexer_loss_weight > 0
        and part.current_step() <= args.indexer_warmup_steps
    )


def drop_warmup_gradients(model_parts: list[nn.Module], placeholder: bool = False) -> None:
    """During the indexer's dense warm-up only the indexers learn, but a pipeline backpropagates the LM loss
    times 0 through every other parameter: its stages must backpropagate to reach the earlier stages'
    indexers (the last stage's loss is ``0 * main``, ``infra/loss.py``). An unsplit model never creates those
    gradients; drop them, so that AdamW leaves those parameters (and their state) alone.

    Called at the end of the schedule's step (``ScheduleOverGlobalTokens.step``), that is before Titan's
    trainer clips: the gradients are "zero" only while the LM path is finite. An inf in the logits makes
    the cross-entropy's gradient NaN, and 0 x NaN is NaN, so these "zeros" are NaN through the last stage's
    head and, sent back, through every earlier stage's non-indexer parameters. Had they reached
    ``clip_grad_norm_`` (as when an optimizer pre-hook dropped them, after clipping), the global norm would be
    NaN and so would every clipped indexer gradient, under pipelining only. The indexers' own gradients are
    untouched by them: their KL's inputs and target are detached (``model/attention.py``), and a stage's KL
    joins backward with the constant gradient 1 (``attach_to_backward``). So the norm Titan clips by is the
    unsplit model's: the indexers' gradients alone.

    ``placeholder``: a rank whose stages hold no indexer (no CSA layer) would hand Titan's ``clip_grad_norm_``
    no gradient at all, and its norm of nothing is a CPU ``tensor(0.)``, which the NCCL all-reduce over the
    pipeline ranks refuses. Such a rank keeps one exact zero gradient (written here, not the backward's
    value): it adds 0 to the norm and stays 0 when clipped; the optimizer's pre-hook (``infra/optimizer.py``)
    calls this again without ``placeholder`` and drops it before AdamW steps.
    """
    parts = [part for part in model_parts if in_dense_warmup(part)]
    kept, spare = False, None
    for part in parts:
        learning = {id(p) for m in part.modules() if isinstance(m, Indexer) for p in m.parameters()}
        for p in part.parameters():
            if id(p) in learning:
                kept = kept or p.grad is not None
                continue
            p.grad = None
            if spare is None and p.requires_grad:
                spare = p
    if placeholder and not kept and spare is not None:
        spare.grad = torch.zeros_like(spare)


__all__ = ["pipeline_deepseek_v4", "stage_module_names", "refuse_pipeline_problems"]
