"""The fused Triton depthwise convolution against the module's oracle (Eq. 10, then a grouped conv2d).

Runs on CUDA when there is a GPU; otherwise in Triton's CPU interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 without an NVIDIA device), which runs the same kernel code slowly: shapes stay tiny.
"""

import math

import pytest
import torch

from sit_atconv.ops import ATConv, atconv_triton
from sit_atconv.ops.atconv import depthwise_conv_grouped
from sit_atconv.ops.atconv_triton import modulated_depthwise_conv, triton_available, triton_interpreting

DEVICE = "cuda" if torch.cuda.is_available() and not triton_interpreting() else "cpu"
pytestmark = pytest.mark.skipif(
    not triton_available(DEVICE), reason="Triton cannot run here: no CUDA device and TRITON_INTERPRET unset"
)
# Relative error of one float32 -> bfloat16 conversion: compiled Triton rounds to nearest (half an ulp,
# 2^-8), Triton's interpreter truncates (up to one ulp, 2^-7).
BF16_ROUNDING = 2**-7 if triton_interpreting() else 2**-8


def reference(v: torch.Tensor, k: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Modulation (Eq. 10) then the channels-first grouped convolution. v: (B, H, W, C), k: (B, C, K*K)."""
    B, C, taps = k.shape
    K = math.isqrt(taps)
    alpha = k - torch.sigmoid(gamma)[:, None] * k.mean(-1, keepdim=True)
    return depthwise_conv_grouped(v.permute(0, 3, 1, 2), alpha.view(B, C, K, K)).permute(0, 2, 3, 1)


def inputs(shape, kernel_size, dtype=torch.float64, seed=0):
    """v: (B, H, W, C), k: (B, C, K*K), gamma: (C,), all requiring grad."""
    B, H, W, C = shape
    gen = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn(B, H, W, C, generator=gen, dtype=dtype),
        torch.randn(B, C, kernel_size**2, generator=gen, dtype=dtype),
        torch.randn(C, generator=gen, dtype=dtype),
    )
    return [t.to(DEVICE).requires_grad_() for t in tensors]


def grads(fn, tensors, grad_out):
    return torch.autograd.grad(fn(*tensors), tensors, grad_out)


@pytest.mark.parametrize(
    "kernel_size,shape",
    [
        (3, (1, 5, 7, 3)),  # batch 1, H != W
        (3, (3, 5, 7, 3)),
        (5, (3, 5, 7, 3)),
        (3, (2, 2, 3, 4)),  # H < K
        (5, (1, 2, 3, 4)),  # H, W < K: some taps never touch the grid
        (3, (1, 3, 23, 70)),  # 69 pixels, 70 channels: partial pixel tiles and channel blocks
    ],
)
def test_matches_reference_float64(kernel_size, shape):
    v, k, gamma = inputs(shape, kernel_size)
    y = modulated_depthwise_conv(v, k, gamma)
    expected = reference(v, k, gamma)
    assert y.dtype == torch.float64 and y.shape == v.shape
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = grads(modulated_depthwise_conv, (v, k, gamma), grad_y)
    want = grads(reference, (v, k, gamma), grad_y)
    for name, g, w in zip(("v", "k", "gamma"), got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12, msg=lambda s, name=name: f"grad {name}: {s}")


def test_gradcheck():
    """Finite differences, independent of the reference's autograd (fast mode: random directions)."""
    v, k, gamma = inputs((2, 3, 4, 2), 3)
    assert torch.autograd.gradcheck(modulated_depthwise_conv, (v, k, gamma), eps=1e-6, atol=1e-8, fast_mode=True)


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_bf16_values_fp32_kernels(kernel_size):
    """bf16 activations with float32 kernels (ATConv under autocast): float32 accumulation, so y and grad v
    differ from the float32 reference on the same bf16 values by their final conversion only; grad k and
    grad gamma stay float32 and match closely."""
    v, k, gamma = inputs((2, 5, 7, 3), kernel_size, dtype=torch.float32)
    v_bf16 = v.detach().bfloat16().requires_grad_()
    y = modulated_depthwise_conv(v_bf16, k, gamma)
    expected = reference(v_bf16.float(), k, gamma)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, rtol=BF16_ROUNDING, atol=1e-6)

    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).bfloat16().to(DEVICE)
    got = grads(modulated_depthwise_conv, (v_bf16, k, gamma), grad_y)
    want = grads(reference, (v_bf16.float(), k, gamma), grad_y.float())
    assert [g.dtype for g in got] == [torch.bfloat16, torch.float32, torch.float32]
    torch.testing.assert_close(got[0].float(), want[0], rtol=BF16_ROUNDING, atol=1e-6)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)


def test_bf16_throughout_close_to_fp32():
    """All-bf16 inputs: outputs and gradients in bf16, within bf16 rounding of the float32 reference."""
    tensors = inputs((3, 4, 5, 6), 3, dtype=torch.float32)
    low = [t.detach().bfloat16().requires_grad_() for t in tensors]
    y = modulated_depthwise_conv(*low)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(*[t.float() for t in low]), rtol=2**-7, atol=1e-2)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got = grads(modulated_depthwise_conv, low, grad_y.bfloat16())
    want = grads(reference, tensors, grad_y)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.bfloat16
        assert (g.float() - w).abs().max() <= 2e-2 * w.abs().max()  # bf16 inputs: ~2^-8 each, summed


