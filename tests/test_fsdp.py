"""FOOF and KFAC under FSDP2 (`fully_shard`): 2 gloo ranks on CPU, each updating the rows it holds,
equal one process on the union of their batches, with no collective beyond FSDP's own per step
(KFAC: one all-gather per layer), and resume bit for bit from per-rank checkpoints."""
import io
import os
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.debug import CommDebugMode

import fastfoof
import gloo_ranks
from fastfoof import ops
from gloo_ranks import KW, WORLD, batches, dcp_load, dcp_save

# inversions at t = 1, 3, 6 (T = 3), observed steps 2, 3, 5, 6; the checkpoints are taken after step 2,
# when each rank's statistics since the last round are its own
RESUME_AT = 3
INVERSIONS = {1, 3, 6}
# name: optimizer, its arguments beyond KW, reshard_after_forward of the layers, dtype
RUNS = {"foof": (fastfoof.FOOF, {}, True, torch.float64),
        "foof_ungrafted": (fastfoof.FOOF, {"graft": None}, True, torch.float64),
        "foof_unsharded_forward": (fastfoof.FOOF, {}, False, torch.float64),
        # rank 4: the convolutions and the first Linear (D' = 28, 19, 55 > 8) keep (Q, s), the others P
        "foof_rank": (fastfoof.FOOF, {"rank": 4}, True, torch.float64),
        # each rank's statistic from the first of its 2 samples (one process: `single_process`)
        "foof_stats_batch": (fastfoof.FOOF, {"stats_batch": 1}, True, torch.float64),
        "kfac": (fastfoof.KFAC, {}, True, torch.float64),
        "kfac_exact": (fastfoof.KFAC, {"damping_mode": "exact"}, False, torch.float64)}
# The update's Triton kernel on the local shards' views (float32: float64 takes the reference path),
# through the interpreter on CPU (conftest); the other operations stay on the reference (`worker`).
TRITON = ops.triton_available() and os.environ.get("TRITON_INTERPRET") == "1"
if TRITON:
    RUNS["foof_triton"] = (fastfoof.FOOF, {"backend": "triton"}, True, torch.float32)
RESUMED = ("foof", "foof_rank", "kfac")
GATHER, REDUCE_SCATTER = "c10d._allgather_base_", "c10d._reduce_scatter_base_"
KFAC_GATHER = "c10d_functional.all_gather_into_tensor"


