"""ATConv's per-sample depthwise convolution as fused Triton kernels, differential modulation included.

For v: (B, H, W, C) in token layout, raw generated kernels k: (B, C, K*K) (kernel_gen's output) and the
modulation parameter gamma: (C,), `modulated_depthwise_conv` computes

    alpha[b, c, t]    = k[b, c, t] - sigmoid(gamma[c]) * mean_t' k[b, c, t']          (Eq. 10)
    y[b, i, j, c]     = sum_{du, dv} alpha[b, c, du*K + dv] * v[b, i + du - r, j + dv - r, c]

with zero padding (r = K // 2), float32 accumulation (float64 for float64 inputs) and y in v's dtype.
alpha never exists in memory: every program recomputes its channels' K*K weights from k and gamma.

Kernels (each program owns a tile of BLOCK_P raster-ordered pixels x BLOCK_C channels of one sample;
channels are contiguous, so every load and store is coalesced along C):
- forward: K^2 masked, shifted tile loads of v, each multiplied by its tap's weights.
- backward, one pass over the tiles: grad v is the same convolution of grad y with the taps mirrored
  (the transposed convolution); grad alpha[b, c, t] = sum_{i,j} grad y[b, i, j, c] * v[b, i+du-r, j+dv-r, c]
  is reduced over the tile's pixels in registers and written as one partial per (tile, tap, channel).
  Summing those partials (a small torch reduction) instead of accumulating with atomics keeps the
  gradients deterministic run to run; the partials hold HW / BLOCK_P * K^2 floats per (b, c), under a
  third of v's size for K = 3. grad k and grad gamma follow from grad alpha by the chain rule through
  Eq. 10 on (B, C, K^2) tensors, in torch.

The batch index is a launch-grid axis and never a kernel argument, so no batch size recompiles a
kernel. The two launches are wrapped as torch custom ops (the registered form of an autograd.Function:
forward, backward and shape functions), so torch.compile keeps each as one opaque node with symbolic
shapes, batch included, instead of tracing into Triton launches it may not handle (the interpreter's).

Triton compiles for CUDA devices. With TRITON_INTERPRET=1 in the environment before this module is
imported (the tests set it when no NVIDIA device exists), the kernels run in Triton's interpreter on
CPU tensors: slow, but the same code, which is how the tests check it without a GPU.
"""

from __future__ import annotations

import os

import torch

from sit_atconv.errors import UserError

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the module still imports, `triton_available` says False
    triton = None

# Raster pixels x channels per program. 64 channels = 128 bytes of bf16 per pixel row of the tile;
# a GPU sweep (`make gpu-check`) may retune these.
BLOCK_P = 64
BLOCK_C = 64


# Triton chose between compiling and interpreting when it decorated the kernels below, i.e. now.
_INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_interpreting() -> bool:
    """Whether this module's kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1 at import)."""
    return _INTERPRET


def triton_available(device: torch.device | str) -> bool:
    """Whether `modulated_depthwise_conv` can run on tensors on `device`: CUDA with Triton installed, or any
    device in Triton's interpreter mode (which copies CUDA tensors to the host and back)."""
    if triton is None:
        return False
    device = torch.device(device)
    return _INTERPRET or (device.type == "cuda" and torch.cuda.is_available())


