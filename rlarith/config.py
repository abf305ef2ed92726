"""Run configuration: typed dataclasses grouped by concern, loaded from YAML plus dotted CLI overrides.

The YAML file is the record of a run; ``key=value`` overrides on the command line only adjust it, and the
resolved result is written into the run directory at start (``config.yaml``). Every mistake a user can
make in a config (unknown key, wrong type, value out of range, missing file) raises ``ConfigError`` with
one paragraph naming the key and the fix; the CLI prints it without a traceback.

OmegaConf does the YAML merge, the dotted overrides and the type checks against these dataclasses; the
range checks live in each dataclass's ``__post_init__``.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from rlarith.answers import MODES
from rlarith.durable import write_atomic
from rlarith.tasks import OPERATORS


class ConfigError(ValueError):
    """A user's configuration mistake; the message says which key and how to fix it."""


class ConfigDamaged(ConfigError):
    """A run directory's ``config.yaml`` that is not a whole config (empty, cut short, not YAML): what a
    filesystem crash leaves of a file. Never read as the defaults; ``path`` and ``why`` say what is wrong,
    and the caller names the fix (rlarith.checkpoints.run_config falls back to a checkpoint's record)."""

    def __init__(self, path: Path, why: str, fix: str = "") -> None:
        self.path, self.why = Path(path), why
        super().__init__(
            f"{path}: {why}, so it is not the run's config (a filesystem crash can leave it so; rlarith never "
            f"reads it as the default config).{' ' + fix if fix else ''}"
        )


RUN_CONFIG = "config.yaml"
"""The resolved config in a run directory, written at every start (``save_config``)."""


