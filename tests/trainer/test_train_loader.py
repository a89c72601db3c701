"""The trainer's loaders and epoch mechanics: per-sample seeds, persistent workers, repeated
augmentation, mid-epoch recovery, the checkpoint history, gradient accumulation and DeiT's
distillation loss."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.data.distributed_sampler import RepeatAugSampler
from timm.loss import SoftTargetCrossEntropy

import transmix_train.main as train_main
from train_tiny import EXACT_FIELDS, read_metrics, TINY
from transmix_train.checkpoint import read_checkpoint
from transmix_train.config import parse_args
from transmix_train.data import DataSettings, InMemoryImages
from transmix_train.engine import DistillationLoss, StepConfig, train_one_epoch
from transmix_train.loader import create_loaders, Loaders, SeededSampler
from transmix_train.main import main

RANDOM_EVERYWHERE = [*TINY, "--reprob", "0.5", "--mixup-mode", "elem", "--model-ema", "--model-ema-decay", "0.9",
                     "--warmup-epochs", "1", "--clip-grad", "1.0"]


def _weights(path) -> dict[str, torch.Tensor]:
    checkpoint = read_checkpoint(path)
    return {**checkpoint["state_dict"], **{f"ema.{k}": v for k, v in checkpoint["state_dict_ema"].items()}}


def _assert_same_run(output_a, output_b) -> None:
    rows_a = [{k: r[k] for k in EXACT_FIELDS} for r in read_metrics(output_a)]
    rows_b = [{k: r[k] for k in EXACT_FIELDS} for r in read_metrics(output_b)]
    assert rows_a == rows_b
    weights_a, weights_b = _weights(output_a / "last.pth"), _weights(output_b / "last.pth")
    for name, tensor in weights_a.items():
        assert torch.equal(tensor, weights_b[name]), f"{name} differs"


def test_augmentation_does_not_depend_on_the_worker_count(tmp_path):
    # RandAugment, crops and flips in 2 worker processes must give what the main process gives.
    argv = [*RANDOM_EVERYWHERE, "--epochs", "2", "--limit-train-batches", "3"]
    main([*argv, "--output", str(tmp_path / "inline")])
    main([*argv, "--workers", "2", "--output", str(tmp_path / "workers")])
    _assert_same_run(tmp_path / "inline", tmp_path / "workers")


def test_float16_autocast_uses_timms_loss_scaler_and_resumes_exactly(tmp_path):
    argv = [*RANDOM_EVERYWHERE, "--epochs", "2", "--limit-train-batches", "3", "--amp", "--amp-dtype", "float16"]
    main([*argv, "--output", str(tmp_path / "straight")])
    main([*argv, "--output", str(tmp_path / "split"), "--stop-after-epochs", "1"])
    scaler = read_checkpoint(tmp_path / "split" / "last.pth")["scaler"]
    assert scaler and scaler["scale"] > 0, f"no loss-scaler state in the checkpoint: {scaler}"
    main(["--resume", str(tmp_path / "split" / "last.pth")])
    _assert_same_run(tmp_path / "straight", tmp_path / "split")


class _WorkerPids(torch.utils.data.Dataset):
    """Each sample's label is the process that made it."""

    transform = None

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        return np.zeros((3, 4, 4), dtype=np.uint8), os.getpid()


