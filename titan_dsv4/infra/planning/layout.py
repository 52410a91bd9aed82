"""What every planning figure is a function of: the layout (how ranks split the model) and the step."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

from titan_dsv4.model.args import DeepSeekV4ModelArgs

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
FP32 = 4


@dataclass(frozen=True)
class Layout:
    """How the ranks split the model, as Titan's ``ParallelDims`` does: world = dp_replicate x dp_shard x cp
    x pp; FSDP shards over dp_shard x cp (within one pipeline rank's slice); EP borrows ep of those ranks.

    cp: each rank holds seq_len / cp tokens (``Training.cp``). pp: each rank holds its pipeline stages only
    (``stages.py``), the ranks of one stage sharding it over their dp_shard x cp.
    """

    dp_replicate: int
    dp_shard: int
    ep: int = 1
    cp: int = 1
    pp: int = 1

    @property
    def batch_ranks(self) -> int:
        """Ranks that each take their own local batch (CP and PP ranks share one)."""
        return self.dp_replicate * self.dp_shard

    @property
    def world(self) -> int:
        return self.batch_ranks * self.cp * self.pp

    @property
    def fsdp(self) -> int:
        """The ranks FSDP shards the non-expert units over (Titan's 'fsdp' mesh: dp_shard x cp)."""
        return self.dp_shard * self.cp

    @property
    def efsdp(self) -> int:
        """The ranks FSDP shards one EP rank's experts over (Titan's 'efsdp' mesh)."""
        return self.fsdp // self.ep

    @property
    def data_parallel(self) -> bool:
        """Whether FSDP shards over a data-parallel mesh (``parallelize.data_parallel_mesh``): without one a
        pipeline computes in the storage dtype (Titan turns mixed precision off under PP without FSDP)."""
        return self.fsdp > 1 or self.dp_replicate > 1

    @property
    def fsdp_mesh_shape(self) -> tuple[int, int]:
        """(shard, replicate) ranks of the mesh FSDP shards over (``data_parallel_mesh``): HSDP's, or with
        dp_shard 1 the replicate group itself, as shards."""
        return (self.fsdp, self.dp_replicate) if self.fsdp > 1 else (self.dp_replicate, 1)

    @classmethod
    def of(cls, parallel_dims) -> Layout:
        d = parallel_dims
        return cls(d.dp_replicate, d.dp_shard, d.ep, d.cp, d.pp)

    def describe(self) -> str:
        hsdp = f"dp_replicate {self.dp_replicate} x " if self.dp_replicate > 1 else ""
        more = "".join(f", {name} {n}" for name, n in (("cp", self.cp), ("pp", self.pp)) if n > 1)
        return f"{self.world} ranks ({hsdp}dp_shard {self.dp_shard}, ep {self.ep}{more})"

    def launch(self) -> str:
        """How to ask for this layout: the GPU count and the flags that differ from the defaults."""
        degrees = (
            ("expert_parallel_degree", self.ep),
            ("data_parallel_replicate_degree", self.dp_replicate),
            ("context_parallel_degree", self.cp),
            ("pipeline_parallel_degree", self.pp),
        )
        flags = [f"--parallelism.{name} {n}" for name, n in degrees if n > 1]
        return f"{self.world} GPUs" + (" with " + " ".join(flags) if flags else "")


def experts_shard_dim(num_experts: int, efsdp: int, ep: int) -> int:
    """The dim FSDP shards routed experts on: 0 (the experts), or 1 under EP when the efsdp x ep ranks
    outnumber the experts (as Titan's llama4 / deepseek_v3; ``apply_fsdp`` and the planner both ask here)."""
    return 1 if ep > 1 and efsdp * ep > num_experts else 0


def experts_shardable(a: DeepSeekV4ModelArgs, layout: Layout) -> bool:
    """Experts sharded on dim 1 (moe_inter_dim for w1/w3, dim for w2) must divide evenly over efsdp: FSDP2
    refuses uneven dim-1 shards."""
    if experts_shard_dim(a.moe_args.num_experts, layout.efsdp, layout.ep) == 0:
        return True
    return a.moe_inter_dim % layout.efsdp == 0 and a.dim % layout.efsdp == 0


@dataclass(frozen=True)
class Pipeline:
    """How a pipelined step runs: Titan's ``parallelism.pipeline_parallel_*`` keys (unused when pp is 1)."""

    schedule: str = "1F1B"
    microbatch_size: int = 1
    layers_per_stage: int | None = None
    first_stage_less_layers: int = 1
    last_stage_less_layers: int = 1
    module_fqns: tuple[tuple[str, ...], ...] | None = None  # module_fqns_per_model_part

    @classmethod
    def of(cls, parallelism) -> Pipeline:
        p = parallelism
        fqns = p.module_fqns_per_model_part
        return cls(
            schedule=p.pipeline_parallel_schedule,
            microbatch_size=p.pipeline_parallel_microbatch_size,
            layers_per_stage=p.pipeline_parallel_layers_per_stage,
            first_stage_less_layers=p.pipeline_parallel_first_stage_less_layers,
            last_stage_less_layers=p.pipeline_parallel_last_stage_less_layers,
            module_fqns=None if fqns is None else tuple(tuple(names) for names in fqns),
        )

    def job_config(self, pp: int) -> SimpleNamespace:
        """The keys ``infra.pipeline`` reads (``stage_module_names``, ``stages_per_rank``) for pp ranks."""
        return SimpleNamespace(
            parallelism=SimpleNamespace(
                pipeline_parallel_degree=pp,
                pipeline_parallel_schedule=self.schedule,
                pipeline_parallel_microbatch_size=self.microbatch_size,
                pipeline_parallel_layers_per_stage=self.layers_per_stage,
                pipeline_parallel_first_stage_less_layers=self.first_stage_less_layers,
                pipeline_parallel_last_stage_less_layers=self.last_stage_less_layers,
                module_fqns_per_model_part=None
                if self.module_fqns is None
                else [list(names) for names in self.module_fqns],
            )
        )


@dataclass(frozen=True)
class Training:
    """The step's shape and precision: what activations and collectives scale with."""

    seq_len: int
    local_batch_size: int
    compute_dtype: str = "bfloat16"  # training.mixed_precision_param
    reduce_dtype: str = "float32"  # training.mixed_precision_reduce
    storage_dtype: str = "float32"  # training.dtype
    ac_mode: str = "full"
    selective_ac_option: str = "op"
    memory_budget: float = 0.5
    reshard_after_forward: bool | None = None  # None: Titan's "default", resharded unless pipelined
    microbatches: int = 1  # gradient accumulation steps
    cpu_offload: bool = False
    cp: int = 1  # context parallelism: a rank holds seq_len / cp tokens of each row
    cp_chunks_per_rank: int = 2  # Titan's head-tail load balancer (1: contiguous shards)
    pipeline: Pipeline = Pipeline()  # pipeline parallelism: the schedule and its microbatches

    def on(self, layout: Layout) -> Training:
        """The step as this layout runs it: a cp rank's share of each row; FSDP's "default" resharding
        resolved (``parallelize.reshard_after_forward``: not under PP); without a data-parallel mesh a
        pipeline computes in the storage dtype (Titan's ``maybe_enable_amp``: mixed precision under PP only
        through FSDP)."""
        reshard = layout.pp == 1 if self.reshard_after_forward is None else self.reshard_after_forward
        fp32_pipeline = layout.pp > 1 and not layout.data_parallel
        compute = self.storage_dtype if fp32_pipeline else self.compute_dtype
        return replace(self, cp=layout.cp, reshard_after_forward=reshard, compute_dtype=compute)

    @property
    def pipeline_microbatches(self) -> int:
        """The microbatches a pipeline cuts the local batch into."""
        return max(1, self.local_batch_size // self.pipeline.microbatch_size)

    @property
    def tokens(self) -> int:
        """Tokens of the local batch's rows, whole (what the sequence-wide terms scale with)."""
        return self.seq_len * self.local_batch_size

    @property
    def local_tokens(self) -> int:
        """Tokens this rank holds: the rows' tokens, divided over the context-parallel ranks."""
        return self.tokens // self.cp

    @property
    def compute_bytes(self) -> int:
        return DTYPE_BYTES[self.compute_dtype]

    @classmethod
    def of(cls, job_config, layout: Layout) -> Training:
        """The step the job config asks for (the layout sets the gradient accumulation steps)."""
        t, ac = job_config.training, job_config.activation_checkpoint
        per_step = t.local_batch_size * layout.batch_ranks
        policy = job_config.parallelism.fsdp_reshard_after_forward
        return cls(
            seq_len=t.seq_len,
            local_batch_size=t.local_batch_size,
            compute_dtype=t.mixed_precision_param,
            reduce_dtype=t.mixed_precision_reduce,
            storage_dtype=t.dtype,
            ac_mode=ac.mode,
            selective_ac_option=str(ac.selective_ac_option),
            memory_budget=ac.memory_budget,
            reshard_after_forward={"always": True, "never": False}.get(policy),  # None: resolved by ``on``
            microbatches=max(1, t.global_batch_size // per_step) if t.global_batch_size > 0 else 1,
            cpu_offload=t.enable_cpu_offload,
            cp=layout.cp,
            cp_chunks_per_rank=1 if job_config.parallelism.context_parallel_load_balancer is None else 2,
            pipeline=Pipeline.of(job_config.parallelism),
        )

    def describe(self) -> str:
        ac = self.ac_mode if self.ac_mode != "selective" else f"selective {self.selective_ac_option}"
        shard = f" ({self.seq_len // self.cp} per cp rank)" if self.cp > 1 else ""
        return (
            f"seq_len {self.seq_len}{shard} x local_batch_size {self.local_batch_size}, AC {ac}, "
            f"{self.compute_dtype} compute"
        )
