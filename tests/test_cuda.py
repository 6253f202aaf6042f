"""What only a GPU can show: CUDA generators, sharded sampling, bf16 and compiled training, the Triton kernel
and the pipeline on a CUDA device. Every test is marked `cuda` and skipped without one; `make gpu-check`
runs them (`pytest -m cuda tests/test_cuda.py`) on the GPU machine.

SIT_ATCONV_TEST_DEVICE=cpu runs the same checks on the CPU, to debug the tests themselves where there is no
GPU (the Triton test then needs TRITON_INTERPRET=1, which tests/conftest.py sets without an NVIDIA device).
"""

import os

import numpy as np
import pytest
import torch
from helpers import tiny_sit, tiny_vae

from sit_atconv.generation import GenerationConfig, generate, sample_to_npz
from sit_atconv.transport import SampleNoise, SamplingSpec, Transport

DEVICE = torch.device(os.environ.get("SIT_ATCONV_TEST_DEVICE", "cuda"))
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE.type == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.fixture(autouse=True)
def no_tf32():
    """TF32 matmuls and convolutions round to 10 mantissa bits, which would hide the differences these
    tests look for; they are restored afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def guided(steps: int = 8) -> GenerationConfig:
    return GenerationConfig(spec=SamplingSpec(sampler="euler", num_steps=steps, cfg=1.8), seed=5)


def test_per_sample_generators_make_samples_independent_of_the_batch():
    model = tiny_sit().to(DEVICE)
    labels = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6])
    noise = SampleNoise(5, range(8), DEVICE).randn((4, 8, 8))
    assert noise.device.type == DEVICE.type
    for i in (0, 5):  # CUDA's Philox streams are per generator: one sample's noise alone is the same bits
        assert torch.equal(SampleNoise(5, [i], DEVICE).randn((4, 8, 8))[0], noise[i])

    batch, calls = generate(model, None, range(8), labels, guided(), DEVICE)
    assert calls == 8 and batch.device.type == DEVICE.type
    singles = torch.cat([generate(model, None, [i], labels[i : i + 1], guided(), DEVICE)[0] for i in range(8)])
    # Only the matmul kernels differ between batch 1 and 8 (their summation order), never the noise.
    torch.testing.assert_close(singles, batch, rtol=0, atol=1e-4)
    assert batch.std() > 0.05  # the perturbed weights make the samples carry signal


def test_sharded_npz_run_does_not_depend_on_the_batch_split(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model = tiny_sit(in_channels=3).to(DEVICE)  # a pixel model: the .npz holds its samples without a VAE
    runs = []
    for batch_size in (8, 3):
        AcceleratorState._reset_state(reset_partial_state=True)  # the device comes from a fresh state
        accelerator = Accelerator(cpu=DEVICE.type == "cpu")
        assert accelerator.device.type == DEVICE.type
        out = tmp_path / f"batch{batch_size}.npz"
        info = sample_to_npz(accelerator, model, None, out, 10, batch_size, guided(4), progress=False)
        assert info["arr_0_shape"] == [10, 8, 8, 3]
        with np.load(out) as npz:
            runs.append((npz["arr_0"], npz["arr_1"]))
    AcceleratorState._reset_state(reset_partial_state=True)
    (images_8, labels_8), (images_3, labels_3) = runs
    np.testing.assert_array_equal(labels_8, labels_3)
    # uint8 rounding may flip by one where a value lands within float noise of a .5 boundary.
    assert np.abs(images_8.astype(int) - images_3.astype(int)).max() <= 1
    assert (images_8 != images_3).mean() < 0.01


def training_run(name: str, steps: int, bf16: bool, lr: float) -> tuple[list[float], dict]:
    """Losses of `steps` AdamW steps of a seeded tiny model on fixed data, times and noise, and its final weights."""
    model = tiny_sit(name, std=0.05).to(DEVICE).train()
    model.y_embedder.dropout_prob = 0.0  # the same labels in both precisions
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    generator = torch.Generator().manual_seed(1)
    x, eps = (torch.randn(8, 4, 8, 8, generator=generator).to(DEVICE) for _ in range(2))
    t = torch.rand(8, generator=generator).to(DEVICE)
    y = torch.randint(0, 10, (8,), generator=generator).to(DEVICE)
    transport, losses = Transport(), []
    for _ in range(steps):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=bf16):
            loss = transport.loss(model, x, {"y": y}, t=t, eps=eps).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().float() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["SiT-ATConv-S/2", "SiT-Hybrid-S/2"])
def test_bf16_training_stays_finite_and_close_to_fp32(name):
    steps, lr = 6, 1e-3
    fp32, weights_fp32 = training_run(name, steps, bf16=False, lr=lr)
    bf16, weights_bf16 = training_run(name, steps, bf16=True, lr=lr)
    assert np.isfinite(bf16).all()
    assert fp32[-1] < fp32[0] and bf16[-1] < bf16[0]  # both train
    # bf16 keeps 8 mantissa bits: a few parts in a thousand per op, a few percent after six steps.
    np.testing.assert_allclose(bf16, fp32, rtol=0.03)
    # Adam moves a weight by about lr per step whatever its gradient's size, so where a gradient is near zero
    # bf16 may step the other way: weights may drift apart by up to 2 lr per step, and no further.
    for key, value in weights_fp32.items():
        assert torch.isfinite(weights_bf16[key]).all(), key
        torch.testing.assert_close(weights_bf16[key], value, rtol=0, atol=2 * lr * steps, msg=key)


@pytest.mark.parametrize("name", ["SiT-ATConv-S/2", "SiT-Hybrid-S/2"])
def test_compiled_forward_and_loss_do_not_recompile_across_steps_and_batch_sizes(name):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny_sit(name).to(DEVICE).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    transport = Transport()

    def forward_loss(x, y, t, eps):
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            return transport.loss(model, x, {"y": y}, t=t, eps=eps).mean()

    compiled = torch.compile(forward_loss)

    def batch(size: int) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(size)
        tensors = [torch.randn(size, 4, 8, 8, generator=generator), torch.randint(0, 10, (size,), generator=generator)]
        tensors += [torch.rand(size, generator=generator), torch.randn(size, 4, 8, 8, generator=generator)]
        tensors = [t.to(DEVICE) for t in tensors]
        for tensor in tensors:  # the batch dimension is symbolic from the first call: one graph for all sizes
            torch._dynamo.mark_dynamic(tensor, 0)
        return tensors

    def step(size: int) -> float:
        loss = compiled(*batch(size))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step(4)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises instead of passing silently
        losses = [step(size) for size in (4, 4, 6, 8, 3)]
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(np.isfinite(losses))

    model.eval()  # no label dropout: compiled and eager see the same labels
    inputs = batch(5)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*inputs), forward_loss(*inputs), rtol=2e-2, atol=1e-4)
    torch._dynamo.reset()


def triton_module():
    """sit_atconv.ops.atconv_triton if it exists and runs on DEVICE (else the test is skipped)."""
    module = pytest.importorskip("sit_atconv.ops.atconv_triton")
    if not module.triton_available(DEVICE):
        pytest.skip(f"Triton cannot run on {DEVICE}")
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_atconv_matches_the_reference_values_and_gradients(dtype):
    triton = triton_module()
    from sit_atconv.ops.atconv import depthwise_conv_grouped

    # A SiT-XL/2 width at 256 px on CUDA; a small one in Triton's CPU interpreter.
    B, H, W, C = (4, 16, 16, 1152) if DEVICE.type == "cuda" else (2, 5, 7, 8)
    generator = torch.Generator().manual_seed(0)
    v = torch.randn(B, H, W, C, generator=generator).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(B, C, 9, generator=generator).to(DEVICE).requires_grad_()  # float32, as ATConv makes it
    gamma = torch.randn(C, generator=generator).to(DEVICE).requires_grad_()
    grad_out = torch.randn(B, H, W, C, generator=generator).to(DEVICE, dtype)

    def reference(v, k, gamma):  # Eq. 10, then the channels-first grouped conv, in float64
        alpha = k - torch.sigmoid(gamma)[:, None] * k.mean(-1, keepdim=True)
        return depthwise_conv_grouped(v.permute(0, 3, 1, 2), alpha.view(B, C, 3, 3)).permute(0, 2, 3, 1)

    y = triton.modulated_depthwise_conv(v, k, gamma)
    assert y.dtype == dtype and y.shape == v.shape
    grads = torch.autograd.grad(y, (v, k, gamma), grad_out)
    exact = [t.detach().double().requires_grad_() for t in (v, k, gamma)]
    y_ref = reference(*exact)
    grads_ref = torch.autograd.grad(y_ref, exact, grad_out.double())
    # float32 accumulates in float32; bf16 output adds its rounding (2^-8 relative) on top.
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-2)
    torch.testing.assert_close(y.double(), y_ref, **tol)
    for name, grad, grad_ref in zip(("v", "k", "gamma"), grads, grads_ref, strict=True):
        scale = grad_ref.abs().max().item()  # k and gamma sum over H*W pixels: compare relative to their size
        torch.testing.assert_close(grad.double() / scale, grad_ref / scale, **tol, msg=f"grad {name}")


def test_triton_conv_impl_matches_the_default_inside_sit():
    triton_module()
    model = tiny_sit("SiT-ATConv-S/2").to(DEVICE)
    x, t, y = torch.randn(3, 4, 8, 8).to(DEVICE), torch.rand(3).to(DEVICE), torch.tensor([1, 2, 3]).to(DEVICE)
    with torch.no_grad():
        expected = model(x, t, y)
        for module in model.modules():
            if hasattr(module, "conv_impl"):
                module.conv_impl = "triton"
        torch.testing.assert_close(model(x, t, y), expected, rtol=1e-4, atol=1e-5)


def test_pipeline_runs_on_cuda_and_matches_the_cpu():
    from sit_atconv.pipelines import SiTPipeline, flow_match_scheduler

    pipe = SiTPipeline(tiny_sit(), flow_match_scheduler(), vae=tiny_vae())
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    options = dict(class_labels=[1, 7], guidance_scale=1.5, num_inference_steps=5, output_type="pt")
    expected = pipe(latents=latents, **options).images
    pipe.to(DEVICE)
    assert pipe.transformer.device.type == DEVICE.type and pipe.vae.device.type == DEVICE.type
    images = pipe(latents=latents, **options).images
    assert images.device.type == DEVICE.type and images.shape == (2, 3, 16, 16)
    torch.testing.assert_close(images.cpu(), expected, rtol=0, atol=1e-4)
    # Noise drawn on the device from a CUDA generator, and the project's SDE sampler, run there too.
    generator = torch.Generator(DEVICE).manual_seed(0)
    sampled = pipe(generator=generator, sampler="sde-euler", **options).images
    assert torch.isfinite(sampled).all() and 0 <= sampled.min() and sampled.max() <= 1


def test_the_training_loop_never_waits_for_the_gpu_between_log_steps(tmp_path, monkeypatch):
    """The trainer as configured by default on CUDA (compiled forward + loss, fused AdamW, TF32): steps,
    noise and EMA updates run under CUDA's sync debug mode "error", so any host read-back inside them fails;
    the compiled step never recompiles, previews with CFG included."""
    import torch._dynamo
    from helpers import tiny_overrides

    from sit_atconv.training import load_config, train, trainer

    def no_sync(fn):
        def wrapped(*args, **kwargs):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")

        return wrapped

    if DEVICE.type == "cuda":
        for name in ("train_step", "step_noise", "update_ema"):
            monkeypatch.setattr(trainer, name, no_sync(getattr(trainer, name)))
    demo = os.path.join(os.path.dirname(__file__), "..", "configs", "demo", "digits.yaml")
    extra = {"log.every": 4, "checkpoint.every": 4, "preview.every": 4, "preview.cfg": 2.0, "preview.num_steps": 2}
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        result = train(load_config(demo, tiny_overrides(tmp_path, 8, **extra)), resume="none", progress=False)
    assert [s for s, _ in result.losses] == list(range(1, 9)) and all(np.isfinite([v for _, v in result.losses]))


def test_stop_signals_agree_a_fixed_number_of_steps_later_without_waiting_for_the_gpu():
    """With several processes the stop request is summed over them every step and read back StopSignals.LAG steps
    later (on CUDA through pinned memory and an event), so every process stops after the same step. One GPU
    here: a stand-in accelerator with 2 processes whose sum is the identity."""
    from types import SimpleNamespace

    from sit_atconv.training.signals import StopSignals

    accelerator = SimpleNamespace(num_processes=2, device=DEVICE, reduce=lambda tensor, op: tensor.clone())
    signals = StopSignals(accelerator)
    answers = []
    for step in range(1, 9):
        if step == 3:
            signals.received = "SIGTERM"  # as the handler sets it
        answers.append(signals.agreed())
    lag = StopSignals.LAG if DEVICE.type == "cuda" else 0
    assert answers == [step >= 3 + lag for step in range(1, 9)]
