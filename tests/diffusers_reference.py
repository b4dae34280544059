"""Helpers of the parity tests against diffusers (test_mmdit.py, test_flux.py, test_vae.py)."""

import numpy as np
import torch


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter of a torch model drawn at random, so that a parameter sent to the wrong
    place (or a zero-initialised layer hiding one) changes the output: weights with two or more
    axes N(0, 1/fan_in) (unit-variance outputs), other weights (norm scales) 1 + N(0, 0.3²),
    biases N(0, 0.3²). Draws in ``named_parameters`` order from ``seed``; returns the model
    in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim > 1:
                p.copy_(noise / np.sqrt(p[0].numel()))
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.3 * noise)
            else:
                p.copy_(0.3 * noise)
    return model.eval()


def relative_error(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs|, the shapes equal."""
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    assert ours.shape == theirs.shape
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())
