"""The training harness shared by the examples (fashion_mnist.py, lra.py).

One configuration dataclass with command-line overrides, a model builder for :class:`ssm.SSMModel`, and
:func:`train`: AdamW over :func:`ssm.optim.param_groups`, linear warmup then cosine decay, a progress bar,
per-epoch metrics in ``metrics.jsonl``, ``last.pt``/``best.pt`` checkpoints with exact resume, the final
test accuracy of the best checkpoint, ``curves.png`` and ``summary.json``.

Exact resume: the data order of epoch ``e`` is a function of ``(seed, e)`` only, and ``last.pt`` holds the
model, optimizer, scheduler and the torch/CUDA/numpy/python RNG states at the end of each epoch, so a run
interrupted after epoch k and resumed ends with the same parameters, bit for bit, as one that never
stopped, provided the device and configuration are the same (a changed configuration is reported) and
the dataset draws its randomness, if any, from those generators.

``examples/`` is not a package: the scripts ``import harness`` (Python puts a script's folder first on
``sys.path``, so ``python examples/lra.py`` works from any directory); the tests find it through the
``pythonpath`` setting of pytest in pyproject.toml. The name is unique on purpose: ``benchmarks/`` has its
own ``common.py``, and both folders are importable in one pytest process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

try:
    import ssm  # noqa: F401
except ImportError:  # running from a checkout without installing: use the repository's package
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ssm._checks import check_choice, check_int, check_positive

MODELS = ("s4", "s4d", "rtf")
SCHEDULERS = ("cosine", "constant")

# Fields whose change between a run and its resumption does not break exact resume.
_RESUME_NEUTRAL = ("device", "num_workers", "progress", "eval_batch_size", "max_eval_steps")
# Fields that may be None (set from the command line with the word "none").
_OPTIONAL_INTS = ("max_steps_per_epoch", "max_eval_steps", "eval_batch_size")
# curves.png is redrawn after every epoch that took at least this long, and at the end of each call.
_REPLOT_SECONDS = 30.0

_HELP = {
    "model": "SSM layer: s4, s4d or rtf",
    "d_model": "model width H",
    "n_layers": "number of residual SSM blocks",
    "d_state": "state size N of each SSM",
    "dropout": "dropout probability in the blocks",
    "norm": "normalization in the blocks: layer, batch or none (checked by ssm.SSMModel)",
    "prenorm": "normalize before (pre-norm) or after (post-norm) each block",
    "pool": "pooling over the sequence before the head: mean or last (checked by ssm.SSMModel)",
    "ff": "expansion factor of a GELU feed-forward branch after each SSM layer (0: none)",
    "lr": "learning rate of all non-SSM parameters",
    "lr_ssm": "learning rate of the SSM parameters (no weight decay on them)",
    "weight_decay": "AdamW weight decay of the non-SSM parameters",
    "epochs": "number of training epochs",
    "batch_size": "training batch size",
    "warmup": "linear learning-rate warmup, in optimizer steps",
    "scheduler": "learning-rate schedule after warmup: cosine (to 0 at the end) or constant",
    "grad_clip": "clip the global gradient norm to this value (0: no clipping)",
    "seed": "seed of the initialization, the data order and dropout",
    "num_workers": "DataLoader worker processes",
    "max_steps_per_epoch": "cap on optimizer steps per epoch, for smoke tests ('none': no cap)",
    "max_eval_steps": "cap on batches per evaluation, for smoke tests ('none': the whole split)",
    "eval_batch_size": "evaluation batch size ('none': the training batch size)",
    "device": "auto, cpu, cuda or cuda:N",
    "progress": "show a progress bar (tqdm when installed, else periodic prints)",
}


@dataclass(frozen=True)
class Config:
    """Everything that defines a training run; validated on construction (ValueError naming the field).

    Model: ``model`` ("s4", "s4d", "rtf"), ``d_model`` (H), ``n_layers``, ``d_state`` (N), ``dropout``,
    ``norm``, ``prenorm``, ``pool``, ``ff`` (see :class:`ssm.SSMModel`). Optimization: AdamW with ``lr`` and
    ``weight_decay`` for ordinary parameters and ``lr_ssm`` (no weight decay) for SSM parameters;
    ``warmup`` optimizer steps of linear warmup, then ``scheduler`` ("cosine" to 0, or "constant");
    ``grad_clip`` (0: off). Run: ``epochs``, ``batch_size``, ``seed``, ``num_workers``, ``device``
    ("auto", "cpu", "cuda[:N]"), ``progress``; smoke-test caps ``max_steps_per_epoch`` and
    ``max_eval_steps`` and ``eval_batch_size`` (None: no cap / the training batch size).
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
        check_choice("scheduler", self.scheduler, SCHEDULERS)
        for name in ("norm", "pool", "device"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string; got {getattr(self, name)!r}")
        for name in ("prenorm", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")
        for name in ("d_model", "n_layers", "d_state", "epochs", "batch_size"):
            check_int(name, getattr(self, name), minimum=1)
        for name in ("ff", "warmup", "seed", "num_workers"):
            check_int(name, getattr(self, name), minimum=0)
        for name in _OPTIONAL_INTS:
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), minimum=1)
        check_positive("lr", self.lr)
        check_positive("lr_ssm", self.lr_ssm)
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0; got {value!r}")
        dropout = self.dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
            raise ValueError(f"dropout must be a number in [0, 1); got {self.dropout!r}")


