"""Layer normalization whose derivatives of every order are right, with torch's values up to the second.

Why: ``F.layer_norm``'s first and second derivatives are right, its third is not (torch 2.13). Its statistics
(mean and 1/std) come out of ``native_layer_norm`` as non-differentiable outputs. The backward and the double
backward use them as constants, which their formulas compensate analytically; differentiating the double
backward once more (the third derivative) drops their dependence on the input. A training step with R1/R2 holds
a gradient with respect to D's input inside D's loss, so ITD (the derivative of the step) and AID (the Jacobian
of the game's gradient) differentiate D three times: with ``F.layer_norm`` both were wrong (ITD by 2% to 8% of
the largest influence against central differences of retraining on tiny float64 DCGANs, AID's Jacobian products
by 40%), and forward and reverse mode disagreed, which sent those steps of the Hessian-vector-product adjoint
back to the VJP.

Design: two ``autograd.Function`` levels that call torch's kernels for the values and give the statistics their
derivative, so that values, first and second derivatives are bit for bit those of ``F.layer_norm``: training,
replays and retrains of runs recorded before (which trained with ``F.layer_norm``) replay bitwise, and the run
format does not change.

- ``_LayerNorm``: forward ``native_layer_norm`` (the kernel ``F.layer_norm`` runs), returning the mean and
  1/std as differentiable outputs; its backward sends their cotangents to the input (d mean / dx = 1/N,
  d rstd / dx = -rstd^3 (x - mean) / N, in differentiable operations), and the output's to
  ``_LayerNormBackward``.
- ``_LayerNormBackward``: forward ``native_layer_norm_backward`` (the kernel of ``F.layer_norm``'s backward).
  Its backward is torch's own double backward of that kernel (through ``torch.func.vjp``, so the same formula
  and values as ``F.layer_norm``'s second derivative), which autograd records as operations on the input and
  on the statistics. Differentiated once more, the statistics' share goes to ``_LayerNorm``'s outputs and from
  there to the input: the dependence that ``F.layer_norm`` loses.

Both have forward-mode rules (``jvp``, composite formulas that carry the statistics' tangents) for the
Hessian-vector-product adjoint and AID's Jacobian products, and vmap rules generated from them for batched
retrains.

Where: only a discriminator trained with gradient penalties (``models.base.third_derivatives``), and there only
in an evaluation whose input and parameters both carry gradients (``may_take_third_derivatives``): an input
gradient differentiated with respect to the parameters is how third derivatives arise, so the evaluations on
constant inputs (the losses on real data) or with constant parameters (the generator's step) keep
``F.layer_norm``, and so does every network of a run without penalties. That is a matter of speed only: the
values and first two derivatives are the same either way. The functions cost Python dispatch under
``torch.func`` (a fixed time per call, which dominates at small batches), one more call of the backward kernel
per double backward, and, in ITD and AID, the terms through the statistics that ``F.layer_norm`` skips. Measured
on the 28x28 DCGAN of the examples (32 channels, float32, one CPU thread, R1 gamma 10), against ``F.layer_norm``
everywhere: the training step +10% at batch 50, +10% at batch 8 with lazy R1 every 4 steps (the fine-tuning
example), +30% at batch 8 with R1 every step; ITD's step +10% to +24% the ``vjp`` way, +3% to +8% the ``hvp``
way, which no longer falls back to the VJP on penalised steps.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn
from torch.autograd.function import FunctionCtx
from torch.func import vjp

MaybeTensor = torch.Tensor | None  # weight and bias may be absent, and so may (co)tangents


def _backward_kernel(shape: list[int], mask: list[bool], bias: MaybeTensor) -> Callable[..., tuple]:
    """``native_layer_norm_backward`` as a function of (grad_out, input, mean, rstd, weight)."""
    def kernel(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor,
               weight: MaybeTensor = None) -> tuple[MaybeTensor, MaybeTensor, MaybeTensor]:
        return torch.ops.aten.native_layer_norm_backward(grad_out, x, shape, mean, rstd, weight, bias, mask)
    return kernel


class _LayerNormBackward(torch.autograd.Function):
    """(grad_out, x, mean, rstd, weight, bias) -> (grad_x, grad_weight, grad_bias), ``mask`` choosing which."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_out: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor, weight: MaybeTensor,
                bias: MaybeTensor, shape: list[int], mask: list[bool]) -> tuple[MaybeTensor, MaybeTensor, MaybeTensor]:
        return _backward_kernel(shape, mask, bias)(grad_out, x, mean, rstd, weight)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        grad_out, x, mean, rstd, weight, bias, shape, mask = inputs
        ctx.save_for_backward(grad_out, x, mean, rstd, weight, bias)
        ctx.save_for_forward(grad_out, x, mean, rstd, weight, bias)
        ctx.shape, ctx.mask = shape, mask
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: FunctionCtx, *cotangents: MaybeTensor) -> tuple[MaybeTensor, ...]:
        """torch's double backward of the kernel, on (grad_out, x, weight) as far as they need it; mean and rstd
        get none here (the formula's x block already holds their share), their part of higher derivatives
        reaches them through the operations it records."""
        grad_out, x, mean, rstd, weight, bias = ctx.saved_tensors
        kernel = _backward_kernel(ctx.shape, ctx.mask, bias)
        used = [i for i in range(3) if ctx.mask[i] and cotangents[i] is not None]
        primals = {0: grad_out, 1: x, 4: weight}
        wanted = [i for i in primals if ctx.needs_input_grad[i]]
        grads: dict[int, torch.Tensor] = {}
        if used and wanted:
            def outputs(*moving: torch.Tensor) -> tuple[torch.Tensor, ...]:
                args = [grad_out, x, mean, rstd, weight]
                for i, value in zip(wanted, moving):
                    args[i] = value
                results = kernel(*args)
                return tuple(results[i] for i in used)
            pulled = vjp(outputs, *(primals[i] for i in wanted))[1](tuple(cotangents[i] for i in used))
            grads = dict(zip(wanted, pulled))
        return grads.get(0), grads.get(1), None, None, grads.get(4), None, None, None

    @staticmethod
    def jvp(ctx: FunctionCtx, grad_out_t: MaybeTensor, x_t: MaybeTensor, mean_t: MaybeTensor, rstd_t: MaybeTensor,
            weight_t: MaybeTensor, *_: object) -> tuple[MaybeTensor, ...]:
        """Forward mode of the kernel's formula, grad_x = rstd (a - mean(a) - xhat mean(a xhat)) with
        a = grad_out weight, grad_weight = sum(grad_out xhat), grad_bias = sum(grad_out) over the batch's dims,
        every input's tangent included (those of the statistics come from ``_LayerNorm.jvp``)."""
        grad_out, x, mean, rstd, weight, _ = ctx.saved_tensors
        grad_out_t, x_t, mean_t, rstd_t = (torch.zeros_like(p) if t is None else t for p, t in
                                           zip((grad_out, x, mean, rstd), (grad_out_t, x_t, mean_t, rstd_t)))
        dims = tuple(range(x.ndim - len(ctx.shape), x.ndim))
        batch_dims = tuple(range(x.ndim - len(ctx.shape)))
        xhat = (x - mean) * rstd
        xhat_t = (x_t - mean_t) * rstd + (x - mean) * rstd_t
        tangents: list[MaybeTensor] = [None, None, None]
        if ctx.mask[0]:
            scaled = grad_out if weight is None else grad_out * weight
            scaled_t = grad_out_t if weight is None else grad_out_t * weight
            if weight_t is not None:
                scaled_t = scaled_t + grad_out * weight_t
            moment = (scaled * xhat).mean(dims, keepdim=True)
            moment_t = (scaled_t * xhat + scaled * xhat_t).mean(dims, keepdim=True)
            projected = scaled - scaled.mean(dims, keepdim=True) - xhat * moment  # grad_x / rstd
            projected_t = scaled_t - scaled_t.mean(dims, keepdim=True) - xhat_t * moment - xhat * moment_t
            tangents[0] = rstd_t * projected + rstd * projected_t
        if ctx.mask[1]:
            tangents[1] = (grad_out_t * xhat + grad_out * xhat_t).sum(batch_dims)
        if ctx.mask[2]:
            tangents[2] = grad_out_t.sum(batch_dims)
        return tuple(tangents)


