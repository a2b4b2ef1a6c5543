"""Train an S4, S4D or RTF classifier on a Long Range Arena task (Tay et al. 2021).

    python examples/lra.py --task listops                          # quick CPU run on generated ListOps
    python examples/lra.py --task listops --config s4 --model s4d  # the S4 paper's settings, S4D layers
    python examples/lra.py --task pathfinder32 --config quick      # generated Pathfinder, 32 x 32
    python examples/lra.py --task text --data /data/lra --config s4 --out runs/imdb
    torchrun --nproc_per_node=4 examples/lra.py --task listops --config s4   # 4 GPUs, DDP, same global batch
    python examples/lra.py --task listops --config s4 --precision bf16 --accumulate 2 --checkpoint-every 500

Tasks: ``listops``, ``text`` (IMDB bytes), ``retrieval`` (AAN pairs), ``image`` (grayscale CIFAR-10),
``pathfinder32``, ``pathfinder64``, ``pathfinder128``, ``pathx`` (= Pathfinder 128 x 128, hard); see
:mod:`ssm.data.lra` for the files each one reads. ``--data DIR`` points at the official files (the task's
folder or one above it, e.g. the unpacked ``lra_release``). Without ``--data``, ListOps and Pathfinder are
generated (:mod:`ssm.data.listops`, :mod:`ssm.data.pathfinder`) once into a cache folder, ``$SSM_CACHE/lra``
or ``~/.cache/ssm/lra`` (``--cache-dir`` overrides), one subfolder per generator setting, marked complete
only when every file is written (an interrupted generation is redone); the other tasks need ``--data``.

Retrieval is a pair task: one shared SSM encoder reads both documents (stacked along the batch) and an MLP
classifies ``[e1, e2, e1 * e2, e1 - e2]`` (LRA's and S4's head), see :class:`PairClassifier`.

Outputs in ``--out`` (default runs/lra/<task>-<model>-<config>), all from the harness in training_harness.py:
metrics.jsonl, last.pt, best.pt, curves.png, summary.json; the summary here adds the task, the data folder
and the majority-class accuracy of the test split. Running the same command again resumes from last.pt.

Scale (all in training_harness.py): under ``torchrun`` each process trains its share of every global batch
with DistributedDataParallel (NCCL on CUDA, gloo on CPU); ``--batch-size`` stays the global batch; rank 0
generates missing data, prints and writes the outputs; every rank resumes from last.pt. ``--accumulate N``,
``--precision {32,bf16,fp16}``, ``--compile``, ``--checkpoint-every STEPS`` and ``--gen-workers N``
(processes generating ListOps/Pathfinder) are the other knobs.

Configs:
    quick: CPU runs. For ListOps it is tuned to learn in a few minutes on 2 cores: it trains on 2,000
        generated expressions of LRA's lengths (500-2,000 tokens) for 2 epochs and is tested on a generated
        test split of the official size (2,000) and format; a bidirectional S4D model (2 layers, width 32)
        read at position 0 (``--pool first``, see :class:`FirstPosition`). Measured with the current
        generator (cache folders ``*-v2``): test accuracy 35.30% against a majority class of 17.45%
        (generator seed 0; seeds 1 and 2: 36.30% vs 17.40%, 36.15% vs 17.90%); on a 2-core CPU shared with
        other jobs, 3 minutes of wall time and 80 s of CPU time with ``OMP_NUM_THREADS=1`` (31.7 minutes
        with torch's two threads when the machine was busier). For the other tasks it is a small, short
        smoke configuration (subsets, truncated documents), not tuned.
    s4: the S4 paper's hyperparameters per task (see the comment above ``S4_PRESETS``).
    s5: the S5 paper's hyperparameters per task, S5 layers (see the comment above ``S5_PRESETS``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import threading
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import training_harness as harness  # before ssm: from a checkout it makes the repository's ssm importable
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset
from training_harness import Config

from ssm._checks import check_choice, check_int
from ssm.data.listops import write_listops
from ssm.data.lra import LRA_TASKS, load_lra
from ssm.data.pathfinder import DIFFICULTY_DIRS, write_pathfinder
from ssm.data.text import collate_pair

TASKS = ("listops", "text", "retrieval", "image", "pathfinder32", "pathfinder64", "pathfinder128", "pathx")
PATHFINDER_TASKS = ("pathfinder32", "pathfinder64", "pathfinder128", "pathx")
GENERATED_TASKS = ("listops", *PATHFINDER_TASKS)
CONFIGS = ("quick", "s4", "s5")

# Where the official files come from (tasks that cannot be generated).
SOURCES = {
    "text": "the IMDB reviews, https://ai.stanford.edu/~amaas/data/sentiment/aclImdb_v1.tar.gz "
    "(unpacks to aclImdb/{train,test}/{pos,neg}/<id>_<rating>.txt)",
    "retrieval": "the LRA release, https://storage.googleapis.com/long-range-arena/lra_release.gz "
    "(unpacks to lra_release/lra_release/tsv_data/new_aan_pairs.{train,eval,test}.tsv)",
    "image": "CIFAR-10 for Python, https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz "
    "(unpacks to cifar-10-batches-py/data_batch_1..5 and test_batch)",
}

# ----------------------------------------------------------------------------------------------------------
# The S4 paper's settings per task, from the S4 repository (github.com/state-spaces/s4), Hydra configs
# configs/experiment/lra/s4-lra-{listops,imdb,aan,cifar,pathfinder,pathx}.yaml (the S4 V2 configs that the
# repository's models/s4/experiments.md lists for LRA; listops/imdb/cifar/pathfinder at commit ab287c63,
# aan at d589d982, pathx at d27bdf99). All use S4 layers with HiPPO-LegS init, dt in [1e-3, 1e-1]
# (Path-X: [1e-4, 1e-1]), bidirectional kernels, a GLU after the output projection (postact: glu),
# AdamW with the SSM parameters (A, B) at their own lr without weight decay, and a cosine schedule with
# linear warmup (1,000 steps unless the file says otherwise):
#
#   task        layers d_model  N   norm   prenorm dropout  lr     SSM lr  wd    batch epochs warmup pool
#   listops        8    128    64  batch   False    0.0    0.01   0.001   0.05   50    40    1000  mean
#   text (imdb)    6    256    64  batch   True     0.0    0.01   0.001   0.05   16    32    1000  mean
#   retrieval      6    256    64  batch   True     0.0    0.01   0.001   0.05   64    20    2500  mean
#   image (cifar)  6    512    64  layer   False    0.1    0.01   0.001   0.05   50   200    1000  mean
#   pathfinder     6    256    64  batch   True     0.0    0.004  0.001   0.03   64   200    2500  last
#   pathx          6    256    64  batch   True     0.0    0.001  0.0005  0.05   16    50   50000  mean
#
# ("mean" is decoder mode "pool", S4's default.) Pathfinder 64 x 64 is not in the S4 paper: it takes the
# Pathfinder settings; pathfinder128 is Path-X. S4 lets dt follow the global lr (lr.dt: null); here every
# SSM parameter, dt included, takes the SSM lr.
# ----------------------------------------------------------------------------------------------------------


def _s4(**kwargs: Any) -> Config:
    base = dict(
        model="s4",
        d_state=64,
        dropout=0.0,
        norm="batch",
        prenorm=True,
        pool="mean",
        lr=0.01,
        lr_ssm=1e-3,
        weight_decay=0.05,
        warmup=1000,
        scheduler="cosine",
        grad_clip=0.0,
    )
    base.update(kwargs)
    return Config(**base)


_PATHFINDER_S4 = _s4(
    n_layers=6, d_model=256, pool="last", lr=0.004, weight_decay=0.03, batch_size=64, epochs=200, warmup=2500
)
_PATHX_S4 = _s4(n_layers=6, d_model=256, lr=0.001, lr_ssm=5e-4, batch_size=16, epochs=50, warmup=50000)

S4_PRESETS: dict[str, Config] = {
    "listops": _s4(n_layers=8, d_model=128, prenorm=False, batch_size=50, epochs=40),
    "text": _s4(n_layers=6, d_model=256, batch_size=16, epochs=32),
    "retrieval": _s4(n_layers=6, d_model=256, batch_size=64, epochs=20, warmup=2500),
    "image": _s4(
        n_layers=6, d_model=512, norm="layer", prenorm=False, dropout=0.1, batch_size=50, epochs=200
    ),
    "pathfinder32": _PATHFINDER_S4,
    "pathfinder64": _PATHFINDER_S4,
    "pathfinder128": _PATHX_S4,
    "pathx": _PATHX_S4,
}


def _quick(**kwargs: Any) -> Config:
    base = dict(
        model="s4d",
        d_model=64,
        n_layers=2,
        d_state=32,
        dropout=0.0,
        norm="layer",
        prenorm=True,
        pool="mean",
        lr=0.01,
        lr_ssm=0.002,
        weight_decay=0.01,
        epochs=2,
        batch_size=32,
        warmup=50,
        scheduler="cosine",
        grad_clip=0.0,
        eval_batch_size=64,
    )
    base.update(kwargs)
    return Config(**base)


QUICK_PRESETS: dict[str, Config] = {
    # Tuned on generated ListOps (see the module docstring): small batches for many updates, a high SSM
    # lr, and the output read at position 0 of a bidirectional model (pool "first", see FirstPosition),
    # where the top-level operator sits; mean pooling over ~1,000 tokens dilutes it and does not learn
    # within this budget.
    "listops": _quick(
        d_model=32,
        n_layers=2,
        d_state=16,
        pool="first",
        lr=0.01,
        lr_ssm=0.01,
        weight_decay=0.01,
        epochs=2,
        batch_size=8,
        warmup=20,
    ),
    "text": _quick(),
    "retrieval": _quick(),
    "image": _quick(),
    "pathfinder32": _quick(epochs=4),
    "pathfinder64": _quick(),
    "pathfinder128": _quick(batch_size=16),
    "pathx": _quick(batch_size=16),
}

# ----------------------------------------------------------------------------------------------------------
# The S5 paper's settings per task (Smith, Warrington, Linderman, ICLR 2023, Appendix, Table 11 "the main
# hyperparameters used for each experiment"), as released in the paper's repository
# (github.com/lindermanlab/S5, bin/run_experiments/run_lra_{listops,imdb,aan,cifar,pathfinder,pathx}.sh;
# LR = lr_factor * ssm_lr_base there). All: S5 layers, zoh, conjugate symmetry, bidirectional, batch norm,
# pre-norm, mean pooling, dt in [1e-3, 1e-1] (Path-X: [1e-4, 1e-1]), a GLU after the output projection
# (S5's "half_glu"), AdamW with Lambda, B and dt at the SSM lr without weight decay, cosine schedule after a
# linear warmup of one epoch (S5's warmup_end=1; here in optimizer steps for the official training-set
# sizes; IMDB: none):
#
#   task        layers  H    P    J  dropout  lr      SSM lr  batch epochs  wd    warmup (steps)
#   listops        8   128   16   8   0.0    0.003   0.001    50    40   0.04   1920  (96,000 / 50)
#   text (imdb)    6   256  192  12   0.1    0.004   0.001    50    35   0.07      0
#   retrieval      6   128  256  16   0.0    0.002   0.001    32    20   0.05   4597  (147,086 / 32)
#   image (cifar)  6   512  384   3   0.1    0.0045  0.001    50   250   0.07    900  (45,000 / 50)
#   pathfinder     6   192  256   8   0.05   0.0045  0.0009   64   200   0.03   2500  (160,000 / 64)
#   pathx          6   128  256  16   0.0    0.0018  0.0006   32    75   0.06   5000  (160,000 / 32)
#
# Not carried over: S5's per-task optimizer variants ("BfastandCdecay" for ListOps and CIFAR puts B at the
# global lr with weight decay; "dt_global" for IMDB and AAN puts dt at the global lr), its C initializations
# other than truncated normal (lecun_normal for ListOps, IMDB and CIFAR; complex normal for Path-X), CIFAR's
# eigenvalue clipping and the batch-norm momentum (0.9 for Pathfinder and Path-X): here every Lambda, B and
# dt takes the SSM lr without weight decay, C follows the global settings.
# ----------------------------------------------------------------------------------------------------------


def _s5(**kwargs: Any) -> Config:
    base = dict(model="s5", dropout=0.0, norm="batch", prenorm=True, pool="mean", scheduler="cosine",
                grad_clip=0.0)
    base.update(kwargs)
    return Config(**base)


_PATHFINDER_S5 = _s5(n_layers=6, d_model=192, d_state=256, dropout=0.05, lr=0.0045, lr_ssm=0.0009,
                     weight_decay=0.03, batch_size=64, epochs=200, warmup=2500)
_PATHX_S5 = _s5(n_layers=6, d_model=128, d_state=256, lr=0.0018, lr_ssm=0.0006, weight_decay=0.06,
                batch_size=32, epochs=75, warmup=5000)

S5_PRESETS: dict[str, Config] = {
    "listops": _s5(n_layers=8, d_model=128, d_state=16, lr=0.003, lr_ssm=0.001, weight_decay=0.04,
                   batch_size=50, epochs=40, warmup=1920),
    "text": _s5(n_layers=6, d_model=256, d_state=192, dropout=0.1, lr=0.004, lr_ssm=0.001, weight_decay=0.07,
                batch_size=50, epochs=35, warmup=0),
    "retrieval": _s5(n_layers=6, d_model=128, d_state=256, lr=0.002, lr_ssm=0.001, weight_decay=0.05,
                     batch_size=32, epochs=20, warmup=4597),
    "image": _s5(n_layers=6, d_model=512, d_state=384, dropout=0.1, lr=0.0045, lr_ssm=0.001,
                 weight_decay=0.07, batch_size=50, epochs=250, warmup=900),
    "pathfinder32": _PATHFINDER_S5,
    "pathfinder64": _PATHFINDER_S5,
    "pathfinder128": _PATHX_S5,
    "pathx": _PATHX_S5,
}
S5_BLOCKS = {"listops": 8, "text": 12, "retrieval": 16, "image": 3, "pathfinder32": 8, "pathfinder64": 8,
             "pathfinder128": 16, "pathx": 16}

PRESETS: dict[str, dict[str, Config]] = {"quick": QUICK_PRESETS, "s4": S4_PRESETS, "s5": S5_PRESETS}

# Everything besides the Config: model options, data subsets and truncation, generator sizes.
# bidirectional/glu/dt_min/dt_max: layer options (S4 configs: bidirectional, postact glu, dt range);
# train/val/test_subset: seeded subsets of the splits (None: all); truncate: ids kept per document
# (token tasks; None: the task's LRA length); listops: generator sizes and lengths; pathfinder_n: images.
_S4_EXTRA = dict(bidirectional=True, glu=True, dt_min=1e-3, dt_max=1e-1)
_QUICK_EXTRA = dict(bidirectional=True, glu=False, dt_min=1e-3, dt_max=1e-1)
_OFFICIAL_LISTOPS = dict(train=96_000, val=2_000, test=2_000, min_length=500, max_length=2000)
_SUBSETS = dict(train_subset=None, val_subset=None, test_subset=None, truncate=None)

EXTRAS: dict[str, dict[str, dict[str, Any]]] = {
    "s4": {
        task: {**_S4_EXTRA, **_SUBSETS, "listops": _OFFICIAL_LISTOPS, "pathfinder_n": 200_000}
        for task in TASKS
    },
    "quick": {
        task: {**_QUICK_EXTRA, **_SUBSETS, "listops": _OFFICIAL_LISTOPS, "pathfinder_n": 2_000}
        for task in TASKS
    },
}
EXTRAS["s4"]["pathx"]["dt_min"] = EXTRAS["s4"]["pathfinder128"]["dt_min"] = 1e-4
EXTRAS["quick"]["listops"]["listops"] = dict(
    train=2_000, val=500, test=2_000, min_length=500, max_length=2000
)
for _task in ("text", "retrieval"):
    EXTRAS["quick"][_task].update(train_subset=2_000, val_subset=500, test_subset=2_000, truncate=1024)
EXTRAS["quick"]["image"].update(train_subset=5_000, val_subset=1_000, test_subset=2_000)
for _task, _n in (("pathfinder64", 1_000), ("pathfinder128", 500), ("pathx", 500)):
    EXTRAS["quick"][_task]["pathfinder_n"] = _n
# s5: the S4 extras (bidirectional, GLU, full data) plus the number of blocks J of the initialization
EXTRAS["s5"] = {task: {**EXTRAS["s4"][task], "listops": dict(_OFFICIAL_LISTOPS), "blocks": S5_BLOCKS[task]}
                for task in TASKS}


# ----------------------------------------------------------------------------------------------------------
# Retrieval: a shared encoder over both documents


class PairClassifier(nn.Module):
    """Classify a pair of sequences from one shared encoder: MLP([e1, e2, e1 * e2, e1 - e2]).

    Args:
        encoder: maps ``x`` (B, L[, d]) and ``lengths=`` (B,) to pooled features (B, d_features), e.g. an
            :class:`ssm.SSMModel` whose decoder is ``nn.Identity()`` (see :func:`build_pair_model`).
        d_features: width of the encoder's output.
        num_classes: number of classes.
        d_hidden: width of the MLP's hidden layer (default ``d_features``).

    Shapes: forward x (B, 2, L) token ids (or (B, 2, L, d) features), lengths (B, 2) -> logits
    (B, num_classes). Both documents go through the encoder as one batch of 2B sequences (S4's setup).
    """

    def __init__(self, encoder: nn.Module, d_features: int, num_classes: int, *, d_hidden: int | None = None):
        super().__init__()
        d_features = check_int("d_features", d_features, minimum=1)
        num_classes = check_int("num_classes", num_classes, minimum=1)
        d_hidden = check_int("d_hidden", d_features if d_hidden is None else d_hidden, minimum=1)
        self.encoder = encoder
        self.head = nn.Sequential(
            nn.Linear(4 * d_features, d_hidden), nn.ReLU(), nn.Linear(d_hidden, num_classes)
        )

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim < 3 or x.shape[1] != 2:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must stack the two documents as (B, 2, L) or (B, 2, L, d); got {got}")
        Bsz = x.shape[0]
        both = torch.cat([x[:, 0], x[:, 1]])  # (2B, L[, d])
        if lengths is None:
            e = self.encoder(both)
        else:
            if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (Bsz, 2):
                got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
                raise ValueError(f"lengths must have shape ({Bsz}, 2), one length per document; got {got}")
            e = self.encoder(both, lengths=torch.cat([lengths[:, 0], lengths[:, 1]]))
        e1, e2 = e[:Bsz], e[Bsz:]  # (B, d_features) each
        return self.head(torch.cat([e1, e2, e1 * e2, e1 - e2], dim=-1))


def collate_stacked_pair(batch) -> tuple[Tensor, Tensor, Tensor]:
    """Collate Retrieval items ``(ids1, ids2, label)`` into ``(x (B, 2, L), y (B,), lengths (B, 2))``.

    Both documents are padded with 0 to the batch's longest document (:func:`ssm.data.text.collate_pair`)
    and stacked, so that the harness sees an ordinary ``(x, y, lengths)`` batch.
    """
    x1, x2, y, len1, len2 = collate_pair(batch)
    return torch.stack([x1, x2], dim=1), y, torch.stack([len1, len2], dim=1)


class FirstPosition(nn.Module):
    """Read a per-position model at position 0: ``model(x, lengths=lengths)[:, 0]``.

    With bidirectional layers the anti-causal half of every layer carries the whole sequence back to
    position 0, so position 0 summarizes it, as the last position does in a causal model (or a leading
    [CLS] token in a Transformer encoder). ``model`` must return (B, L, d) (``pool="none"``).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        out = self.model(x) if lengths is None else self.model(x, lengths=lengths)  # (B, L, d)
        return out[:, 0]


def build_classifier(
    cfg: Config,
    d_input: int,
    d_output: int,
    *,
    embedding: bool = False,
    bidirectional: bool = False,
    layer_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``harness.build_model``; for ``cfg.pool == "first"`` its output at position 0 (:class:`FirstPosition`).

    Raises ValueError for ``pool="first"`` without ``bidirectional`` (position 0 would see one token).
    """
    kwargs = dict(embedding=embedding, bidirectional=bidirectional, layer_kwargs=layer_kwargs)
    if cfg.pool != "first":
        return harness.build_model(cfg, d_input, d_output, **kwargs)
    if not bidirectional:
        raise ValueError(
            "pool='first' needs bidirectional layers (a causal position 0 sees only the first token)"
        )
    return FirstPosition(harness.build_model(replace(cfg, pool="none"), d_input, d_output, **kwargs))


def build_pair_model(
    cfg: Config,
    vocab_size: int,
    num_classes: int,
    *,
    bidirectional: bool = False,
    layer_kwargs: dict[str, Any] | None = None,
) -> PairClassifier:
    """A :class:`PairClassifier` over the SSM encoder that ``cfg`` describes (token embedding, pooled)."""
    encoder = build_classifier(
        cfg, vocab_size, cfg.d_model, embedding=True, bidirectional=bidirectional, layer_kwargs=layer_kwargs
    )
    inner = encoder.model if isinstance(encoder, FirstPosition) else encoder
    inner.decoder = nn.Identity()  # the pooled features go to the pair head
    return PairClassifier(encoder, cfg.d_model, num_classes)


# ----------------------------------------------------------------------------------------------------------
# Data: the cache of generated data, subsets, majority class

# Part of every cache folder name: the generators' output for a seed changed when generation became parallel
# (per-index seeds), so a cache written before is not reused.
GENERATOR_VERSION = "-v2"


def default_cache_dir() -> Path:
    """``$SSM_CACHE/lra`` when the variable is set, else ``~/.cache/ssm/lra``."""
    base = os.environ.get("SSM_CACHE")
    return (Path(base) if base else Path.home() / ".cache" / "ssm") / "lra"


_COMPLETE = "COMPLETE.json"


def _inventory(folder: Path) -> dict[str, int]:
    """The number of files under ``folder`` (the marker aside) and their total size in bytes."""
    files = [p for p in folder.rglob("*") if p.is_file() and p.name != _COMPLETE]
    return {"files": len(files), "bytes": sum(p.stat().st_size for p in files)}


def _completed(folder: Path) -> bool:
    """A marker whose recorded inventory matches the files (a truncated or deleted file does not)."""
    marker = folder / _COMPLETE
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("inventory") == _inventory(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _sweep_partials(folder: Path) -> None:
    """Remove ``folder.partial-<pid>`` siblings whose process is gone (killed by SIGKILL mid-generation)."""
    for tmp in folder.parent.glob(f"{folder.name}.partial-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_as_exit():
    """SIGTERM raises SystemExit for the duration (main thread only), so cleanup handlers run."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ensure_generated(folder: str | os.PathLike, generate, settings: dict[str, Any]) -> Path:
    """``folder``, generated by ``generate(tmp_folder)`` unless an earlier generation completed there.

    A generation is complete when ``folder/COMPLETE.json`` exists and the number and total size of the files
    it records (``inventory``, besides ``settings``) match the folder: a file truncated or deleted since, even
    at a line boundary, means generating again. The data are written into a temporary sibling folder
    ``<folder>.partial-<pid>`` that is renamed when done; an interrupted generation (an exception, Ctrl-C,
    SIGTERM) removes it, and one killed outright (SIGKILL) leaves it to the next call, which removes the
    folders of processes that no longer exist. A ``folder`` without a valid marker is deleted and redone.
    """
    folder = Path(folder)
    if _completed(folder):
        return folder
    if folder.exists():
        print(f"{folder}: incomplete or altered earlier generation; generating again", flush=True)
        shutil.rmtree(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    _sweep_partials(folder)
    tmp = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    try:
        with _sigterm_as_exit():
            generate(tmp)
            record = {**settings, "inventory": _inventory(tmp)}
            (tmp / _COMPLETE).write_text(json.dumps(record, indent=2) + "\n")
    except BaseException:  # interrupted or failed: leave nothing half-written behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        tmp.rename(folder)
    except OSError:  # another process finished the same generation first
        if not _completed(folder):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"generated {folder} in {time.perf_counter() - t0:.1f} s", flush=True)
    return folder


def generated_data(
    task: str,
    cache_dir: str | os.PathLike,
    extra: dict[str, Any],
    *,
    seed: int,
    difficulty: str,
    workers: int | None = None,
) -> Path:
    """The cache folder of ``task``'s generated data (generated first when needed, by ``workers`` processes:
    None lets the generator choose; the data do not depend on it)."""
    check_choice("task", task, GENERATED_TASKS)
    seed = check_int("gen_seed", seed, minimum=0)
    cache = Path(cache_dir)
    if task == "listops":
        gen = dict(extra["listops"])
        for name in ("train", "val", "test"):
            check_int(f"gen_{name}", gen[name], minimum=1)
        check_int("gen_min_length", gen["min_length"], minimum=0)
        check_int("gen_max_length", gen["max_length"], minimum=gen["min_length"] + 2)
        name = (
            f"listops-train{gen['train']}-val{gen['val']}-test{gen['test']}-"
            f"len{gen['min_length']}-{gen['max_length']}-seed{seed}{GENERATOR_VERSION}"
        )
        settings = {"task": task, **gen, "seed": seed}

        def generate_listops(folder: Path) -> None:
            print(
                f"ListOps: generating {gen['train']}/{gen['val']}/{gen['test']} expressions of "
                f"{gen['min_length']}-{gen['max_length']} tokens into the cache (once)",
                flush=True,
            )
            write_listops(folder, **gen, seed=seed, workers=workers)

        return ensure_generated(cache / name, generate_listops, settings)
    check_choice("difficulty", difficulty, tuple(DIFFICULTY_DIRS))
    n = check_int("gen_n", extra["pathfinder_n"], minimum=10)
    resolution = LRA_TASKS[task]["resolution"]
    name = f"pathfinder{resolution}-{difficulty}-n{n}-seed{seed}{GENERATOR_VERSION}"
    settings = {"task": task, "resolution": resolution, "difficulty": difficulty, "n": n, "seed": seed}

    def generate(folder: Path) -> None:
        print(
            f"Pathfinder {resolution}x{resolution} ({difficulty}): generating {n} images into the cache "
            "(once; --gen-n sets the number)",
            flush=True,
        )
        write_pathfinder(
            folder, resolution=resolution, n=n, seed=seed, difficulty=difficulty, workers=workers
        )

    return ensure_generated(cache / name, generate, settings)


def resolve_data(
    task: str,
    data: str | None,
    cache_dir: str | os.PathLike,
    extra: dict[str, Any],
    *,
    seed: int,
    difficulty: str,
    workers: int | None = None,
) -> Path:
    """``--data`` when given; generated data for ListOps and Pathfinder; else a FileNotFoundError saying where
    the official files come from and how they are laid out."""
    if data is not None:
        return Path(data)
    if task in GENERATED_TASKS:
        return generated_data(task, cache_dir, extra, seed=seed, difficulty=difficulty, workers=workers)
    raise FileNotFoundError(
        f"the {task} task needs the official data: pass --data DIR, a folder holding {SOURCES[task]}; "
        f"it cannot be generated (only ListOps and Pathfinder can)"
    )


def _labels(dataset: Dataset) -> Tensor:
    if isinstance(dataset, Subset):
        return _labels(dataset.dataset)[torch.as_tensor(dataset.indices, dtype=torch.long)]
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor):
        return labels
    return torch.tensor([int(dataset[i][-1]) for i in range(len(dataset))], dtype=torch.long)


def majority_class(dataset: Dataset) -> tuple[int, float]:
    """The most frequent label of ``dataset`` and its frequency (the accuracy of always predicting it)."""
    counts = Counter(_labels(dataset).tolist())
    if not counts:
        raise ValueError("dataset must not be empty")
    label, count = counts.most_common(1)[0]
    return int(label), count / sum(counts.values())


def subset(dataset: Dataset, n: int | None, seed: int, name: str) -> Dataset:
    """A seeded choice of ``n`` items of ``dataset`` in their original order (all of them when n is None)."""
    if n is None:
        return dataset
    check_int(name, n, minimum=1)
    if n >= len(dataset):
        return dataset
    keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].sort().values
    return Subset(dataset, keep.tolist())


