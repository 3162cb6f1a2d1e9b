"""FOOF and KFAC inside the frameworks people train with: PyTorch Lightning and accelerate, each compared
with the same training written by hand (which the other test modules check against independent
computations). Skipped where a framework is not installed (CI installs none of them)."""
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastfoof
from helpers import importorskip

STEPS, CLIP = 4, 0.1
KW = dict(lr=0.1, momentum=0.9, inv_period=2, stats_steps=1)
WARM_UP_AT = 2  # before step 3, which observes nothing of its own (T = 2, S = 1)


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def data():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(STEPS)]


def scaled(kind, scaler):
    """KFAC's empirical G is recorded in the scaled backward: it reads the scale from the grad_scaler."""
    return {"grad_scaler": scaler} if kind is fastfoof.KFAC else {}


def by_hand(kind, clip=CLIP):
    """fp16 autocast on the CPU, GradScaler, unscale, clip the gradient norm, step."""
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    opt = kind(model, **KW, **scaled(kind, scaler))
    for x, y in data():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        scaler.step(opt)
        scaler.update()
    return model, opt


def assert_same(model, twin, tolerance=0.0):
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q) or ((p - q).norm() / q.norm()).item() <= tolerance


@pytest.mark.parametrize("kind", [fastfoof.FOOF, fastfoof.KFAC])
def test_unscale_clip_step_by_hand_equals_clipping_without_a_scaler(kind):
    """By hand, FOOF takes GradScaler's unscaled grads (a power-of-two scale: exactly the fp32 grads). KFAC's
    G from the scaled fp16 output gradients differs from the unscaled ones' by their rounding only (1e-8 here;
    without grad_scaler, by its scale²: 2–4% in the weights after 4 steps)."""
    model, opt = by_hand(kind)
    twin = make_model()
    twin_opt = kind(twin, **KW)
    for x, y in data():
        twin_opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = F.cross_entropy(twin(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), CLIP)
        twin_opt.step()
    assert opt.schedule.steps == twin_opt.schedule.steps == STEPS
    assert_same(model, twin, 0.0 if kind is fastfoof.FOOF else 1e-6)


def test_kfac_warns_where_it_cannot_unscale_its_fisher():
    """Gradients unscaled before step() and no grad_scaler: G keeps the scale², which KFAC says once."""
    model = make_model()
    opt = fastfoof.KFAC(model, **KW)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x, y = data()[0]
    scaler.scale(F.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    with pytest.warns(RuntimeWarning, match="grad_scaler"):
        scaler.step(opt)


# ---- PyTorch Lightning -------------------------------------------------------------------------------

def lightning_module(kind, manual=False, warm_up=False):
    pl = importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = make_model()
            self.automatic_optimization = not manual

        def configure_optimizers(self):
            return kind(self.net, **KW, **scaled(kind, getattr(self.trainer.precision_plugin, "scaler", None)))

        def training_step(self, batch, index):
            x, y = batch
            if not manual:
                return F.cross_entropy(self.net(x), y)
            opt = self.optimizers()
            if warm_up and index == WARM_UP_AT:
                with opt.warm_up():  # through Lightning's wrapper of the optimizer
                    self.net(x)
            opt.zero_grad()
            self.manual_backward(F.cross_entropy(self.net(x), y))
            opt.step()

    return Module()


def fit(module, **trainer_kw):
    pl = importorskip("lightning.pytorch")
    loader = torch.utils.data.DataLoader(data(), batch_size=None)
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **trainer_kw)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers).*")
        trainer.fit(module, loader)
    return trainer


@pytest.mark.parametrize("kind", [fastfoof.FOOF, fastfoof.KFAC])
def test_lightning_16_mixed_with_gradient_clipping_equals_the_hand_written_loop(kind):
    """Lightning's 16-mixed precision with gradient_clip_val: it unscales and clips, GradScaler hands FOOF the
    non-finite flag; the same as by hand."""
    pl = importorskip("lightning.pytorch")
    from lightning.pytorch.plugins.precision import MixedPrecision

    module = lightning_module(kind)
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))
    trainer = fit(module, plugins=[precision], gradient_clip_val=CLIP)
    assert isinstance(trainer, pl.Trainer)
    model, opt = by_hand(kind)
    assert trainer.optimizers[0].schedule.steps == opt.schedule.steps == STEPS
    assert_same(module.net, model)


