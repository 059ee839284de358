"""Writes tests/data/torch_sgd/*.npz: what torch.optim.SGD and torch.nn.Linear do.

Run with the bench interpreter (torch), from the repository root:

    /work/venv-bench/bin/python scripts/make_torch_sgd_fixtures.py

sgd_trajectory.npz: a fixed sequence of gradients and per-step learning rates (a cosine
with warm-up, so the rate changes every step) applied by torch.optim.SGD(momentum=0.9,
dampening=0) with and without Nesterov and coupled weight decay; the weights and momentum
buffers after every step. tests/test_sgd_torch_form.py replays the same inputs through
kd_keras.optim.optimizers.SGD(momentum_form="torch") without torch.

linear_init.npz: statistics of torch.nn.Linear's default initialisation over many layers
(kernel and bias bounds, means, variances), against which kd_keras.nets.initializers is
checked.
"""

import math
import os

import numpy as np
import torch

OUT = os.path.join("tests", "data", "torch_sgd")
SHAPES = [(6, 5), (5,), (3, 3, 2, 4)]
STEPS = 12
MOMENTUM = 0.9


def learning_rates(steps, peak=0.3, warmup=3):
    """Linear warm-up then cosine to 0: a different rate at every step."""
    out = []
    for t in range(steps):
        if t < warmup:
            out.append(peak * (t + 1) / warmup)
        else:
            out.append(0.5 * peak * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup))))
    return np.asarray(out, np.float64)


def trajectory(initial, grads, lrs, nesterov, weight_decay):
    """Weights [steps, ...] and buffers [steps, ...] of torch's SGD per parameter."""
    params = [torch.nn.Parameter(torch.from_numpy(w.copy())) for w in initial]
    opt = torch.optim.SGD(
        params, lr=float(lrs[0]), momentum=MOMENTUM, nesterov=nesterov, weight_decay=weight_decay
    )
    weights = [[] for _ in params]
    buffers = [[] for _ in params]
    for t, step_grads in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = float(lrs[t])
        for p, g in zip(params, step_grads, strict=True):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
        for i, p in enumerate(params):
            weights[i].append(p.detach().numpy().copy())
            buffers[i].append(opt.state[p]["momentum_buffer"].numpy().copy())
    return weights, buffers


def sgd_fixture():
    rng = np.random.default_rng(21)
    initial = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    grads = [[rng.normal(size=s).astype(np.float32) for s in SHAPES] for _ in range(STEPS)]
    lrs = learning_rates(STEPS)
    arrays = {"lrs": lrs, "momentum": np.float64(MOMENTUM)}
    for i, w in enumerate(initial):
        arrays[f"initial_{i}"] = w
        arrays[f"grads_{i}"] = np.stack([g[i] for g in grads])
    for name, nesterov, wd in (("plain", False, 0.0), ("nesterov", True, 0.0), ("wd", False, 0.05)):
        weights, buffers = trajectory(initial, grads, lrs, nesterov, wd)
        arrays[f"{name}_weight_decay"] = np.float64(wd)
        for i in range(len(SHAPES)):
            arrays[f"{name}_weights_{i}"] = np.stack(weights[i])
            arrays[f"{name}_buffers_{i}"] = np.stack(buffers[i])
    np.savez_compressed(os.path.join(OUT, "sgd_trajectory.npz"), **arrays)


def linear_init_fixture():
    """Pooled statistics of nn.Linear(fan_in, fan_out) weights and biases."""
    torch.manual_seed(0)
    arrays = {}
    for fan_in, fan_out in ((16, 256), (512, 64)):
        kernels, biases = [], []
        for _ in range(20):
            layer = torch.nn.Linear(fan_in, fan_out)
            kernels.append(layer.weight.detach().numpy().ravel())
            biases.append(layer.bias.detach().numpy().ravel())
        for name, values in (("kernel", np.concatenate(kernels)), ("bias", np.concatenate(biases))):
            key = f"{fan_in}x{fan_out}_{name}"
            arrays[f"{key}_absmax"] = np.float64(np.abs(values).max())
            arrays[f"{key}_mean"] = np.float64(values.mean())
            arrays[f"{key}_var"] = np.float64(values.var())
            arrays[f"{key}_count"] = np.int64(values.size)
    np.savez_compressed(os.path.join(OUT, "linear_init.npz"), **arrays)


def main():
    os.makedirs(OUT, exist_ok=True)
    sgd_fixture()
    linear_init_fixture()
    print("wrote", sorted(os.listdir(OUT)))


if __name__ == "__main__":
    main()
