"""timm's recipe switches in transmix-train: ``--bce-loss`` (and its ``--bce-*`` options),
``--mixup-off-epoch`` and ``--grad-checkpointing`` (the TransMix probe reads each forward once).

Each test looks at what the training step itself saw (its images, targets, loss, attention), by
wrapping the run's loader, loss and optimizer around the real ones.
"""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import assert_close
from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from train_tiny import EXACT_FIELDS, read_metrics, TINY
from transmix_train.build import base_loss, build_run
from transmix_train.checkpoint import read_checkpoint
from transmix_train.config import parse_args
from transmix_train.distributed import init_processes
from transmix_train.engine import DistillationLoss
from transmix_train.main import main, run_training

ONE_STEP = [*TINY, "--epochs", "1", "--limit-train-batches", "1", "--limit-val-batches", "1"]
NUM_CLASSES, SMOOTHING = 10, 0.1  # digits; the demo's smoothing


def _run(tmp_path, *flags: str):
    args = parse_args([*ONE_STEP, *flags, "--output", str(tmp_path / "run")])
    return build_run(args, init_processes("cpu", None), lambda message: None)


class _Tap:
    """Keeps, per epoch, each batch as the loader gave it (before mixing) and what the loss got."""

    def __init__(self, run) -> None:
        self.loader, self.criterion = run.train_loader, run.criterion
        self.epochs: list[dict[str, list]] = []
        run.train_loader, run.criterion = self, self.loss

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.epochs.append({"clean": [], "step": []})
        for images, labels in self.loader:
            self.epochs[-1]["clean"].append((images.clone(), labels.clone()))  # the mixer works in place
            yield images, labels

    def loss(self, images, outputs, targets):
        value = self.criterion(images, outputs, targets)
        self.epochs[-1]["step"].append({"images": images.detach().clone(), "outputs": outputs.detach().clone(),
                                        "targets": targets.detach().clone(), "loss": value.detach().clone()})
        return value


def _smoothed_one_hot(labels: torch.Tensor) -> torch.Tensor:
    off = SMOOTHING / NUM_CLASSES
    return torch.full((labels.shape[0], NUM_CLASSES), off).scatter_(1, labels[:, None], 1.0 - SMOOTHING + off)


# ------------------------------------------------------------------------------------------
# --bce-loss
# ------------------------------------------------------------------------------------------


def test_bce_loss_is_timms_binary_cross_entropy_of_the_step_targets(tmp_path):
    run = _run(tmp_path, "--bce-loss")
    tap = _Tap(run)
    run_training(run, lambda message: None)
    run.probe.remove()
    (step,) = tap.epochs[0]["step"]
    outputs, targets = step["outputs"], step["targets"]
    assert not torch.equal(targets, _smoothed_one_hot(tap.epochs[0]["clean"][0][1])), "the batch was not mixed"
    assert_close("loss", step["loss"], BinaryCrossEntropy()(outputs, targets), rtol=1e-6)
    soft_ce = SoftTargetCrossEntropy()(outputs, targets)
    assert (step["loss"] - soft_ce).abs() > 1e-3, "the step used soft-target cross-entropy"


