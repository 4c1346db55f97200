"""Typed job configuration: one dataclass per YAML section, validated in ``__post_init__``.

The YAML file has the sections ``model`` (``models.ModelConfig``), ``optim``, ``schedule``, ``data``,
``train``, ``parallel``, ``logging`` and ``monitor``. Every section is optional (defaults below). Loading,
type checking and dotted CLI overrides live in ``configs/loader.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from models import ModelConfig
from muonclip.newton_schulz import NS_PATHS, NS_SCHEDULES
from parallel.fp8_storage import FP8_POINTS
from parallel.recompute import RECOMPUTE_MODES, RECOMPUTE_MODULES

NS_DTYPE_NAMES = ("auto", "float32", "bfloat16", "float64")


def _need(section: str, cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"{section} config: {msg}")


def _one_of(section: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    _need(section, value in allowed, f"{name} must be one of {list(allowed)}, got {value!r}")


QK_CLIP_MODES = ("forward", "post_step")


@dataclass
class OptimConfig:
    """MuonClip: Muon for hidden matrices, AdamW for embeddings/head/norms, QK-Clip after each step."""

    lr: float = 3e-3  # shared by Muon (RMS-matched update) and AdamW
    momentum: float = 0.95  # Muon momentum
    nesterov: bool = True
    ns_steps: int = 5  # Newton–Schulz iterations
    # Newton–Schulz compute dtype: "auto" = bfloat16 on CUDA, float32 on CPU; or "float32", "bfloat16", "float64"
    ns_dtype: str = "auto"
    ns_coefficients: str = "quintic"  # "quintic" (Keller Jordan's, every step) or "polar_express" (per step)
    # "standard" (as torch.optim.Muon), "gram" (iterate on the small Gram matrix; float32/64 only) or "auto" (per
    # shape the one with fewer FLOPs: gram when C > 1.5 A). Gram amplifies rounding (see muonclip/newton_schulz.py),
    # so layouts then agree with one process less tightly; hence standard by default.
    ns_path: str = "standard"
    weight_decay: float = 0.1  # decoupled, for Muon and AdamW(decay) groups
    adamw_betas: tuple[float, float] = (0.9, 0.95)
    adamw_eps: float = 1e-8
    adamw_lr_scale: float = 1.0  # AdamW groups use lr * adamw_lr_scale
    qk_clip: bool = True  # enable QK-Clip
    qk_clip_tau: float = 100.0  # max attention logit allowed per head
    # "forward": clip with the max logits of the step's own forward (Kimi K2; free, but a step's update can leave a
    # head above tau until the next clip). "post_step": after the update, re-run a no-grad forward on the step's
    # batch and clip layer by layer, so every head is <= tau on that batch after every step (one extra forward).
    qk_clip_mode: str = "forward"
    grad_clip: float = 1.0  # global grad-norm clip before Muon; 0 disables
    # with train.param_dtype bfloat16: keep a float32 master copy of each parameter with its optimizer state (on
    # the owner under ZeRO-1) and update that; false updates the bf16 parameters directly (a comparison baseline)
    master_weights: bool = True
    # keep the owner's float32 master weights, Muon momentum and AdamW moments in host memory (pinned on CUDA)
    # and stream them to the device bucket by bucket for the update (parallel.optimizer zero1, or one process)
    offload_state: bool = False

    def __post_init__(self) -> None:
        s = "optim"
        _need(s, self.lr > 0, f"lr must be > 0, got {self.lr}")
        _need(s, 0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        _need(s, self.ns_steps >= 1, f"ns_steps must be >= 1, got {self.ns_steps}")
        _one_of(s, "ns_dtype", self.ns_dtype, NS_DTYPE_NAMES)
        _one_of(s, "ns_coefficients", self.ns_coefficients, tuple(NS_SCHEDULES))
        _one_of(s, "ns_path", self.ns_path, NS_PATHS)
        _need(s, not (self.ns_path == "gram" and self.ns_dtype == "bfloat16"),
              "ns_path gram diverges in bfloat16 (see muonclip/newton_schulz.py): use ns_dtype float32 or "
              "ns_path standard/auto")
        _need(s, self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _need(s, len(self.adamw_betas) == 2 and all(0 <= b < 1 for b in self.adamw_betas),
              f"adamw_betas must be two numbers in [0, 1), got {list(self.adamw_betas)}")
        _need(s, self.adamw_eps > 0, f"adamw_eps must be > 0, got {self.adamw_eps}")
        _need(s, self.adamw_lr_scale > 0, f"adamw_lr_scale must be > 0, got {self.adamw_lr_scale}")
        _need(s, self.qk_clip_tau > 0, f"qk_clip_tau must be > 0, got {self.qk_clip_tau}")
        _need(s, self.qk_clip_mode in QK_CLIP_MODES,
              f"qk_clip_mode must be one of {list(QK_CLIP_MODES)}, got {self.qk_clip_mode!r}")
        _need(s, self.grad_clip >= 0, f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


DECAYS = ("cosine", "wsd", "constant")


@dataclass
class ScheduleConfig:
    """Linear warmup, then cosine to min_lr_ratio, WSD (stable then linear decay) or constant."""

    warmup_steps: int = 100
    decay: str = "cosine"
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, wsd)
    wsd_decay_fraction: float = 0.2  # wsd: the last fraction of train.steps decays linearly

    def __post_init__(self) -> None:
        s = "schedule"
        _need(s, self.warmup_steps >= 0, f"warmup_steps must be >= 0, got {self.warmup_steps}")
        _one_of(s, "decay", self.decay, DECAYS)
        _need(s, 0 <= self.min_lr_ratio <= 1, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        _need(s, 0 < self.wsd_decay_fraction <= 1, f"wsd_decay_fraction must be in (0, 1], got {self.wsd_decay_fraction}")


SOURCE_FORMATS = ("auto", "jsonl", "json", "parquet", "text", "lines", "hf_disk", "megatron")


@dataclass
class SourceConfig:
    """One entry of ``data.sources`` / ``data.val_sources`` (formats and resolution: data/formats.py)."""

    path: str = ""  # a file, a directory, a glob, a datasets.save_to_disk directory or a Megatron prefix
    weight: float = 1.0  # blend weight (normalised over the list); 0 leaves the source out
    name: str = ""  # label for logs and W&B (data/<name>/tokens); default: derived from the path
    text_key: str = "text"  # JSON/parquet/arrow column that holds the document text
    format: str = "auto"  # "auto" (by extension), or one of SOURCE_FORMATS; "lines": one document per line

    def __post_init__(self) -> None:
        s = "data source"
        _need(s, bool(self.path), "path must be a non-empty file, directory, glob or Megatron prefix")
        _need(s, self.weight >= 0 and self.weight < float("inf"),
              f"weight must be a finite number >= 0, got {self.weight} (path {self.path})")
        _need(s, bool(self.text_key), f"text_key must be non-empty (path {self.path})")
        _one_of(s, "format", self.format, SOURCE_FORMATS)


def _check_sources(name: str, sources: list[SourceConfig]) -> None:
    if sources:
        _need("data", sum(src.weight for src in sources) > 0,
              f"{name}: the weights sum to 0; give at least one source a weight > 0")
        labels = [src.name for src in sources if src.name]
        dup = sorted({n for n in labels if labels.count(n) > 1})
        _need("data", not dup, f"{name}: names must be unique, {dup} appear more than once")


@dataclass
class DataConfig:
    """What to train on (``sources``; empty = the embedded corpus) and how batches are cut (data/)."""

    # [{path, weight, name, text_key, format}, ...]; raw text is tokenized once on rank 0 (cached under data_dir)
    sources: list[SourceConfig] = field(default_factory=list)
    val_sources: list[SourceConfig] = field(default_factory=list)  # empty: hold out val_fraction of each source
    tokenizer: str = "bpe8k"  # "bpe8k", "gpt2", a tokenizer.json path or a local Hugging Face tokenizer dir
    trust_remote_code: bool = False  # let AutoTokenizer run a tokenizer directory's own code (e.g. Kimi-K2)
    utf8_errors: str = "strict"  # invalid UTF-8 in raw text: "strict" (error naming file and line) or "replace"
    # tokenizer processes rank 0 uses for raw-text sources; 0: one per 64 MiB of text, up to its CPUs (the other
    # ranks wait meanwhile); identical files whatever the number
    preprocess_workers: int = 0
    # how long the other ranks wait for rank 0 to tokenize and index the data before they end with an error
    # naming rank 0's last message (tokenize large corpora beforehand: python -m data.preprocess)
    build_timeout_s: float = 7200.0
    data_dir: str = "data/cache"  # token shards of raw-text sources, sample indices, downloads
    seq_len: int = 256
    micro_batch_size: int = 8  # sequences per rank per micro step
    grad_accum: int = 1  # micro steps per optimizer step
    val_fraction: float = 0.01  # documents of each source held out for validation (when val_sources is empty)
    val_batches: int = 8  # validation pass = val_batches global batches (micro_batch_size * dp * grad_accum)
    seed: int = 1234  # data order
    # packed samples hold several documents: with document_mask a token attends only to earlier tokens of its own
    # document (boundaries from the sample index, exact), and QK-Clip's max logits cover exactly those pairs;
    # reset_positions (with document_mask) restarts RoPE positions at each document
    document_mask: bool = False
    reset_positions: bool = False

    def __post_init__(self) -> None:
        s = "data"
        _need(s, bool(self.tokenizer), "tokenizer must be a non-empty name (e.g. 'bpe8k')")
        _need(s, bool(self.data_dir), "data_dir must be a non-empty path")
        for name in ("seq_len", "micro_batch_size", "grad_accum", "val_batches"):
            _need(s, getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _need(s, self.preprocess_workers >= 0, f"preprocess_workers must be >= 0 (0: automatic), got "
                                               f"{self.preprocess_workers}")
        _need(s, self.build_timeout_s > 0, f"build_timeout_s must be > 0 seconds, got {self.build_timeout_s}")
        _need(s, self.document_mask or not self.reset_positions,
              "reset_positions needs document_mask: true (positions restart where attention is cut)")
        _need(s, 0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        _one_of(s, "utf8_errors", self.utf8_errors, ("strict", "replace"))
        _check_sources("sources", self.sources)
        _check_sources("val_sources", self.val_sources)


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps in the whole run (the schedule spans them)
    seed: int = 0  # model init (identical on all ranks)
    device: str = "auto"  # "auto" (cuda if available), "cpu" or "cuda"
    dtype: str = "float32"  # compute dtype of the GEMMs: "float32" or "bfloat16" (autocast)
    # the model's parameters: "float32", or "bfloat16" (bf16 parameters and activations, float32 gradient
    # buffers, float32 master weights with the optimizer state; needs dtype bfloat16). See docs/precision.md.
    param_dtype: str = "float32"
    log_interval: int = 10
    eval_interval: int = 100  # validation every N steps and at the end; 0 disables
    ckpt_interval: int = 0  # checkpoint every N steps and at the end; 0 disables
    ckpt_keep: int = 3  # keep the last K checkpoints
    output_dir: str = "outputs/run"  # config.yaml, metrics.jsonl, checkpoints/, wandb/
    resume: str = "auto"  # "auto" (latest checkpoint in output_dir if any), "none", or a checkpoint path
    # torch.compile each transformer block (parallel/parallelize.py apply_compile); the first step compiles
    compile: bool = False
    init_from: str = ""  # a Hugging Face DeepseekV3 / Kimi K2 directory: start from its weights (fresh optimizer)
    resume_fallback: bool = False  # resume: auto and the latest checkpoint is damaged -> the previous one (warning)
    ckpt_verify: bool = True  # check every file's checksum (and finite values) before a checkpoint is loaded
    ckpt_async: bool = False  # stage a copy and write in the background (only the copy blocks training)
    dist_timeout_s: float = 600.0  # collectives and the rank watchdog: a rank silent this long ends the job
    # the device's peak TFLOP/s for the logged MFU (launch/mfu.py); 0 = the dense bf16 peak of a known CUDA device
    peak_tflops: float = 0.0

    def __post_init__(self) -> None:
        s = "train"
        _need(s, self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _one_of(s, "device", self.device, ("auto", "cpu", "cuda"))
        _one_of(s, "dtype", self.dtype, ("float32", "bfloat16"))
        _one_of(s, "param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _need(s, self.param_dtype == "float32" or self.dtype == "bfloat16",
              f"param_dtype {self.param_dtype} computes in {self.param_dtype}: set dtype: {self.param_dtype} too")
        _need(s, self.log_interval >= 1, f"log_interval must be >= 1, got {self.log_interval}")
        for name in ("eval_interval", "ckpt_interval"):
            _need(s, getattr(self, name) >= 0, f"{name} must be >= 0 (0 disables), got {getattr(self, name)}")
        _need(s, self.ckpt_keep >= 1, f"ckpt_keep must be >= 1, got {self.ckpt_keep}")
        _need(s, bool(self.output_dir), "output_dir must be a non-empty path")
        _need(s, bool(self.resume), "resume must be 'auto', 'none' or a checkpoint directory")
        _need(s, self.dist_timeout_s > 0, f"dist_timeout_s must be > 0 seconds, got {self.dist_timeout_s}")
        _need(s, self.peak_tflops >= 0, f"peak_tflops must be >= 0 (0 = from the device), got {self.peak_tflops}")


@dataclass
class ParallelConfig:
    """world size = pp * dp * cp * tp; ep splits the experts over ep of the dp * cp ranks (EP borrows from DP/CP), or
    with sequence_parallel over ep of a stage's dp * cp * tp ranks (folded across TP, parallel/dims.py)."""

    dp: int = 0  # 0 = world_size // (pp * cp * tp)
    tp: int = 1
    # sequence parallelism (Megatron's --sequence-parallel, parallel/sequence_parallel.py): the tp ranks also split
    # each sequence outside the tensor-parallel regions (norms, residual stream, routers, routed experts); the expert
    # groups are then folded over the tp ranks too: ep must divide dp * cp * tp (each token is routed once)
    sequence_parallel: bool = False
    ep: int = 1
    # expert tensor parallelism (Megatron's --expert-tensor-parallel-size, parallel/expert_parallel.py): each routed
    # expert's gate/up split by columns and down by rows over etp ranks of the folded expert groups (etp * ep must
    # divide dp * cp * tp; with tp > 1 it needs sequence_parallel; at tp 1 it splits over data ranks)
    etp: int = 1
    # context parallelism: ranks that split each sequence (data.seq_len / cp tokens each; all-to-all over heads
    # around attention, Ulysses: parallel/context_parallel.py); gradients are reduced over dp x cp
    cp: int = 1
    pp: int = 1  # pipeline stages' ranks (outermost axis); data.grad_accum = micro batches per step
    pp_schedule: str = ""  # "1f1b", "interleaved_1f1b", "zbv", "dualpipev"; "" = 1f1b, or interleaved_1f1b
    pp_virtual_stages: int = 1  # stages per pipeline rank (2 for zbv / dualpipev)
    pp_layers: list[int] = field(default_factory=list)  # layers per stage (pp * pp_virtual_stages numbers); [] = balanced
    # micro batches per schedule call; 0 (default) = all the step's in one pass, one fill and drain of the pipeline
    # per step, memory bounded by the micro batches in flight (parallel/pipeline_runtime.py). n > 0 splits the step
    # into grad_accum / n rounds, gradients summed, each filling and draining the pipeline (a bubble per round)
    pp_microbatches: int = 0
    optimizer: str = "zero1"  # "zero1" (sharded optimizer state when dp > 1) or "replicated" (DDP)
    zero1_bucket_mb: float = 25.0  # zero1 gradient buckets: MiB of parameters of one owner each (0 = one per owner)
    zero1_overlap: bool = True  # zero1: reduce each bucket as soon as backward completes it (False: after backward)
    # the dtype gradients are reduced in over data parallelism (they accumulate in float32 buffers either way);
    # "bfloat16" halves the bytes, as Megatron's --grad-reduce-in-bf16
    grad_reduce_dtype: str = "float32"
    activation_checkpointing: bool = False  # = recompute: full
    # activation recomputation (parallel/recompute.py): "none", "full" (each block) or "selective" (the modules of
    # recompute_modules; [] = all: norm, swiglu, mla_up_proj, moe_down_proj)
    recompute: str = "none"
    recompute_modules: list[str] = field(default_factory=list)
    # tensors kept for backward stored as FP8-E4M3 in 1x128 tiles with float32 scales (parallel/fp8_storage.py; no
    # FP8 compute): "moe_up_input" (the rows entering the routed experts), "swiglu_input" (gate and up)
    fp8_activations: list[str] = field(default_factory=list)
    # tensors kept for backward in host memory (parallel/activation_offload.py; pinned + a side stream on CUDA)
    activation_offload: bool = False

    @property
    def schedule(self) -> str:
        return self.pp_schedule or ("1f1b" if self.pp_virtual_stages == 1 else "interleaved_1f1b")

    def data_parallel(self, world: int) -> int:
        """``dp``, or with 0 what the world leaves after pp, cp and tp (the runtime, the planner and its FLOP
        report all use this)."""
        return self.dp or world // (self.pp * self.cp * self.tp)

    def microbatches_per_round(self, grad_accum: int) -> int:
        """Micro batches per pipeline schedule call (``pp_microbatches``, or all ``grad_accum`` of the step)."""
        return self.pp_microbatches or grad_accum

    @property
    def recompute_mode(self) -> str:
        return "full" if self.activation_checkpointing else self.recompute

    def __post_init__(self) -> None:
        s = "parallel"
        _need(s, self.dp >= 0, f"dp must be >= 0 (0 = infer from the world size), got {self.dp}")
        _need(s, self.tp >= 1 and self.ep >= 1 and self.cp >= 1,
              f"tp, ep and cp must be >= 1, got tp={self.tp} ep={self.ep} cp={self.cp}")
        _need(s, not self.sequence_parallel or self.tp > 1,
              f"sequence_parallel: true splits sequences over the tensor-parallel ranks: it needs tp > 1, got "
              f"tp={self.tp}")
        _need(s, self.etp >= 1, f"etp must be >= 1, got etp={self.etp}")
        _need(s, self.etp == 1 or self.tp == 1 or self.sequence_parallel,
              f"etp ({self.etp}) > 1 with tp ({self.tp}) > 1 needs sequence_parallel: true (expert tensor parallelism "
              "splits the experts over ranks that route different tokens)")
        if self.dp and (self.sequence_parallel or self.tp == 1) and self.etp > 1:
            ranks = self.dp * self.cp * self.tp
            _need(s, ranks % (self.etp * self.ep) == 0, f"etp * ep ({self.etp} * {self.ep}) must divide dp * cp * tp "
                  f"({self.dp} * {self.cp} * {self.tp} = {ranks}): the expert groups are folded over a stage's ranks")
        if self.dp and self.sequence_parallel:  # the expert groups fold over the stage's ranks (parallel/dims.py)
            ranks = self.dp * self.cp * self.tp
            _need(s, ranks % self.ep == 0, f"ep ({self.ep}) must divide dp * cp * tp ({self.dp} * {self.cp} * "
                  f"{self.tp} = {ranks}): with sequence_parallel the expert groups are folded over a stage's ranks")
        _need(s, self.pp >= 1 and self.pp_virtual_stages >= 1,
              f"pp and pp_virtual_stages must be >= 1, got pp={self.pp} pp_virtual_stages={self.pp_virtual_stages}")
        _one_of(s, "pp_schedule", self.pp_schedule, ("", "1f1b", "interleaved_1f1b", "zbv", "dualpipev"))
        if self.schedule == "1f1b":
            _need(s, self.pp_virtual_stages == 1, "pp_schedule 1f1b runs one stage per rank: use "
                  f"interleaved_1f1b for pp_virtual_stages={self.pp_virtual_stages}")
        if self.schedule in ("zbv", "dualpipev"):
            _need(s, self.pp_virtual_stages == 2, f"pp_schedule {self.schedule} places exactly 2 stages per rank "
                  f"(a V): set pp_virtual_stages: 2, got {self.pp_virtual_stages}")
            _need(s, not self.activation_offload, f"activation_offload: true with pp_schedule {self.schedule} is not "
                  "supported yet: its split backward reads each saved tensor twice (the input pass, then the weight "
                  "pass) and offload hands a host copy back once; use 1f1b or interleaved_1f1b")
            _need(s, self.recompute_mode != "full", f"recompute: full with pp_schedule {self.schedule} is not supported "
                  "yet: its split backward recomputes each block twice (the input pass, then the weight pass) and a "
                  "block's recorded collectives are handed back once; use recompute: selective, or 1f1b or "
                  "interleaved_1f1b")
        _need(s, self.pp_microbatches >= 0,
              f"pp_microbatches must be >= 0 (0 = all the step's micro batches in one pass), "
              f"got {self.pp_microbatches}")
        _need(s, all(isinstance(n, int) and n >= 1 for n in self.pp_layers),
              f"pp_layers must be a list of positive layer counts, got {self.pp_layers!r}")
        _need(s, self.pp == 1 or self.optimizer == "zero1",
              "pp > 1 needs optimizer: zero1 (DistributedMuonClip clips one grad norm over all stages)")
        _one_of(s, "optimizer", self.optimizer, ("zero1", "replicated"))
        _need(s, self.zero1_bucket_mb >= 0, f"zero1_bucket_mb must be >= 0 (0 = one bucket per owner), got "
              f"{self.zero1_bucket_mb}")
        _one_of(s, "grad_reduce_dtype", self.grad_reduce_dtype, ("float32", "bfloat16"))
        _one_of(s, "recompute", self.recompute, RECOMPUTE_MODES)
        _need(s, not self.activation_checkpointing or self.recompute in ("none", "full"),
              f"activation_checkpointing: true means recompute: full; it conflicts with recompute: {self.recompute}")
        bad = sorted(set(self.recompute_modules) - set(RECOMPUTE_MODULES))
        _need(s, not bad, f"recompute_modules {bad} unknown: choose from {list(RECOMPUTE_MODULES)}")
        _need(s, not self.recompute_modules or self.recompute == "selective",
              "recompute_modules needs recompute: selective")
        bad = sorted(set(self.fp8_activations) - set(FP8_POINTS))
        _need(s, not bad, f"fp8_activations {bad} unknown: choose from {list(FP8_POINTS)}")
        _need(s, not self.fp8_activations or self.recompute_mode != "full",
              "fp8_activations compress what the layers keep for backward; with recompute: full (or "
              "activation_checkpointing: true) they keep only their inputs: use recompute: selective or none")
        _need(s, self.optimizer == "zero1" or (self.tp == 1 and self.ep == 1 and self.etp == 1),
              f"tp={self.tp}, ep={self.ep}{f', etp={self.etp}' if self.etp > 1 else ''} needs optimizer: zero1 (DistributedMuonClip reduces expert/sharded "
              "gradients over the right groups and orthogonalises the full TP matrices; DDP + MuonClip cannot)")