def test_backward_is_deterministic():
    """grad alpha is reduced from per-tile partials, not atomics: repeated backward passes agree bit for bit."""
    v, k, gamma = inputs((2, 9, 10, 5), 3, dtype=torch.float32)
    grad_y = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    first = grads(modulated_depthwise_conv, (v, k, gamma), grad_y)
    second = grads(modulated_depthwise_conv, (v, k, gamma), grad_y)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def randomised(module: ATConv, seed: int = 0) -> ATConv:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return module.to(DEVICE)


@pytest.mark.parametrize("kernel_size,context_pool,layout", [(3, "2d", "image"), (5, "raster", "tokens")])
def test_module_matches_channels_last(kernel_size, context_pool, layout):
    """ATConv with conv_impl="triton" against "channels_last" in float64: output, input and parameter gradients."""
    m = randomised(ATConv(8, kernel_size, context_pool, conv_impl="triton")).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if layout == "tokens":
        x = x.flatten(2).transpose(1, 2)  # (B, N, C)
    x.requires_grad_()
    size = (5, 7) if layout == "tokens" else None
    out = m(x, size)
    got = torch.autograd.grad(out.square().sum(), (x, *m.parameters()))
    m.conv_impl = "channels_last"
    expected = m(x, size)
    want = torch.autograd.grad(expected.square().sum(), (x, *m.parameters()))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for (name, _), g, w in zip([("x", None), *m.named_parameters()], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=lambda s, name=name: f"grad {name}: {s}")


def test_module_bf16_autocast_close_to_fp32():
    """Under bf16 autocast the kernels stay float32 and the output is within 1e-2 (relative to its largest
    value) of float32: only value_proj, out_proj and the convolution's result are rounded to bf16."""
    m = randomised(ATConv(32, 3, conv_impl="triton"))
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    with torch.no_grad():
        ref = m(x)
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = m(x)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_compiled_module_is_not_specialised_on_batch():
    """Under torch.compile(dynamic=True) the kernels are one opaque op: no graph break, one graph for every
    batch size, gradients through it."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    m = randomised(ATConv(8, 3, conv_impl="triton"))
    compiled = torch.compile(m, backend=counting_backend, fullgraph=True, dynamic=True)
    for batch in (2, 3):
        x = torch.randn(batch, 20, 8, generator=torch.Generator().manual_seed(batch)).to(DEVICE)
        out = compiled(x, (4, 5))
        torch.testing.assert_close(out, m(x, (4, 5)))
        out.sum().backward()
    assert len(graphs) == 1
    assert all(p.grad is not None for p in m.parameters())


def test_errors(monkeypatch):
    v, k, gamma = inputs((1, 3, 3, 2), 3)
    with pytest.raises(ValueError, match="expected K\\*K for an odd K"):
        modulated_depthwise_conv(v, k[..., :4], gamma)
    with pytest.raises(ValueError, match="do not match v"):
        modulated_depthwise_conv(v, k, gamma[:1])
    with pytest.raises(ValueError, match=r"expected v \(B, H, W, C\)"):
        modulated_depthwise_conv(v[0], k, gamma)
    monkeypatch.setattr(atconv_triton, "_INTERPRET", False)
    cpu = torch.zeros(1, 3, 3, 2)
    with pytest.raises(RuntimeError, match="needs a CUDA device with Triton"):
        modulated_depthwise_conv(cpu, k.detach().cpu(), gamma.detach().cpu())
    with pytest.raises(RuntimeError, match="needs a CUDA device with Triton"):
        ATConv(2, 3, conv_impl="triton")(cpu.permute(0, 3, 1, 2))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_compiled_kernels_at_model_width(dtype):
    """The compiled (not interpreted) kernels at a SiT-like width: many pixel tiles and channel blocks."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(4, 32, 32, 200, generator=gen).to("cuda", dtype).requires_grad_()
    k = torch.randn(4, 200, 9, generator=gen).cuda().requires_grad_()
    gamma = torch.randn(200, generator=gen).cuda().requires_grad_()
    grad_y = torch.randn(v.shape, generator=gen).to("cuda", dtype)
    got = grads(modulated_depthwise_conv, (v, k, gamma), grad_y)
    want = grads(reference, (v.float(), k, gamma), grad_y.float())
    y = modulated_depthwise_conv(v, k, gamma)
    tol = 2**-8 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(y.float(), reference(v.float(), k, gamma), rtol=tol, atol=1e-5)
    torch.testing.assert_close(got[0].float(), want[0], rtol=tol, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-4, atol=1e-3)  # sums over 1024 pixels
    torch.testing.assert_close(got[2], want[2], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("modulation", ["none", "softmax", "central_difference"])
def test_ablated_modulations_through_the_fused_kernel(modulation):
    """Other modulations run in torch and reach the fused kernel with its own modulation switched off
    (gamma = -inf, sigmoid = 0): values and gradients equal channels_last's."""
    m = randomised(ATConv(8, conv_impl="triton", modulation=modulation, kernel_source="static")).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    out = m(x)
    got = torch.autograd.grad(out.square().sum(), list(m.parameters()))
    m.conv_impl = "channels_last"
    expected = m(x)
    want = torch.autograd.grad(expected.square().sum(), list(m.parameters()))
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