def modulated_depthwise_conv(v: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-sample depthwise KxK "same" cross-correlation with ATConv's differential kernel modulation folded in.

    v: (B, H, W, C); k: (B, C, K*K), raw kernels before modulation, K odd; gamma: (C,).
    Returns (B, H, W, C) in v's dtype. Differentiable in v, k and gamma.
    """
    if not triton_available(v.device):
        raise RuntimeError(
            f"the Triton depthwise convolution needs a CUDA device with Triton installed, got a tensor on "
            f"{v.device}{'' if triton is not None else ' (Triton is not installed)'}; on CPU set "
            "TRITON_INTERPRET=1 before importing sit_atconv to run it in Triton's (slow) interpreter"
        )
    if v.ndim != 4 or k.ndim != 3 or gamma.ndim != 1:
        raise UserError(
            f"expected v (B, H, W, C), k (B, C, K*K) and gamma (C,), got shapes {tuple(v.shape)}, "
            f"{tuple(k.shape)} and {tuple(gamma.shape)}"
        )
    B, H, W, C = v.shape
    _kernel_size(k.shape[-1])  # raises unless k has K*K taps for an odd K
    if k.shape[:2] != (B, C) or gamma.shape[0] != C:
        raise UserError(
            f"k {tuple(k.shape)} and gamma {tuple(gamma.shape)} do not match v (B, H, W, C) = {tuple(v.shape)}"
        )
    if k.device != v.device or gamma.device != v.device:
        raise UserError(f"v, k and gamma must share a device, got {v.device}, {k.device} and {gamma.device}")
    if H * W * C >= 2**31:  # per-sample offsets are int32 in the kernels (the batch offset is int64)
        raise UserError(f"one sample of {H}x{W}x{C} elements is too large for the Triton kernels (< 2^31)")
    return _conv_op(v.contiguous(), k.contiguous(), gamma.contiguous())


def _kernel_size(taps: int) -> int:
    kernel_size = round(taps**0.5)
    if kernel_size * kernel_size != taps or kernel_size % 2 == 0:
        raise UserError(f"k has {taps} taps per channel; expected K*K for an odd K")
    return kernel_size


def _acc_dtype(v: torch.Tensor) -> torch.dtype:
    return torch.float64 if v.dtype == torch.float64 else torch.float32


def _grid(B: int, H: int, W: int, C: int) -> tuple[int, int, int]:
    return (triton.cdiv(H * W, BLOCK_P), triton.cdiv(C, BLOCK_C), B)


# ---- torch custom ops: opaque, shape-polymorphic nodes for torch.compile, with autograd -----------------


@torch.library.custom_op("sit_atconv::modulated_dwconv", mutates_args=())
def _conv_op(v: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    B, H, W, C = v.shape
    y = torch.empty_like(v)
    _forward_kernel[_grid(B, H, W, C)](
        v,
        k,
        gamma,
        y,
        H,
        W,
        C,
        KSIZE=_kernel_size(k.shape[-1]),
        BLOCK_P=BLOCK_P,
        BLOCK_C=BLOCK_C,
        F64=v.dtype == torch.float64,
    )
    return y


@_conv_op.register_fake
def _(v, k, gamma):
    return torch.empty_like(v)


@torch.library.custom_op("sit_atconv::modulated_dwconv_backward", mutates_args=())
def _conv_backward_op(
    grad_y: torch.Tensor, v: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns grad v: (B, H, W, C) in v's dtype and grad alpha, transposed: (B, K*K, C), in the accumulation
    dtype (float32, or float64 for float64 v)."""
    B, H, W, C = v.shape
    taps = k.shape[-1]
    grid = _grid(B, H, W, C)
    grad_v = torch.empty_like(v)
    partials = torch.empty(B, grid[0], taps, C, device=v.device, dtype=_acc_dtype(v))  # per pixel tile
    _backward_kernel[grid](
        grad_y,
        v,
        k,
        gamma,
        grad_v,
        partials,
        H,
        W,
        C,
        KSIZE=_kernel_size(taps),
        BLOCK_P=BLOCK_P,
        BLOCK_C=BLOCK_C,
        F64=v.dtype == torch.float64,
    )
    return grad_v, partials.sum(1)  # (B, K*K, C)


@_conv_backward_op.register_fake
def _(grad_y, v, k, gamma):
    B, H, W, C = v.shape
    return torch.empty_like(v), v.new_empty((B, k.shape[-1], C), dtype=_acc_dtype(v))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_y):
    v, k, gamma = ctx.saved_tensors
    grad_v, grad_alpha = _conv_backward_op(grad_y.contiguous(), v, k, gamma)
    grad_alpha = grad_alpha.transpose(1, 2)  # (B, C, K*K)
    # Eq. 10, alpha = k - s * mean(k) with s = sigmoid(gamma), differentiated on the small (B, C, K*K) tensors.
    s = torch.sigmoid(gamma.to(grad_alpha.dtype))  # (C,)
    grad_sum = grad_alpha.sum(-1)  # (B, C)
    grad_k = grad_alpha - (s / k.shape[-1])[:, None] * grad_sum[..., None]
    mean_k = k.to(grad_alpha.dtype).mean(-1)  # (B, C)
    grad_gamma = -(grad_sum * mean_k).sum(0) * s * (1 - s)
    return grad_v, grad_k.to(k.dtype), grad_gamma.to(gamma.dtype)


_conv_op.register_autograd(_backward, setup_context=_setup_context)


