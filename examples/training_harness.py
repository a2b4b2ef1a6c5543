"""The training harness shared by the examples (fashion_mnist.py, lra.py).

One configuration dataclass with command-line overrides, a model builder for :class:`ssm.SSMModel`, and
:func:`train`: AdamW over :func:`ssm.optim.param_groups`, linear warmup then cosine decay, a progress bar
(or, with ``--no-progress``, a line with the step, loss and tokens per second at least every 30 s),
per-epoch metrics in ``metrics.jsonl`` (with throughput: tokens per second, peak device memory), the loss
of every optimizer step in ``steps.jsonl``, ``last.pt``/``best.pt`` checkpoints with exact resume, the final
test accuracy of the best checkpoint, ``curves.png`` (per step) and ``summary.json``. The scripts' command
lines come from :class:`ExampleParser` and :func:`run_cli`: every default in ``--help``, a configuration
error as one line ``error: ...`` (exit status 2) from rank 0 only.

Exact resume: the data order of epoch ``e`` is a function of ``(seed, e)`` only (global batch ``s`` of the
epoch is items ``s * batch_size`` to ``(s + 1) * batch_size`` of that order), and ``last.pt`` holds the
model, optimizer, scheduler, gradient scaler and the torch/CUDA/numpy/python RNG states at the end of each
epoch (and every ``checkpoint_every`` optimizer steps), so a run interrupted and resumed ends with the same
parameters, bit for bit, as one that never stopped, provided the device, world size and configuration are
the same (a changed configuration is reported), ``num_workers`` is 0 or the dataset is deterministic, and
the dataset draws its randomness, if any, from those generators. Resuming with another world size continues
the same sequence of global batches, but not bit for bit (other reduction orders, other dropout draws).

Scale (see :func:`train`): under ``torchrun`` the harness joins the process group (NCCL on CUDA, gloo on
CPU) and trains with DistributedDataParallel, each rank on its share of every global batch; ``accumulate``
splits each rank's share into micro-batches; ``precision`` runs the forward under ``torch.autocast``;
``compile`` wraps the model in ``torch.compile``.

``examples/`` is not a package: the scripts ``import training_harness`` (Python puts a script's folder
first on ``sys.path``, so ``python examples/lra.py`` works from any directory); the tests find it through the
``pythonpath`` setting of pytest in pyproject.toml. The name is unique on purpose: ``benchmarks/`` has its
own ``common.py``, and both folders are importable in one pytest process.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import resource
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

try:
    import ssm  # noqa: F401
except ImportError:  # running from a checkout without installing: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm._checks import check_choice, check_int, check_positive
from ssm.blocks import NORMS
from ssm.layers import LAYERS

MODELS = tuple(LAYERS)  # "s4", "s4d", "rtf", ...: every layer in the registry
SCHEDULERS = ("cosine", "constant")
PRECISIONS = ("32", "bf16", "fp16")
DTYPES = ("float32", "float64")

# Fields whose change between a run and its resumption does not break exact resume.
_RESUME_NEUTRAL = (
    "device", "num_workers", "progress", "eval_batch_size", "max_eval_steps", "compile", "checkpoint_every"
)
# Optimizer hyperparameters that a checkpoint restores: on resume the configuration's new values replace them.
_RESUME_HPARAMS = ("lr", "lr_ssm", "weight_decay")
# Fields that may be None (set from the command line with the word "none").
_OPTIONAL_INTS = ("max_steps_per_epoch", "max_eval_steps", "eval_batch_size", "checkpoint_every")
_CHOICES = {"scheduler": SCHEDULERS, "precision": PRECISIONS, "dtype": DTYPES}
# Choices the command line enforces on top of the Config checks (SSMModel checks norm and pool; a classifier
# needs a pooled output, so pool "none" is not offered). add_config_args(choices=...) replaces them.
CLI_CHOICES = {"norm": NORMS, "pool": ("mean", "last")}
# curves.png is redrawn after every epoch that took at least this long, and at the end of each call.
_REPLOT_SECONDS = 30.0
# Without a progress bar (progress=False, --no-progress), a progress line at least this often.
_HEARTBEAT_SECONDS = 30.0

_HELP = {
    "model": f"SSM layer: {', '.join(MODELS)}",
    "d_model": "model width H",
    "n_layers": "number of residual SSM blocks",
    "d_state": "state size N of each SSM",
    "dropout": "dropout probability in the blocks",
    "norm": "normalization in the blocks: layer, batch or none",
    "prenorm": "normalize before (pre-norm) or after (post-norm) each block",
    "pool": "how the classifier reads the sequence of outputs: mean (their mean over the valid positions, "
    "padding excluded) or last (the output at the last valid position)",
    "ff": "expansion factor of a GELU feed-forward branch after each SSM layer (0: none)",
    "lr": "learning rate of all non-SSM parameters",
    "lr_ssm": "learning rate of the SSM parameters (no weight decay on them)",
    "weight_decay": "AdamW weight decay of the non-SSM parameters",
    "epochs": "number of training epochs",
    "batch_size": "global training batch size (all ranks and accumulation steps together)",
    "accumulate": "micro-batches per optimizer step and rank (same global batch on fewer/smaller devices)",
    "precision": "32, bf16 or fp16: the forward under torch.autocast (fp16 with a GradScaler)",
    "dtype": "parameter dtype: float32 or float64 (float64 for exact comparisons; precision must be 32)",
    "compile": "torch.compile the training forward (evaluation runs eagerly)",
    "checkpoint_every": "also write last.pt every this many optimizer steps ('none': at epoch ends only)",
    "warmup": "linear learning-rate warmup, in optimizer steps",
    "scheduler": "learning-rate schedule after warmup: cosine (to 0 at the end) or constant",
    "grad_clip": "clip the global gradient norm to this value (0: no clipping)",
    "seed": "seed of the initialization, the data order and dropout",
    "num_workers": "DataLoader worker processes",
    "max_steps_per_epoch": "cap on optimizer steps per epoch, for smoke tests ('none': no cap)",
    "max_eval_steps": "cap on batches per evaluation, for smoke tests ('none': the whole split)",
    "eval_batch_size": "evaluation batch size ('none': the training batch size)",
    "device": "auto, cpu, cuda or cuda:N",
    "progress": "show a progress bar (tqdm when installed, else a line every 10%% of an epoch); without it "
    f"(--no-progress), a line (step, loss, tokens/s) every {_HEARTBEAT_SECONDS:.0f} s",
}


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run; validated on construction (ValueError naming the field).

    Model: ``model`` (a name in ``ssm.layers.LAYERS``: "s4", "s4d", "rtf", ...), ``d_model`` (H),
    ``n_layers``, ``d_state`` (N), ``dropout``,
    ``norm``, ``prenorm``, ``pool``, ``ff`` (see :class:`ssm.SSMModel`). Optimization: AdamW with ``lr`` and
    ``weight_decay`` for ordinary parameters and ``lr_ssm`` (no weight decay) for SSM parameters;
    ``warmup`` optimizer steps of linear warmup, then ``scheduler`` ("cosine" to 0, or "constant");
    ``grad_clip`` (0: off). Run: ``epochs``, ``batch_size`` (global: per rank it is
    ``batch_size / world_size``, split into ``accumulate`` micro-batches), ``precision`` ("32", "bf16",
    "fp16"), ``dtype`` ("float32", "float64"), ``compile``, ``checkpoint_every`` (None: at epoch ends),
    ``seed``, ``num_workers``, ``device`` ("auto", "cpu", "cuda[:N]"), ``progress``; smoke-test caps
    ``max_steps_per_epoch`` and ``max_eval_steps`` and ``eval_batch_size`` (None: no cap / the training
    batch size).
    """

    model: str = "s4"
    d_model: int = 128
    n_layers: int = 4
    d_state: int = 64
    dropout: float = 0.0
    norm: str = "layer"
    prenorm: bool = True
    pool: str = "mean"
    ff: int = 0
    lr: float = 1e-2
    lr_ssm: float = 1e-3
    weight_decay: float = 0.05
    epochs: int = 10
    batch_size: int = 64
    accumulate: int = 1
    precision: str = "32"
    dtype: str = "float32"
    compile: bool = False
    checkpoint_every: int | None = None
    warmup: int = 0
    scheduler: str = "cosine"
    grad_clip: float = 0.0
    seed: int = 0
    num_workers: int = 0
    max_steps_per_epoch: int | None = None
    max_eval_steps: int | None = None
    eval_batch_size: int | None = None
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        check_choice("model", self.model, MODELS)
        for name, choices in _CHOICES.items():
            check_choice(name, getattr(self, name), choices)
        for name in ("norm", "pool", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string; got {getattr(self, name)!r}")
        for name in ("prenorm", "progress", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        for name in ("d_model", "n_layers", "d_state", "epochs", "batch_size", "accumulate"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("ff", "warmup", "seed", "num_workers"):
            check_int(name, getattr(self, name), minimum=0)
        for name in _OPTIONAL_INTS:
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        for name in ("lr", "lr_ssm"):
            check_positive(name, getattr(self, name))
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number > 0; got {getattr(self, name)!r}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {self.dropout!r}")
        if self.dtype != "float32" and self.precision != "32":
            raise ValueError(f"precision {self.precision!r} needs dtype 'float32'; got dtype {self.dtype!r}")


# ----------------------------------------------------------------------------------------------------------
# Command line


class ConfigError(ValueError):
    """A configuration that cannot run: a bad value or a bad combination of options (a batch size that
    ``world_size * accumulate`` does not divide, ...). :func:`run_cli` prints it as one line."""


def launch_rank() -> int:
    """This process's rank as ``torchrun`` announces it (``$RANK``), known before the process group is
    joined; 0 without torchrun."""
    rank = os.environ.get("RANK", "0")
    return int(rank) if rank.isdigit() else 0


def fail(message: str, status: int) -> NoReturn:
    """Exit with ``status`` after printing ``error: <message>`` as one line on stderr, from rank 0 only (the
    other ranks of a torchrun job fail with the same message and say nothing)."""
    if launch_rank() == 0:
        print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
    sys.exit(status)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, ``(default: ...)``, unless the help already says what the
    default is (a word "default" in it: a default that depends on the preset, say)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        return text if "default" in text.lower() else super()._get_help_string(action)


class ExampleParser(argparse.ArgumentParser):
    """The examples' ``ArgumentParser``: ``--help`` shows every default (:class:`DefaultsHelpFormatter`),
    and a command-line error is one line from rank 0 only, exit status 2 (as argparse), see :func:`fail`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)", 2)


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Run a script's ``main(argv)`` the way its ``__main__`` block does: a :class:`ConfigError` becomes one
    line ``error: ...`` and exit status 2 (as a command-line error in argparse), an error of
    :data:`RUN_ERRORS` one line and status 1, printed by rank 0 only under torchrun (:func:`fail`); any other
    exception (a bug) keeps its traceback."""
    try:
        main(argv)
    except ConfigError as err:
        fail(str(err), 2)
    except RUN_ERRORS as err:
        fail(str(err), 1)


@contextlib.contextmanager
def config_errors() -> Iterator[None]:
    """Turn a ValueError raised inside into a :class:`ConfigError`: for a script's setup (options, data,
    model), where a bad value is the command line's."""
    try:
        yield
    except ConfigError:
        raise
    except ValueError as err:
        raise ConfigError(str(err)) from err


def optional_int(text: str) -> int | None:
    """An argparse ``type``: an integer, or None for the word "none" (any case)."""
    return None if text.lower() == "none" else int(text)


def add_config_args(
    parser: argparse.ArgumentParser,
    base: Config | None = None,
    *,
    title: str = "training configuration",
    helps: dict[str, str] | None = None,
    choices: dict[str, Sequence[str]] | None = None,
) -> argparse.ArgumentParser:
    """Add ``--<field>`` options (dashes for underscores) for every :class:`Config` field to ``parser``.

    Options left out keep the value of the configuration they are applied to (see :func:`config_from_args`);
    ``base`` only supplies the defaults shown in ``--help``. Booleans take ``--prenorm/--no-prenorm``;
    optional integers take ``none``. The options form an argument group named ``title``. ``helps`` and
    ``choices`` replace the help text and the allowed values (:data:`CLI_CHOICES`) of the fields they name.
    """
    base = base if base is not None else Config()
    helps = {**_HELP, **(helps or {})}
    allowed = {**CLI_CHOICES, "model": MODELS, **_CHOICES, **(choices or {})}
    group = parser.add_argument_group(title)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(base, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        shown = "none" if value is None else value
        kwargs["help"] = f"{helps[f.name]} (default: {shown})"
        if isinstance(value, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in _OPTIONAL_INTS:
            kwargs["type"] = optional_int
        elif f.name in allowed:
            kwargs["choices"] = tuple(allowed[f.name])
        else:
            kwargs["type"] = type(value)
        group.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """``base`` with every :class:`Config` field given on the command line replaced (and validated: a
    :class:`ConfigError` names a bad field)."""
    names = {f.name for f in fields(Config)}
    with config_errors():
        return replace(base, **{k: v for k, v in vars(args).items() if k in names})


def add_run_args(parser: argparse.ArgumentParser, default_out: str) -> argparse.ArgumentParser:
    """Add ``--out DIR``, ``--resume/--no-resume`` (resume from ``DIR/last.pt`` when present) and the
    test-only ``--stop-after-steps N`` (end after N optimizer steps in all, as if killed)."""
    parser.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from OUT/last.pt when it exists (default: %(default)s)",
    )
    parser.add_argument(
        "--stop-after-steps",
        type=optional_int,
        default=None,
        help="for tests: end after this many optimizer steps in all, as if killed (no checkpoint is written; "
        "default: none, run to the end)",
    )
    return parser


def check_out_dir(out_dir: str | os.PathLike) -> Path:
    """``out_dir`` as a Path; NotADirectoryError when it names an existing file (or lies below one)."""
    out = Path(out_dir)
    for path in (out, *out.parents):
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(
                f"--out {str(out)!r}: {str(path)!r} is an existing file, not a directory; "
                "pass a new or existing directory"
            )
    return out


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str, *, local_rank: int | None = None) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)`` (which must exist: a
    :class:`ConfigError` otherwise).

    With ``local_rank`` (a torchrun process), "auto" and "cuda" mean ``cuda:<local_rank>``.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
    if device.type == "cuda" and device.index is None and local_rank is not None:
        device = torch.device("cuda", local_rank)
    return device


# ----------------------------------------------------------------------------------------------------------
# Distributed training (torchrun)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group: ``rank``, ``world_size``, ``local_rank`` (on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one process that prints and writes files."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """The current process group's :class:`DistInfo` (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank, dist.get_world_size(), int(os.environ.get("LOCAL_RANK", rank)))
    return DistInfo()


@contextlib.contextmanager
def distributed(device: str = "auto") -> Iterator[DistInfo]:
    """Join the process group that ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment) for the
    duration: NCCL when ``device`` resolves to CUDA (each process on ``cuda:<LOCAL_RANK>``), else gloo.

    Without torchrun, or when a group is already initialized (it is then left as it is), this does nothing.
    Yields the :class:`DistInfo`.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available() or dist.is_initialized():
        yield dist_info()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank=local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    ok = False
    try:
        yield dist_info()
        ok = True
    finally:
        if ok:  # leave together: a rank tearing the group down while its peers still talk to it can abort
            dist.barrier()
        dist.destroy_process_group()


def _all_reduce(t: torch.Tensor, d: DistInfo, op: str = "sum") -> torch.Tensor:
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return t


def _gather(obj: Any, d: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without a process group)."""
    if not d.active:
        return [obj]
    got: list[Any] = [None] * d.world_size
    dist.all_gather_object(got, obj)
    return got


def _broadcast(obj: Any, d: DistInfo) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch normalization whose training statistics span every rank's batch (two-pass mean and variance
    through differentiable all-reduces): what ``nn.SyncBatchNorm`` does on CUDA, on any device (gloo/CPU).

    Without a process group it is ``F.batch_norm``. Same parameters, buffers and state-dict keys as
    ``nn.BatchNorm1d``; input (B, C) or (B, C, L).
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected a (B, C) or (B, C, L) input; got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = self.training and dist.is_available() and dist.is_initialized()
        if not (synced and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        count = torch.full((1,), x.numel() // x.shape[1], dtype=xf.dtype, device=x.device)
        dist.all_reduce(count)
        mean = all_reduce(xf.sum(dims)) / count  # (C,)
        centered = xf - mean.reshape(shape)
        var = all_reduce(centered.square().sum(dims)) / count  # biased, as in the normalization
        y = centered * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = float(count)
                self.running_mean.mul_(1 - m).add_(m * mean.detach().to(self.running_mean.dtype))
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.mul_(1 - m).add_(m * unbiased.to(self.running_var.dtype))
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norms of ``model`` replaced by ones with statistics over all ranks: ``nn.SyncBatchNorm`` on
    CUDA, :class:`GlobalBatchNorm` elsewhere (``nn.SyncBatchNorm`` needs a GPU). Parameters are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, GlobalBatchNorm):
            new = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats,
                device=device, dtype=child.weight.dtype if child.affine else None,
            )
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(model, name, new)
        else:
            sync_batchnorm(child, device)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (a complex parameter counts twice)."""
    return sum(p.numel() * (2 if p.is_complex() else 1) for p in model.parameters() if p.requires_grad)


def build_model(
    cfg: Config,
    d_input: int,
    d_output: int,
    *,
    embedding: bool = False,
    bidirectional: bool = False,
    layer_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The :class:`ssm.SSMModel` classifier that ``cfg`` describes.

    The SSM learning rate ``cfg.lr_ssm`` reaches the layers as ``ssm_lr``, the hint that
    :func:`ssm.optim.param_groups` reads; ``layer_kwargs`` adds or overrides layer options.
    """
    from ssm.models import SSMModel

    kwargs = {"ssm_lr": cfg.lr_ssm}
    kwargs.update(layer_kwargs or {})
    return SSMModel(
        d_input,
        d_output,
        d_model=cfg.d_model,
        n_layers=cfg.n_layers,
        layer=cfg.model,
        d_state=cfg.d_state,
        dropout=cfg.dropout,
        norm=cfg.norm,
        prenorm=cfg.prenorm,
        pool=cfg.pool,
        embedding=embedding,
        bidirectional=bidirectional,
        ff=cfg.ff,
        layer_kwargs=kwargs,
    )


def make_optimizer(model: nn.Module, cfg: Config) -> torch.optim.AdamW:
    """AdamW over ``ssm.optim.param_groups``: SSM parameters keep their own lr and no weight decay."""
    from ssm.optim import param_groups

    groups = param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_factor(step: int, *, warmup: int, total: int, scheduler: str = "cosine") -> float:
    """Multiplier of every group's base lr before optimizer step ``step`` (0-based).

    Linear warmup ``(step + 1) / warmup`` for ``step < warmup``; then ``1`` (constant) or the cosine
    ``(1 + cos(pi * p)) / 2`` with ``p = (step - warmup) / (total - warmup)``, reaching 0 after the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    if scheduler == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * p))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step :func:`lr_factor` schedule (call ``scheduler.step()`` after each optimizer step)."""

    def factor(step: int) -> float:
        return lr_factor(step, warmup=cfg.warmup, total=total_steps, scheduler=cfg.scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The training order of ``epoch``: a permutation of ``range(n)`` that depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch)))