class _LayerNorm(torch.autograd.Function):
    """(x, weight, bias) -> (output, mean, rstd): ``native_layer_norm`` with differentiable statistics."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: torch.Tensor, weight: MaybeTensor, bias: MaybeTensor, shape: list[int], eps: float
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return torch.native_layer_norm(x, shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: tuple) -> None:
        x, weight, bias, shape, _ = inputs
        _, mean, rstd = output
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.save_for_forward(x, weight, mean, rstd)
        ctx.shape = shape
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: MaybeTensor, grad_mean: MaybeTensor, grad_rstd: MaybeTensor
                 ) -> tuple[MaybeTensor, ...]:
        """The output's cotangent through ``_LayerNormBackward`` (torch's kernel), the statistics' (met only in
        derivatives of order three and up) by their own derivatives."""
        x, weight, bias, mean, rstd = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if grad_out is not None:
            need = ctx.needs_input_grad
            mask = [need[0], need[1] and weight is not None, need[2] and bias is not None]
            grad_x, grad_weight, grad_bias = _LayerNormBackward.apply(grad_out, x, mean, rstd, weight, bias,
                                                                      ctx.shape, mask)
        if grad_mean is not None or grad_rstd is not None:
            count = math.prod(ctx.shape)  # d mean / dx = 1 / N, d rstd / dx = -rstd^3 (x - mean) / N
            share = (x - mean) * (-rstd.pow(3) * grad_rstd / count) if grad_rstd is not None else None
            if grad_mean is not None:
                share = (grad_mean / count).expand_as(x) if share is None else share + grad_mean / count
            grad_x = share if grad_x is None else grad_x + share
        return grad_x, grad_weight, grad_bias, None, None

    @staticmethod
    def jvp(ctx: FunctionCtx, x_t: MaybeTensor, weight_t: MaybeTensor, bias_t: MaybeTensor, *_: object
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tangents of the output and of the statistics: mean' = mean(x'), rstd' = -rstd^3 mean((x - mean) x')."""
        x, weight, mean, rstd = ctx.saved_tensors
        dims = tuple(range(x.ndim - len(ctx.shape), x.ndim))
        centred = x - mean
        if x_t is None:
            out_t, mean_t, rstd_t = torch.zeros_like(x), torch.zeros_like(mean), torch.zeros_like(rstd)
        else:
            mean_t = x_t.mean(dims, keepdim=True)
            rstd_t = -rstd.pow(3) * (centred * x_t).mean(dims, keepdim=True)
            out_t = (x_t - mean_t) * rstd + centred * rstd_t
            out_t = out_t if weight is None else out_t * weight
        if weight_t is not None:
            out_t = out_t + centred * rstd * weight_t
        if bias_t is not None:
            out_t = out_t + bias_t
        return out_t, mean_t, rstd_t


def layer_norm(x: torch.Tensor, shape: list[int], weight: MaybeTensor = None, bias: MaybeTensor = None,
               eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x, shape, weight, bias, eps)``: the same values and first two derivatives bit for bit, and
    right derivatives of every order."""
    return _LayerNorm.apply(x, weight, bias, list(shape), eps)[0]


def exact_layer_norm(layer: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` through ``layer_norm``."""
    return layer_norm(x, list(layer.normalized_shape), layer.weight, layer.bias, layer.eps)


def may_take_third_derivatives(network: nn.Module, x: torch.Tensor) -> bool:
    """Whether an evaluation of ``network`` on ``x`` can be differentiated three times: its input and its parameters
    both carry gradients. An input gradient differentiated with respect to the parameters is how the third
    derivatives arise (gradient penalties in training, differentiated once more by ITD and AID); in this package an
    evaluation whose input or parameters are constants (the loss on real data, the generator's step) never gets
    there."""
    return x.requires_grad and any(p.requires_grad for p in network.parameters())