def make_model(dtype=torch.float64):
    """Row counts that split unevenly over 2 ranks: 9 output channels in 3 groups (rank 0 holds
    group 0 and part of group 1), 5 features (3 + 2), 1 feature (rank 1 holds none); a LayerNorm
    (no preconditioner) and a Linear without bias."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 9, 3, stride=2, groups=3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(9 * 2 * 3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 1),
                         nn.Tanh(), nn.Linear(1, 4, bias=False)).to(dtype)


LAYERS = 5  # preconditioned: the two convolutions and the three Linear layers


def sharded_model(reshard_after_forward, dtype):
    model = make_model(dtype)
    for module in model:
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    return fully_shard(model)  # the root holds the LayerNorm


def collectives(mode):
    return Counter({str(op): n for op, n in mode.get_comm_counts().items()})


def train(model, opt, data, rank, world):
    """Train on each rank's share of the batches; the collectives of each step, in forward and
    backward and in opt.step()."""
    counts = []
    for batch in data:
        # inputs in channels_last (FSDP2 refuses channels_last parameters; inputs and activations may be)
        x, y = gloo_ranks.shard(batch, rank, world, torch.channels_last)
        opt.zero_grad()
        with CommDebugMode() as backward:
            F.cross_entropy(model(x), y).backward()
        with CommDebugMode() as step:
            opt.step()
        counts.append((collectives(backward), collectives(step)))
    return counts


def full(model):
    return [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in model.parameters()]


def checkpoint(model, opt):
    buffer = io.BytesIO()
    torch.save((model.state_dict(), opt.state_dict()), buffer)
    return buffer.getvalue()


def resume(saved, kind, kw, reshard_after_forward, dtype):
    model = sharded_model(reshard_after_forward, dtype)
    opt = kind(model, **{**KW, **kw})
    model_state, opt_state = torch.load(io.BytesIO(saved), weights_only=False)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    return model, opt


def state_kinds(opt):
    """Per state entry: whether it is a DTensor placed as its parameter, or a plain tensor."""
    kinds = {}
    for p, state in opt.state.items():
        for key, value in state.items():
            placed = isinstance(value, DTensor) and value.placements == p.placements and value.shape == p.shape
            kinds.setdefault(key, set()).add("sharded" if placed else type(value).__name__)
    return kinds


def worker(rank, world, out_dir):
    # the Triton runs are for the update on the local shards; the other kernels have their own tests
    ops.TRITON_KERNELS = {"preconditioned_update_": ops.TRITON_KERNELS["preconditioned_update_"]}
    results = {}
    for name, (kind, kw, reshard, dtype) in RUNS.items():
        data = batches(dtype)
        model = sharded_model(reshard, dtype)
        opt = kind(model, **{**KW, **kw})
        counts = train(model, opt, data[:RESUME_AT - 1], rank, world)
        saved = checkpoint(model, opt)
        folder = os.path.join(out_dir, f"dcp_{name}")
        if name in RESUMED:  # and with torch.distributed.checkpoint, every rank writing its shards
            dcp_save(model, opt, folder)
        counts += train(model, opt, data[RESUME_AT - 1:], rank, world)
        results[name] = {"params": full(model), "counts": counts, "state": state_kinds(opt)}
        if name in RESUMED:
            model, opt = resume(saved, kind, kw, reshard, dtype)
            train(model, opt, data[RESUME_AT - 1:], rank, world)
            results[name]["resumed"] = full(model)
            model = sharded_model(reshard, dtype)  # fresh: DCP loads into its state dicts
            opt = kind(model, **{**KW, **kw})
            dcp_load(model, opt, folder)
            train(model, opt, data[RESUME_AT - 1:], rank, world)
            results[name]["dcp_resumed"] = full(model)
    refused = nn.Linear(4, 6).double()  # the weight sharded along its columns: not the rows the update takes
    fully_shard(refused, shard_placement_fn=lambda p: Shard(p.dim() - 1))
    with pytest.raises(ValueError, match="Shard"):
        fastfoof.FOOF(refused, **KW)
    model = sharded_model(True, torch.float64)  # what FSDP itself communicates
    results["sgd"] = train(model, torch.optim.SGD(model.parameters(), lr=0.1), batches(), rank, world)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return gloo_ranks.run(worker, tmp_path_factory.mktemp("fsdp"))


def single_process(kind, kw, dtype):
    """The ranks' training in one process on the whole batches. With stats_batch = k the ranks' mean
    statistic is that of their first k samples each: the batch is reordered so that those come first,
    and k·WORLD samples enter."""
    model = make_model(dtype)
    kw = {key: value for key, value in kw.items() if key != "backend"}
    order = torch.arange(2 * WORLD)
    if "stats_batch" in kw:
        k = kw["stats_batch"]
        shares = order.view(WORLD, 2)
        order = torch.cat([shares[:, :k].reshape(-1), shares[:, k:].reshape(-1)])
        kw["stats_batch"] = k * WORLD
    opt = kind(model, **KW, **kw)
    for x, y in batches(dtype):
        x, y = x[order], y[order]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return [p.detach() for p in model.parameters()]


@pytest.mark.parametrize("name", RUNS)
def test_two_sharded_ranks_equal_one_process_on_the_union(two_ranks, name):
    kind, kw, _, dtype = RUNS[name]
    expected = single_process(kind, kw, dtype)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    moved = 0
    for r in two_ranks:
        gloo_ranks.assert_close(r[name]["params"], expected, tolerance)
        for p, start in zip(r[name]["params"], make_model(dtype).parameters()):
            moved = max(moved, ((p - start).norm() / start.norm()).item())
    assert moved > 1e-2  # the comparison is of trained parameters


@pytest.mark.parametrize("resume", ["resumed", "dcp_resumed"])
@pytest.mark.parametrize("name", RESUMED)
def test_per_rank_and_distributed_checkpoints_resume_bit_for_bit(two_ranks, name, resume):
    for r in two_ranks:
        for p, q in zip(r[name][resume], r[name]["params"]):
            assert torch.equal(p, q)


def test_momentum_is_sharded_and_statistics_replicated(two_ranks):
    for r in two_ranks:
        assert r["foof"]["state"] == {"momentum_buffer": {"sharded"}, "ema": {"Tensor"}, "ema_count": {"Tensor"},
                                      "precond": {"Tensor"}}
        assert r["foof_rank"]["state"] == {"momentum_buffer": {"sharded"}, "ema": {"Tensor"}, "ema_count": {"Tensor"},
                                           "precond": {"Tensor"}, "top_eigvecs": {"Tensor"}, "top_eigvals": {"Tensor"}}
        kfac = r["kfac"]["state"]
        assert kfac.pop("momentum_buffer") == {"sharded"}
        assert set(kfac) == {"ema", "ema_count", "precond", "grad_ema", "grad_ema_count", "grad_precond"}
        assert all(kinds == {"Tensor"} for kinds in kfac.values())


@pytest.mark.parametrize("name, norms", [("foof_ungrafted", 0), ("foof", 1)])
def test_foof_communicates_only_the_graft_norms_beyond_fsdp_between_inversions(two_ranks, name, norms):
    """graft=None: nothing beyond FSDP's own; grafting: one all-reduce of every layer's two norms per step."""
    for r in two_ranks:
        for t, ((backward, step), (sgd_backward, sgd_step)) in enumerate(zip(r[name]["counts"], r["sgd"]), 1):
            assert backward == sgd_backward and set(backward) == {GATHER, REDUCE_SCATTER}  # forward and backward
            assert not sgd_step
            expected = Counter({"c10d.allreduce_": norms})
            if t in INVERSIONS:  # the round: one all-reduce of the statistics, a broadcast per rank and dtype
                expected.update({"c10d.allreduce_": 1, "c10d.broadcast_": 2 * WORLD})  # dtypes: P's, the status's
            assert step == +expected


def test_kfac_gathers_each_layer_gradient_once_per_step(two_ranks):
    for r in two_ranks:
        for t, ((backward, step), (sgd_backward, _)) in enumerate(zip(r["kfac"]["counts"], r["sgd"]), 1):
            assert backward == sgd_backward
            if t not in INVERSIONS:  # and grafting's norms
                assert step == {KFAC_GATHER: LAYERS, "c10d.allreduce_": 1}
            else:
                assert step[KFAC_GATHER] == LAYERS and step["c10d.allreduce_"] == 2