# ---- Triton kernels ---------------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _tile(pid_p, pid_c, H, W, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        """Pixel rows i, columns j, channel offsets and masks of this program's (BLOCK_P, BLOCK_C) tile."""
        p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        return p // W, p % W, c, p < H * W, c < C

    @triton.jit
    def _inhibition(k_row, gamma_ptr, c, c_mask, TAPS: tl.constexpr, ACC: tl.constexpr):
        """sigmoid(gamma[c]) * mean_t k[b, c, t] for the tile's channels; k_row points at k[b, c, 0]."""
        total = tl.zeros_like(c).to(ACC)
        for t in tl.static_range(TAPS):
            total += tl.load(k_row + t, mask=c_mask, other=0.0).to(ACC)
        gamma = tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(ACC)
        return tl.sigmoid(gamma) * (total / TAPS)

    @triton.jit
    def _shifted(base, i, j, c, p_mask, c_mask, du, dv, H, W, C, ACC: tl.constexpr):
        """The (BLOCK_P, BLOCK_C) tile of a (H, W, C) map at pixels (i + du, j + dv), zero outside the grid."""
        ii = i + du
        jj = j + dv
        inside = p_mask & (ii >= 0) & (ii < H) & (jj >= 0) & (jj < W)
        ptrs = base + (ii * W + jj)[:, None] * C + c[None, :]
        return tl.load(ptrs, mask=inside[:, None] & c_mask[None, :], other=0.0).to(ACC)

    @triton.jit
    def _forward_kernel(
        v_ptr,
        k_ptr,
        gamma_ptr,
        y_ptr,
        H,
        W,
        C,
        KSIZE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        F64: tl.constexpr,
    ):
        ACC: tl.constexpr = tl.float64 if F64 else tl.float32
        TAPS: tl.constexpr = KSIZE * KSIZE
        R: tl.constexpr = KSIZE // 2
        b = tl.program_id(2).to(tl.int64)
        i, j, c, p_mask, c_mask = _tile(tl.program_id(0), tl.program_id(1), H, W, C, BLOCK_P, BLOCK_C)
        sample = b * H * W * C  # int64: B * H * W * C may exceed 2^31
        k_row = k_ptr + (b * C + c) * TAPS  # (BLOCK_C,) pointers to k[b, c, 0]
        inhibition = _inhibition(k_row, gamma_ptr, c, c_mask, TAPS, ACC)

        acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        for t in tl.static_range(TAPS):
            alpha = tl.load(k_row + t, mask=c_mask, other=0.0).to(ACC) - inhibition  # (BLOCK_C,)
            x = _shifted(v_ptr + sample, i, j, c, p_mask, c_mask, t // KSIZE - R, t % KSIZE - R, H, W, C, ACC)
            acc += x * alpha[None, :]

        out = y_ptr + sample + (i * W + j)[:, None] * C + c[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])

    @triton.jit
    def _backward_kernel(
        grad_y_ptr,
        v_ptr,
        k_ptr,
        gamma_ptr,
        grad_v_ptr,
        partials_ptr,
        H,
        W,
        C,
        KSIZE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
        F64: tl.constexpr,
    ):
        """grad v (the transposed convolution) and per-tile partial sums of grad alpha: partials[b, tile, t, c]."""
        ACC: tl.constexpr = tl.float64 if F64 else tl.float32
        TAPS: tl.constexpr = KSIZE * KSIZE
        R: tl.constexpr = KSIZE // 2
        pid_p = tl.program_id(0)
        b = tl.program_id(2).to(tl.int64)
        i, j, c, p_mask, c_mask = _tile(pid_p, tl.program_id(1), H, W, C, BLOCK_P, BLOCK_C)
        sample = b * H * W * C
        k_row = k_ptr + (b * C + c) * TAPS
        inhibition = _inhibition(k_row, gamma_ptr, c, c_mask, TAPS, ACC)
        grad_y = _shifted(grad_y_ptr + sample, i, j, c, p_mask, c_mask, 0, 0, H, W, C, ACC)  # unshifted tile
        partial_row = partials_ptr + ((b * tl.num_programs(0) + pid_p) * TAPS) * C + c  # partials[b, tile, 0, c]

        grad_v = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
        for t in tl.static_range(TAPS):
            du = t // KSIZE - R
            dv = t % KSIZE - R
            x = _shifted(v_ptr + sample, i, j, c, p_mask, c_mask, du, dv, H, W, C, ACC)
            tl.store(partial_row + t * C, tl.sum(grad_y * x, axis=0), mask=c_mask)
            # y[p] takes alpha_t * v[p + (du, dv)], so v[q] receives alpha_t * grad y[q - (du, dv)].
            alpha = tl.load(k_row + t, mask=c_mask, other=0.0).to(ACC) - inhibition
            grad_v += _shifted(grad_y_ptr + sample, i, j, c, p_mask, c_mask, -du, -dv, H, W, C, ACC) * alpha[None, :]

        out = grad_v_ptr + sample + (i * W + j)[:, None] * C + c[None, :]
        tl.store(out, grad_v.to(grad_v_ptr.dtype.element_ty), mask=p_mask[:, None] & c_mask[None, :])
