"""Choose a retraining rate the model can take before the retraining starts.

A repair retrains a model it did not train with a recipe that is not the
model's own. A rate that suits an SGD-trained model can wreck one trained
otherwise: on bench/thirdparty.py's Adam-trained PreAct-ResNet (Fashion-MNIST)
SGD at defense.lr=0.01 turned it into a constant classifier (89.3% -> 9.9%
clean accuracy) within 20 steps, with or without triggers, while lr 0.003 kept
it (bench/results/ingredients.md). Nothing about the model says which rate it
takes, so the repair tries: a few steps of its own recipe (the first
sampler's triggers, a constant rate) on a copy of the model, then the copy's
accuracy on part of the defender's clean images. The first rate of
``lr, lr/3, lr/10, lr/30`` whose accuracy stays within ``tolerance`` of the
model's own is used for the whole retraining; a model that takes the
configured rate is retrained exactly as without the probe (the probe draws
from its own generator). The trials go into the repair's metrics.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from gdm_ray.core.data import ImageSet
from gdm_ray.core.defense import DefenseConfig, TriggerSampler, retrain
from gdm_ray.core.metrics import clean_accuracy
from gdm_ray.core.model_io import clone_model

__all__ = ["FACTORS", "probe_lr"]

FACTORS = (1.0, 1 / 3, 1 / 10, 1 / 30)  # the rates tried, as fractions of defense.lr, in order
PROBE_IMAGES = 1000  # clean images the probe's accuracy is measured on


def probe_lr(model: nn.Module, clean: ImageSet, samplers: list[TriggerSampler], cfg: DefenseConfig, seed: int) -> dict:
    """Try ``cfg.lr`` and smaller rates for ``cfg.lr_probe_steps`` steps each; returns
    ``{"lr": chosen, "accuracy_before": ..., "trials": [{"lr", "accuracy"}, ...], "kept": bool}``.

    ``kept`` is False when no rate stayed within ``cfg.lr_probe_tolerance``: the rate
    whose copy scored best is then chosen. ``model`` itself is not changed."""
    g = torch.Generator().manual_seed(seed)
    probe = clean.subset(torch.randperm(len(clean), generator=g)[:PROBE_IMAGES])
    before = clean_accuracy(model, probe)
    steps_per_epoch = math.ceil(len(clean) / min(int(cfg.batch_size), len(clean)))
    epochs = int(cfg.lr_probe_steps) / steps_per_epoch
    trials: list[dict] = []
    for factor in FACTORS:
        lr = float(cfg.lr) * factor
        trial = dataclasses.replace(cfg, lr=lr, epochs=epochs, schedule="constant", holdout=0.0, lr_probe_steps=0)
        copy = clone_model(model)
        # one phase: the most anomalous class's triggers, as the retraining starts
        retrain(copy, clean, samplers[:1], trial, torch.Generator().manual_seed(seed + 1))
        acc = clean_accuracy(copy, probe)
        trials.append({"lr": lr, "accuracy": acc})
        if acc >= before - float(cfg.lr_probe_tolerance):
            return {"lr": lr, "accuracy_before": before, "trials": trials, "kept": True}
    best = max(trials, key=lambda t: t["accuracy"])
    return {"lr": best["lr"], "accuracy_before": before, "trials": trials, "kept": False}