def test_bce_options_under_deit_distillation():
    args = parse_args([*TINY, "--bce-loss", "--bce-target-thresh", "0.2", "--bce-pos-weight", "2.5", "--bce-sum"])
    bce = BinaryCrossEntropy(target_threshold=0.2, pos_weight=2.5, sum_classes=True)
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, NUM_CLASSES))
    images, logits, logits_dist = torch.randn(6, 3, 4, 4), torch.randn(6, NUM_CLASSES), torch.randn(6, NUM_CLASSES)
    targets = torch.softmax(torch.randn(6, NUM_CLASSES), dim=1)
    loss = DistillationLoss(teacher, "hard", alpha=0.3, tau=1.0, base=base_loss(args, torch.device("cpu")))
    expected = 0.7 * bce(logits, targets) + \
        0.3 * nn.functional.cross_entropy(logits_dist, teacher(images).argmax(1))
    assert_close("distillation loss", loss(images, (logits, logits_dist), targets), expected, rtol=1e-6)
    # a distilled model trained without a teacher: both heads learn the targets through the BCE
    plain = DistillationLoss(base=base_loss(args, torch.device("cpu")))
    both = (bce(logits, targets) + bce(logits_dist, targets)) / 2
    assert_close("two heads", plain(images, (logits, logits_dist), targets), both, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# --mixup-off-epoch
# ------------------------------------------------------------------------------------------


def test_mixup_off_epoch_trains_unmixed_from_that_epoch(tmp_path):
    run = _run(tmp_path, "--epochs", "3", "--mixup-off-epoch", "1")
    tap = _Tap(run)
    run_training(run, lambda message: None)
    run.probe.remove()
    assert len(tap.epochs) == 3
    for epoch, seen in enumerate(tap.epochs):
        assert len(seen["step"]) == 1
        for (clean, labels), step in zip(seen["clean"], seen["step"]):
            unmixed = torch.equal(step["images"], clean)
            one_hot = torch.equal(step["targets"], _smoothed_one_hot(labels))
            if epoch < 1:
                assert not unmixed and not one_hot, f"epoch {epoch} (before --mixup-off-epoch 1) was not mixed"
            else:
                assert unmixed and one_hot, f"epoch {epoch} (from --mixup-off-epoch 1 on) was mixed"


def test_mixup_off_epoch_survives_resume(tmp_path):
    argv = [*TINY, "--epochs", "2", "--warmup-epochs", "1", "--mixup-off-epoch", "1", "--mixup-mode", "elem"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    main([*argv, "--output", str(straight)])
    main([*argv, "--output", str(split), "--stop-after-epochs", "1"])
    main(["--resume", str(split / "last.pth")])  # its saved config: the switch is part of it
    assert [{k: r[k] for k in EXACT_FIELDS} for r in read_metrics(split)] == \
        [{k: r[k] for k in EXACT_FIELDS} for r in read_metrics(straight)]
    final_straight, final_split = (read_checkpoint(path / "last.pth")["state_dict"] for path in (straight, split))
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_split[name]), f"{name} differs after resume"


# ------------------------------------------------------------------------------------------
# --grad-checkpointing
# ------------------------------------------------------------------------------------------


def _probed_step(tmp_path, *flags: str) -> dict:
    """One TransMix training step: the attention at loss time and after backward, the loss, the
    gradients, how often the probed q projection ran and how often the probe stored a capture."""
    run = _run(tmp_path, "--drop-path", "0.2", *flags)  # drop path: train-mode randomness in the blocks
    adapter = run.probe._adapter
    seen = {"q_calls": 0, "stores": []}

    def count_calls(_module, _args, _output):
        seen["q_calls"] += 1  # the training step's forward, its recomputation; evaluation is read below

    adapter.attns[0].q_norm.register_forward_hook(count_calls)
    keep = adapter.keep

    def counting_keep(key, tensor):
        before = adapter.captured.get(key)
        keep(key, tensor)
        if adapter.captured.get(key) is not before:
            seen["stores"].append(key)

    adapter.keep = counting_keep
    criterion, step = run.criterion, run.optimizer.step

    def loss(images, outputs, targets):
        seen.update(attention=run.probe.attention().clone(), targets=targets.clone())
        seen["loss"] = criterion(images, outputs, targets)
        return seen["loss"]

    def optimizer_step(*args, **kwargs):  # after backward, before the weights change
        seen.update(step_q_calls=seen["q_calls"], step_stores=list(seen["stores"]),
                    after_backward=run.probe.attention().clone(),
                    grads={name: p.grad.clone() for name, p in run.module.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    run.criterion, run.optimizer.step = loss, optimizer_step
    seen["checkpointing"] = run.module.grad_checkpointing
    run_training(run, lambda message: None)
    run.probe.remove()
    return seen


def test_grad_checkpointing_probe_reads_each_forward_once(tmp_path):
    plain = _probed_step(tmp_path / "plain")
    checkpointed = _probed_step(tmp_path / "checkpointed", "--grad-checkpointing")
    assert not plain["checkpointing"] and checkpointed["checkpointing"]
    # the blocks ran again in backward (the checkpointing is on) ...
    assert (plain["step_q_calls"], checkpointed["step_q_calls"]) == (1, 2)
    # ... but the probe kept the forward's q and k only: one capture each
    index = checkpointed["step_stores"][0][1]
    assert plain["step_stores"] == checkpointed["step_stores"] == [("q", index), ("k", index)]
    # the same weights and images give the same attention, targets and loss, before and after backward
    for run in (plain, checkpointed):
        assert torch.equal(run["after_backward"], run["attention"])
    assert torch.equal(checkpointed["attention"], plain["attention"])
    assert torch.equal(checkpointed["targets"], plain["targets"])
    assert torch.equal(checkpointed["loss"], plain["loss"])
    assert plain["grads"].keys() == checkpointed["grads"].keys()
    for name, grad in plain["grads"].items():
        assert_close(name, checkpointed["grads"][name], grad, atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# bad values stop at set-up
# ------------------------------------------------------------------------------------------


BAD = {
    "mixup-off-negative": (["--mixup-off-epoch", "-1"], "--mixup-off-epoch must be >= 0"),
    "bce-sum-alone": (["--bce-sum"], "--bce-sum sets up the BCE loss: it needs --bce-loss"),
    "bce-thresh-alone": (["--bce-target-thresh", "0.5"], "--bce-target-thresh sets up the BCE loss"),
    "bce-thresh-range": (["--bce-loss", "--bce-target-thresh", "1.5"], "--bce-target-thresh must be in [0, 1)"),
    "bce-pos-weight": (["--bce-loss", "--bce-pos-weight", "0"], "--bce-pos-weight must be a finite number > 0"),
    "wandb-resume-id": (["--wandb-resume-id", "abc123"], "--wandb-resume-id abc123 continues a W&B run: it needs "
                                                         "--resume"),
    "grad-checkpointing": ([], "--grad-checkpointing: --model pit_ti_224 does not support it"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_switch_stops_before_writing(tmp_path, case):
    flags, named = BAD[case]
    output = tmp_path / "run"
    argv = [*TINY, *flags, "--output", str(output)]
    if case == "grad-checkpointing":  # a timm model without checkpointing (and without the demo's DeiT keywords)
        config = tmp_path / "pit.yaml"
        config.write_text(yaml.safe_dump({"data": "digits", "model": "pit_ti_224", "mix": "none"}))
        argv = ["--config", str(config), "--device", "cpu", "--grad-checkpointing", "--output", str(output)]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert named in str(exit_info.value.code)
    assert not output.exists(), "a bad switch left an output folder behind"