# ----------------------------------------------------------------------------------------------------------
# Command line


def optional_int(text: str) -> int | None:
    """An argparse ``type``: an integer, or None for the word "none" (any case)."""
    return None if text.lower() == "none" else int(text)


def add_config_args(
    parser: argparse.ArgumentParser,
    base: Config | None = None,
    *,
    title: str = "training configuration",
) -> argparse.ArgumentParser:
    """Add ``--<field>`` options (dashes for underscores) for every :class:`Config` field to ``parser``.

    Options left out keep the value of the configuration they are applied to (see :func:`config_from_args`);
    ``base`` only supplies the defaults shown in ``--help``. Booleans take ``--prenorm/--no-prenorm``;
    optional integers take ``none``. The options form an argument group named ``title``.
    """
    base = base if base is not None else Config()
    group = parser.add_argument_group(title)
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        value = getattr(base, f.name)
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS}
        kwargs["help"] = f"{_HELP[f.name]} (default: {value})"
        if isinstance(value, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in _OPTIONAL_INTS:
            kwargs["type"] = optional_int
        elif f.name == "model":
            kwargs["choices"] = MODELS
        elif f.name == "scheduler":
            kwargs["choices"] = SCHEDULERS
        else:
            kwargs["type"] = type(value)
        group.add_argument(flag, **kwargs)
    return parser


def config_from_args(args: argparse.Namespace, base: Config) -> Config:
    """``base`` with every :class:`Config` field given on the command line replaced (and validated)."""
    names = {f.name for f in fields(Config)}
    return replace(base, **{k: v for k, v in vars(args).items() if k in names})


def add_run_args(parser: argparse.ArgumentParser, default_out: str) -> argparse.ArgumentParser:
    """Add ``--out DIR`` and ``--resume/--no-resume`` (resume from ``DIR/last.pt`` when present)."""
    parser.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument(
        "--resume",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="continue from OUT/last.pt when it exists (default: on)",
    )
    return parser


# ----------------------------------------------------------------------------------------------------------
# Building blocks


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise ``torch.device(name)`` (which must exist)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N'; got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was requested but CUDA is not available; use --device cpu")
    return device


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
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _unpack(batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    if not isinstance(batch, (tuple, list)) or len(batch) not in (2, 3):
        raise ValueError(
            "batch must be (x, y) or (x, y, lengths) as the collate_fn returns it; "
            f"got {type(batch).__name__} of length {len(batch) if isinstance(batch, (tuple, list)) else '?'}"
        )
    x = batch[0].to(device, non_blocking=True)
    y = torch.as_tensor(batch[1]).to(device, non_blocking=True)
    lengths = batch[2].to(device, non_blocking=True) if len(batch) == 3 else None
    return x, y, lengths


def _forward(model: nn.Module, x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    return model(x) if lengths is None else model(x, lengths=lengths)


class _Progress:
    """tqdm when importable, else a line every ~10% of the steps; silent when disabled."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.count = total, desc, enabled, 0
        self.bar = None
        self.every = max(1, total // 10)
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)

    def update(self, sums: dict[str, torch.Tensor], n: int) -> None:
        """One step done; ``sums[k] / n`` are the running means shown (read only when shown)."""
        self.count += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(1)
            if self.count % 10 == 0 or self.count == self.total:
                self.bar.set_postfix({k: f"{v.item() / n:.4g}" for k, v in sums.items()}, refresh=False)
        elif self.count % self.every == 0 or self.count == self.total:
            text = " ".join(f"{k} {v.item() / n:.4g}" for k, v in sums.items())
            print(f"{self.desc}: {self.count}/{self.total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------------------------------------
# Evaluation and training


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

    Uses at most ``cfg.max_eval_steps`` batches of ``cfg.eval_batch_size`` (default ``cfg.batch_size``).
    """
    device = device if device is not None else resolve_device(cfg.device)
    was_training = model.training
    model.eval()
    loader = DataLoader(
        dataset,
        batch_size=cfg.eval_batch_size or cfg.batch_size,
        shuffle=False,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    total = len(loader) if cfg.max_eval_steps is None else min(len(loader), cfg.max_eval_steps)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    bar = _Progress(total, desc, cfg.progress)
    for i, batch in enumerate(loader):
        if i == total:
            break
        x, y, lengths = _unpack(batch, device)
        logits = _forward(model, x, lengths)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(-1) == y).sum()
        n += y.shape[0]
        bar.update({"acc": correct}, n)
    bar.close()
    model.train(was_training)
    return {"loss": loss_sum.item() / max(n, 1), "acc": correct.item() / max(n, 1), "n": n}


def _train_epoch(model, optimizer, scheduler, train_ds, cfg, device, epoch, collate_fn) -> dict[str, float]:
    model.train()
    order = epoch_order(len(train_ds), cfg.seed, epoch)
    if cfg.max_steps_per_epoch is not None:
        order = order[: cfg.max_steps_per_epoch * cfg.batch_size]
    loader = DataLoader(
        train_ds,
        batch_size=cfg.batch_size,
        sampler=order.tolist(),
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(_mix(cfg.seed, epoch)),
    )
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    n = 0
    params = [p for p in model.parameters() if p.requires_grad]
    bar = _Progress(len(loader), f"epoch {epoch + 1}/{cfg.epochs}", cfg.progress)
    for batch in loader:
        x, y, lengths = _unpack(batch, device)
        logits = _forward(model, x, lengths)
        loss = F.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach().double() * y.shape[0]
        correct += (logits.detach().argmax(-1) == y).sum()
        n += y.shape[0]
        bar.update({"loss": loss_sum, "acc": correct}, n)
    bar.close()
    return {"loss": loss_sum.item() / max(n, 1), "acc": correct.item() / max(n, 1), "steps": len(loader)}


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


def _save(obj: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_metrics(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def plot_curves(records: Sequence[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Write loss, accuracy and learning-rate curves per epoch to ``path`` (PNG).

    Returns False (writing nothing) when matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    epochs = [r["epoch"] for r in records]
    fig = Figure(figsize=(13, 3.6), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    for key, ax in (("loss", ax_loss), ("acc", ax_acc)):
        for split in ("train", "val"):
            ys = [r.get(f"{split}_{key}") for r in records]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], marker="o", label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel("cross-entropy" if key == "loss" else "accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
    ax_lr.plot(epochs, [r["lr"] for r in records], marker="o")
    ax_lr.set_xlabel("epoch")
    ax_lr.set_ylabel("learning rate (end of epoch)")
    ax_lr.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return True


def _plot(records: Sequence[dict[str, Any]], out: Path, noted: bool) -> bool:
    if not plot_curves(records, out / "curves.png") and not noted:
        print("matplotlib is not installed: skipping curves.png (pip install matplotlib)", flush=True)
        return True
    return noted


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
) -> dict[str, Any]:
    """Train a classifier, checkpoint every epoch, evaluate the best checkpoint on the test set.

    Args:
        model: maps ``x`` (and ``lengths=`` when the batches carry them) to logits (B, classes).
        train_ds, val_ds, test_ds: map-style datasets; ``val_ds``/``test_ds`` may be None. With ``collate_fn``
            None, items are ``(x, y)``; a ``collate_fn`` returns ``(x, y)`` or ``(x, y, lengths)`` batches.
        cfg: the run's :class:`Config`.
        out_dir: created if needed; receives ``metrics.jsonl`` (one JSON object per epoch: epoch, step,
            train_loss, train_acc, val_loss, val_acc, lr, lrs, epoch_time_s), ``last.pt`` (model, optimizer,
            scheduler, epoch, step, best val, RNG states, data-order state, config), ``best.pt`` (model of the
            best val accuracy, or the latest without ``val_ds``), ``curves.png`` and ``summary.json``.
        resume: continue from ``out_dir/last.pt`` when it exists; otherwise start afresh (re-seeding with
            ``cfg.seed``, deleting an earlier run's files in ``out_dir`` and overwriting ``metrics.jsonl``).
        stop_after_epoch: end this call once that many epochs are complete, as if interrupted (the schedule
            still spans ``cfg.epochs``); a later call with ``resume=True`` continues.

    Returns:
        The summary also written to ``summary.json``: finished, epochs_completed, steps, best_epoch,
        best_val_acc, best_val_loss, test_acc, test_loss (None until finished, or without ``test_ds``),
        n_params, train_time_s (summed over resumptions), device, out_dir, config. When finished, ``model``
        holds the best checkpoint's weights.
    """
    if not isinstance(cfg, Config):
        raise ValueError(f"cfg must be a Config; got {type(cfg).__name__}")
    if len(train_ds) == 0:
        raise ValueError("train_ds must not be empty")
    if stop_after_epoch is not None:
        check_int("stop_after_epoch", stop_after_epoch, minimum=1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    model.to(device)
    steps_per_epoch = math.ceil(len(train_ds) / cfg.batch_size)
    if cfg.max_steps_per_epoch is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    optimizer = make_optimizer(model, cfg)
    scheduler = make_scheduler(optimizer, cfg, cfg.epochs * steps_per_epoch)
    metrics_path, last_path, best_path = out / "metrics.jsonl", out / "last.pt", out / "best.pt"

    state = {
        "epoch": 0,
        "step": 0,
        "best_val_acc": None,
        "best_val_loss": None,
        "best_epoch": None,
        "train_time_s": 0.0,
    }
    if resume and last_path.exists():
        ckpt = torch.load(last_path, map_location="cpu", weights_only=True)
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as err:
            raise RuntimeError(
                f"{last_path} holds a different model; use another output directory or resume=False "
                f"(--no-resume) to start afresh. {err}"
            ) from err
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"])
        state.update({k: ckpt[k] for k in state})
        old = ckpt["config"]
        changed = [k for k, v in old.items() if k not in _RESUME_NEUTRAL and getattr(cfg, k, v) != v]
        if changed or ckpt["steps_per_epoch"] != steps_per_epoch:
            print(
                f"note: resuming with changed {changed or 'steps per epoch'}; the run will not match an "
                "uninterrupted one",
                flush=True,
            )
        records = [r for r in _read_metrics(metrics_path) if r["epoch"] <= state["epoch"]]
        print(f"resumed from {last_path} after epoch {state['epoch']} (step {state['step']})", flush=True)
    else:
        seed_everything(cfg.seed)
        records = []
        for stale in (last_path, best_path, out / "curves.png", out / "summary.json"):
            stale.unlink(missing_ok=True)
    _write_metrics(metrics_path, records)

    n_params = count_parameters(model)
    plot_note = False
    for epoch in range(state["epoch"], cfg.epochs):
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            break
        t0 = time.perf_counter()
        tr = _train_epoch(model, optimizer, scheduler, train_ds, cfg, device, epoch, collate_fn)
        if not math.isfinite(tr["loss"]):
            raise FloatingPointError(
                f"training loss became {tr['loss']} in epoch {epoch + 1}; lower lr/lr_ssm or set grad_clip"
            )
        va = None
        if val_ds is not None and len(val_ds) > 0:
            va = evaluate(model, val_ds, cfg, collate_fn=collate_fn, device=device, desc="val")
        elapsed = time.perf_counter() - t0
        state["epoch"], state["step"] = epoch + 1, state["step"] + tr["steps"]
        state["train_time_s"] += elapsed
        record = {
            "epoch": epoch + 1,
            "step": state["step"],
            "train_loss": tr["loss"],
            "train_acc": tr["acc"],
            "val_loss": va["loss"] if va else None,
            "val_acc": va["acc"] if va else None,
            "lr": optimizer.param_groups[0]["lr"],
            "lrs": [g["lr"] for g in optimizer.param_groups],
            "epoch_time_s": elapsed,
        }
        records.append(record)
        with metrics_path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if va is None or state["best_val_acc"] is None or va["acc"] > state["best_val_acc"]:
            state["best_epoch"] = epoch + 1
            state["best_val_acc"] = va["acc"] if va else None
            state["best_val_loss"] = va["loss"] if va else None
            _save({"model": model.state_dict(), "epoch": epoch + 1, "val": va}, best_path)
        _save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                **state,
                "steps_per_epoch": steps_per_epoch,
                "rng": _rng_state(),
                "data_order": {"seed": cfg.seed, "next_epoch": epoch + 1},
                "config": asdict(cfg),
            },
            last_path,
        )
        val_text = f" val loss {va['loss']:.4f} acc {va['acc']:.4f}" if va else ""
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: train loss {tr['loss']:.4f} acc {tr['acc']:.4f}{val_text} "
            f"lr {record['lr']:.3g} ({elapsed:.1f} s)",
            flush=True,
        )
        if elapsed >= _REPLOT_SECONDS:  # refresh the curves during long runs; always drawn at the end
            plot_note = _plot(records, out, plot_note)
    if records:
        _plot(records, out, plot_note)

    finished = state["epoch"] >= cfg.epochs
    test = None
    if finished and test_ds is not None:
        if best_path.exists():
            model.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["model"])
        test = evaluate(model, test_ds, cfg, collate_fn=collate_fn, device=device, desc="test")
        best = state["best_epoch"]
        print(f"test (best epoch {best}): loss {test['loss']:.4f} acc {test['acc']:.4f}", flush=True)
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
        "device": str(device),
        "out_dir": str(out),
        "config": asdict(cfg),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