# ----------------------------------------------------------------------------------------------------------
# Command line


# What --pool does here: harness.build_model's pooling, plus "first" (build_classifier, FirstPosition).
POOL_HELP = (
    "how the classifier reads the sequence of outputs: mean (their mean over the valid positions, padding "
    "excluded), last (the output at the last valid position) or first (the output at position 0 of a "
    "bidirectional model, whose anti-causal half carries the whole sequence there, see FirstPosition; needs "
    "--bidirectional). Retrieval reads each document so before the pair head"
)


def build_parser() -> argparse.ArgumentParser:
    parser = harness.ExampleParser(
        description="Long Range Arena with an S4, S4D or RTF classifier (see the module docstring).",
    )
    parser.add_argument("--task", required=True, choices=TASKS, help="LRA task (required)")
    parser.add_argument("--config", choices=CONFIGS, default="quick", help="preset")
    parser.add_argument(
        "--data",
        default=None,
        help="folder of the official files (default: none, generate ListOps/Pathfinder into the cache)",
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"cache of generated data (default: {default_cache_dir()}, from $SSM_CACHE)",
    )
    parser.add_argument(
        "--difficulty",
        choices=tuple(DIFFICULTY_DIRS),
        default="hard",
        help="Pathfinder difficulty, read or generated (default: %(default)s, LRA's)",
    )
    data = parser.add_argument_group("data: overrides of the preset (see EXTRAS in examples/lra.py)")
    data.add_argument(
        "--train-subset",
        type=harness.optional_int,
        default=argparse.SUPPRESS,
        help="train on a seeded subset of this many examples ('none': all; default: the preset's, 2000 for "
        "quick text and retrieval, 5000 for quick image, else all)",
    )
    data.add_argument(
        "--val-subset",
        type=harness.optional_int,
        default=argparse.SUPPRESS,
        help="validate on a seeded subset ('none': all; default: the preset's, 500 for quick text and "
        "retrieval, 1000 for quick image, else all)",
    )
    data.add_argument(
        "--test-subset",
        type=harness.optional_int,
        default=argparse.SUPPRESS,
        help="test on a seeded subset ('none': all; default: the preset's, 2000 for quick text, retrieval "
        "and image, else all)",
    )
    data.add_argument(
        "--truncate",
        type=harness.optional_int,
        default=argparse.SUPPRESS,
        help="token tasks: ids kept per document, end-of-sequence included ('none': LRA's; default: the "
        "preset's, 1024 for quick text and retrieval, else LRA's)",
    )
    data.add_argument(
        "--bidirectional",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="bidirectional SSM layers (default: on in every preset)",
    )
    data.add_argument(
        "--glu",
        action=argparse.BooleanOptionalAction,
        default=argparse.SUPPRESS,
        help="GLU after each layer's output projection (default: on for s4 and s5, off for quick)",
    )
    gen = parser.add_argument_group("generated data (without --data)")
    gen.add_argument(
        "--gen-train", type=int, default=None,
        help="ListOps training expressions (default: the preset's, 96000 for s4 and s5, 2000 for quick)",
    )
    gen.add_argument(
        "--gen-val", type=int, default=None,
        help="ListOps validation expressions (default: the preset's, 2000 for s4 and s5, 500 for quick)",
    )
    gen.add_argument("--gen-test", type=int, default=None, help="ListOps test expressions (default: 2000)")
    gen.add_argument("--gen-min-length", type=int, default=None, help="ListOps: length > this (default: 500)")
    gen.add_argument(
        "--gen-max-length", type=int, default=None, help="ListOps: length < this (default: 2000)"
    )
    gen.add_argument(
        "--gen-n", type=int, default=None,
        help="Pathfinder: images, split 80/10/10 (default: the preset's, 200000 for s4 and s5; for quick "
        "2000 at 32 x 32, 1000 at 64 x 64, 500 for pathfinder128 and pathx)",
    )
    gen.add_argument("--gen-seed", type=int, default=0, help="generator seed")
    gen.add_argument(
        "--gen-workers",
        type=int,
        default=None,
        metavar="N",
        help="processes generating ListOps/Pathfinder (default: the generators' choice); same data for any N",
    )
    harness.add_run_args(parser, default_out="runs/lra/<task>-<model>-<config>")
    title = "training configuration: overrides of the --config preset (defaults shown: quick ListOps)"
    harness.add_config_args(
        parser, QUICK_PRESETS["listops"], title=title, helps={"pool": POOL_HELP},
        choices={"pool": ("mean", "last", "first")},
    )
    return parser