def _check(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


@dataclass
class TaskConfig:
    """The problems: ``a <op> b`` with operands of fixed digit counts."""

    name: str = "arithmetic"
    """Task family. Only ``arithmetic`` exists today; ``interleave`` will implement the same interface."""
    op: str = "*"
    """Operator: ``+``, ``-``, ``*`` or ``/`` (``/`` is always exact: the dividend is quotient x divisor)."""
    digits_a: int = 3
    """Digits of the first operand (of the quotient for ``/``). The positive control: 3."""
    digits_b: int = 2
    """Digits of the second operand (the divisor for ``/``). The positive control: 2."""

    def __post_init__(self) -> None:
        _check(self.name == "arithmetic", "task.name", f"unknown task {self.name!r}; use 'arithmetic'.")
        _check(self.op in OPERATORS, "task.op", f"must be one of {', '.join(OPERATORS)}; got {self.op!r}.")
        for key in ("digits_a", "digits_b"):
            value = getattr(self, key)
            _check(1 <= value <= 9, f"task.{key}", f"must be between 1 and 9; got {value}.")


@dataclass
class PromptConfig:
    """How a problem is put to the model. ``{question}`` is replaced by e.g. ``123 * 45``."""

    system: str = ""
    """System message; empty for none."""
    user: str = "Compute {question}. Reply with only the final number."
    """User message template. The default forbids chain of thought: the answer must be the reply."""
    precision: str = "Give the answer rounded to {decimals} decimal places."
    """Sentence appended only when the task's answers are not integers (never for integer tasks)."""

    def __post_init__(self) -> None:
        _check("{question}" in self.user, "prompt.user", "must contain the placeholder {question}.")


@dataclass
class DataConfig:
    """Which problems are trained on and which are held out."""

    strategy: str = "fresh"
    """``fixed``: ``train_size`` problems cycled in a seeded order; ``fresh``: a new problem for every
    prompt, never repeated within a run."""
    train_size: int = 2500
    """Number of training problems for the ``fixed`` strategy (ignored by ``fresh``)."""
    val_size: int = 1000
    """Validation set size."""
    test_size: int = 1000
    """Test set size."""
    val_fraction: float = 0.05
    """Share of the problem space reserved for validation (a keyed hash picks the bucket)."""
    test_fraction: float = 0.05
    """Share of the problem space reserved for testing."""
    split_salt: str = "rlarith-split-v1"
    """Key of the hash that partitions problems into train/val/test. Runs that share it share held-out
    sets; change it only to draw a different partition."""

    def __post_init__(self) -> None:
        _check(
            self.strategy in ("fixed", "fresh"),
            "data.strategy",
            f"use 'fixed' or 'fresh'; got {self.strategy!r}.",
        )
        _check(self.train_size >= 1, "data.train_size", f"must be at least 1; got {self.train_size}.")
        for key in ("val_size", "test_size"):
            _check(getattr(self, key) >= 1, f"data.{key}", f"must be at least 1; got {getattr(self, key)}.")
        for key in ("val_fraction", "test_fraction"):
            value = getattr(self, key)
            _check(0 < value < 0.5, f"data.{key}", f"must be in (0, 0.5); got {value}.")
        _check(self.split_salt != "", "data.split_salt", "must not be empty.")


@dataclass
class RewardConfig:
    """Reward components and their weights; each component is also logged on its own."""

    weights: dict[str, float] = field(default_factory=lambda: {"exact": 1.0, "partial": 0.0, "format": 0.0})
    """Weight per component (see rlarith.rewards): ``exact``, ``partial`` and ``format``. A component with
    weight 0 is still computed and logged."""
    extraction: str = "strict"
    """Answer extraction mode used for rewards: ``strict`` (the reply is one number) or ``last``."""

    def __post_init__(self) -> None:
        from rlarith.rewards import COMPONENTS

        for name, weight in self.weights.items():
            close = difflib.get_close_matches(name, COMPONENTS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            _check(
                name in COMPONENTS,
                f"rewards.weights.{name}",
                f"no such reward; use {', '.join(COMPONENTS)}.{hint}",
            )
            _check(weight >= 0, f"rewards.weights.{name}", f"must be >= 0; got {weight}.")
        _check(sum(self.weights.values()) > 0, "rewards.weights", "at least one weight must be positive.")
        _check(
            self.extraction in MODES,
            "rewards.extraction",
            f"use one of {', '.join(MODES)}; got {self.extraction!r}.",
        )


@dataclass
class ModelConfig:
    """The policy model."""

    path: str = "runs/bootstrap/model"
    """A directory loadable with ``from_pretrained`` (a Hugging Face model and tokenizer). The default is
    the tiny model that ``rlarith bootstrap`` warms up; on a cluster, your pretrained model's directory."""
    dtype: str = "float32"
    """Compute precision: ``float32`` (CPU), ``bfloat16`` (GPU: mixed precision; weights and optimizer
    state stay float32). Evaluation loads the model in this dtype."""

    def __post_init__(self) -> None:
        _check(
            self.path != "",
            "model.path",
            "set it to a model directory (e.g. one made by `rlarith init-model`).",
        )
        _check(
            self.dtype in ("float32", "bfloat16", "float16"),
            "model.dtype",
            f"use float32, bfloat16 or float16; got {self.dtype!r}.",
        )


@dataclass
class TrainingConfig:
    """GRPO optimisation (TRL ``GRPOConfig`` is built from these)."""

    seed: int = 0
    """Seeds everything: problem order, sampling, initialisation of anything random."""
    max_steps: int = 200
    """Optimizer steps."""
    learning_rate: float = 3e-4
    """Constant learning rate (after optional warmup): the notebook removed the decay."""
    warmup_steps: int = 0
    """Linear warmup steps before the constant rate."""
    prompts_per_step: int = 8
    """Distinct problems per optimizer step (across all ranks)."""
    num_generations: int = 8
    """Completions sampled per problem (the GRPO group)."""
    max_completion_length: int = 8
    """Tokens per completion: answers are at most a few tokens, no chain of thought."""
    temperature: float = 1.0
    """Sampling temperature for training rollouts."""
    beta: float = 0.0
    """KL coefficient against the reference model (0: no reference model is loaded)."""
    loss_type: str = "dapo"
    """TRL loss aggregation: ``grpo``, ``dapo``, ``dr_grpo`` or ``bnpo``."""
    steps_per_generation: int = 1
    """Optimizer steps per generation batch. Checkpoints may only fall on generation boundaries."""
    num_iterations: int = 1
    """Optimisation passes per generation batch (GRPO's mu)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    gradient_checkpointing: bool = False
    """Trade compute for memory (useful for large models on GPU; pointless for the tiny CPU model)."""
    deepspeed: str = "none"
    """``none``, ``zero2``, ``zero3`` (rlarith/deepspeed/*.json, shipped in the package) or a path to a
    DeepSpeed JSON file."""
    logging_steps: int = 1
    """Log metrics every this many steps (the notebook: every step)."""
    report_to: list[str] = field(default_factory=lambda: ["tensorboard"])
    """Metric sinks besides the JSONL file: ``tensorboard``, ``wandb`` (offline with WANDB_MODE=offline)."""
    collective_timeout_s: int = 300
    """How long a rank waits in a collective (all-reduce, barrier) for a peer before it fails (TRL's
    ``ddp_timeout``; torch's default is 30 min): a peer that vanished without a reset (a node lost its
    power or its link) then ends the job in minutes. Raise it above the longest save, which other ranks
    wait for at a barrier."""

    def __post_init__(self) -> None:
        for key in (
            "max_steps",
            "prompts_per_step",
            "max_completion_length",
            "steps_per_generation",
            "num_iterations",
            "logging_steps",
        ):
            _check(
                getattr(self, key) >= 1, f"training.{key}", f"must be at least 1; got {getattr(self, key)}."
            )
        _check(
            self.num_generations >= 2,
            "training.num_generations",
            f"GRPO needs a group of at least 2; got {self.num_generations}.",
        )
        _check(self.learning_rate > 0, "training.learning_rate", f"must be > 0; got {self.learning_rate}.")
        _check(
            self.collective_timeout_s >= 10,
            "training.collective_timeout_s",
            f"must be at least 10 seconds (a few minutes is usual); got {self.collective_timeout_s}.",
        )
        _check(self.warmup_steps >= 0, "training.warmup_steps", f"must be >= 0; got {self.warmup_steps}.")
        _check(self.temperature > 0, "training.temperature", f"must be > 0; got {self.temperature}.")
        _check(self.beta >= 0, "training.beta", f"must be >= 0; got {self.beta}.")
        _check(
            self.loss_type in ("grpo", "dapo", "dr_grpo", "bnpo"),
            "training.loss_type",
            f"use grpo, dapo, dr_grpo or bnpo; got {self.loss_type!r}.",
        )
        # The one check of this key (rlarith.training.grpo_config.deepspeed_config trusts it): a user's
        # file must exist and hold JSON now, not when DeepSpeed starts after the model has loaded.
        if self.deepspeed not in ("none", "zero2", "zero3"):
            _check(
                Path(self.deepspeed).is_file(),
                "training.deepspeed",
                f"file {self.deepspeed!r} not found; use none, zero2, zero3 or a DeepSpeed JSON path.",
            )
            try:
                json.loads(Path(self.deepspeed).read_text())
            except (OSError, ValueError) as err:
                raise ConfigError(
                    f"training.deepspeed: {self.deepspeed!r} is not a readable JSON file ({err}); "
                    "fix it or use none, zero2 or zero3."
                ) from None
        for sink in self.report_to:
            _check(
                sink in ("tensorboard", "wandb"),
                "training.report_to",
                f"unknown sink {sink!r}; use tensorboard or wandb.",
            )


REWARD_METRICS = ("exact", "total")
"""What the save policy smooths: the exact-match reward, or the weighted total of the components."""


@dataclass
class CheckpointConfig:
    """The notebook's checkpoint policy (rlarith.save_policy.SavePolicy)."""

    save_every: int = 20
    """Save every this many steps (always, whatever the budget below). The final step and a stop request
    always save too."""
    reward_threshold: float = 0.3
    """Save when the smoothed reward (``reward_metric``, an exponential moving average with alpha 0.1) first
    crosses this: "a checkpoint when the reward gets there". Once per run."""
    save_on_best: bool = True
    """Also save at each new best of the smoothed reward (within the budget)."""
    keep_best: bool = True
    """Retention keeps the best checkpoint besides the first, second-to-last and latest."""
    reward_metric: str = "exact"
    """Which reward is smoothed for threshold and best: ``exact`` (exact-match mean, the default: it is the
    quantity the positive control is about and does not move with the weights) or ``total`` (the weighted
    sum of ``rewards.weights``)."""
    max_save_fraction: float = 0.05
    """Budget of the reward-triggered saves: the share of wall time spent saving (counting the save about
    to happen, estimated from the previous one) may not exceed this. A full state of a 0.5B model takes ~8 s
    to write against a ~0.5 s step, so without a budget every new best would slow a GPU run down many times."""
    min_save_gap: int = 10
    """Budget of the reward-triggered saves: at least this many steps since the previous save."""
    overlap: bool = True
    """Write checkpoints in a background thread: the step pays only for a copy of the state into host
    memory (as much host memory as the state; pinned on a GPU), one write is in flight at a time, and a
    stop or the final step saves synchronously (rlarith.training.async_save). False: every save blocks.
    The writer needs a free CPU core: CPU runs that train on every core gain little from it."""

    def __post_init__(self) -> None:
        _check(self.save_every >= 1, "checkpoints.save_every", f"must be at least 1; got {self.save_every}.")
        _check(
            self.reward_metric in REWARD_METRICS,
            "checkpoints.reward_metric",
            f"use exact or total (either is smoothed before it is compared); got {self.reward_metric!r}.",
        )
        _check(
            0 < self.max_save_fraction <= 1,
            "checkpoints.max_save_fraction",
            f"must be in (0, 1], e.g. 0.05 for 5% of the wall time; got {self.max_save_fraction}.",
        )
        _check(self.min_save_gap >= 0, "checkpoints.min_save_gap", f"must be >= 0; got {self.min_save_gap}.")


@dataclass
class TraceConfig:
    """Per-step traces: every prompt and completion, in zstd-compressed HDF5 shards."""

    enabled: bool = True
    """Record traces."""
    dir: str = ""
    """Shard directory. Empty: ``$SCRATCH/rlarith/<run>-<hash>/traces`` when SCRATCH is set (``<hash>``: of the
    run directory's absolute path, so two runs of one name in different runs_dir never share it), else
    ``<run dir>/traces``. A trace folder belongs to one run directory (docs/traces.md)."""
    shard_steps: int = 500
    """Start a new shard after this many steps."""
    shard_bytes: int = 256 * 2**20
    """... or once a shard passes this many bytes."""
    zstd_level: int = 10
    """zstandard level for text columns (1..19)."""
    fsync_steps: bool = False
    """fsync the journal after every step, so each step survives a crashed node (one fsync per step, costed in
    benchmarks/README.md). Off, the journal is still fsynced whenever a checkpoint is saved, so a resume never
    starts past traces that a crash could take back, and a crash loses at most the steps since the last
    checkpoint (a killed process loses none)."""

    def __post_init__(self) -> None:
        _check(self.shard_steps >= 1, "traces.shard_steps", f"must be at least 1; got {self.shard_steps}.")
        _check(
            self.shard_bytes >= 2**16,
            "traces.shard_bytes",
            f"must be at least 65536; got {self.shard_bytes}.",
        )
        _check(1 <= self.zstd_level <= 19, "traces.zstd_level", f"must be in 1..19; got {self.zstd_level}.")


@dataclass
class EvalConfig:
    """Held-out evaluation defaults (``rlarith eval`` flags override them)."""

    split: str = "val"
    """``val`` or ``test``."""
    n: int = 500
    """Problems to score (at most the split's size)."""
    samples: int = 1
    """Completions per problem; 1 with temperature 0 is greedy."""
    temperature: float = 0.0
    """0 for greedy decoding."""
    batch_size: int = 64
    """Problems per generation batch."""
    max_new_tokens: int = 16
    """Tokens generated per answer."""

    def __post_init__(self) -> None:
        _check(self.split in ("val", "test"), "eval.split", f"use val or test; got {self.split!r}.")
        for key in ("n", "samples", "batch_size", "max_new_tokens"):
            _check(getattr(self, key) >= 1, f"eval.{key}", f"must be at least 1; got {getattr(self, key)}.")
        _check(self.temperature >= 0, "eval.temperature", f"must be >= 0; got {self.temperature}.")


@dataclass
class SlurmConfig:
    """Where and how ``rlarith submit`` runs the job."""

    executor: str = "local"
    """``local`` (this machine, via submitit's LocalExecutor) or ``slurm``."""
    partition: str = ""
    """SLURM partition; empty for the cluster default."""
    account: str = ""
    """SLURM account; empty for none."""
    qos: str = ""
    """SLURM QOS; empty for none."""
    nodes: int = 1
    """Nodes per job."""
    tasks_per_node: int = 1
    """Ranks per node; with GPUs, one per GPU (equal to ``gpus_per_node``)."""
    gpus_per_node: int = 0
    """GPUs per node; every rank sees its node's GPUs and uses ``cuda:LOCAL_RANK`` (0 for CPUs only)."""
    cpus_per_task: int = 2
    """CPU cores per rank."""
    mem_gb: int = 16
    """Memory per node, GB."""
    timeout_min: int = 60
    """Wall-clock limit per attempt, minutes (preempted or timed-out attempts are requeued)."""
    signal_delay_s: int = 120
    """Seconds before the limit at which SLURM sends the stop signal (time for a full checkpoint)."""
    max_timeouts: int = 3
    """Attempts that may end at the time limit and still be requeued; the next one ends the job. Preemptions
    are requeued without limit."""
    max_failures: int = 2
    """Restarts after failures per job: a rank that failed (any exit but 0 and a stop) is requeued only when
    its attempt saved a checkpoint past the one it resumed from; an attempt lost with its node (SLURM
    restarts the job by itself) counts too. 0: a failure always ends the job."""
    lock_wait_s: int = 300
    """How long a restarted job waits for the run lock when an earlier attempt of the same job still holds
    it (a crashed node's lock lingers on NFSv3, or until Lustre evicts the client), seconds."""
    container: str = ""
    """Apptainer image (``.sif``) the trainer runs in (``apptainer exec``); empty to run on the host. The
    job driver, submitit and the requeue stay on the host, where ``scontrol`` exists."""
    container_runtime: str = "apptainer"
    """What runs the image: ``apptainer`` (or ``singularity``; the image a ``.sif``), ``ch-run``
    (charliecloud; the image a directory from ``ch-convert``) or ``podman`` (the image a name); a bare name
    on the compute nodes' PATH or a path to one of these (rlarith.container)."""
    binds: list[str] = field(default_factory=list)
    """Extra folders bound into the container, ``SRC`` or ``SRC:DST`` (the run, model, traces, config and
    DeepSpeed JSON folders are bound already, at their host paths)."""
    logs_dir: str = ""
    """submitit's log and pickle folder (never shared between clusters); empty: ``<runs_dir>/submitit``."""

    def __post_init__(self) -> None:
        _check(
            self.executor in ("local", "slurm"),
            "slurm.executor",
            f"use local or slurm; got {self.executor!r}.",
        )
        for key in ("nodes", "tasks_per_node", "cpus_per_task", "mem_gb", "timeout_min"):
            _check(getattr(self, key) >= 1, f"slurm.{key}", f"must be at least 1; got {getattr(self, key)}.")
        _check(self.gpus_per_node >= 0, "slurm.gpus_per_node", f"must be >= 0; got {self.gpus_per_node}.")
        # One rank per GPU, each using cuda:LOCAL_RANK among its node's GPUs (rlarith.ranks): more ranks than
        # GPUs would leave a rank without a device, fewer would leave GPUs idle.
        _check(
            not self.gpus_per_node or self.tasks_per_node == self.gpus_per_node,
            "slurm.tasks_per_node",
            f"must equal slurm.gpus_per_node when GPUs are asked for (one rank per GPU); got "
            f"tasks_per_node={self.tasks_per_node} and gpus_per_node={self.gpus_per_node}: set both to the "
            "GPUs you want per node (or gpus_per_node=0 to train on CPUs).",
        )
        _check(self.signal_delay_s >= 0, "slurm.signal_delay_s", f"must be >= 0; got {self.signal_delay_s}.")
        _check(self.max_timeouts >= 0, "slurm.max_timeouts", f"must be >= 0; got {self.max_timeouts}.")
        _check(
            Path(self.container_runtime).name in ("apptainer", "singularity", "ch-run", "podman"),
            "slurm.container_runtime",
            f"use apptainer, singularity, ch-run or podman (or a path to one); got {self.container_runtime!r}.",
        )
        _check(self.max_failures >= 0, "slurm.max_failures", f"must be >= 0; got {self.max_failures}.")
        _check(self.lock_wait_s >= 0, "slurm.lock_wait_s", f"must be >= 0 seconds; got {self.lock_wait_s}.")


@dataclass
class RunConfig:
    """One run: where it lives and everything it does."""

    name: str = "default"
    """Run name; the run directory is ``<runs_dir>/<name>``."""
    runs_dir: str = "runs"
    """Parent of run directories (on a cluster: a shared filesystem)."""
    task: TaskConfig = field(default_factory=TaskConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rewards: RewardConfig = field(default_factory=RewardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    checkpoints: CheckpointConfig = field(default_factory=CheckpointConfig)
    traces: TraceConfig = field(default_factory=TraceConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def __post_init__(self) -> None:
        _check(
            self.name != "" and "/" not in self.name,
            "name",
            f"must be a non-empty name without '/'; got {self.name!r}.",
        )
        # Resume is exact only at generation boundaries (the generation buffer is not saved).
        boundary = self.training.steps_per_generation * self.training.num_iterations
        _check(
            self.checkpoints.save_every % boundary == 0,
            "checkpoints.save_every",
            f"must be a multiple of training.steps_per_generation x training.num_iterations = {boundary}, "
            f"so every checkpoint falls on a generation boundary and resume is exact; got {self.checkpoints.save_every}.",
        )
        # The final step must be a boundary too: it is always saved, and max_steps may be raised later
        # (a resumable key), which resumes from that final checkpoint.
        steps = self.training.max_steps
        if steps % boundary:
            below, above = steps - steps % boundary, steps - steps % boundary + boundary
            nearest = f"{below} or {above}" if below else f"{above}"
            raise ConfigError(
                f"training.max_steps: must be a multiple of training.steps_per_generation x "
                f"training.num_iterations = {boundary} (the final step is saved, and a checkpoint inside a "
                f"generation window would not resume exactly); got {steps}: use {nearest}."
            )

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name

    @property
    def trace_dir(self) -> Path:
        return Path(self.traces.dir) if self.traces.dir else default_trace_dir(self.run_dir, self.name)


def default_trace_dir(run_dir: Path, name: str) -> Path:
    """``$SCRATCH/rlarith/<name>-<hash of the absolute run dir>/traces``, else ``<run dir>/traces``: a copy
    of a run directory, or a run of the same name in another runs_dir, gets a trace folder of its own."""
    if not os.environ.get("SCRATCH"):
        return Path(run_dir) / "traces"
    digest = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:8]
    return Path(os.environ["SCRATCH"]) / "rlarith" / f"{name}-{digest}" / "traces"


def _section_types() -> dict[str, type]:
    return {
        f.name: f.default_factory().__class__
        for f in dataclasses.fields(RunConfig)  # type: ignore[misc]
        if f.default_factory is not dataclasses.MISSING
    }


def _field_type(key: str) -> str:
    section, _, name = key.partition(".")
    fields = {f.name: f.type for f in dataclasses.fields(_section_types().get(section, RunConfig))}
    return str(fields.get(name or section, "another type"))


def _known_keys() -> list[str]:
    keys = [f.name for f in dataclasses.fields(RunConfig)]
    for section, cls in _section_types().items():
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(cls)]
    return keys


def _check_key(key: str, source: str) -> None:
    if key in _known_keys() or key.startswith("rewards.weights."):
        return
    close = difflib.get_close_matches(key, _known_keys(), n=1, cutoff=0.6)
    hint = f" Did you mean {close[0]!r}?" if close else " `rlarith config` prints every key."
    raise ConfigError(f"{key}: unknown key in {source}.{hint}")


def _friendly(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    if not key:
        return ConfigError(
            f"{str(err).splitlines()[0]} (in {source}); `rlarith config` shows the expected layout."
        )
    if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
        _check_key(key, source)
    if isinstance(err, ValidationError):
        return ConfigError(
            f"{key or '?'}: expected {_field_type(key)}, got {getattr(err, 'value', '?')!r} (in {source})."
        )
    return ConfigError(f"{key or '?'}: {str(err).splitlines()[0]} (in {source}).")


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load ``path`` (YAML) over the defaults, apply ``key=value`` overrides, check everything.

    >>> load_config(overrides=["training.learning_rate=1e-3"]).training.learning_rate
    0.001
    >>> load_config(overrides=["training.learnin_rate=1e-3"])  # doctest: +IGNORE_EXCEPTION_DETAIL
    Traceback (most recent call last):
    ...
    rlarith.config.ConfigError: training.learnin_rate: unknown key in the command line. Did you mean 'training.learning_rate'?
    """
    schema = OmegaConf.structured(RunConfig)
    merged: Any = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"config file {str(path)!r} not found; pass an existing YAML file (see configs/)."
            )
        try:
            loaded = OmegaConf.load(path)
        except Exception as err:  # YAML syntax errors come in several types
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
        try:
            merged = OmegaConf.merge(merged, loaded)
        except OmegaConfBaseException as err:
            raise _friendly(err, str(path)) from None
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{item!r}: overrides look like key=value, e.g. training.learning_rate=3e-4.")
        _check_key(item.split("=", 1)[0], "the command line")
        try:
            dotlist = OmegaConf.from_dotlist([item])
        except Exception:  # values are parsed as YAML
            raise ConfigError(f"{item!r}: not a valid value; quote it, e.g. 'task.op=\"*\"'.") from None
        try:
            merged = OmegaConf.merge(merged, dotlist)
        except OmegaConfBaseException as err:
            raise _friendly(err, "the command line") from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]  # runs every __post_init__
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise _friendly(err, "the config") from None


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The config a run directory was started with (``<run>/config.yaml``). A file that is not a whole
    config raises ``ConfigDamaged``: empty or all zero bytes (the size a crash leaves of a file whose data
    never reached the disk), not YAML, not a mapping, or without ``name`` (``save_config`` always writes
    every section). Read as a config file, it would be the defaults with nothing to say so."""
    path = Path(run_dir) / RUN_CONFIG
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r} not found: {str(run_dir)!r} is not a run directory.") from None
    if not text.strip("\0 \t\r\n"):
        raise ConfigDamaged(path, f"is empty ({path.stat().st_size} bytes{', all zero' if text else ''})")
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigDamaged(path, f"is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(loaded, dict) or "name" not in loaded:
        raise ConfigDamaged(path, "is not a whole config (no 'name' key)")
    return load_config(path)


def from_flat(record: dict[str, Any], source: str) -> RunConfig:
    """The config whose ``flat`` form is ``record`` (the copy a checkpoint stores), checked like a file.
    Keys this version does not know are left out (a record from another rlarith version)."""
    known, nested = set(_known_keys()), {}
    for key, value in record.items():
        if key not in known:
            continue
        node = nested
        *parents, last = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), nested))  # type: ignore[return-value]
    except ConfigError:
        raise
    except OmegaConfBaseException as err:
        if isinstance(err.__cause__, ConfigError):
            raise err.__cause__ from None
        raise _friendly(err, source) from None


def to_yaml(cfg: RunConfig) -> str:
    """The resolved config as YAML: what is written to ``<run dir>/config.yaml``."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config atomically and durably (rlarith.durable: temporary name, fsync, rename,
    fsync of the folder): a node crash after a start leaves the whole file, not an empty one."""
    write_atomic(path, to_yaml(cfg), durable=True)


# Prefixes of the ``flat`` keys that may change between the attempts of one run: they do not change what
# is trained (runs_dir: where the run lives; a run directory moved or copied elsewhere is the same run).
RESUMABLE_KEYS = (
    "runs_dir",
    "training.max_steps",
    "training.logging_steps",
    "training.report_to",
    "training.collective_timeout_s",
    "eval.",
    "slurm.",
    "traces.",
)


def schema_id() -> str:
    """A short hash of every config key: two rlarith builds with the same one read each other's configs
    (``rlarith version`` prints it; the job driver compares the host's with the container image's)."""
    keys = sorted(flat(RunConfig()))
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:10]


def flat(cfg: RunConfig) -> dict[str, Any]:
    """``{"training.learning_rate": 3e-4, ...}``: for comparing two configs key by key."""

    def walk(node: Any, prefix: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in node.items():
            if isinstance(value, dict) and key != "weights":
                out.update(walk(value, f"{prefix}{key}."))
            else:
                out[f"{prefix}{key}"] = value
        return out

    return walk(OmegaConf.to_container(OmegaConf.structured(cfg)), "")
