"""DDP through torchrun on CPU (gloo): 2 processes vs 1 process with the same global batch.

What is asserted (each exact in principle, compared to float tolerance):

1. **BN frozen** (BatchNorm layers in eval mode, everything else training): 2 DDP processes with
   local batch B/2 end with the same parameters, buffers and epoch loss as 1 process with batch B.
   The data order is the loader's global order; rank r takes positions r::2 of it, so rank r's
   step-i batch is positions r::2 of the single process's step-i batch (the ragged last batch
   too, because the epoch size is even).  Both ranks end bit-identical.
2. **BN training, per rank** (no SyncBN -- torch's SyncBatchNorm is CUDA-only): 2 DDP processes
   equal 1 process that normalises each half of the global batch separately ("ghost batch"
   reference: the mean of the two half-batch losses) and keeps rank 0's running statistics (DDP
   broadcasts rank 0's buffers before every forward).

Mixup and augmentation are off: both draw from per-rank generators of the local batch, so they
are identically distributed under DDP but not sample-for-sample equal to the 1-process run.

The runs are in float64.  The two paths sum the same terms in different orders; in float32 a
ReLU input that lands within rounding of zero after a step flips sides between them and the
trajectories part (chaotically, differently on each torch build).  In float64 they agree to ~1e-15
after every step, so the comparison is well posed at a tolerance of 1e-9.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from balpoe.runtime import distributed as dist
from balpoe.data.device_loader import DeviceLoader
from balpoe.errors import BalpoeError
from balpoe.evaluate.build import load_model
from balpoe.losses import BalPoELoss
from balpoe.models import build_multi_expert
from balpoe.recipe import Recipe
from balpoe.training.build import build_optimizer
from balpoe.training.trainer import train_one_epoch

ROOT = Path(__file__).resolve().parents[1]
N, GLOBAL_BATCH, EPOCHS, SEED = 100, 32, 2, 3   # 100 = 3 x 32 + 4: a ragged last batch (2 per rank)
TAUS = [0.0, 1.0, 2.0]
RTOL, ATOL = 1e-9, 1e-10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data():
    """Learnable: class brightness plus noise; long-tailed labels (every class present)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.cat([torch.arange(10), torch.randint(0, 10, (N - 10,), generator=g).pow(2) // 10])
    noise = torch.randint(-40, 41, (N, 1, 16, 16), generator=g)
    images = (labels.view(-1, 1, 1, 1) * 20 + 40 + noise).clamp(0, 255).to(torch.uint8)
    return images, labels


def _model():
    torch.manual_seed(0)
    return build_multi_expert("small_cnn", 10, 3, split="layer1", head="cosine", scale=30.0, in_chans=1).double()


class _Float64:
    """The loader's batches in float64 (the model runs in double; see the module docstring)."""

    def __init__(self, loader):
        self.loader = loader

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return ((x.double(), y) for x, y in self.loader)


def _set_mode(model, bn_mode: str) -> None:
    model.train()
    if bn_mode == "frozen":
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.eval()


def _train(bn_mode: str, rank: int, world: int):
    """Train EPOCHS epochs with the library's loader, optimizer and train_one_epoch."""
    images, labels = _data()
    loader = _Float64(DeviceLoader(images, labels, dist.local_batch_size(GLOBAL_BATCH, world), [0.5], [0.25],
                                   train=True, seed=SEED, rank=rank, world_size=world))
    model = _model()
    criterion = BalPoELoss(torch.bincount(labels, minlength=10), TAUS)
    optimizer = build_optimizer(Recipe().optim, model.parameters())
    model = dist.wrap_model(model, torch.device("cpu"))
    losses = []
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        _set_mode(model, bn_mode)
        losses.append(train_one_epoch(model, loader, criterion, optimizer, epoch=epoch, seed=SEED,
                                      num_classes=10)["loss"])
    return {k: v.detach().clone() for k, v in dist.unwrap(model).state_dict().items()}, losses


def _ghost_bn_reference():
    """1 process, global batch; BN statistics per half (positions 0::2 and 1::2 of each batch),
    running statistics as rank 0 keeps them."""
    images, labels = _data()
    loader = _Float64(DeviceLoader(images, labels, GLOBAL_BATCH, [0.5], [0.25], train=True, seed=SEED))
    model = _model()
    criterion = BalPoELoss(torch.bincount(labels, minlength=10), TAUS)
    optimizer = build_optimizer(Recipe().optim, model.parameters())
    for epoch in range(EPOCHS):
        loader.set_epoch(epoch)
        model.train()
        for x, y in loader:
            optimizer.zero_grad(set_to_none=True)
            before = [b.clone() for b in model.buffers()]
            (criterion(model(x[1::2]), y[1::2]) / 2).backward()      # rank 1's shard
            with torch.no_grad():                                   # DDP keeps rank 0's running stats
                for b, saved in zip(model.buffers(), before):
                    b.copy_(saved)
            (criterion(model(x[0::2]), y[0::2]) / 2).backward()      # rank 0's shard
            optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    r, w, _ = dist.init_distributed(torch.device("cpu"))
    assert (r, w) == (rank, world) and dist.is_distributed()
    try:
        result = {mode: _train(mode, rank, world) for mode in ("frozen", "per_rank")}
        try:
            dist.wrap_model(torch.nn.BatchNorm2d(2), torch.device("cpu"), sync_bn=True)
            result["sync_bn_error"] = None
        except BalpoeError as e:
            result["sync_bn_error"] = str(e)
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.shutdown()


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


@pytest.fixture(scope="module")
def single_process():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {"frozen": _train("frozen", 0, 1), "ghost": _ghost_bn_reference()}
    finally:
        torch.set_num_threads(threads)


def _assert_close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{k}: {m}")
            worst = max(worst, (a[k] - b[k]).abs().max().item())
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


def test_ddp_two_ranks_equal_one_process_with_frozen_bn(ddp_run, single_process):
    (s0, loss0), (s1, loss1) = ddp_run[0]["frozen"], ddp_run[1]["frozen"]
    assert all(torch.equal(s0[k], s1[k]) for k in s0)       # DDP keeps the ranks bit-identical
    ref_state, ref_loss = single_process["frozen"]
    assert any(not torch.equal(s0[k], _model().state_dict()[k]) for k in s0)  # it did train
    _assert_close(s0, ref_state)
    assert loss0 == loss1 and loss0 == pytest.approx(ref_loss, rel=1e-6)   # the epoch loss is summed in float32


def test_ddp_per_rank_bn_equals_ghost_batch_reference(ddp_run, single_process):
    s0, _ = ddp_run[0]["per_rank"]
    s1, _ = ddp_run[1]["per_rank"]
    params = dict(dist.unwrap(_model()).named_parameters()).keys()
    assert all(torch.equal(s0[k], s1[k]) for k in params)   # parameters in sync; buffers are rank-local
    _assert_close(s0, single_process["ghost"])


def test_loader_shards_match_distributed_sampler_indices():
    """The device loader's sharding is DistributedSampler's (padding by wrapping, then r::world)."""
    from torch.utils.data import DistributedSampler
    n = 11
    images, labels = torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.arange(n)
    for world in (2, 3, 4):
        for r in range(world):
            ours = torch.cat([y for _, y in DeviceLoader(images, labels, 2, [0.0], [1.0], rank=r, world_size=world)])
            theirs = list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False))
            assert ours.tolist() == theirs