def _loaders(argv: list[str], train_set, val_set):
    args = parse_args([*TINY, *argv])
    settings = DataSettings((3, 4, 4), (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear", augment=False)
    return create_loaders(args, train_set, val_set, settings, rank=0, world_size=1, device=torch.device("cpu"))


def test_workers_persist_across_epochs():
    loaders = _loaders(["--workers", "2", "--batch-size", "4", "--reprob", "0"], _WorkerPids(), _WorkerPids())
    pids = []
    for epoch in range(2):
        loaders.set_epoch(epoch)
        pids.append({int(pid) for _, labels in loaders.train for pid in labels})
    assert os.getpid() not in pids[0] and len(pids[0]) == 2
    assert pids[0] == pids[1], "the train workers were started again for the second epoch"


class _MadeCount(torch.utils.data.Dataset):
    """Counts, in a file, the samples the workers made (a worker's memory is not the test's)."""

    transform = None

    def __init__(self, path) -> None:
        self.path = path

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int):
        with open(self.path, "a") as handle:
            handle.write(f"{index}\n")
        return np.zeros((3, 4, 4), dtype=np.uint8), index


def _made(path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def _wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_set_epoch_starts_the_train_workers_before_the_loop_asks(tmp_path):
    train_file, val_file = tmp_path / "train", tmp_path / "val"
    loaders = _loaders(["--workers", "2", "--batch-size", "4", "--reprob", "0"], _MadeCount(train_file),
                       _MadeCount(val_file))
    loaders.set_epoch(0)
    loaders.start_val()
    # Nothing iterates yet: the workers make the first batches (2 per worker) on their own.
    assert _wait_for(lambda: _made(train_file) >= 16), f"train samples made before iterating: {_made(train_file)}"
    assert _wait_for(lambda: _made(val_file) >= 16), f"val samples made before iterating: {_made(val_file)}"
    # The loop gets the started pass (no second pass from the sampler): 16 samples, each once.
    assert sorted(int(i) for _, labels in loaders.train for i in labels) == list(range(16))
    assert _made(train_file) == 16, f"samples made for one epoch: {_made(train_file)} (expected 16)"


def test_next_epoch_starts_before_evaluation(monkeypatch, tmp_path):
    events = []
    real_set_epoch, real_evaluate = Loaders.set_epoch, train_main.evaluate
    monkeypatch.setattr(Loaders, "set_epoch",
                        lambda self, epoch, **kw: (events.append(f"set_epoch {epoch}"), real_set_epoch(self, epoch, **kw)))
    monkeypatch.setattr(train_main, "evaluate",
                        lambda *a, **kw: (events.append("evaluate"), real_evaluate(*a, **kw))[1])
    main([*TINY, "--epochs", "3", "--limit-train-batches", "1", "--output", str(tmp_path / "run")])
    assert events == ["set_epoch 0", "set_epoch 1", "evaluate", "set_epoch 2", "evaluate", "evaluate"], events


def _digits_like(count: int) -> InMemoryImages:
    rng = np.random.default_rng(3)
    return InMemoryImages(rng.integers(0, 256, (count, 16, 16, 3), dtype=np.uint8), rng.integers(0, 10, count))


def test_aug_repeats_shows_each_image_three_times_augmented_differently():
    train = _digits_like(12)
    args = parse_args([*TINY, "--aug-repeats", "3", "--batch-size", "4"])
    settings = DataSettings((3, 16, 16), (0.5,) * 3, (0.25,) * 3, 1.0, "bilinear", augment=True)
    loaders = create_loaders(args, train, _digits_like(4), settings, rank=0, world_size=1,
                             device=torch.device("cpu"))
    assert isinstance(loaders.sampler.sampler, RepeatAugSampler)
    loaders.set_epoch(0)
    order = list(loaders.sampler)
    indices = [index for index, _ in order]
    assert indices == [i for i in indices[::3] for _ in range(3)], f"not three consecutive copies: {indices}"
    dataset = loaders.train.loader.dataset
    copies = [dataset[item][0] for item in order[:3]]
    assert not (np.array_equal(copies[0], copies[1]) and np.array_equal(copies[1], copies[2])), \
        "the three copies of an image got the same augmentation"


def test_seeds_follow_seed_epoch_and_position_only():
    base = torch.utils.data.SequentialSampler(range(10))
    base.set_epoch = lambda epoch: None
    sampler = SeededSampler(base, seed=5, rank=0)
    sampler.set_epoch(1)
    first = list(sampler)
    torch.manual_seed(123), np.random.seed(7)  # the process's random state plays no part
    assert list(sampler) == first
    sampler.skip(4)
    assert len(sampler) == 6 and list(sampler) == first[4:]
    assert list(sampler) == first, "skip() must apply to one epoch only"
    sampler.set_epoch(2)
    assert [seed for _, seed in sampler] != [seed for _, seed in first]


class _Crash(RuntimeError):
    pass


def test_resume_from_a_mid_epoch_recovery_checkpoint_is_exact(tmp_path, monkeypatch):
    argv = [*RANDOM_EVERYWHERE, "--epochs", "2", "--limit-train-batches", "5", "--grad-accum-steps", "2",
            "--recovery-interval", "1"]
    main([*argv, "--output", str(tmp_path / "straight")])
    assert not list((tmp_path / "straight").glob("recovery-*.pth")), "recovery files outlive their epoch"

    real_save = train_main._save_recovery
    written = []

    def save_then_crash(run, history, best, epoch, num_updates, progress, log):
        real_save(run, history, best, epoch, num_updates, progress, log)
        written.append((epoch, num_updates, progress.steps))
        if epoch == 1 and len([w for w in written if w[0] == 1]) == 2:
            raise _Crash("killed in the middle of epoch 1")

    monkeypatch.setattr(train_main, "_save_recovery", save_then_crash)
    with pytest.raises(_Crash):
        main([*argv, "--output", str(tmp_path / "crashed")])
    monkeypatch.setattr(train_main, "_save_recovery", real_save)
    recovery = sorted((tmp_path / "crashed").glob("recovery-*.pth"))
    assert [path.name for path in recovery] == ["recovery-1-5.pth"], recovery  # 3 updates per epoch: 3 + 2
    assert read_checkpoint(recovery[0])["progress"]["steps"] == 4
    main(["--resume", str(recovery[0])])
    _assert_same_run(tmp_path / "straight", tmp_path / "crashed")


def test_checkpoint_hist_keeps_the_best_epochs(tmp_path):
    output = tmp_path / "run"
    main([*TINY, "--epochs", "4", "--checkpoint-hist", "2", "--lr", "3e-3", "--output", str(output)])
    top1 = [float(row["val_top1"]) for row in read_metrics(output)]
    best_two = sorted(range(4), key=lambda epoch: -top1[epoch])[:2]  # stable: the earlier epoch wins a tie
    kept = sorted(path.name for path in output.glob("checkpoint-*.pth"))
    assert kept == sorted(f"checkpoint-{epoch}.pth" for epoch in best_two), (top1, kept)
    for epoch in best_two:
        assert read_checkpoint(output / f"checkpoint-{epoch}.pth")["epoch"] == epoch


def _tiny_step_config(accum: int) -> StepConfig:
    return StepConfig(device=torch.device("cpu"), grad_accum_steps=accum, log=lambda line: None)


def test_last_partial_accumulation_group_is_weighted_by_its_real_size():
    torch.manual_seed(0)
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]  # 3 micro-batches, accum 2
    model = torch.nn.Linear(5, 3)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    mixer = lambda images, labels: (images, SimpleNamespace(targets=lambda probe: F.one_hot(labels, 3).float()))
    scheduler = SimpleNamespace(step_update=lambda num_updates: None)
    criterion = DistillationLoss()
    train_one_epoch(model, batches, mixer, None, criterion, optimizer, scheduler, _tiny_step_config(2), 0, 0)

    expected = torch.nn.Linear(5, 3)
    expected.load_state_dict(start)
    for group in (batches[:2], batches[2:]):  # each update: the mean loss over its own micro-batches
        expected.zero_grad()
        loss = sum(SoftTargetCrossEntropy()(expected(x), F.one_hot(y, 3).float()) for x, y in group) / len(group)
        loss.backward()
        with torch.no_grad():
            for p in expected.parameters():
                p -= p.grad
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


class _Teacher(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits


@pytest.mark.parametrize("kind", ["soft", "hard"])
def test_distillation_loss_matches_deit(kind):
    torch.manual_seed(1)
    batch, classes, alpha, tau = 6, 7, 0.3, 2.5
    logits, logits_dist, teacher = (torch.randn(batch, classes, dtype=torch.float64) * 3 for _ in range(3))
    targets = torch.softmax(torch.randn(batch, classes, dtype=torch.float64), dim=1)
    loss = DistillationLoss(_Teacher(teacher), kind, alpha, tau)(None, (logits, logits_dist), targets)

    base = -(targets * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
    if kind == "soft":  # DeiT losses.py: sum of KL(teacher || student) at tau, * tau^2 / (B * K)
        p_teacher = torch.softmax(teacher / tau, dim=1)
        kl = (p_teacher * (torch.log(p_teacher) - torch.log_softmax(logits_dist / tau, dim=1))).sum()
        distill = kl * tau ** 2 / (batch * classes)
    else:  # cross-entropy to the teacher's argmax
        distill = -torch.log_softmax(logits_dist, dim=1)[torch.arange(batch), teacher.argmax(dim=1)].mean()
    expected = (1 - alpha) * base + alpha * distill
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0.0)
