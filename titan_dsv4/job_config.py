"""The ``[deepseek_v4]`` training-config section, and the job checks TorchTitan makes late or not at all.

``[job] custom_config_module = "titan_dsv4.job_config"`` (set in every shipped TOML) merges ``JobConfig``
below into Titan's, so ``--deepseek_v4.mtp_layers 1`` works on the command line. The section is the model's
``TrainingOptions`` (declared once, in ``model/options.py``) plus the job-level keys. ``check_job`` runs from
the train spec's first hook on every entry point (and once more before any rank starts, from
``./run_train.sh``); ``check_parallel_degrees`` runs before Titan builds its meshes (``titan_dsv4.train``
and ``./run_train.sh``).
"""

# No `from __future__ import annotations`: tyro resolves these field types after Titan merges the
# dataclass into its own JobConfig, from another module.
import os
from dataclasses import dataclass, field
from math import prod

from .flavors import UnknownFlavorError, deepseek_v4_args
from .model.errors import ConfigError
from .model.options import TrainingOptions
from .model.sequence_shard import check_context_parallel


@dataclass
class DeepSeekV4(TrainingOptions):
    """DeepSeek-V4 knobs: the model's training options, and the job-level keys below."""

    mtp_layers: int | None = None
    """Multi-token-prediction depths (the released checkpoints have 1; 0 builds none; unset: the flavor's)."""
    gpu_memory_gib: float = 0.0
    """Per-device memory the layout must fit (0: the device's own); the trainer refuses a layout that does
    not."""


@dataclass
class JobConfig:
    deepseek_v4: DeepSeekV4 = field(default_factory=DeepSeekV4)


# Options only titan_dsv4's Trainer serves (Titan has no extension point for them): key -> why.
TRAINER_ONLY = {
    "checkpoint.last_save_in_hf": (
        "it completes the export with the int64 hash tables, config.json and the tokenizer, which "
        "TorchTitan's HF save leaves out"
    ),
}


def check_job(job_config, trainer_completes_hf_export: bool = False) -> None:
    """Refuse, before any compute, what Titan would refuse only when it reaches it (or never).

    ``trainer_completes_hf_export``: the caller is ``titan_dsv4``'s Trainer, which serves
    ``checkpoint.last_save_in_hf``; TorchTitan's stock Trainer does not.
    """
    problems = _checkpoint_problems(
        job_config.checkpoint, os.path.join(job_config.job.dump_folder, job_config.checkpoint.folder)
    )
    if (
        job_config.checkpoint.enable
        and job_config.checkpoint.last_save_in_hf
        and not trainer_completes_hf_export
    ):
        problems.append(
            "checkpoint.last_save_in_hf needs titan_dsv4's trainer ("
            + TRAINER_ONLY["checkpoint.last_save_in_hf"]
            + "): launch with ./run_train.sh or `python -m titan_dsv4.train` instead of "
            "`python -m torchtitan.train`"
        )
    section = getattr(job_config, "deepseek_v4", None)
    if section is None:
        raise ConfigError(
            "the job config has no [deepseek_v4] section: add `custom_config_module = "
            '"titan_dsv4.job_config"` to the [job] table of your TOML (every shipped config has it), or '
            "--job.custom_config_module titan_dsv4.job_config on the command line"
        )
    if section.gpu_memory_gib < 0:
        problems.append(
            f"deepseek_v4.gpu_memory_gib={section.gpu_memory_gib} must be >= 0 (0: the device's own)"
        )
    problems += _model_problems(job_config, section)
    problems += _tokenizer_problems(job_config.model.hf_assets_path)
    if problems:
        raise ConfigError("Invalid job config:\n  - " + "\n  - ".join(problems))


def job_model_args(job_config):
    """The flavor's args with the job's ``[deepseek_v4]`` section applied (a private copy)."""
    try:
        args = deepseek_v4_args[job_config.model.flavor].replace()
    except UnknownFlavorError as e:
        raise ConfigError(f"model.flavor: {e}") from None
    args.apply_section(job_config.deepseek_v4)
    return args


def _model_problems(job_config, section) -> list[str]:
    """The flavor, the options, seq_len and the expert-parallel degree against the model they build."""
    if job_config.model.name != "deepseek_v4":
        return []
    try:
        args = job_model_args(job_config)
        args.validate()
        args.check_seq_len(job_config.training.seq_len)
        check_context_parallel(job_config, args)
        check_attention_kernel(job_config, args)
        if job_config.parallelism.pipeline_parallel_degree > 1:
            from .infra.pipeline import refuse_pipeline_problems

            dims = parallel_dims_of(job_config, launch_world_size(job_config))
            refuse_pipeline_problems(args.n_layers, job_config, dims.dp_replicate * dims.dp_shard)
    except ConfigError as e:
        return [str(e)]
    ep, experts = job_config.parallelism.expert_parallel_degree, args.moe_args.num_experts
    if ep > 1 and experts % ep:
        return [
            f"expert_parallel_degree={ep} must divide the {experts} routed experts: each EP rank owns the "
            f"same number of experts. Pick a divisor of {experts}."
        ]
    return []