def test_sync_bn_on_cpu_is_a_one_line_user_error(ddp_run):
    msg = ddp_run[0]["sync_bn_error"]
    assert msg is not None and "'train.sync_bn' needs CUDA" in msg and "\n" not in msg


def test_batch_size_must_split_evenly_and_no_torchrun_is_a_no_op():
    assert dist.local_batch_size(128, 4) == 32
    with pytest.raises(BalpoeError, match="'optim.batch_size' \\(30\\) must be divisible by the number of processes"):
        dist.local_batch_size(30, 4)
    assert dist.init_distributed(torch.device("cpu")) == (0, 1, torch.device("cpu"))  # no torchrun: no-op
    model = torch.nn.BatchNorm2d(2)
    assert dist.wrap_model(model, torch.device("cpu"), sync_bn=True) is model     # not distributed: no-op


# ------------------------------------------------------------------------------------------------
# End to end: torchrun --nproc_per_node 2 -m balpoe train (gloo), then --resume


RECIPE = """name: ddp_smoke
seed: 0
data:
  dataset: fashion_mnist
  root: {root}
  imb_factor: 10
  augment: {{crop_padding: 2, flip: true, rotation: 0}}
  many_threshold: 20
  few_threshold: 8
model: {{backbone: small_cnn, num_experts: 3, split: layer1, kwargs: {{widths: [8, 16, 32]}}}}
loss: {{tau: [0, 1, 2]}}
optim: {{lr: 0.05, batch_size: 32, epochs: 1, warmup_epochs: 0, schedule: constant}}
train: {{device: cpu, mixup_alpha: 0.4, checkpoint_every: 1, eval_batch_size: 256}}
"""


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "balpoe", "train", *args, "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_torchrun_cli_two_gloo_processes_rank0_writes_and_resume(tmp_path):
    from formats import write_fashion_mnist

    from balpoe.runtime.checkpoint import load_checkpoint

    root = write_fashion_mnist(tmp_path / "fm", train_per_class=40, test_per_class=10)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE.format(root=root))
    out = tmp_path / "run"

    proc = _torchrun([str(recipe), "--out", str(out)], tmp_path)
    log = proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "last.pt", "metrics.csv", "metrics.jsonl", "recipe.yaml",
                                                      "report.html"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1       # rank 1 wrote no row
    assert log.count("saved ") == 2 and log.count("balanced test set") == 1  # one report (+ report.html), from rank 0
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 1
    model, _, _ = load_model(ckpt)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (3, 2, 10)

    # Every rank loads last.pt and continues with epoch 2.
    proc = _torchrun([str(recipe), "--out", str(out), "--resume", "--set", "optim.epochs=2"], tmp_path)
    rows = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["epoch"] for r in rows] == [1, 2]
    assert load_checkpoint(out / "last.pt")["epoch"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "last.pt", "metrics.csv", "metrics.jsonl", "recipe.yaml",
                                                      "report.html"]
