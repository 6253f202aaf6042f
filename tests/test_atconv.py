"""ATConv against a literal loop implementation of Eq. 7-11, plus layouts, gradients, precision and errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from sit_atconv.ops import ATConv, atconv_reference
from sit_atconv.ops.atconv import (
    depthwise_conv_channels_last,
    depthwise_conv_grouped,
    depthwise_conv_shift,
    pool_context,
)


def randomised(module: ATConv, seed: int = 0) -> ATConv:
    """Random values in every parameter (gamma and biases included), so no term can hide behind zeros."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)
    return module


def adaptive_bins(length: int, bins: int) -> list[tuple[int, int]]:
    return [(math.floor(i * length / bins), math.ceil((i + 1) * length / bins)) for i in range(bins)]


def literal_atconv(m: ATConv, x: torch.Tensor) -> torch.Tensor:
    """Eq. 7-11 with explicit loops. x: (B, C, H, W) float64 -> (B, C, H, W)."""
    B, C, H, W = x.shape
    K, r = m.kernel_size, m.kernel_size // 2
    Wc, bc = m.context_proj.weight, m.context_proj.bias
    Wg, bg = m.kernel_gen.weight, m.kernel_gen.bias
    Wv, bv = m.value_proj.weight, m.value_proj.bias
    Wo, bo = m.out_proj.weight, m.out_proj.bias
    gelu_tanh = lambda z: 0.5 * z * (1 + math.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))  # noqa: E731
    sigmoid = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731

    out = torch.zeros_like(x)
    for b in range(B):
        ctx = [[Wc @ x[b, :, i, j] + bc for j in range(W)] for i in range(H)]  # F, per pixel
        if m.context_pool == "2d":
            Z = [
                sum(ctx[i][j] for i in range(r0, r1) for j in range(c0, c1)) / ((r1 - r0) * (c1 - c0))
                for (r0, r1) in adaptive_bins(H, K)
                for (c0, c1) in adaptive_bins(W, K)
            ]
        else:
            flat = [ctx[n // W][n % W] for n in range(H * W)]
            Z = [sum(flat[s:e]) / (e - s) for (s, e) in adaptive_bins(H * W, K * K)]
        V = [[Wv @ x[b, :, i, j] + bv for j in range(W)] for i in range(H)]
        Y = torch.zeros(C, H, W, dtype=x.dtype)
        for c in range(C):
            phi = torch.tensor([gelu_tanh(Z[k][c].item()) for k in range(K * K)], dtype=x.dtype)
            kernel = Wg @ phi + bg
            alpha = kernel - sigmoid(m.gamma[c].item()) * kernel.mean()
            for i in range(H):
                for j in range(W):
                    acc = 0.0
                    for u in range(K):
                        for v in range(K):
                            ii, jj = i + u - r, j + v - r
                            if 0 <= ii < H and 0 <= jj < W:
                                acc += alpha[u * K + v] * V[ii][jj][c]
                    Y[c, i, j] = acc
        for i in range(H):
            for j in range(W):
                out[b, :, i, j] = Wo @ Y[:, i, j] + bo
    return out


@pytest.mark.parametrize("context_pool", ["2d", "raster"])
@pytest.mark.parametrize("kernel_size", [3, 5])
def test_matches_literal_equations(context_pool, kernel_size):
    m = randomised(ATConv(3, kernel_size, context_pool).double())
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # H != W
    expected = literal_atconv(m, x)
    with torch.no_grad():
        torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(atconv_reference(m, x), expected, rtol=1e-10, atol=1e-10)
        for conv_impl in ("shift", "channels_last"):
            m.conv_impl = conv_impl
            torch.testing.assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("context_pool", ["2d", "raster"])
def test_pool_then_project_equals_project_then_pool(context_pool):
    m = randomised(ATConv(8, 3, context_pool).double())
    x = torch.randn(3, 7, 9, 8, dtype=torch.float64)  # (B, H, W, C), bins of unequal size
    with torch.no_grad():
        pooled_first = m.context_proj(pool_context(x, 3, context_pool))
        projected_first = pool_context(m.context_proj(x), 3, context_pool)
    torch.testing.assert_close(pooled_first, projected_first, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel_size", [3, 5, 7])
@pytest.mark.parametrize("grid", [(8, 8), (5, 11), (2, 3)])
def test_fast_path_matches_reference(kernel_size, grid):
    H, W = grid
    m = randomised(ATConv(16, kernel_size, "2d"))
    x = torch.randn(2, H * W, 16)
    with torch.no_grad():
        torch.testing.assert_close(m(x, size=grid), atconv_reference(m, x, size=grid), rtol=1e-4, atol=1e-4)


def test_token_and_image_layouts_agree():
    m = randomised(ATConv(12, 3))
    img = torch.randn(2, 12, 6, 10)
    tokens = img.flatten(2).transpose(1, 2)  # (B, N, C), raster order
    with torch.no_grad():
        out_img = m(img)
        out_tok = m(tokens, size=(6, 10))
    assert out_img.shape == img.shape and out_tok.shape == tokens.shape
    torch.testing.assert_close(out_tok, out_img.flatten(2).transpose(1, 2))


def test_square_grid_inferred_for_tokens():
    m = randomised(ATConv(4, 3))
    x = torch.randn(1, 25, 4)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m(x, size=(5, 5)))


@pytest.mark.parametrize("conv_impl", ["shift", "channels_last"])
@pytest.mark.parametrize("context_pool", ["2d", "raster"])
def test_gradcheck(conv_impl, context_pool):
    m = randomised(ATConv(3, 3, context_pool, conv_impl=conv_impl).double())
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    params = tuple(m.parameters())

    def fn(x, *weights):
        return torch.func.functional_call(
            m, dict(zip([n for n, _ in m.named_parameters()], weights, strict=True)), (x,)
        )

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dim,kernel_size", [(8, 3), (64, 3), (768, 3), (32, 5), (16, 7)])
def test_parameter_count(dim, kernel_size):
    m = ATConv(dim, kernel_size)
    names = {n for n, _ in m.named_parameters()}
    assert {n.split(".")[0] for n in names} == {"context_proj", "kernel_gen", "gamma", "value_proj", "out_proj"}
    K2 = kernel_size**2
    assert sum(p.numel() for p in m.parameters()) == 3 * dim**2 + 4 * dim + K2**2 + K2
    assert torch.equal(m.gamma, torch.zeros(dim))  # sigmoid(0) = 0.5 inhibition at init


def test_depthwise_conv_forms_agree_with_conv2d():
    v = torch.randn(3, 6, 7, 5)  # (B, H, W, C)
    alpha = torch.randn(3, 5, 3, 3)
    expected = torch.stack(
        [F.conv2d(v[b].permute(2, 0, 1)[None], alpha[b][:, None], padding=1, groups=5)[0] for b in range(3)]
    )  # (B, C, H, W)
    torch.testing.assert_close(depthwise_conv_shift(v, alpha).permute(0, 3, 1, 2), expected)
    torch.testing.assert_close(depthwise_conv_channels_last(v, alpha).permute(0, 3, 1, 2), expected)
    torch.testing.assert_close(depthwise_conv_grouped(v.permute(0, 3, 1, 2), alpha), expected)


@pytest.mark.parametrize("conv_impl", ["shift", "channels_last"])
def test_bf16_autocast_keeps_kernels_fp32(conv_impl):
    """Under bf16 autocast the kernel path (pool, context_proj, kernel_gen, modulation) runs in float32 and
    gives the float32 kernels; the output stays within 1.5e-2 of float32, relative to its largest value.
    That budget is the token-sized bf16 work: value_proj's and out_proj's inputs and weights and the
    convolution's output are each rounded to bf16 (2^-9 relative apiece; measured 0.6e-2 for "shift" and
    1.0e-2 for "channels_last", which also rounds the kernels to bf16 for oneDNN's conv)."""
    m = randomised(ATConv(32, 3, conv_impl=conv_impl))
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = m(x)
        ref_alpha = m.modulate_kernels(m.context_kernels(x.view(2, 8, 8, 32)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)
            alpha = m.modulate_kernels(m.context_kernels(x.view(2, 8, 8, 32)))
            bf16_context = m.context_proj(x[:, :9])  # (B, K*K, C), as atconv_reference passes it
            assert m.kernels_from_context(bf16_context).dtype == torch.float32
    assert alpha.dtype == torch.float32
    torch.testing.assert_close(alpha, ref_alpha, rtol=1e-6, atol=1e-6)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() <= 1.5e-2 * ref.abs().max()


def test_channels_last_bf16_accumulates_in_fp32():
    """oneDNN's bf16 depthwise conv (what autocast runs) sums in float32: it differs from the float32 conv of
    the same bf16 values by the final rounding to bf16 only (half an ulp, 2^-8 relative)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(2, 16, 16, 64, generator=gen).bfloat16()
    alpha = torch.randn(2, 64, 3, 3, generator=gen)
    expected = depthwise_conv_channels_last(v.float(), alpha.bfloat16().float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = depthwise_conv_channels_last(v, alpha)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize("conv_impl", ["shift", "channels_last"])
def test_bf16_module_keeps_dtype(conv_impl):
    m = randomised(ATConv(8, 3, conv_impl=conv_impl))
    x = torch.randn(1, 16, 8)
    ref = m(x)
    out = m.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() / ref.abs().max() < 3e-2


def test_compiles_without_graph_breaks():
    m = randomised(ATConv(8, 3))
    x = torch.randn(2, 20, 8)
    compiled = torch.compile(m, backend="aot_eager", fullgraph=True)  # fullgraph: a graph break raises
    torch.testing.assert_close(compiled(x, (4, 5)), m(x, (4, 5)))


@pytest.mark.slow
def test_inductor_compile_matches_eager():
    m = randomised(ATConv(16, 3))
    x = torch.randn(2, 64, 16)
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x), m(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel_size", [2, 4, 0, -3, 3.0])
def test_rejects_bad_kernel_size(kernel_size):
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer"):
        ATConv(8, kernel_size)


def test_rejects_bad_inputs():
    m = ATConv(8, 3)
    with pytest.raises(ValueError, match=r"token count N=20 does not match size=\(4, 4\)"):
        m(torch.randn(1, 20, 8), size=(4, 4))
    with pytest.raises(ValueError, match="do not form a square grid"):
        m(torch.randn(1, 20, 8))
    with pytest.raises(ValueError, match="got an input with 6 channels"):
        m(torch.randn(1, 16, 6))
    with pytest.raises(ValueError, match=r"expects \(B, C, H, W\) or \(B, N, C\)"):
        m(torch.randn(16, 8))
    with pytest.raises(ValueError, match="context_pool='1d'"):
        ATConv(8, context_pool="1d")
    with pytest.raises(ValueError, match="kernel_act='relu'"):
        ATConv(8, kernel_act="relu")


# ------------------------------------------------------------------------------------------------
# The ablations of Table IX(c): each variant against its literal formula and its parameter count
# ------------------------------------------------------------------------------------------------

ABLATIONS = [
    dict(modulation="none"),
    dict(modulation="softmax"),
    dict(modulation="central_difference"),
    dict(kernel_source="static"),
    dict(kernel_source="static", modulation="none"),
    dict(value_proj=False),
    dict(out_proj=False),
    dict(value_proj=False, out_proj=False, modulation="none"),
]


def literal_ablation(module: ATConv, x: torch.Tensor, options: dict) -> torch.Tensor:
    """The variant written out: x (B, C, H, W) -> (B, C, H, W), channels-first, no shared code paths."""
    B, C, H, W = x.shape
    K = module.kernel_size
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    if options.get("kernel_source") == "static":
        k = module.static_kernel.expand(B, C, K * K)
    else:
        pooled = F.adaptive_avg_pool2d(x, K).flatten(2).transpose(1, 2)  # (B, K*K, C)
        context = pooled @ module.context_proj.weight.T + module.context_proj.bias
        phi = F.gelu(context, approximate="tanh").transpose(1, 2)  # (B, C, K*K)
        k = phi @ module.kernel_gen.weight.T + module.kernel_gen.bias
    modulation = options.get("modulation", "differential")
    if modulation == "differential":
        alpha = k - torch.sigmoid(module.gamma)[:, None] * k.mean(-1, keepdim=True)
    elif modulation == "central_difference":
        alpha = k - k.mean(-1, keepdim=True)
    elif modulation == "softmax":
        alpha = torch.exp(k) / torch.exp(k).sum(-1, keepdim=True)
    else:
        alpha = k
    v = tokens @ module.value_proj.weight.T + module.value_proj.bias if options.get("value_proj", True) else tokens
    v = v.transpose(1, 2).reshape(B, C, H, W)
    y = F.conv2d(v.reshape(1, B * C, H, W), alpha.reshape(B * C, 1, K, K), padding=K // 2, groups=B * C)
    y = y.reshape(B, C, H * W).transpose(1, 2)
    if options.get("out_proj", True):
        y = y @ module.out_proj.weight.T + module.out_proj.bias
    return y.transpose(1, 2).reshape(B, C, H, W)


def ablation_parameters(C: int, K: int, options: dict) -> int:
    """Closed-form parameter count: context path 2 (C^2 + C) ... see ATConv's docstring."""
    count = 0
    if options.get("kernel_source", "context") == "context":
        count += C * C + C + K**4 + K**2  # context_proj, kernel_gen
    else:
        count += C * K * K  # static kernel
    count += C if options.get("modulation", "differential") == "differential" else 0  # gamma
    count += (C * C + C) * (options.get("value_proj", True) + options.get("out_proj", True))
    return count


@pytest.mark.parametrize("options", ABLATIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("impl", ["channels_last", "shift"])
def test_ablation_variants_follow_their_formulas(options, impl):
    torch.manual_seed(0)
    module = ATConv(12, conv_impl=impl, **options).double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    x = torch.randn(2, 12, 5, 6, dtype=torch.float64)
    torch.testing.assert_close(module(x), literal_ablation(module, x, options), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        atconv_reference(module, x), literal_ablation(module, x, options), rtol=1e-10, atol=1e-10
    )
    assert sum(p.numel() for p in module.parameters()) == ablation_parameters(12, 3, options)


def test_the_defaults_are_the_papers_atconv():
    assert (
        sum(p.numel() for p in ATConv(1152).parameters())
        == ablation_parameters(1152, 3, {})
        == 3 * 1152**2 + 4 * 1152 + 81 + 9
    )


def test_dwconv_baseline_is_a_static_depthwise_convolution():
    from sit_atconv.ops import DWConv

    torch.manual_seed(0)
    for K in (3, 5, 7):
        module = DWConv(8, K).double()
        x = torch.randn(2, 8, 6, 5, dtype=torch.float64)
        tokens = x.flatten(2).transpose(1, 2)
        expected = F.conv2d(x, module.conv.weight, module.conv.bias, padding=K // 2, groups=8)
        torch.testing.assert_close(module(tokens, (6, 5)), expected.flatten(2).transpose(1, 2))
        assert sum(p.numel() for p in module.parameters()) == 8 * K * K + 8
    with pytest.raises(ValueError, match="dwconv kernel_size must be a positive odd integer"):
        DWConv(8, 4)


def test_ablation_options_are_checked_and_part_of_the_architecture():
    from sit_atconv.models import check_architecture, create_model
    from sit_atconv.ops import DWConv

    small = dict(depth=2, hidden_size=32, num_heads=2, input_size=8)
    with pytest.raises(ValueError, match="modulation='sharpen' is not supported"):
        create_model("SiT-ATConv-S/2", **small, mixer_options={"atconv": {"modulation": "sharpen"}})
    with pytest.raises(ValueError, match="mixer_options.atconv.modulation='none' needs a 'atconv' mixer"):
        create_model("SiT-S/2", **small, mixers=["dwconv", "dwconv"], mixer_options={"atconv": {"modulation": "none"}})
    with pytest.raises(ValueError, match="mixer_options.dwconv.kernel_size=7 needs a 'dwconv' mixer"):
        create_model("SiT-ATConv-S/2", **small, mixer_options={"dwconv": {"kernel_size": 7}})
    with pytest.raises(ValueError, match="mixer_options.atconv.gain: unknown option; atconv takes kernel_size"):
        create_model("SiT-ATConv-S/2", **small, mixer_options={"atconv": {"gain": 2}})
    variant = create_model("SiT-ATConv-S/2", **small, mixer_options={"atconv": {"modulation": "none"}})
    paper = create_model("SiT-ATConv-S/2", **small)
    with pytest.raises(ValueError, match="mixer_options.atconv.modulation: 'none' there, 'differential' expected"):
        check_architecture(variant.config, paper.config, "the checkpoint is another variant")
    # 0.4's flat spelling still builds the same model, with a DeprecationWarning
    with pytest.warns(DeprecationWarning, match=r"SiT arguments \['atconv_modulation'\] are now mixer_options"):
        old = create_model("SiT-ATConv-S/2", **small, atconv_modulation="none")
    assert old.config.mixer_options == variant.config.mixer_options
    baseline = create_model(
        "SiT-S/2", **small, mixers=["dwconv", "atconv"], mixer_options={"dwconv": {"kernel_size": 5}}
    )
    assert isinstance(baseline.blocks[0].mixer, DWConv) and baseline.blocks[0].mixer.kernel_size == 5