def test_warm_up_through_lightnings_optimizer_wrapper():
    """`self.optimizers().warm_up()` in manual optimization observes the forwards inside, as on the optimizer
    itself (Lightning's wrapper subclasses the optimizer's class and forwards what it lacks)."""
    module = lightning_module(fastfoof.FOOF, manual=True, warm_up=True)
    trainer = fit(module)
    opt = trainer.optimizers[0]
    model = make_model()
    twin = fastfoof.FOOF(model, **KW)
    for index, (x, y) in enumerate(data()):
        if index == WARM_UP_AT:
            with twin.warm_up():
                model(x)
        twin.zero_grad()
        F.cross_entropy(model(x), y).backward()
        twin.step()
    assert opt.schedule.steps == twin.schedule.steps == STEPS
    assert_same(module.net, model)
    state, twin_state = opt.state[module.net[0].weight], twin.state[model[0].weight]
    assert torch.equal(state["ema_count"], twin_state["ema_count"])  # the warm-up batch was observed


# ---- accelerate --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", [fastfoof.FOOF, fastfoof.KFAC])
def test_accelerate_fp16_with_clip_grad_norm_equals_the_hand_written_loop(kind):
    """accelerate's fp16 path (GradScaler, `clip_grad_norm_` unscales, AcceleratedOptimizer steps through the
    scaler). accelerate runs no GradScaler on the CPU, so the test gives it one, as on a GPU."""
    accelerate = importorskip("accelerate")
    model = make_model()
    accelerator = accelerate.Accelerator(mixed_precision="fp16", cpu=True)
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8), True
    prepared, opt = accelerator.prepare(model, kind(model, **KW, **scaled(kind, accelerator.scaler)))
    for x, y in data():
        opt.zero_grad()
        accelerator.backward(F.cross_entropy(prepared(x), y))
        accelerator.clip_grad_norm_(prepared.parameters(), CLIP)
        opt.step()
    twin, twin_opt = by_hand(kind)
    assert opt.optimizer.schedule.steps == twin_opt.schedule.steps == STEPS
    assert_same(model, twin)


# ---- torch.distributed.checkpoint --------------------------------------------------------------------

def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))


DCP_RUNS = {"foof": (fastfoof.FOOF, {}), "foof_rank": (fastfoof.FOOF, {"rank": 4}),
            "kfac_mc": (fastfoof.KFAC, {"fisher": "mc"}), "kfac_exact": (fastfoof.KFAC, {"damping_mode": "exact"})}


def conv_batches(steps):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 5, (4,), generator=g)) for _ in range(steps)]


def conv_step(model, opt, x, y):
    opt.zero_grad()
    logits = model(x)
    if isinstance(opt, fastfoof.KFAC) and opt.fisher == "mc":
        opt.backward_fisher(logits)
    F.cross_entropy(logits, y).backward()
    opt.step()


@pytest.mark.parametrize("name", list(DCP_RUNS))
def test_distributed_checkpoint_round_trip_resumes_bit_for_bit(name, tmp_path):
    """get/set_optimizer_state_dict with dcp.save/dcp.load to a folder, into a fresh model and optimizer
    (whose state dict DCP loads into): training goes on exactly as without the checkpoint."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import state_dict as dsd

    kind, options = DCP_RUNS[name]
    kw = dict(KW, momentum=0.9, dampening=0.1, **options)
    data = conv_batches(7)
    model = conv_net()
    opt = kind(model, **kw)
    for x, y in data[:3]:
        conv_step(model, opt, x, y)
    dcp.save({"model": dsd.get_model_state_dict(model), "optim": dsd.get_optimizer_state_dict(model, opt)},
             checkpoint_id=tmp_path)
    for x, y in data[3:]:
        conv_step(model, opt, x, y)
    torch.manual_seed(1)
    resumed = conv_net()
    for p in resumed.parameters():
        p.data.normal_()  # nothing of the fresh model's own may survive the load
    resumed_opt = kind(resumed, **kw)
    state = {"model": dsd.get_model_state_dict(resumed), "optim": dsd.get_optimizer_state_dict(resumed, resumed_opt)}
    dcp.load(state, checkpoint_id=tmp_path)
    dsd.set_model_state_dict(resumed, state["model"])
    dsd.set_optimizer_state_dict(resumed, resumed_opt, state["optim"])
    assert resumed_opt.schedule.steps == 3
    for x, y in data[3:]:
        conv_step(resumed, resumed_opt, x, y)
    assert_same(resumed, model)


@pytest.mark.parametrize("name", ["foof", "kfac_mc"])
def test_taking_a_checkpoint_of_a_fresh_optimizer_changes_nothing(name):
    """DCP makes a fresh optimizer's state by a step with zero gradients at lr 0; FOOF does not count it."""
    from torch.distributed.checkpoint import state_dict as dsd

    kind, options = DCP_RUNS[name]
    runs = []
    for checkpoint in (False, True):
        model = conv_net()
        opt = kind(model, **KW, **options)
        if checkpoint:
            dsd.get_optimizer_state_dict(model, opt)
        for x, y in conv_batches(4):
            conv_step(model, opt, x, y)
        runs.append(model)
    assert_same(*runs)