@dataclass
class LoggingConfig:
    wandb_mode: str = "offline"  # "online", "offline" or "disabled"; the WANDB_MODE env variable wins
    project: str = "muonclip-moe"
    run_name: str = ""  # default: the output_dir's name
    progress_bar: bool = True  # tqdm bar on rank 0

    def __post_init__(self) -> None:
        _one_of("logging", "wandb_mode", self.wandb_mode, ("online", "offline", "disabled"))
        _need("logging", bool(self.project), "project must be a non-empty name")


@dataclass
class MonitorConfig:
    """Loss-spike detection (robust z-score over a window of recent losses), see launch/monitor.py."""

    spike_window: int = 100
    spike_threshold: float = 6.0
    spike_min_history: int = 20
    rollback: bool = False  # on a spike: restore the last checkpoint, skip the data since it (launch/monitor.py)
    max_rollbacks: int = 3  # consecutive rollbacks allowed before training stops with an error
    rollback_reset_after: int = 100  # a spike more than this many steps after the previous one is not consecutive
    alert_wait_s: float = 300.0  # W&B alerts (spike, rollback, non-finite loss, ...): at most one per title per wait
    # a step whose global gradient norm is not finite is skipped (nothing changes); this many in a row stop the run
    max_skipped_steps: int = 10

    def __post_init__(self) -> None:
        s = "monitor"
        _need(s, self.spike_window >= 2, f"spike_window must be >= 2, got {self.spike_window}")
        _need(s, self.spike_threshold > 0, f"spike_threshold must be > 0, got {self.spike_threshold}")
        _need(s, 1 <= self.spike_min_history <= self.spike_window,
              f"spike_min_history must be in [1, spike_window={self.spike_window}], got {self.spike_min_history}")
        _need(s, self.max_rollbacks >= 0, f"max_rollbacks must be >= 0, got {self.max_rollbacks}")
        _need(s, self.rollback_reset_after >= 0, f"rollback_reset_after must be >= 0, got {self.rollback_reset_after}")
        _need(s, self.alert_wait_s >= 0, f"alert_wait_s must be >= 0 seconds, got {self.alert_wait_s}")
        _need(s, self.max_skipped_steps >= 1, f"max_skipped_steps must be >= 1 (the skipped steps in a row that stop "
              f"the run), got {self.max_skipped_steps}")


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        m, d, p = self.model, self.data, self.parallel
        _need("monitor", not self.monitor.rollback or self.train.ckpt_interval > 0,
              "rollback: true needs checkpoints to roll back to: set train.ckpt_interval > 0")
        _need("data", d.seq_len <= m.max_seq_len,
              f"seq_len ({d.seq_len}) must be <= model.max_seq_len ({m.max_seq_len})")
        _need("parallel", m.n_heads % p.tp == 0, f"tp ({p.tp}) must divide model.n_heads ({m.n_heads})")
        _need("parallel", m.vocab_size % p.tp == 0,
              f"tp ({p.tp}) must divide model.vocab_size ({m.vocab_size}): the embedding and the head split their "
              "rows over the tensor-parallel ranks (pad the vocabulary)")
        if p.pp > 1:
            stages = p.pp * p.pp_virtual_stages
            _need("parallel", stages <= m.n_layers,
                  f"pp * pp_virtual_stages = {stages} stages need at least as many layers (model.n_layers {m.n_layers})")
            _need("parallel", not p.pp_layers or (len(p.pp_layers) == stages and sum(p.pp_layers) == m.n_layers),
                  f"pp_layers {p.pp_layers} must list {stages} layer counts (pp * pp_virtual_stages) that sum to "
                  f"model.n_layers ({m.n_layers})")
            per_round = p.microbatches_per_round(d.grad_accum)
            _need("parallel", d.grad_accum % per_round == 0,
                  f"pp_microbatches ({p.pp_microbatches}) must divide data.grad_accum ({d.grad_accum}): each round "
                  "runs the same number of micro batches")
            what = "grad_accum" if not p.pp_microbatches else "pp_microbatches"
            _need("data" if what == "grad_accum" else "parallel", per_round >= p.pp,
                  f"{what} ({per_round}) is the number of micro batches per pipeline round: it must be >= "
                  f"parallel.pp ({p.pp}) to fill the pipeline")
            _need("data" if what == "grad_accum" else "parallel", p.schedule != "dualpipev" or per_round >= stages,
                  f"{what} ({per_round}): dualpipev needs at least as many micro batches per round as stages "
                  f"({stages})")
            _need("optim", not (self.optim.qk_clip and self.optim.qk_clip_mode == "post_step"),
                  "qk_clip_mode: post_step re-runs a forward after the update, which a pipeline cannot do per stage "
                  "in order yet: use qk_clip_mode: forward with parallel.pp > 1")
        if p.sequence_parallel:
            _need("data", d.seq_len % (p.cp * p.tp) == 0,
                  f"seq_len ({d.seq_len}) must be divisible by parallel.cp * parallel.tp ({p.cp} * {p.tp}): "
                  "sequence parallelism gives each tensor-parallel rank 1/tp of a context-parallel chunk")
        if m.first_k_dense < m.n_layers:
            _need("parallel", m.n_routed_experts % p.ep == 0,
                  f"ep ({p.ep}) must divide model.n_routed_experts ({m.n_routed_experts})")
            _need("parallel", m.moe_inter_dim % p.etp == 0,
                  f"etp ({p.etp}) must divide model.moe_inter_dim ({m.moe_inter_dim}): expert tensor parallelism splits "
                  "each routed expert's columns")
        if p.cp > 1:
            _need("parallel", m.n_heads % (p.tp * p.cp) == 0,
                  f"tp * cp ({p.tp} * {p.cp}) must divide model.n_heads ({m.n_heads}): each context-parallel rank "
                  f"attends over the whole sequence for 1/cp of its heads")
            _need("data", d.seq_len % p.cp == 0, f"seq_len ({d.seq_len}) must be divisible by parallel.cp ({p.cp})")
        _need("data", bool(d.val_sources) or d.val_fraction > 0 or self.train.eval_interval == 0,
              "validation needs data: set val_fraction > 0 or val_sources, or train.eval_interval: 0")
        _need("schedule", self.schedule.warmup_steps <= self.train.steps,
              f"warmup_steps ({self.schedule.warmup_steps}) must be <= train.steps ({self.train.steps})")


SECTIONS: dict[str, type] = {
    "model": ModelConfig, "optim": OptimConfig, "schedule": ScheduleConfig, "data": DataConfig,
    "train": TrainConfig, "parallel": ParallelConfig, "logging": LoggingConfig, "monitor": MonitorConfig,
}
