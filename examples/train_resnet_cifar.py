"""Train a ResNet-18 on CIFAR-10 with FOOF: the pattern to copy into your own training script.

    python examples/train_resnet_cifar.py --data-dir ~/data            # cifar-10-batches-py inside
    python examples/train_resnet_cifar.py --data-dir ~/data --resume   # continue from the checkpoint

What it shows: FOOF built from the model, a cosine learning-rate schedule stepped every batch,
FOOF's statistics warm-up before the first step (paper App. K), bf16 autocast on a GPU,
`--compile` for torch.compile, a
checkpoint after every epoch holding model, optimizer (EMA statistics, preconditioners, momentum)
and schedule, from which `--resume` continues exactly where the run stopped.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fastfoof  # noqa: E402
from data import channel_stats, normalise, read_cifar10  # noqa: E402
from models import resnet18  # noqa: E402

DEFAULT_EPOCHS = 30
# --smoke: a narrow ResNet-18 on a few synthetic images; T and S so small that the run (and a resume)
# crosses inversions.
SMOKE_IMAGES = (64, 32)  # train, test
SMOKE_WIDTH = 8
SMOKE = dict(batch_size=16, warmup_batches=2, inv_period=3, stats_steps=2)
SMOKE_EPOCHS = 2


def synthetic_cifar10(train_images: int, test_images: int, seed: int):
    """Random CIFAR-shaped uint8 images and labels, for --smoke without --data-dir."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (train_images + test_images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.randint(0, 10, (train_images + test_images,), generator=gen)
    return images[:train_images], labels[:train_images], images[train_images:], labels[train_images:]


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The standard CIFAR augmentation, batched: random 32x32 crop of the 4-pixel zero-padded image
    and a random horizontal flip."""
    n, _, h, w = images.shape
    padded = F.pad(images, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, images.shape[1], h, w + 8)
    cropped = padded.gather(2, rows.to(images.device))
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, images.shape[1], h, w)
    cropped = cropped.gather(3, cols.to(images.device))
    flip = (torch.rand(n, generator=gen) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], cropped.flip(3), cropped)


def save_checkpoint(path: Path, **state) -> None:
    """Write then rename, so that an interrupted save never leaves a broken checkpoint behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model, images, labels, mean, std, batch_size, autocast) -> tuple[float, float]:
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(images), batch_size):
        x, y = normalise(images[i:i + batch_size], mean, std), labels[i:i + batch_size]
        with autocast:
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
    model.train()
    return loss_sum / len(images), correct / len(images)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, help="folder holding cifar-10-batches-py")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, help=f"default {DEFAULT_EPOCHS} ({SMOKE_EPOCHS} with --smoke)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1,
                        help="peak learning rate of the cosine schedule: the SGD learning rate you would use (FOOF grafts "
                             "its step to SGD's size per layer)")
    parser.add_argument("--damping", type=float, default=3.0,
                        help="FOOF's λ (its default): shapes the direction; BatchNorm parameters step as under SGD")
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="decoupled, as AdamW")
    parser.add_argument("--inv-period", type=int, default=100, help="T: steps between inversions")
    parser.add_argument("--stats-steps", type=int, default=10, help="S: steps observed before each inversion")
    parser.add_argument("--warmup-batches", type=int, default=20,
                        help="forward-only batches that seed FOOF's statistics before the first step")
    parser.add_argument("--no-amp", action="store_true", help="no bf16 autocast on a GPU")
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/resnet18_cifar10.pt"))
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--stop-after", type=int,
                        help="stop after this many epochs in this run (as if preempted); --resume continues")
    parser.add_argument("--log-every", type=int, default=50, help="steps between log lines")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="train the model under torch.compile (one graph; FOOF's hooks only record inputs)")
    parser.add_argument("--smoke", action="store_true",
                        help="a few steps of a narrow ResNet-18 (synthetic data unless --data-dir)")
    args = parser.parse_args(argv)
    if args.data_dir is None and not args.smoke:
        parser.error("--data-dir is required (the folder holding cifar-10-batches-py); --smoke runs without data")
    if args.resume and not args.checkpoint.is_file():
        parser.error(f"--resume: no checkpoint at {args.checkpoint}")
    if args.epochs is None:
        args.epochs = SMOKE_EPOCHS if args.smoke else DEFAULT_EPOCHS
    args.width = SMOKE_WIDTH if args.smoke else 64
    if args.smoke:
        vars(args).update(SMOKE)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    use_amp = device.type == "cuda" and not args.no_amp
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    if args.data_dir is not None:
        x_train, y_train, x_test, y_test = read_cifar10(args.data_dir)
    else:
        x_train, y_train, x_test, y_test = synthetic_cifar10(*SMOKE_IMAGES, args.seed)
    mean, std = (t.to(device) for t in channel_stats(x_train))
    x_train, y_train, x_test, y_test = (t.to(device) for t in (x_train, y_train, x_test, y_test))
    steps_per_epoch = len(x_train) // args.batch_size

    torch.manual_seed(args.seed)
    model = resnet18(num_classes=10, width=args.width).to(device)
    optimizer = fastfoof.FOOF(model, lr=args.lr, damping=args.damping, momentum=args.momentum,
                              weight_decay=args.weight_decay, inv_period=args.inv_period,
                              stats_steps=args.stats_steps)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs * steps_per_epoch)
    # FOOF first, then compile (the other order works too): the compiled forward is one graph that does
    # not recompile as FOOF's schedule moves. Checkpoints hold the plain model's state dict.
    forward = torch.compile(model, fullgraph=True) if args.compile else model

    def batches(epoch: int):
        """The epoch's shuffled, augmented batches; seeded by epoch so that a resumed run sees the same."""
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(x_train), generator=gen).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
            yield normalise(augment(x_train[idx], gen), mean, std), y_train[idx]

    start_epoch = 0
    if args.resume:
        state = torch.load(args.checkpoint, map_location=device, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = state["epoch"]
        print(f"resumed from {args.checkpoint} after epoch {start_epoch}", flush=True)
    elif args.warmup_batches:
        # App. K: seed the statistics from forward passes so the first steps are preconditioned.
        with optimizer.warm_up(), autocast:
            for _, (x, _) in zip(range(args.warmup_batches), batches(-1)):
                forward(x)
        print(f"warm-up: FOOF statistics from {args.warmup_batches} batches", flush=True)

    print(f"ResNet-18 (width {args.width}), {len(x_train)} training images, batch {args.batch_size}, "
          f"{steps_per_epoch} steps/epoch, device {device}{', bf16 autocast' if use_amp else ''}"
          f"{', torch.compile' if args.compile else ''}; "
          f"FOOF lr={args.lr:g} damping={args.damping:g} T={args.inv_period} S={args.stats_steps}", flush=True)
    end_epoch = args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)
    for epoch in range(start_epoch, end_epoch):
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        started = time.perf_counter()
        bar = tqdm(batches(epoch), total=steps_per_epoch, desc=f"epoch {epoch + 1}/{args.epochs}", file=sys.stderr,
                   leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(bar, start=1):
            optimizer.zero_grad(set_to_none=True)
            with autocast:
                logits = forward(x)
                loss = F.cross_entropy(logits.float(), y)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
            correct += (logits.argmax(1) == y).sum()
            if step % args.log_every == 0:
                bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.3g}")
        bar.close()
        seconds = time.perf_counter() - started
        train_loss = loss_sum.item() / steps_per_epoch
        if not math.isfinite(train_loss):
            raise SystemExit(f"error: training loss is {train_loss} in epoch {epoch + 1}: lower --lr or raise --damping")
        train_acc = correct.item() / (steps_per_epoch * args.batch_size)
        test_loss, test_acc = evaluate(model, x_test, y_test, mean, std, 4 * args.batch_size, autocast)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {train_loss!r} acc {train_acc:.2%} | "
              f"test loss {test_loss:.4f} acc {test_acc:.2%} | lr {scheduler.get_last_lr()[0]:.4g} | "
              f"{seconds:.1f} s, {1e3 * seconds / steps_per_epoch:.1f} ms/step | diagnostics {optimizer.diagnostics}",
              flush=True)
        save_checkpoint(args.checkpoint, model=model.state_dict(), optimizer=optimizer.state_dict(),
                        scheduler=scheduler.state_dict(), epoch=epoch + 1,
                        args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    print(f"checkpoint: {args.checkpoint}", flush=True)


if __name__ == "__main__":
    main()
