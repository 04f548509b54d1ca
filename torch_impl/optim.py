"""Optimizers and learning-rate schedules with Keras 3 / TF numerics for PyTorch.

Both optimizers keep ONE step counter per optimizer (Keras' ``iterations``), advanced once
per ``step()`` call and shared by every parameter, instead of PyTorch's per-parameter
``state["step"]``.  Scalar factors (learning rate, bias corrections) are evaluated in the
parameter dtype, as Keras casts them to the variable dtype.

Member axis (``members=M``): for an ensemble whose members are stacked along dim 0 of every parameter
(`torch_impl.models.vectorized`), one ``step()`` performs what tutorial 001's loop does with one optimizer
shared by M models: M consecutive ``apply_gradients``, member k's being application ``iterations + k``
(bias correction at ``t = iterations + k + 1``, learning-rate schedule at ``iterations + k``); the counter
then advances by M.  With ``members=1`` on the same stacked parameters every member sees the same ``t``,
which is M independent optimizers (the corrected semantics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer

Params = Iterable[torch.Tensor] | Iterable[dict[str, Any]]
LearningRate = float | torch.Tensor | Callable[[int], float]


def _scalar(value: float | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A CPU 0-d tensor in ``dtype``, so scalar arithmetic rounds as TF's does in the variable dtype."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device="cpu", dtype=dtype)
    return torch.tensor(value, dtype=dtype)  # straight from the Python float, no float32 detour


class _KerasOptimizer(Optimizer):
    """Base class: a single shared ``iterations`` counter that ``state_dict`` saves and restores.

    ``lr`` may be a schedule (a callable of the step, as Keras accepts a ``LearningRateSchedule``, e.g.
    ``ExponentialDecay``): it is then evaluated at each update's own step, and ``param_groups[...]["lr"]``
    shows its value at the current counter (for monitors). Don't also attach a torch LR scheduler then.
    """

    def __init__(self, params: Params, defaults: dict[str, Any], members: int = 1) -> None:
        if members < 1:
            raise ValueError(f"members must be >= 1, got {members}")
        lr = defaults["lr"]
        self.lr_schedule: Callable[[int], float] | None = None
        if callable(lr) and not isinstance(lr, torch.Tensor):
            self.lr_schedule, defaults = lr, {**defaults, "lr": lr(0)}
        super().__init__(params, defaults)
        self.members = members
        # Keras counts optimizer applications, not per-parameter updates.
        self.iterations = 0

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["iterations"] = self.iterations
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        self.iterations = int(state_dict.pop("iterations", 0))
        super().load_state_dict(state_dict)

    def _lr(self, group: dict[str, Any], step: int) -> float | torch.Tensor:
        """The learning rate of the update that is application number ``step`` (0-based)."""
        return group["lr"] if self.lr_schedule is None else self.lr_schedule(step)

    def _factor(self, group: dict[str, Any], step: int, dtype: torch.dtype) -> float:
        """The step-dependent scalar of application ``step`` (Adam: the bias-corrected step size)."""
        raise NotImplementedError

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                factor: float | torch.Tensor) -> None:
        raise NotImplementedError

    def _member_factors(self, group: dict[str, Any], param: torch.Tensor, cache: dict) -> torch.Tensor:
        """Member k's factor for every row of a member-major stacked parameter, shaped to broadcast over it.

        Each member's factor is computed by the same scalar code as a single update, so a member gets
        bit for bit the step size it would get from the looped shared optimizer.
        """
        rows = param.shape[0]
        if rows % self.members:
            raise ValueError(f"a stacked parameter of shape {tuple(param.shape)} does not split into "
                             f"{self.members} members along dim 0")
        key = (id(group), param.dtype, param.device)
        if key not in cache:  # one (M,) tensor per step, dtype and device: a single host-to-device copy
            factors = torch.tensor([self._factor(group, self.iterations + k, param.dtype) for k in range(self.members)],
                                   dtype=param.dtype)
            if param.device.type == "cuda":
                # from pinned memory, asynchronously: a plain copy from pageable memory synchronizes the host with the
                # GPU's stream, which would stall every step until the GPU has finished the backward pass
                factors = factors.pin_memory().to(param.device, non_blocking=True)
            cache[key] = factors.to(param.device)
        shaped = (*key, rows, param.dim())
        if shaped not in cache:  # member k's factor on each of its rows, broadcasting over the other dims
            column = cache[key].view(self.members, 1).expand(self.members, rows // self.members).reshape(rows)
            cache[shaped] = column.view(rows, *([1] * (param.dim() - 1)))
        return cache[shaped]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Update every parameter that has a gradient, then advance the shared counter by one
        (by ``members`` with a member axis: that many applications of the shared optimizer).

        Parameters whose ``.grad`` is None are left untouched (moments included), like the
        variables Keras filters out of ``apply_gradients``; the counter advances regardless
        (Keras would raise if no variable at all had a gradient).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cache: dict = {}
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                if self.members == 1:
                    factor = cache.get((id(group), param.dtype))
                    if factor is None:
                        factor = cache[(id(group), param.dtype)] = self._factor(group, self.iterations, param.dtype)
                else:
                    factor = self._member_factors(group, param, cache)
                self._update(param, param.grad, group, factor)
        self.iterations += self.members
        if self.lr_schedule is not None:
            for group in self.param_groups:
                group["lr"] = self.lr_schedule(self.iterations)
        return loss


class KerasAdam(_KerasOptimizer):
    """``keras.optimizers.Adam`` (and TF1 ``tf.compat.v1.train.AdamOptimizer`` with ``epsilon=1e-8``).

    ``alpha_t = lr * sqrt(1 - beta_2^t) / (1 - beta_1^t)``, ``m += (g - m) * (1 - beta_1)``,
    ``v += (g^2 - v) * (1 - beta_2)``, ``p -= alpha_t * m / (sqrt(v) + epsilon)``, with ``t``
    the optimizer-wide ``iterations + 1``.

    Why not ``torch.optim.Adam``: it adds epsilon to the bias-corrected ``sqrt(v_hat)``
    (Keras adds "epsilon hat" after folding the correction into the step size), and it
    counts steps per parameter, whereas one Keras optimizer shared by several models
    advances a single counter on every ``apply_gradients``.  TF1's AdamOptimizer uses the
    same formula and a single pair of beta-power accumulators per optimizer (updated by
    multiplication rather than ``pow``, a last-bit rounding difference).

    ``members=M``: every parameter stacks M ensemble members along dim 0 (see the module docstring).
    """

    def __init__(
        self,
        params: Params,
        lr: LearningRate = 1e-3,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-7,
        members: int = 1,
    ) -> None:
        defaults = {"lr": lr, "beta_1": beta_1, "beta_2": beta_2, "epsilon": epsilon}
        super().__init__(params, defaults, members)

    def _factor(self, group: dict[str, Any], step: int, dtype: torch.dtype) -> float:
        # Bias correction folded into the step size, from the shared counter, in the parameter dtype.
        # Keras casts the Python betas with tf.cast, which rounds them to float32 first (visible in float64 only).
        t = _scalar(step + 1, dtype)
        beta_1_power = _scalar(torch.tensor(group["beta_1"], dtype=torch.float32), dtype) ** t
        beta_2_power = _scalar(torch.tensor(group["beta_2"], dtype=torch.float32), dtype) ** t
        return (_scalar(self._lr(group, step), dtype) * torch.sqrt(1 - beta_2_power) / (1 - beta_1_power)).item()

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                factor: float | torch.Tensor) -> None:
        beta_1, beta_2 = group["beta_1"], group["beta_2"]
        state = self.state[param]
        if not state:
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        m, v = state["exp_avg"], state["exp_avg_sq"]

        # Same operation order as Keras' update_step; `factor` is alpha (per member with a member axis).
        m.add_((grad - m).mul_(1 - beta_1))
        v.add_((grad.square() - v).mul_(1 - beta_2))
        param.sub_((m * factor).div_(v.sqrt().add_(group["epsilon"])))


class KerasRMSprop(_KerasOptimizer):
    """``keras.optimizers.RMSprop`` (Keras 3) with ``momentum=0`` and ``centered=False``.

    ``v = rho * v + (1 - rho) * g^2`` (v starts at zero), ``p -= lr * g / sqrt(v + epsilon)``.
    Why not ``torch.optim.RMSprop``: Keras adds epsilon inside the square root, PyTorch
    outside; the defaults also differ (Keras rho 0.9 / epsilon 1e-7, PyTorch alpha 0.99 / eps 1e-8).
    ``members=M``: every parameter stacks M ensemble members along dim 0 (only a schedule makes it matter).
    """

    def __init__(
        self, params: Params, lr: LearningRate = 1e-3, rho: float = 0.9, epsilon: float = 1e-7, members: int = 1
    ) -> None:
        defaults = {"lr": lr, "rho": rho, "epsilon": epsilon}
        super().__init__(params, defaults, members)

    def _factor(self, group: dict[str, Any], step: int, dtype: torch.dtype) -> float:
        # Learning rate rounded to the parameter dtype, as Keras casts it.
        return _scalar(self._lr(group, step), dtype).item()

    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any],
                factor: float | torch.Tensor) -> None:
        rho = group["rho"]
        state = self.state[param]
        if not state:
            state["square_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        v = state["square_avg"]

        # Same operation order as Keras' update_step; epsilon goes inside the sqrt; `factor` is the lr.
        v.mul_(rho).add_(grad.square().mul_(1 - rho))
        param.sub_((grad * factor).div_(v.add(group["epsilon"]).sqrt_()))


@dataclass(frozen=True)
class ExponentialDecay:
    """``keras.optimizers.schedules.ExponentialDecay`` as a function of the step.

    ``lr(step) = lr0 * decay_rate ** (step / decay_steps)``, with the exponent floored when
    ``staircase``.  Keras evaluates it at ``optimizer.iterations`` *before* the increment, so
    the first update uses ``lr(0)``.  Why the float32 arithmetic: Keras computes the schedule
    in float32, and evaluating it in float64 lands one float32 ulp away at most steps.
    """

    lr0: float
    decay_steps: int
    decay_rate: float
    staircase: bool = False

    def __call__(self, step: int) -> float:
        exponent = _scalar(step, torch.float32) / _scalar(self.decay_steps, torch.float32)
        if self.staircase:
            exponent = torch.floor(exponent)
        lr0, rate = _scalar(self.lr0, torch.float32), _scalar(self.decay_rate, torch.float32)
        return (lr0 * torch.pow(rate, exponent)).item()


def exponential_decay_lambda(
    lr0: float, decay_steps: int, decay_rate: float, staircase: bool = False
) -> Callable[[int], float]:
    """Multiplicative factor for ``torch.optim.lr_scheduler.LambdaLR`` reproducing ``ExponentialDecay``.

    Build the optimizer with ``lr=lr0`` and step the scheduler once after every
    ``optimizer.step()`` (Lightning: ``"interval": "step"``; its default is per epoch), so
    that the scheduler's step count equals Keras' ``iterations``.
    """
    schedule = ExponentialDecay(lr0, decay_steps, decay_rate, staircase)
    # LambdaLR multiplies the base lr (lr0) by this factor; the float32 schedule value survives the round trip.
    return lambda step: schedule(step) / lr0