def check_attention_kernel(job_config, args) -> None:
    """``attn_impl = "triton"``: its kernels must run on this job's device and layout (refused here, before
    any work; never replaced by another kernel)."""
    if args.attn_impl != "triton":
        return
    import torch

    from .model.indexer import TRITON_NEEDS_RANGES
    from .model.triton_attention import check_triton_attention
    from .model.triton_indexer import check_triton_indexer

    device = "cuda" if torch.cuda.is_available() else "cpu"  # Titan's device (the CPU mode without CUDA)
    check_triton_attention(args.head_dim, args.n_heads, device)
    if args.csa_ratio in args.compress_ratios:
        check_triton_indexer(args.index_head_dim, args.index_n_heads, device)
    if args.attn_mask_type == "block_causal" and job_config.parallelism.context_parallel_degree > 1:
        raise ConfigError(TRITON_NEEDS_RANGES)


def _tokenizer_problems(hf_assets_path: str | None) -> list[str]:
    """Titan's HF tokenizer reads tokenizer.json from ``model.hf_assets_path``."""
    if hf_assets_path and os.path.isfile(os.path.join(hf_assets_path, "tokenizer.json")):
        return []
    return [
        f"model.hf_assets_path={hf_assets_path!r} holds no tokenizer.json: point --model.hf_assets_path at a "
        "folder with one (a released checkpoint folder, or ./titan_dsv4/assets/tokenizer, the debug model's)"
    ]


def check_tokenizer_fits(tokenizer, job_config) -> None:
    """Token ids past the embedding would index out of range: the tokenizer must fit the flavor's vocab."""
    vocab = job_model_args(job_config).vocab_size
    n = tokenizer.get_vocab_size()
    if n > vocab:
        raise ConfigError(
            f"the tokenizer at {job_config.model.hf_assets_path} has {n} tokens but the model vocab_size is "
            f"{vocab}: token ids >= {vocab} would index past the embedding. Use a flavor with a larger "
            "vocab_size or the matching tokenizer (--model.hf_assets_path)."
        )


def _checkpoint_problems(cfg, checkpoint_folder: str) -> list[str]:
    if not cfg.enable:
        return []
    problems = []
    if cfg.last_save_in_hf and not cfg.last_save_model_only:
        problems.append(
            "checkpoint.last_save_in_hf exports model weights only, but checkpoint.last_save_model_only "
            "is false: add --checkpoint.last_save_model_only"
        )
    if cfg.initial_load_in_hf and not cfg.initial_load_model_only:
        problems.append(
            "checkpoint.initial_load_in_hf loads model weights only, but checkpoint.initial_load_model_only "
            "is false: drop --checkpoint.no_initial_load_model_only"
        )
    if cfg.initial_load_in_hf_quantized and not cfg.initial_load_in_hf:
        problems.append(
            "checkpoint.initial_load_in_hf_quantized needs checkpoint.initial_load_in_hf: add "
            "--checkpoint.initial_load_in_hf"
        )
    resuming = os.path.isdir(checkpoint_folder)  # Titan then ignores initial_load_path
    if cfg.initial_load_path and not resuming and not os.path.isdir(cfg.initial_load_path):
        problems.append(
            f"checkpoint.initial_load_path {cfg.initial_load_path} is not a folder: point it at a "
            "checkpoint folder (a Hugging Face folder with --checkpoint.initial_load_in_hf, or a DCP step-N "
            "folder)"
        )
    return problems


def check_checkpoint_options(cfg, checkpoint_folder: str) -> None:
    """The checkpoint part of ``check_job`` on its own."""
    problems = _checkpoint_problems(cfg, checkpoint_folder)
    if problems:
        raise ConfigError("Invalid checkpoint options:\n  - " + "\n  - ".join(problems))


def launch_world_size(job_config) -> int:
    """The world size Titan will initialise: NGPU in the fake comm modes, torchrun's WORLD_SIZE otherwise."""
    if job_config.comm.mode in ("fake_backend", "local_tensor"):
        return int(os.environ.get("NGPU", "1"))
    return int(os.environ.get("WORLD_SIZE", "1"))