def _extra_from_args(args: argparse.Namespace) -> dict[str, Any]:
    extra = {k: (dict(v) if isinstance(v, dict) else v) for k, v in EXTRAS[args.config][args.task].items()}
    for name in ("train_subset", "val_subset", "test_subset", "truncate", "bidirectional", "glu"):
        if name in args:
            extra[name] = getattr(args, name)
    for name in ("train", "val", "test", "min_length", "max_length"):
        value = getattr(args, f"gen_{name}")
        if value is not None:
            extra["listops"][name] = value
    if args.gen_n is not None:
        extra["pathfinder_n"] = args.gen_n
    return extra


def _layer_kwargs(cfg: Config, extra: dict[str, Any]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"glu": bool(extra["glu"])}
    if cfg.model in ("s4", "s4d", "s5"):
        kwargs.update(dt_min=extra["dt_min"], dt_max=extra["dt_max"])
    if cfg.model == "s5" and "blocks" in extra:
        kwargs["blocks"] = extra["blocks"]
    return kwargs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` (default ``sys.argv[1:]``), train, and return the summary dict (also summary.json).

    The summary is that of ``harness.train`` plus ``task``, ``config_name``, ``data_dir``, ``n_train``,
    ``n_val``, ``n_test``, ``majority_label`` and ``majority_test_acc``.
    """
    args = build_parser().parse_args(argv)
    cfg = harness.config_from_args(args, PRESETS[args.config][args.task])
    with harness.distributed(cfg.device) as d:  # under torchrun: join the process group (else nothing)
        return _run(args, cfg, d)


def _run(args: argparse.Namespace, cfg: Config, d: harness.DistInfo) -> dict[str, Any]:
    task = args.task
    with harness.config_errors():  # a bad option or value: one line, exit status 2
        extra = _extra_from_args(args)
        info = LRA_TASKS[task]
        out = args.out
        if out == "runs/lra/<task>-<model>-<config>":
            out = f"runs/lra/{task}-{cfg.model}-{args.config}"
        harness.check_out_dir(out)
        cache = Path(args.cache_dir) if args.cache_dir is not None else default_cache_dir()

        # rank 0 generates missing data; the other ranks then find it in the cache
        for first in (True, False):
            if d.main == first:
                root = resolve_data(
                    task, args.data, cache, extra, seed=args.gen_seed, difficulty=args.difficulty,
                    workers=args.gen_workers,
                )
            if d.active and first:
                torch.distributed.barrier()
        options: dict[str, Any] = {}
        if info["input"] == "tokens" and extra["truncate"] is not None:
            options["max_length"] = check_int("truncate", extra["truncate"], minimum=2)
        if task in PATHFINDER_TASKS:
            options["difficulty"] = args.difficulty
        splits = {split: load_lra(task, root, split, **options) for split in ("train", "val", "test")}
        train_ds = subset(splits["train"], extra["train_subset"], cfg.seed, "train_subset")
        val_ds = subset(splits["val"], extra["val_subset"], cfg.seed, "val_subset")
        test_ds = subset(splits["test"], extra["test_subset"], cfg.seed, "test_subset")
        majority_label, majority_acc = majority_class(test_ds)

        harness.seed_everything(cfg.seed)
        model_kwargs = dict(
            bidirectional=bool(extra["bidirectional"]), layer_kwargs=_layer_kwargs(cfg, extra)
        )
        collate = info["collate"]
        if info["pair"]:
            model = build_pair_model(cfg, info["vocab_size"], info["num_classes"], **model_kwargs)
            collate = collate_stacked_pair
        elif info["input"] == "tokens":
            model = build_classifier(
                cfg, info["vocab_size"], info["num_classes"], embedding=True, **model_kwargs
            )
        else:
            model = build_classifier(cfg, info["d_input"], info["num_classes"], **model_kwargs)
    say = print if d.main else _quiet
    say(
        f"LRA {task} ({args.config}): data {root}; train {len(train_ds)}, val {len(val_ds)}, test "
        f"{len(test_ds)}; model {cfg.model} d_model {cfg.d_model} x {cfg.n_layers} layers, N {cfg.d_state}"
        f"{', bidirectional' if extra['bidirectional'] else ''}: {harness.count_parameters(model):,} "
        f"parameters; device {harness.resolve_device(cfg.device)}"
        f"{f' x {d.world_size} processes' if d.active else ''}; out {out}",
        flush=True,
    )
    say(f"majority class of the test split: {majority_label} ({100 * majority_acc:.2f}%)", flush=True)
    t0 = time.perf_counter()
    summary = harness.train(
        model, train_ds, val_ds, test_ds, cfg, out, collate_fn=collate, resume=args.resume,
        stop_after_steps=args.stop_after_steps,
    )
    summary.update(
        task=task,
        config_name=args.config,
        data_dir=str(root),
        n_train=len(train_ds),
        n_val=len(val_ds),
        n_test=len(test_ds),
        majority_label=majority_label,
        majority_test_acc=majority_acc,
        wall_time_s=time.perf_counter() - t0,
    )
    if d.main:
        (Path(out) / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if summary["test_acc"] is not None:
        gain = 100 * (summary["test_acc"] - majority_acc)
        say(
            f"{task} test accuracy {100 * summary['test_acc']:.2f}% vs majority class "
            f"{100 * majority_acc:.2f}% ({gain:+.2f} points)",
            flush=True,
        )
    return summary


def _quiet(*args: Any, **kwargs: Any) -> None:
    """``print`` on ranks other than 0."""


if __name__ == "__main__":
    # a configuration error (exit status 2), no data, --out naming a file, a damaged checkpoint, divergence
    # (status 1): one line from rank 0, no traceback
    harness.run_cli(main)
