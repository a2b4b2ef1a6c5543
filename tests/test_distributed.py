"""A 2-process DDP run (gloo, CPU) equals the single-process run on the same global batch."""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tol

import ssm
from ssm.optim import make_optimizer

STEPS, BATCH, L = 3, 8, 32
# 10x the float64 table: the all-reduce sums the gradients in another order, and STEPS Adam steps amplify it
DDP_TOL = {key: 10 * value for key, value in tol(torch.float64).items()}


def _model() -> ssm.SSMModel:
    torch.manual_seed(0)
    # float64: the comparison tests the algorithm, not float32 reduction order (which Adam amplifies for
    # near-zero gradient entries)
    return ssm.SSMModel(2, 3, d_model=8, n_layers=2, layer="s4", d_state=8, dtype=torch.float64)


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEPS, BATCH, L, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return x, y


def _train(model, x, y):
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.01)
    for s in range(x.shape[0]):
        loss = torch.nn.functional.cross_entropy(model(x[s]), y[s])
        opt.zero_grad()
        loss.backward()
        opt.step()


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        x, y = _data()
        per = BATCH // world
        _train(model, x[:, rank * per:(rank + 1) * per], y[:, rank * per:(rank + 1) * per])
        if rank == 0:
            torch.save(model.module.state_dict(), out)
        # Both ranks leave together: a rank tearing gloo down while its peer still talks to it can abort.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_ddp_matches_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2, join=True)
    ddp_state = torch.load(out)
    model = _model()
    _train(model, *_data())
    moved = 0
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ddp_state[name], p, **DDP_TOL, msg=name)
        moved += int(not torch.equal(p, _model().state_dict()[name]))
    assert moved > 0
