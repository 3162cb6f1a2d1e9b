"""FOOF and KFAC on torch.distributed: 2 gloo ranks on CPU equal one process on the union of their batches."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import fastfoof
import gloo_ranks
from gloo_ranks import KW, batches, dcp_load, dcp_save, shard

RESUME_AT = 4  # inversions at t = 1, 3, 6 (T = 3); the checkpoint is taken after step 3
LOW_RANK = 4  # every layer of the model (D' = 28, 28, 49, 11) keeps (Q, s)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 8, 3, stride=2, groups=2),
                         nn.Tanh(), nn.Flatten(), nn.Linear(8 * 2 * 3, 10), nn.Tanh(), nn.Linear(10, 4)).double()


def train(model, opt, data, rank, world, allreduce_grads=False):
    for batch in data:
        x, y = shard(batch, rank, world)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if allreduce_grads:  # what users do without DDP's wrapper
            for p in model.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()


def count_inversions(log, op="damped_inverse_with_status"):
    original = getattr(fastfoof.ops, op)

    def counting(mats, *args, **kwargs):
        log.append(len(mats))
        return original(mats, *args, **kwargs)

    setattr(fastfoof.ops, op, counting)


def worker(rank, world, out_dir):
    inverted = []
    count_inversions(inverted)
    data = batches()
    # the whole run with DDP, checkpointing on rank 0 after the inversion of step RESUME_AT - 1
    model = make_model()
    ddp = DistributedDataParallel(model)
    opt = fastfoof.FOOF(ddp, **KW)
    train(ddp, opt, data[:RESUME_AT - 1], rank, world)
    if rank == 0:
        torch.save((model.state_dict(), opt.state_dict()), os.path.join(out_dir, "checkpoint.pt"))
    dcp_save(ddp, opt, os.path.join(out_dir, "dcp"))
    train(ddp, opt, data[RESUME_AT - 1:], rank, world)
    results = {"ddp": [p.detach().clone() for p in model.parameters()], "inverted": list(inverted)}
    # the same without the wrapper, gradients all-reduced by hand
    bare = make_model()
    train(bare, fastfoof.FOOF(bare, **KW), data, rank, world, allreduce_grads=True)
    results["bare"] = [p.detach().clone() for p in bare.parameters()]
    # resume the rank-0 checkpoint in this world
    dist.barrier()
    model_state, opt_state = torch.load(os.path.join(out_dir, "checkpoint.pt"))
    resumed = make_model()
    resumed.load_state_dict(model_state)
    ddp = DistributedDataParallel(resumed)
    opt = fastfoof.FOOF(ddp, **KW)
    opt.load_state_dict(opt_state)
    train(ddp, opt, data[RESUME_AT - 1:], rank, world)
    results["resumed"] = [p.detach().clone() for p in resumed.parameters()]
    # resume the distributed checkpoint into a fresh model and optimizer (whose state dict DCP loads into)
    resumed = DistributedDataParallel(make_model())
    opt = fastfoof.FOOF(resumed, **KW)
    dcp_load(resumed, opt, os.path.join(out_dir, "dcp"))
    train(resumed, opt, data[RESUME_AT - 1:], rank, world)
    results["dcp_resumed"] = [p.detach().clone() for p in resumed.module.parameters()]
    # KFAC: both factors averaged over the ranks once per round
    kfac_model = make_model()
    ddp = DistributedDataParallel(kfac_model)
    train(ddp, fastfoof.KFAC(ddp, **KW), data, rank, world)
    results["kfac"] = [p.detach().clone() for p in kfac_model.parameters()]
    # FOOF with rank: each layer's (Q, s) computed by its owner and shared
    decomposed = []
    count_inversions(decomposed, "top_eigenpairs_with_status")
    low_rank_model = make_model()
    ddp = DistributedDataParallel(low_rank_model)
    train(ddp, fastfoof.FOOF(ddp, rank=LOW_RANK, **KW), data, rank, world)
    results["low_rank"] = [p.detach().clone() for p in low_rank_model.parameters()]
    results["decomposed"] = [n for n in decomposed if n]
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, gloo_ranks.run(worker, out)


def single_process(data, opt_state=None, model_state=None, kind=fastfoof.FOOF, **options):
    model = make_model()
    if model_state is not None:
        model.load_state_dict(model_state)
    opt = kind(model, **KW, **options)
    if opt_state is not None:
        opt.load_state_dict(opt_state)
    train(model, opt, data, 0, 1)
    return [p.detach() for p in model.parameters()]


def assert_close(params, expected, tol=1e-6):
    gloo_ranks.assert_close(params, expected, tol)


def test_two_ranks_equal_one_process_on_the_union(two_ranks):
    _, ranks = two_ranks
    expected = single_process(batches())
    for r in ranks:
        assert_close(r["ddp"], expected)
        assert_close(r["bare"], expected)
    for p, q in zip(ranks[0]["ddp"], ranks[1]["ddp"]):
        assert torch.equal(p, q)  # every rank applies the same update


def test_inversions_are_split_between_ranks(two_ranks):
    _, ranks = two_ranks
    layers = 4
    rounds = [r["inverted"] for r in ranks]
    assert len(rounds[0]) == len(rounds[1]) == 3  # t = 1, 3, 6
    for per_rank in zip(*rounds):
        assert sum(per_rank) == layers and all(0 < n < layers for n in per_rank)


def test_rank0_checkpoint_resumes_on_any_world_size(two_ranks):
    out, ranks = two_ranks
    model_state, opt_state = torch.load(out / "checkpoint.pt")
    resumed_alone = single_process(batches()[RESUME_AT - 1:], opt_state, model_state)
    assert_close(resumed_alone, ranks[0]["ddp"])
    for r in ranks:
        assert_close(r["resumed"], r["ddp"])


def test_distributed_checkpoint_resumes_bit_for_bit(two_ranks):
    _, ranks = two_ranks
    for r in ranks:
        for p, q in zip(r["dcp_resumed"], r["ddp"]):
            assert torch.equal(p, q)


def test_kfac_two_ranks_equal_one_process_on_the_union(two_ranks):
    _, ranks = two_ranks
    expected = single_process(batches(), kind=fastfoof.KFAC)
    for r in ranks:
        assert_close(r["kfac"], expected)


def test_low_rank_two_ranks_equal_one_process_on_the_union(two_ranks):
    _, ranks = two_ranks
    expected = single_process(batches(), rank=LOW_RANK)
    for r in ranks:
        assert_close(r["low_rank"], expected)
    for per_rank in zip(*(r["decomposed"] for r in ranks)):  # t = 1, 3, 6: the 4 layers split between ranks
        assert sum(per_rank) == 4 and all(0 < n < 4 for n in per_rank)