def parallel_dims_of(job_config, world_size: int):
    """Titan's ParallelDims for the job's degrees on ``world_size`` ranks (no mesh is built)."""
    from torchtitan.distributed import ParallelDims

    p = job_config.parallelism
    check_parallel_degrees(p, world_size)  # a clear message before Titan's assertions
    return ParallelDims(
        dp_replicate=p.data_parallel_replicate_degree,
        dp_shard=p.data_parallel_shard_degree,
        cp=p.context_parallel_degree,
        tp=p.tensor_parallel_degree,
        pp=p.pipeline_parallel_degree,
        ep=p.expert_parallel_degree,
        etp=p.expert_tensor_parallel_degree,
        world_size=world_size,
    )


def check_parallel_degrees(p, world: int) -> None:
    """The degrees must multiply to the world size, and EP must fit Titan's mesh (before Titan asserts)."""
    others = {
        "data_parallel_replicate_degree": p.data_parallel_replicate_degree,
        "context_parallel_degree": p.context_parallel_degree,
        "tensor_parallel_degree": p.tensor_parallel_degree,
        "pipeline_parallel_degree": p.pipeline_parallel_degree,
    }
    dp_shard = p.data_parallel_shard_degree
    below_one = [
        f"{k}={v}"
        for k, v in {
            **others,
            "expert_parallel_degree": p.expert_parallel_degree,
            "expert_tensor_parallel_degree": p.expert_tensor_parallel_degree,
        }.items()
        if v < 1
    ]
    if dp_shard < 1 and dp_shard != -1:
        below_one.append(f"data_parallel_shard_degree={dp_shard}")
    if below_one:
        raise ConfigError(
            f"parallelism degrees must be >= 1 (data_parallel_shard_degree may be -1): got "
            f"{', '.join(below_one)}; set them to 1 to disable that parallelism"
        )
    fixed = prod(others.values())
    product = " x ".join(f"{k}={v}" for k, v in others.items() if v > 1) or "1"
    if dp_shard == -1 and world % fixed:
        raise ConfigError(
            f"parallelism degrees do not divide the world size: {product} = {fixed} does not divide the "
            f"{world} "
            f"ranks (data_parallel_shard_degree=-1 takes the ranks left over). Pick degrees whose product "
            f"divides "
            f"{world}, or launch a multiple of {fixed} ranks (NGPU)."
        )
    if dp_shard != -1 and fixed * dp_shard != world:
        raise ConfigError(
            f"parallelism degrees do not match the world size: data_parallel_shard_degree={dp_shard} x "
            f"{product} "
            f"= {fixed * dp_shard} ranks, but the job has {world}. Set "
            f"--parallelism.data_parallel_shard_degree -1 "
            f"to use every remaining rank, or launch {fixed * dp_shard} ranks (NGPU={fixed * dp_shard})."
        )
    unimplemented = unimplemented_degrees(
        p.tensor_parallel_degree, p.expert_parallel_degree, p.expert_tensor_parallel_degree
    )
    if unimplemented:
        raise ConfigError(unimplemented_message(unimplemented))
    shard = world // fixed if dp_shard == -1 else dp_shard
    ep, etp = p.expert_parallel_degree, p.expert_tensor_parallel_degree
    borrowed = shard * p.context_parallel_degree * p.tensor_parallel_degree
    if ep > 1 and borrowed % (ep * etp):
        raise ConfigError(
            f"expert_parallel_degree={ep} (x expert_tensor_parallel_degree={etp}) must divide "
            f"data_parallel_shard_degree x context x tensor parallel = {borrowed}: expert parallelism "
            f"borrows its "
            f"ranks from those. Pick an EP degree that divides {borrowed}."
        )


def unimplemented_degrees(tp: int, ep: int, etp: int) -> dict[str, int]:
    """The degrees > 1 this package does not implement (expert TP only counts under EP, as in Titan)."""
    degrees = {"tensor_parallel_degree": tp, "expert_tensor_parallel_degree": etp if ep > 1 else 1}
    return {k: v for k, v in degrees.items() if v > 1}


def unimplemented_message(bad: dict[str, int]) -> str:
    """What is not implemented, what to use instead, and the flags that turn it off."""
    listed = ", ".join(f"parallelism.{k}={v}" for k, v in bad.items())
    return (
        f"DeepSeek-V4 does not implement {listed} yet. Use data parallelism (FSDP / HSDP: "
        "parallelism.data_parallel_shard_degree and data_parallel_replicate_degree), expert, context and "
        "pipeline parallelism, and set " + ", ".join(f"--parallelism.{k} 1" for k in bad)
    )