def _mix(seed: int, epoch: int) -> int:
    # a Python int before the shift: numpy 1.x promotes uint64 >> int to float64 and raises
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]) >> 1


def _unpack(
    batch: Any, device: torch.device, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            "batch must be (x, y) or (x, y, lengths) as the collate_fn returns it; "
            f"got {type(batch).__name__} of length {len(batch) if isinstance(batch, (tuple, list)) else '?'}"
        )
    x = batch[0].to(device, non_blocking=True)
    if x.is_floating_point() and dtype != torch.float32:
        x = x.to(dtype)
    y = torch.as_tensor(batch[1]).to(device, non_blocking=True)
    lengths = batch[2].to(device, non_blocking=True) if len(batch) == 3 else None
    return x, y, lengths


def _positions(x: torch.Tensor) -> int:
    """Sequence positions in a batch (padding included): token ids (B, L[, 2]) or features (B, L[, 2], d)."""
    return x.numel() // x.shape[-1] if x.is_floating_point() else x.numel()


def _forward(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    return model(x) if lengths is None else model(x, lengths=lengths)


def _autocast(cfg: Config, device: torch.device):
    if cfg.precision == "32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 logits (autocast) in float32 for the loss; float32 and float64 as they are."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _model_dtype(cfg: Config) -> torch.dtype:
    return torch.float64 if cfg.dtype == "float64" else torch.float32


def _peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak memory so far: CUDA bytes allocated (since the last reset), or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "cpu_max_rss"


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _clock() -> float:
    """Seconds on a monotonic clock: the progress lines' timer (tests replace it)."""
    return time.monotonic()


class _Progress:
    """The progress of one loop over ``total`` steps, shown by rank 0 (``main``) only.

    With ``bar``: tqdm when importable, else a line every ~10% of the steps. With or without it, a line
    whenever :data:`_HEARTBEAT_SECONDS` of :func:`_clock` passed since the last one (or since the start), so
    that a run without a bar (``--no-progress``) still says every 30 s how far it is, its loss and its speed.
    A line reads ``desc: count/total key value ...``.
    """

    def __init__(self, total: int, desc: str, *, bar: bool, main: bool = True) -> None:
        self.total, self.desc, self.main, self.count = total, desc, main, 0
        self.bar = None
        self.every = max(1, total // 10) if bar else None
        self.last = _clock()
        if main and bar:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(
        self, sums: dict[str, torch.Tensor], n: int, extra: Callable[[], dict[str, str]] | None = None
    ) -> None:
        """One step done; ``sums[k] / n`` are the running means shown, ``extra()`` more fields (both read
        only when shown)."""
        self.count += 1
        if not self.main:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.count % 10 == 0 or self.count == self.total:
                post = {k: f"{v.item() / n:.4g}" for k, v in sums.items()}
                self.bar.set_postfix({**post, **(extra() if extra else {})}, refresh=False)
            return
        now = _clock()
        periodic = self.every is not None and (self.count % self.every == 0 or self.count == self.total)
        if periodic or now - self.last >= _HEARTBEAT_SECONDS:
            self.last = now
            fields_ = {k: f"{v.item() / n:.4g}" for k, v in sums.items()} | (extra() if extra else {})
            text = " ".join(f"{k} {v}" for k, v in fields_.items())
            print(f"{self.desc}: {self.count}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------
# Evaluation and training


class CheckpointError(RuntimeError):
    """A file of an earlier run that cannot be used (damaged, or of another model); the message names the file
    and says how to start afresh."""


class OutDirInUse(RuntimeError):
    """Another run holds the lock of the ``--out`` folder: two runs would mix their files."""


# Errors of a run that are the user's to fix, printed by run_cli as one line (exit status 1): missing data,
# --out naming a file or in use, a damaged checkpoint, divergence.
RUN_ERRORS = (FileNotFoundError, NotADirectoryError, CheckpointError, OutDirInUse, FloatingPointError)


LOCK_NAME = ".lock"
STEPS_NAME = "steps.jsonl"


@contextlib.contextmanager
def out_lock(out: Path, d: DistInfo | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``out/.lock`` (rank 0 takes it; every rank learns the outcome) for the
    duration; ``OutDirInUse`` when another process holds it. An OS file lock (``fcntl.flock``): released by
    the kernel when the process ends, even by SIGKILL, so a crashed run never leaves a stale lock."""
    import fcntl

    d = d or DistInfo()
    fd, holder = None, ""
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            fd = None
    holder = _broadcast(holder, d) if d.active else holder
    if holder:
        raise OutDirInUse(
            f"--out {str(out)!r} is in use by another run (pid {holder}); two runs sharing one folder would "
            "mix their checkpoints and metrics: wait for it, or pass another --out"
        )
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    cfg: Config,
    *,
    collate_fn: Callable | None = None,
    device: torch.device | None = None,
    desc: str = "eval",
) -> dict[str, float]:
    """Mean cross-entropy ``loss``, accuracy ``acc`` and count ``n`` of ``model`` on ``dataset`` (eval mode).

    Uses at most ``cfg.max_eval_steps`` batches of ``cfg.eval_batch_size`` (default ``cfg.batch_size``), under
    ``cfg.precision``. Under a process group every rank evaluates every ``world_size``-th item of those and
    the sums are reduced, so every rank returns the metrics of the whole (capped) split.
    """
    d = dist_info()
    if device is None:
        device = resolve_device(cfg.device, local_rank=d.local_rank if d.active else None)
    was_training = model.training
    model.eval()
    batch_size, max_steps = cfg.eval_batch_size or cfg.batch_size, cfg.max_eval_steps
    if d.active:
        items = len(dataset) if max_steps is None else min(len(dataset), max_steps * batch_size)
        dataset = Subset(dataset, list(range(d.rank, items, d.world_size)))
        batch_size, max_steps = max(1, math.ceil(batch_size / d.world_size)), None
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total = len(loader) if max_steps is None else min(len(loader), max_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    dtype = _model_dtype(cfg)
    bar = _Progress(total, desc, bar=cfg.progress, main=d.main)
    for i, batch in enumerate(loader):
        if i == total:
            break
        x, y, lengths = _unpack(batch, device, dtype)
        with _autocast(cfg, device):
            logits = _forward(model, x, lengths)
        loss_sum += F.cross_entropy(_upcast(logits), y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum()
        n += y.shape[0]
        bar.update({"loss": loss_sum, "acc": correct}, n)
    bar.close()
    model.train(was_training)
    count = torch.tensor(float(n), dtype=torch.float64, device=device)
    stats = torch.stack([loss_sum, correct.double(), count])
    loss, right, count = _all_reduce(stats, d).tolist()
    count = int(count)
    return {"loss": loss / max(count, 1), "acc": right / max(count, 1), "n": count}


def steps_per_epoch(n: int, cfg: Config, world_size: int = 1) -> int:
    """Optimizer steps of one epoch over ``n`` items: global batches of ``cfg.batch_size`` (the last one
    shorter), at most ``cfg.max_steps_per_epoch``; a last batch with fewer items than
    ``world_size * cfg.accumulate`` (one per micro-batch) is dropped."""
    used = n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch * cfg.batch_size)
    full, tail = divmod(used, cfg.batch_size)
    return full + int(tail >= world_size * cfg.accumulate)


def rank_batches(
    n: int, cfg: Config, epoch: int, *, rank: int = 0, world_size: int = 1, start_step: int = 0
) -> tuple[list[list[int]], list[int]]:
    """This rank's micro-batches of ``epoch`` from step ``start_step`` on, and each step's global batch size.

    Global batch ``s`` is ``epoch_order(n, seed, epoch)[s * B:(s + 1) * B]``, a function of (seed, epoch,
    step) only; it is cut into ``world_size * accumulate`` near-equal pieces, and rank ``r`` takes pieces
    ``r * accumulate`` to ``(r + 1) * accumulate - 1``, one per micro-batch.
    """
    order = epoch_order(n, cfg.seed, epoch)
    B, A = cfg.batch_size, cfg.accumulate
    micro, sizes = [], []
    for s in range(start_step, steps_per_epoch(n, cfg, world_size)):
        batch = order[s * B:(s + 1) * B]
        pieces = torch.tensor_split(batch, world_size * A)
        micro.extend(pieces[rank * A + m].tolist() for m in range(A))
        sizes.append(len(batch))
    return micro, sizes


def _rng_state() -> dict[str, Any]:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    keys = npst["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npst["pos"], npst["has_gauss"], npst["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform; the file itself is synced
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace_synced(path: Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` atomically: ``write(fh)`` into a sibling temporary file, fsync it, rename it over
    ``path``, fsync the folder. A crash leaves the old file or the new one, never a partial one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, mode) as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save(obj: dict[str, Any], path: Path) -> None:
    _replace_synced(path, lambda fh: torch.save(obj, fh))


def _write_text(path: Path, text: str) -> None:
    _replace_synced(path, lambda fh: fh.write(text), mode="w")


def _load_checkpoint(path: Path, keys: Sequence[str]) -> dict[str, Any]:
    """``torch.load(path)``, holding ``keys``; a CheckpointError naming the file otherwise."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict):
            raise ValueError(f"it holds a {type(ckpt).__name__}, not a checkpoint dict")
        missing = [k for k in keys if k not in ckpt]
        if missing:
            raise ValueError(f"it lacks {missing}")
    except Exception as err:  # truncated, empty, random bytes, another file: all end here
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"{path} cannot be read: {reason}. The file is damaged (truncated, empty or overwritten?) or not "
            "a checkpoint of this harness: delete it, or pass --no-resume (resume=False) to start afresh"
        ) from err
    return ckpt


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a partial last line (a write interrupted by a kill) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i == last:
                print(f"note: {path}: dropping a partial last line (an interrupted write)", flush=True)
                break
            raise CheckpointError(
                f"{path}, line {i + 1}, is not JSON ({err}); repair or delete the file, or pass --no-resume"
            ) from err
    return records


def _write_metrics(path: Path, records: Sequence[dict[str, Any]]) -> None:
    _write_text(path, "".join(json.dumps(r) + "\n" for r in records))


def curve_points(
    records: Sequence[dict[str, Any]], steps: Sequence[dict[str, Any]] = ()
) -> dict[str, dict[str, tuple[list[float], list[float]]]]:
    """The curves of curves.png as ``{panel: {series: (xs, ys)}}``, x the optimizer step.

    Panels "loss", "acc" and "lr". Series "train": per step from ``steps`` (the lines of steps.jsonl), or,
    without them (a run from before steps.jsonl), the epoch means of ``records`` (metrics.jsonl) at each
    epoch's last step; "val" (loss and acc): one point per evaluation, at the step of each epoch end.
    """
    curves: dict[str, dict[str, tuple[list[float], list[float]]]] = {"loss": {}, "acc": {}, "lr": {}}
    rows = steps if steps else records
    xs = [r["step"] for r in rows]
    for panel, epoch_key in (("loss", "train_loss"), ("acc", "train_acc"), ("lr", "lr")):
        curves[panel]["train"] = (xs, [r[panel] if steps else r[epoch_key] for r in rows])
    for panel in ("loss", "acc"):
        points = [(r["step"], r[f"val_{panel}"]) for r in records if r.get(f"val_{panel}") is not None]
        if points:
            curves[panel]["val"] = ([x for x, _ in points], [y for _, y in points])
    return curves


def plot_curves(
    records: Sequence[dict[str, Any]], path: str | os.PathLike, steps: Sequence[dict[str, Any]] = ()
) -> bool:
    """Write the loss, accuracy and learning-rate curves of :func:`curve_points` to ``path`` (PNG): training
    per optimizer step (with a running mean over ~4% of the run once it has 50 steps), validation per epoch.

    Returns False (writing nothing) when matplotlib is not installed. Raises ValueError when there are fewer
    than two training points: one point is no curve.
    """
    curves = curve_points(records, steps)
    n = len(curves["loss"]["train"][0])
    if n < 2:
        raise ValueError(f"records and steps must hold two training points to draw a curve; got {n}")
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    window = n // 25 if n >= 50 else 1
    per = "per step" if steps else "per epoch"
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    labels = {"loss": "cross-entropy", "acc": "accuracy", "lr": "learning rate (group 0)"}
    for ax, (panel, series) in zip(fig.subplots(1, 3), curves.items()):
        for split, (xs, ys) in series.items():
            ys = [np.nan if y is None else y for y in ys]
            if split == "val":
                ax.plot(xs, ys, marker="o", label="val (per epoch)")
            elif window > 1 and panel != "lr":
                ax.plot(xs, ys, lw=0.6, alpha=0.35, label=f"train ({per})")
                smooth = np.convolve(ys, np.ones(window) / window, mode="valid")
                ax.plot(xs[window - 1:], smooth, label=f"train (mean of {window} steps)")
            else:
                ax.plot(xs, ys, label=f"train ({per})" if panel != "lr" else None)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(labels[panel])
        if panel != "lr":
            ax.legend()
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def _plot(records: Sequence[dict[str, Any]], steps_path: Path, out: Path, noted: set[str]) -> None:
    """Draw out/curves.png; say once per reason (kept in ``noted``) why it was not drawn."""
    steps = _read_metrics(steps_path)
    n = len(curve_points(records, steps)["loss"]["train"][0])
    if n < 2:
        reason = (
            f"curves.png not drawn: a curve needs two points and the run has {n} optimizer step so far "
            "(it is drawn once there are two)"
        )
    elif not plot_curves(records, out / "curves.png", steps):
        reason = "matplotlib is not installed: skipping curves.png (pip install matplotlib)"
    else:
        return
    if reason not in noted:
        noted.add(reason)
        print(reason, flush=True)


class _Trainer:
    """The state of one :func:`train` call: the model as trained (DDP, compiled) and as evaluated, the
    optimizer, schedule, gradient scaler, counters, and the checkpoint it writes."""

    def __init__(self, model, train_ds, cfg, device, d, collate_fn, last_path, stop_after_steps):
        self.model, self.train_ds, self.cfg, self.device, self.d = model, train_ds, cfg, device, d
        self.collate_fn, self.last_path, self.stop_after_steps = collate_fn, last_path, stop_after_steps
        self.steps_path = last_path.with_name(STEPS_NAME)
        self.step_log: list[tuple] = []  # steps not yet in steps.jsonl (written with each last.pt)
        self.dtype = _model_dtype(cfg)
        self.steps_per_epoch = steps_per_epoch(len(train_ds), cfg, d.world_size)
        self.optimizer = make_optimizer(model, cfg)
        self.scheduler = make_scheduler(self.optimizer, cfg, cfg.epochs * self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        self.param_names, self.params = [k for k, _ in named], [p for _, p in named]
        self.state: dict[str, Any] = {
            "epoch": 0,
            "step": 0,
            "best_val_acc": None,
            "best_val_loss": None,
            "best_epoch": None,
            "train_time_s": 0.0,
        }
        self._wrap(cfg.compile)

    def _wrap(self, compile_: bool) -> None:
        """``self.net`` (the training forward: DDP, compiled) and ``self.eval_net`` (evaluation: the plain
        model, eager; compiling it too would recompile for eval mode, and the layers' eval-mode kernel cache
        does not trace)."""
        self.compiled = compile_
        self.ddp = None
        net = self.model
        if self.d.active:
            ids = [self.device] if self.device.type == "cuda" else None
            self.ddp = net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if compile_:
            from torch._dynamo.utils import counters

            self._breaks_before = sum(counters["graph_break"].values())
            self.net = torch.compile(net)
        else:
            self.net = net
        self.eval_net = self.model
        self._first_forward = True

    def say(self, text: str) -> None:
        if self.d.main:
            print(text, flush=True)

    def _train_forward(self, x, lengths) -> torch.Tensor:
        try:
            with _autocast(self.cfg, self.device):
                out = _forward(self.net, x, lengths)
        except ValueError as err:
            if self.state["step"] > 0 and "must be positive" in str(err):
                raise FloatingPointError(
                    f"training diverged by step {self.state['step']}: the model refuses its parameters "
                    f"({err}); lower lr/lr_ssm or set grad_clip"
                ) from err
            raise
        except Exception as err:
            if not (self.compiled and self._first_forward):
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            self.say(f"note: torch.compile failed ({type(err).__name__}: {first}); training without it")
            self._wrap(False)
            return self._train_forward(x, lengths)
        if self.compiled and self._first_forward:
            from torch._dynamo.utils import counters

            breaks = sum(counters["graph_break"].values()) - self._breaks_before
            if breaks > 0:
                reason = (str(next(iter(counters["graph_break"]), "")).strip().splitlines() or [""])[0][:120]
                self.say(
                    f"note: torch.compile fell back to eager at {breaks} graph break(s) (e.g. {reason}); "
                    "the model runs partly compiled"
                )
        self._first_forward = False
        return out

    def _check_finite(self, step_loss: torch.Tensor, epoch: int) -> None:
        """Raise FloatingPointError naming the step once the loss or a parameter is not finite (on every
        rank together), before a layer's own parameter checks refuse the next forward."""
        norms = torch._foreach_norm(self.params, float("inf")) if self.params else []
        flags = [v.isfinite() for v in norms]
        loss_ok = step_loss.isfinite() if self.scaler is None else torch.ones((), dtype=torch.bool)
        ok = torch.stack([loss_ok.to(self.device), *flags]).all()
        bad = _all_reduce((~ok).to(torch.int32), self.d)
        if not bad.item():
            return
        if not bool(loss_ok):
            what = f"the loss is {step_loss.item():g}"
        else:
            names = [k for k, v in zip(self.param_names, flags) if not bool(v)]
            what = f"parameter {names[0]} is not finite" if names else "the loss is not finite on a rank"
        hint = "lower lr/lr_ssm or set grad_clip"
        if self.cfg.precision != "32":
            hint += ", or use --precision 32"
        raise FloatingPointError(
            f"training diverged at step {self.state['step']} (epoch {epoch + 1}): {what}; {hint}"
        )

    def run_epoch(self, epoch: int, start_step: int, partial: dict[str, Any] | None) -> dict[str, Any] | None:
        """Train ``epoch`` from ``start_step`` on; the epoch's metrics reduced over ranks, or None when
        ``stop_after_steps`` ended the run inside it."""
        cfg, d, device = self.cfg, self.d, self.device
        partial = partial or {"loss_sum": 0.0, "correct": 0, "n": 0, "tokens": 0, "time_s": 0.0}
        self.model.train()
        micro, sizes = rank_batches(
            len(self.train_ds), cfg, epoch, rank=d.rank, world_size=d.world_size, start_step=start_step
        )
        loader = DataLoader(
            self.train_ds,
            batch_sampler=micro,
            collate_fn=self.collate_fn,
            num_workers=cfg.num_workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(_mix(cfg.seed, epoch)),
        )
        sums = {
            "loss": torch.tensor(partial["loss_sum"], dtype=torch.float64, device=device),
            "acc": torch.tensor(partial["correct"], dtype=torch.int64, device=device),
        }
        n, tokens = partial["n"], partial["tokens"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()

        def shown() -> dict[str, str]:
            rate = (tokens - partial["tokens"]) * d.world_size / max(time.perf_counter() - t0, 1e-9)
            return {"tok/s": f"{rate:.3g}", "mem": _fmt_bytes(_peak_memory(device)[0])}

        desc = f"epoch {epoch + 1}/{cfg.epochs}"
        bar = _Progress(self.steps_per_epoch, desc, bar=cfg.progress, main=d.main)
        bar.count = start_step
        batches = iter(loader)
        A, W = cfg.accumulate, d.world_size
        for s in range(start_step, self.steps_per_epoch):
            n_global = sizes[s - start_step]
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            step_correct = torch.zeros((), dtype=torch.int64, device=device)
            for m in range(A):
                x, y, lengths = _unpack(next(batches), device, self.dtype)
                sync = self.ddp is None or m == A - 1  # DDP all-reduces in the last micro-batch's backward
                with contextlib.nullcontext() if sync else self.ddp.no_sync():
                    logits = self._train_forward(x, lengths)
                    loss = F.cross_entropy(_upcast(logits), y)
                    # DDP averages over ranks: this weighting makes the gradient that of the global batch mean
                    scaled = loss * (y.shape[0] * W / n_global)
                    (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
                step_loss += loss.detach().double() * y.shape[0]
                step_correct += (logits.detach().argmax(-1) == y).sum()
                n += y.shape[0]
                tokens += _positions(x)
            sums["loss"] += step_loss
            sums["acc"] += step_correct
            lr = self.optimizer.param_groups[0]["lr"]  # the rate of this step (the schedule moves on below)
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.state["step"] += 1
            self.step_log.append(
                (self.state["step"], epoch + 1, s + 1, step_loss, step_correct, n_global, lr)
            )
            self._check_finite(step_loss, epoch)
            bar.update(sums, n, shown)
            mid_epoch = s + 1 < self.steps_per_epoch
            if cfg.checkpoint_every and self.state["step"] % cfg.checkpoint_every == 0 and mid_epoch:
                now = {
                    "loss_sum": sums["loss"].item(),
                    "correct": int(sums["acc"].item()),
                    "n": n,
                    "tokens": tokens,
                    "time_s": partial["time_s"] + time.perf_counter() - t0,
                }
                self.save_last(epoch_step=s + 1, partial=now)
            if self.stop_after_steps is not None and self.state["step"] >= self.stop_after_steps:
                bar.close()
                return None
        bar.close()
        stats = torch.tensor([float(n), float(tokens)], dtype=torch.float64, device=device)
        stats = _all_reduce(torch.cat([sums["loss"][None], sums["acc"].double()[None], stats]), d)
        loss_sum, correct, n_all, tokens_all = stats.tolist()
        peak, kind = _peak_memory(device)
        peak = torch.tensor(float(peak), dtype=torch.float64, device=device)
        peak = int(_all_reduce(peak, d, "max").item())
        loop_s = partial["time_s"] + time.perf_counter() - t0
        return {
            "loss": loss_sum / max(n_all, 1),
            "acc": correct / max(n_all, 1),
            "tokens": int(tokens_all),
            "tokens_per_s": tokens_all / max(loop_s, 1e-9),
            "peak_mem_bytes": peak,
            "peak_mem_kind": kind,
            "time_s": loop_s,
        }

    def flush_steps(self) -> None:
        """Append the steps trained since the last call to steps.jsonl (rank 0), one line per optimizer step:
        ``step``, ``epoch``, ``epoch_step``, the ``loss`` and ``acc`` of the step's global batch (summed over
        ranks in one all-reduce here) and the ``lr`` of group 0. Every rank calls it together."""
        log, self.step_log = self.step_log, []
        if not log:
            return
        sums = torch.stack([torch.stack([loss, correct.double()]) for _, _, _, loss, correct, _, _ in log])
        sums = _all_reduce(sums, self.d).tolist()
        if not self.d.main:
            return
        lines = [
            json.dumps({"step": step, "epoch": epoch, "epoch_step": epoch_step, "loss": loss / size,
                        "acc": correct / size, "lr": lr})
            for (step, epoch, epoch_step, _, _, size, lr), (loss, correct) in zip(log, sums)
        ]
        with self.steps_path.open("a") as fh:
            fh.write("".join(line + "\n" for line in lines))
            fh.flush()
            os.fsync(fh.fileno())

    def save_last(self, *, epoch_step: int = 0, partial: dict[str, Any] | None = None) -> None:
        """Write steps.jsonl's new lines and last.pt (rank 0; every rank contributes its RNG states and
        partial sums)."""
        self.flush_steps()
        ranks = _gather({"rng": _rng_state(), "partial": partial}, self.d)
        if not self.d.main:
            return
        _save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                **self.state,
                "epoch_step": epoch_step,
                "partial": partial,
                "steps_per_epoch": self.steps_per_epoch,
                "world_size": self.d.world_size,
                "rng": ranks[0]["rng"],
                "ranks": ranks if self.d.active else None,
                "data_order": {
                    "seed": self.cfg.seed, "next_epoch": self.state["epoch"], "next_step": epoch_step
                },
                "config": asdict(self.cfg),
            },
            self.last_path,
        )

    def resume(self, records_path: Path) -> tuple[int, dict[str, Any] | None, list[dict[str, Any]]]:
        """Load last.pt on every rank; returns (step within the epoch, this rank's partial sums, records)."""
        cfg, d, path = self.cfg, self.d, self.last_path
        ckpt = _load_checkpoint(path, ("model", "optimizer", "scheduler", "rng", "config", "steps_per_epoch",
                                       *self.state))
        try:
            self.model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise CheckpointError(
                f"{path} holds a different model; use another output directory or resume=False "
                f"(--no-resume) to start afresh. {err}"
            ) from err
        new_base = list(self.scheduler.base_lrs)
        new_wd = [g["weight_decay"] for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
        except (ValueError, KeyError, RuntimeError) as err:
            raise CheckpointError(
                f"{path}: its optimizer state does not fit this model's parameter groups ({err}); use "
                "another output directory or --no-resume"
            ) from err
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        old_base = list(self.scheduler.base_lrs)
        old_wd = [g["weight_decay"] for g in self.optimizer.param_groups]
        if old_base != new_base or old_wd != new_wd:  # the configuration's rates, not the checkpoint's
            self.scheduler.base_lrs = new_base
            for i, g in enumerate(self.optimizer.param_groups):
                g["initial_lr"], g["weight_decay"] = new_base[i], new_wd[i]
                g["lr"] = new_base[i] * self.scheduler.lr_lambdas[i](self.scheduler.last_epoch)
            self.scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        self.state.update({k: ckpt[k] for k in self.state})
        old_world = ckpt.get("world_size", 1)
        ranks = ckpt.get("ranks")
        if old_world == d.world_size and ranks:
            rng, partial = ranks[d.rank]["rng"], ranks[d.rank]["partial"]
        elif d.main:
            rng = ckpt["rng"]
            parts = [r["partial"] for r in ranks] if ranks else [ckpt.get("partial")]
            partial = None if parts[0] is None else {k: sum(p[k] for p in parts) for k in parts[0]}
            if partial is not None:
                partial["time_s"] /= len(parts)
        else:
            rng = None
            seed_everything(_mix(cfg.seed, 2**31 + d.rank + self.state["step"]))
            partial = None if ckpt.get("partial") is None and not ranks else {
                "loss_sum": 0.0, "correct": 0, "n": 0, "tokens": 0, "time_s": 0.0
            }
        if rng is not None:
            _set_rng_state(rng)
        epoch_step = ckpt.get("epoch_step", 0)

        old = ckpt["config"]
        changed = [k for k, v in old.items() if k not in _RESUME_NEUTRAL and getattr(cfg, k, v) != v]
        if changed or ckpt["steps_per_epoch"] != self.steps_per_epoch:
            self.say(
                f"note: resuming with changed {changed or 'steps per epoch'}; the run will not match an "
                "uninterrupted one"
            )
        applied = [k for k in _RESUME_HPARAMS if k in changed]
        if applied:
            self.say(
                f"note: the new {', '.join(applied)} apply from step {self.state['step']} on (group "
                f"learning rates {old_base} -> {new_base}, weight decays {old_wd} -> {new_wd}); the schedule "
                "keeps its position"
            )
        if old_world != d.world_size:
            self.say(
                f"note: resuming a run of world size {old_world} with world size {d.world_size}: the same "
                "sequence of global batches follows, but not bit for bit (other reduction orders and RNG "
                "streams)"
            )
        if epoch_step >= self.steps_per_epoch:  # fewer steps per epoch now: the epoch is over
            epoch_step, partial = 0, None
        records = []
        if d.main:
            records = [r for r in _read_metrics(records_path) if r.get("epoch", 0) <= self.state["epoch"]]
        where = f" and {epoch_step} step(s) of epoch {self.state['epoch'] + 1}" if epoch_step else ""
        self.say(f"resumed from {path} after epoch {self.state['epoch']}{where} (step {self.state['step']})")
        return epoch_step, partial, records


def train(
    model: nn.Module,
    train_ds: Dataset,
    val_ds: Dataset | None,
    test_ds: Dataset | None,
    cfg: Config,
    out_dir: str | os.PathLike,
    *,
    collate_fn: Callable | None = None,
    resume: bool = True,
    stop_after_epoch: int | None = None,
    stop_after_steps: int | None = None,
) -> dict[str, Any]:
    """Train a classifier, checkpoint every epoch, evaluate the best checkpoint on the test set.

    Args:
        model: maps ``x`` (and ``lengths=`` when the batches carry them) to logits (B, classes).
        train_ds, val_ds, test_ds: map-style datasets; ``val_ds``/``test_ds`` may be None. With ``collate_fn``
            None, items are ``(x, y)``; a ``collate_fn`` returns ``(x, y)`` or ``(x, y, lengths)`` batches.
        cfg: the run's :class:`Config`.
        out_dir: created if needed (NotADirectoryError when it is a file); receives ``metrics.jsonl`` (one
            JSON object per epoch: epoch, step, train_loss, train_acc, val_loss, val_acc, lr, lrs,
            epoch_time_s, tokens, tokens_per_s, peak_mem_bytes, peak_mem_kind), ``steps.jsonl`` (one per
            optimizer step: step, epoch, epoch_step, loss, acc, lr; see ``_Trainer.flush_steps``), ``last.pt``
            (model, optimizer, scheduler, scaler, epoch, step, epoch_step, best val, RNG states of every rank,
            data-order state, config; written at each epoch end and every ``cfg.checkpoint_every`` steps),
            ``best.pt`` (model of the best val accuracy, or the latest without ``val_ds``), ``curves.png``
            (training per step, validation per epoch: :func:`plot_curves`) and ``summary.json``.
        resume: continue from ``out_dir/last.pt`` when it exists (a damaged file raises
            :class:`CheckpointError` naming it; the configuration's lr, lr_ssm and weight_decay replace the
            checkpoint's); otherwise start afresh (re-seeding with ``cfg.seed``, deleting an earlier run's
            files in ``out_dir`` and overwriting ``metrics.jsonl``).
        stop_after_epoch: end this call once that many epochs are complete, as if interrupted (the schedule
            still spans ``cfg.epochs``); a later call with ``resume=True`` continues.
        stop_after_steps: end this call after that many optimizer steps in all, without a checkpoint, as if
            killed (for tests of mid-epoch resume with ``cfg.checkpoint_every``).

    Distributed: under ``torchrun`` (or inside an initialized process group) every rank calls ``train``
    with the same arguments. ``cfg.batch_size`` is the global batch: each rank takes ``batch_size /
    world_size`` items of every global batch (a :class:`ConfigError`, a ValueError, when ``world_size *
    accumulate`` does not divide it), gradients are averaged by DistributedDataParallel so that the step is
    that of the global batch, batch norms become synchronized ones (:func:`sync_batchnorm`), metrics are
    reduced over ranks, and rank 0 alone prints and writes files; every rank reads ``last.pt`` on resume.

    Returns:
        The summary also written to ``summary.json``: finished, epochs_completed, steps, best_epoch,
        best_val_acc, best_val_loss, test_acc, test_loss (None until finished, or without ``test_ds``),
        n_params, train_time_s (summed over resumptions), tokens_per_s (last epoch), peak_mem_bytes,
        device, world_size, accumulate, precision, out_dir, config. When finished, ``model`` holds the best
        checkpoint's weights.
    """
    if not isinstance(cfg, Config):
        raise ValueError(f"cfg must be a Config; got {type(cfg).__name__}")
    if len(train_ds) == 0:
        raise ValueError("train_ds must not be empty")
    if stop_after_epoch is not None:
        check_int("stop_after_epoch", stop_after_epoch, minimum=1)
    if stop_after_steps is not None:
        check_int("stop_after_steps", stop_after_steps, minimum=1)
    out = check_out_dir(out_dir)
    with distributed(cfg.device) as d, out_lock(out, d):
        return _train(
            model, train_ds, val_ds, test_ds, cfg, out, d, collate_fn, resume, stop_after_epoch,
            stop_after_steps,
        )


def _train(
    model, train_ds, val_ds, test_ds, cfg, out, d, collate_fn, resume, stop_after_epoch, stop_after_steps
) -> dict[str, Any]:
    parts = d.world_size * cfg.accumulate
    if cfg.batch_size % parts:
        raise ConfigError(
            f"batch_size {cfg.batch_size} (the global batch) must be divisible by world_size * accumulate = "
            f"{d.world_size} * {cfg.accumulate}: each rank takes batch_size / world_size items per step, in "
            "accumulate micro-batches"
        )
    if steps_per_epoch(len(train_ds), cfg, d.world_size) == 0:
        raise ConfigError(f"train_ds has {len(train_ds)} items: fewer than one per micro-batch ({parts})")
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device, local_rank=d.local_rank if d.active else None)
    if cfg.dtype == "float64":
        model.double()
    model.to(device)
    if d.active:
        sync_batchnorm(model, device)
    metrics_path, last_path, best_path = out / "metrics.jsonl", out / "last.pt", out / "best.pt"
    run = _Trainer(model, train_ds, cfg, device, d, collate_fn, last_path, stop_after_steps)
    state = run.state

    epoch_step, partial = 0, None
    resumed = _broadcast(resume and last_path.exists(), d)
    if resumed:
        epoch_step, partial, records = run.resume(metrics_path)
    else:
        seed_everything(cfg.seed if d.main else _mix(cfg.seed, 2**31 + d.rank))
        records = []
        if d.main:
            for stale in (last_path, best_path, out / "curves.png", out / "summary.json", run.steps_path):
                stale.unlink(missing_ok=True)
    if d.main:
        _write_metrics(metrics_path, records)
        kept = [r for r in _read_metrics(run.steps_path) if r["step"] <= state["step"]] if resumed else []
        _write_metrics(run.steps_path, kept)  # the steps up to last.pt's (none when starting afresh)

    n_params = count_parameters(model)
    plot_notes: set[str] = set()
    stopped = False
    for epoch in range(state["epoch"], cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        t0 = time.perf_counter()
        before = partial["time_s"] if partial else 0.0
        tr = run.run_epoch(epoch, epoch_step, partial)
        epoch_step, partial = 0, None
        if tr is None:
            stopped = True
            break
        if not math.isfinite(tr["loss"]):
            raise FloatingPointError(
                f"training loss became {tr['loss']} in epoch {epoch + 1}; lower lr/lr_ssm or set grad_clip"
            )
        va = None
        if val_ds is not None and len(val_ds) > 0:
            va = evaluate(run.eval_net, val_ds, cfg, collate_fn=collate_fn, device=device, desc="val")
        elapsed = before + time.perf_counter() - t0
        state["epoch"] = epoch + 1
        state["train_time_s"] += elapsed - before
        record = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": va["loss"] if va else None,
            "val_acc": va["acc"] if va else None,
            "lr": run.optimizer.param_groups[0]["lr"],
            "lrs": [g["lr"] for g in run.optimizer.param_groups],
            "epoch_time_s": elapsed,
            "tokens": tr["tokens"],
            "tokens_per_s": tr["tokens_per_s"],
            "peak_mem_bytes": tr["peak_mem_bytes"],
            "peak_mem_kind": tr["peak_mem_kind"],
        }
        records.append(record)
        if va is None or state["best_val_acc"] is None or va["acc"] > state["best_val_acc"]:
            state["best_epoch"] = epoch + 1
            state["best_val_acc"] = va["acc"] if va else None
            state["best_val_loss"] = va["loss"] if va else None
            if d.main:
                _save({"model": model.state_dict(), "epoch": epoch + 1, "val": va}, best_path)
        if d.main:
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        run.save_last()
        val_text = f" val loss {va['loss']:.4f} acc {va['acc']:.4f}" if va else ""
        run.say(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {tr['loss']:.4f} acc {tr['acc']:.4f}{val_text} "
            f"lr {record['lr']:.3g} ({elapsed:.1f} s, {tr['tokens_per_s']:.3g} tok/s, peak "
            f"{_fmt_bytes(tr['peak_mem_bytes'])})"
        )
        if elapsed >= _REPLOT_SECONDS and d.main:  # refresh the curves during long runs; drawn at the end
            _plot(records, run.steps_path, out, plot_notes)
    if records and d.main:
        _plot(records, run.steps_path, out, plot_notes)

    finished = state["epoch"] >= cfg.epochs and not stopped
    test = None
    if finished and test_ds is not None:
        if _broadcast(best_path.exists(), d):
            if d.active:
                dist.barrier()  # rank 0 wrote best.pt
            model.load_state_dict(_load_checkpoint(best_path, ("model",))["model"])
        test = evaluate(run.eval_net, test_ds, cfg, collate_fn=collate_fn, device=device, desc="test")
        best = state["best_epoch"]
        run.say(f"test (best epoch {best}): loss {test['loss']:.4f} acc {test['acc']:.4f}")
    summary = {
        "finished": finished,
        "epochs_completed": state["epoch"],
        "steps": state["step"],
        "best_epoch": state["best_epoch"],
        "best_val_acc": state["best_val_acc"],
        "best_val_loss": state["best_val_loss"],
        "test_acc": test["acc"] if test else None,
        "test_loss": test["loss"] if test else None,
        "n_params": n_params,
        "train_time_s": state["train_time_s"],
        "tokens_per_s": records[-1].get("tokens_per_s") if records else None,
        "peak_mem_bytes": max((r.get("peak_mem_bytes") or 0 for r in records), default=None),
        "device": str(device),
        "world_size": d.world_size,
        "accumulate": cfg.accumulate,
        "precision": cfg.precision,
        "out_dir": str(out),
        "config": asdict(cfg),
    }
    if d.main:
        _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary
