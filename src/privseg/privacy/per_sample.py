"""Per-sample gradients from one batched forward/backward pass (the ``"batched"`` grad path).

While :func:`per_sample_grads` runs, a torch-function mode swaps every ``conv2d``,
``group_norm`` and ``linear`` call on a trainable parameter for an autograd function whose
backward returns the input gradient as usual but, instead of the summed parameter gradient,
records one gradient per sample:

- conv2d: the input gradient and the per-sample weight gradients come from *one* grouped
  convolution backward (groups = batch x groups, the batch folded into channels), so the
  convolutions run as batched oneDNN kernels, where one backward per sample runs
  single-sample kernels (torch.profiler: PyTorch routes the small ones to its im2col
  ``_slow_conv2d`` kernels);
- group_norm: the input gradient from the native kernel, per-sample affine gradients in
  closed form from the saved group statistics (no normalised copy of the input);
- linear: ``g_i^T x_i``.

Nothing is recorded in ``p.grad``. A trainable parameter used by any other op is refused
(its per-sample gradient would be missing, and clipping would not bound it).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

Stash = dict[int, torch.Tensor]  # id(parameter) -> per-sample gradient [n, *shape]
# Resolved once: looking an op up under torch.ops costs more than a small kernel.
_CONV_BACKWARD = torch.ops.aten.convolution_backward.default
_GROUP_NORM = torch.ops.aten.native_group_norm.default
_GROUP_NORM_BACKWARD = torch.ops.aten.native_group_norm_backward.default


def _record(stash: Stash, param: torch.Tensor, grad: torch.Tensor) -> None:
    key = id(param)
    stash[key] = stash[key] + grad if key in stash else grad  # a layer used twice: summed


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        stride: tuple[int, int],
        padding: tuple[int, int],
        dilation: tuple[int, int],
        groups: int,
        stash: Stash,
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation, groups, stash, bias)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, stash, bias = ctx.conf
        n = x.shape[0]
        o = weight.shape[0]
        # The batch folded into channels: sample i's channels form groups i*g .. i*g+g-1.
        grad_x, grad_w, _ = _CONV_BACKWARD(
            grad.reshape(1, n * o, *grad.shape[2:]),
            x.reshape(1, n * x.shape[1], *x.shape[2:]),
            weight.repeat(n, 1, 1, 1),
            None,
            stride,
            padding,
            dilation,
            False,
            [0, 0],
            n * groups,
            [ctx.needs_input_grad[0], True, False],
        )
        if weight.requires_grad:
            _record(stash, weight, grad_w.view(n, *weight.shape))
        if bias is not None and bias.requires_grad:
            _record(stash, bias, grad.sum((2, 3)))
        grad_x = None if grad_x is None else grad_x.view_as(x)
        return grad_x, None, None, None, None, None, None, None


class _GroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        num_groups: int,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        eps: float,
        stash: Stash,
    ) -> torch.Tensor:
        n, c = x.shape[:2]
        hw = math.prod(x.shape[2:])
        out, mean, rstd = _GROUP_NORM(x, weight, bias, n, c, hw, num_groups, eps)
        ctx.save_for_backward(x, mean, rstd, weight)
        ctx.conf = (num_groups, stash, bias)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, mean, rstd, weight = ctx.saved_tensors
        num_groups, stash, bias = ctx.conf
        n, c = x.shape[:2]
        hw = math.prod(x.shape[2:])
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x, _, _ = _GROUP_NORM_BACKWARD(
                grad, x, mean, rstd, weight, n, c, hw, num_groups, [True, False, False]
            )
        g = grad.reshape(n, c, hw)
        g_sum = g.sum(2)
        if weight is not None and weight.requires_grad:
            # sum_hw g * xhat = rstd * (sum_hw g * x - mean * sum_hw g), per sample and
            # channel (mean, rstd of the channel's group): no normalised copy of x is made.
            per_group = c // num_groups
            gx = (g * x.reshape(n, c, hw)).sum(2)
            mean_c = mean.repeat_interleave(per_group, dim=1)
            rstd_c = rstd.repeat_interleave(per_group, dim=1)
            _record(stash, weight, (gx - mean_c * g_sum) * rstd_c)
        if bias is not None and bias.requires_grad:
            _record(stash, bias, g_sum)
        return grad_x, None, None, None, None, None


class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, stash: Stash
    ) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.conf = (stash, bias)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight = ctx.saved_tensors
        stash, bias = ctx.conf
        n = x.shape[0]
        g = grad.reshape(n, -1, grad.shape[-1])
        if weight.requires_grad:
            _record(stash, weight, torch.bmm(g.transpose(1, 2), x.reshape(n, -1, x.shape[-1])))
        if bias is not None and bias.requires_grad:
            _record(stash, bias, g.sum(1))
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, str):
        raise ValueError(f"conv2d {name}={v!r} is not supported by grad_path 'batched'")
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _PerSampleMode(TorchFunctionMode):
    """Routes the supported ops on trainable parameters to the recording functions and
    notes every trainable parameter any other op touches."""

    def __init__(self, params: Sequence[torch.Tensor], stash: Stash) -> None:
        super().__init__()
        self.params = {id(p) for p in params}
        self.stash = stash
        self.unsupported: set[str] = set()

    def _ours(self, t: object) -> bool:
        return isinstance(t, torch.Tensor) and id(t) in self.params

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.conv2d:
            return self._conv2d(*args, **kwargs)
        if func is F.group_norm:
            return self._group_norm(*args, **kwargs)
        if func is F.linear:
            return self._linear(*args, **kwargs)
        if any(self._ours(a) for a in (*args, *kwargs.values())):
            self.unsupported.add(getattr(func, "__name__", str(func)))
        return func(*args, **kwargs)

    def _conv2d(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        stride: int | Sequence[int] = 1,
        padding: int | Sequence[int] = 0,
        dilation: int | Sequence[int] = 1,
        groups: int = 1,
    ) -> torch.Tensor:
        if not (self._ours(weight) or self._ours(bias)):
            return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        return _Conv2d.apply(
            x,
            weight,
            bias,
            _pair(stride, "stride"),
            _pair(padding, "padding"),
            _pair(dilation, "dilation"),
            groups,
            self.stash,
        )

    def _group_norm(
        self,
        x: torch.Tensor,
        num_groups: int,
        weight: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        eps: float = 1e-5,
    ) -> torch.Tensor:
        if not (self._ours(weight) or self._ours(bias)):
            return F.group_norm(x, num_groups, weight, bias, eps)
        return _GroupNorm.apply(x, num_groups, weight, bias, eps, self.stash)

    def _linear(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not (self._ours(weight) or self._ours(bias)):
            return F.linear(x, weight, bias)
        return _Linear.apply(x, weight, bias, self.stash)


def per_sample_grads(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor,
    params: Sequence[torch.Tensor],
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(one ``[n, *p.shape]`` gradient per parameter in ``params``, the per-sample losses).

    ``loss_fn`` must return one loss per sample, and the model must not couple samples.
    Thread-safe: torch-function modes are per thread.
    """
    stash: Stash = {}
    mode = _PerSampleMode(params, stash)
    with mode:
        losses = loss_fn(model(images), labels)
    if mode.unsupported:
        raise ValueError(
            "grad_path 'batched' has per-sample gradients for conv2d, group_norm and linear "
            f"only; the model applies {sorted(mode.unsupported)} to a trainable parameter "
            "(use grad_path 'loop')"
        )
    if losses.requires_grad:  # only towards the parameters: other leaves keep their .grad
        torch.autograd.backward(losses.sum(), inputs=list(params))
    n = len(images)
    grads = []
    for p in params:
        g = stash.get(id(p))
        grads.append(g if g is not None else p.new_zeros((n, *p.shape)))
    return grads, losses.detach()