# ---- a clone's root as the working directory ------------------------------------------------------------

ROOT = Path(__file__).resolve().parent.parent


def python_in_root(code: str, pythonpath: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)


def test_the_clones_kernels_folder_does_not_shadow_a_kernels_package(tmp_path):
    """Run from the clone's root, `import kernels` (transformers and peft import the `kernels` distribution)
    finds the installed package, or nothing; fastfoof.kernels stays importable."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("CUDAProperties = 'the installed kernels'\n")
    found = python_in_root("import kernels, fastfoof.kernels.update; print(kernels.CUDAProperties)", str(tmp_path))
    assert found.returncode == 0 and found.stdout.strip() == "the installed kernels", found.stderr
    elsewhere = python_in_root("try:\n import kernels\n print(kernels.__file__)\nexcept ModuleNotFoundError as e:\n"
                               " print(e)", "")
    assert elsewhere.returncode == 0 and elsewhere.stdout.strip() != str(ROOT / "kernels" / "__init__.py"), \
        elsewhere.stdout + elsewhere.stderr


def test_a_package_that_fails_to_import_otherwise_skips(tmp_path, monkeypatch):
    """A torchvision built for another torch raises RuntimeError on import: the optional tests skip."""
    (tmp_path / "mismatched_build.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(pytest.skip.Exception, match="RuntimeError: operator torchvision::nms"):
        importorskip("mismatched_build")


# ---- transformers.Trainer ------------------------------------------------------------------------------

class Classifier(nn.Module):
    """What Trainer expects of a model: keyword inputs, a loss in its output."""

    def __init__(self):
        super().__init__()
        self.net = make_model()

    def forward(self, x, labels):
        return {"loss": F.cross_entropy(self.net(x), labels)}


@pytest.mark.parametrize("kind", [fastfoof.FOOF, fastfoof.KFAC])
def test_transformers_trainer_steps_as_the_hand_written_loop(kind, tmp_path):
    """Trainer with `optimizers=(FOOF(...), None)`: its own linear schedule and gradient clipping, in batch
    order (no shuffling): the same as that loop written by hand."""
    importorskip("transformers")
    from transformers import Trainer, TrainingArguments

    batches = data()
    dataset = [{"x": x[i], "labels": y[i]} for x, y in batches for i in range(len(y))]
    model = Classifier()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=STEPS,
                             learning_rate=KW["lr"], max_grad_norm=CLIP, report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_drop_last=True, disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, optimizers=(kind(model, **KW), None))
    trainer._get_train_sampler = lambda *args: torch.utils.data.SequentialSampler(dataset)
    trainer.train()
    twin = Classifier()
    opt = kind(twin, **KW)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: max(0.0, (STEPS - t) / STEPS))  # Trainer's linear
    for x, y in batches:
        opt.zero_grad()
        twin(x, y)["loss"].backward()
        torch.nn.utils.clip_grad_norm_(twin.parameters(), CLIP)
        opt.step()
        schedule.step()
    assert trainer.optimizer.optimizer.schedule.steps == opt.schedule.steps == STEPS
    for p, q in zip(model.parameters(), twin.parameters()):
        assert ((p - q).norm() / q.norm()).item() <= 1e-6
