"""Transport and samplers against closed forms: Gaussian-mixture data has an exact velocity field."""

import math

import pytest
import torch

from sit_atconv.transport import (
    INTERPOLANTS,
    MODES,
    SAMPLERS,
    SampleNoise,
    SamplingSpec,
    Transport,
    guided_predictor,
    sample,
    sampling_grid,
)


class MixtureModel:
    """The exact prediction E[target | x_t] for data from a mixture of diagonal Gaussians, per class.

    components[c] = list of (weight, mean (D,), variance (D,)); class `null` is the label-free mixture
    of all classes with equal class weights. Called like a model: (x_t (B, D), t (B,), y (B,))."""

    def __init__(self, transport: Transport, components: dict[int, list], null: int | None = None):
        self.transport = transport
        self.components = dict(components)
        if null is not None:
            n = len(components)
            self.components[null] = [(w / n, m, v) for comps in components.values() for (w, m, v) in comps]

    def posterior(self, x_t, t, comps):
        alpha, sigma, _, _ = self.transport.interpolant.coefficients(t[:, None].double())
        x_t = x_t.double()
        log_resp, means_x, means_eps = [], [], []
        for weight, mean, var in comps:
            var_t = alpha**2 * var + sigma**2  # (B, D)
            diff = x_t - alpha * mean
            log_resp.append(math.log(weight) - 0.5 * ((diff**2) / var_t + torch.log(var_t)).sum(1))
            means_x.append(mean + alpha * var * diff / var_t)
            means_eps.append(sigma * diff / var_t)
        resp = torch.softmax(torch.stack(log_resp, 1), 1)  # (B, K)
        ex = sum(resp[:, k : k + 1] * means_x[k] for k in range(len(comps)))
        eeps = sum(resp[:, k : k + 1] * means_eps[k] for k in range(len(comps)))
        return ex, eeps, alpha, sigma

    def __call__(self, x_t, t, y=None):
        y = torch.zeros(x_t.shape[0], dtype=torch.long) if y is None else y
        out = torch.empty_like(x_t, dtype=torch.float64)
        for label in y.unique().tolist():
            rows = y == label
            ex, eeps, alpha, sigma = self.posterior(x_t[rows], t[rows], self.components[label])
            _, _, d_alpha, d_sigma = self.transport.interpolant.coefficients(t[rows][:, None].double())
            if self.transport.prediction == "velocity":
                out[rows] = d_alpha * ex + d_sigma * eeps
            elif self.transport.prediction == "noise":
                out[rows] = eeps
            else:
                out[rows] = -eeps / sigma
        return out.to(x_t.dtype)


MEAN = torch.tensor([1.0, -2.0, 0.5])
VAR = torch.tensor([0.25, 1.0, 2.25])


def seeded_randn_like(seed):
    """One generator for the whole batch: the distribution tests need no per-sample streams."""
    generator = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype)


def run_sampler(transport, config, n=4000, seed=0, model=None, labels=None, cfg_scale=1.0, null=None):
    model = model or MixtureModel(transport, {0: [(1.0, MEAN.double(), VAR.double())]})
    randn_like = seeded_randn_like(seed)
    x = randn_like(torch.empty(n, MEAN.numel(), dtype=torch.float64))
    predict = guided_predictor(model, labels, cfg=cfg_scale, null_class=null)
    return sample(predict, transport, x, config, randn_like)


def assert_gaussian(samples, tol_mean=0.08, tol_var=0.15):
    assert torch.allclose(samples.mean(0), MEAN.double(), atol=tol_mean), samples.mean(0)
    cov = torch.cov(samples.T)
    assert torch.allclose(torch.diag(cov), VAR.double(), rtol=tol_var, atol=0.03), torch.diag(cov)
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 0.08


@pytest.mark.parametrize("interpolant", INTERPOLANTS)
@pytest.mark.parametrize("sampler,steps", [("euler", 200), ("heun", 40), ("dopri5", 1)])
def test_ode_samplers_reproduce_gaussian(interpolant, sampler, steps):
    transport = Transport(interpolant=interpolant)
    samples, calls = run_sampler(transport, SamplingSpec(sampler=sampler, num_steps=steps))
    assert_gaussian(samples)
    if sampler == "euler":
        assert calls == steps
    elif sampler == "heun":
        assert calls == 2 * steps - 1
    else:
        assert calls > 6  # adaptive: reports its function evaluations


@pytest.mark.parametrize("interpolant", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sde_samplers_reproduce_gaussian(interpolant, sampler):
    transport = Transport(interpolant=interpolant)
    config = SamplingSpec(sampler=f"sde-{sampler}", num_steps=250 if sampler == "euler" else 100)
    samples, calls = run_sampler(transport, config)
    assert_gaussian(samples)
    assert calls == (config.num_steps if sampler == "euler" else 2 * (config.num_steps - 1) + 1)


def test_time_shift_grid_is_sd3s_and_keeps_its_ends():
    from sit_atconv.transport import time_grid

    u = torch.linspace(1, 0, 9, dtype=torch.float64)
    for shift in (0.5, 1.0, 3.0):
        grid = time_grid(1.0, 0.0, 9, shift)
        assert torch.allclose(grid, shift * u / (1 + (shift - 1) * u), atol=1e-15)  # t' = s t / (1 + (s - 1) t)
    assert time_grid(1.0, 0.0, 5, 3.0)[2] == 0.75  # the midpoint moves towards the noise for s > 1
    shifted = time_grid(0.96, 0.04, 7, 2.0)  # other ends: the shift acts on the position between them
    assert shifted[0] == 0.96 and shifted[-1] == 0.04 and (shifted.diff() < 0).all()
    sde = sampling_grid(Transport(), SamplingSpec(sampler="sde-euler", num_steps=5, time_shift=2.0))
    assert sde[-1] == 0.0 and sde[-2] == pytest.approx(0.04) and (sde.diff() < 0).all()  # the last step stays
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="time_shift must be a finite number > 0"):
            SamplingSpec(time_shift=bad)


@pytest.mark.parametrize(
    "config",
    [
        SamplingSpec(sampler="heun", num_steps=25, time_shift=3.0),
        SamplingSpec(sampler="euler", num_steps=200, time_shift=0.5),
        SamplingSpec(sampler="sde-heun", num_steps=100, time_shift=2.0),
    ],
)
def test_time_shifted_grids_still_reach_the_exact_distribution(config):
    samples, _ = run_sampler(Transport(interpolant="linear"), config)
    assert_gaussian(samples)


@pytest.mark.parametrize("prediction", ["noise", "score"])
def test_noise_and_score_predictions_sample_the_same_distribution(prediction):
    transport = Transport(interpolant="linear", prediction=prediction)
    samples, _ = run_sampler(transport, SamplingSpec(sampler="heun", num_steps=60))
    assert_gaussian(samples)


@pytest.mark.parametrize("last_step", ["mean", "tweedie", "euler", "none"])
@pytest.mark.parametrize("form", ["sigma", "constant", "linear"])
def test_sde_last_steps_and_diffusion_forms(last_step, form):
    if form == "constant" and last_step == "mean":
        pytest.skip("a noiseless mean step of 0.04 with D = 1 shrinks the spread by design (about 30% here)")
    transport = Transport(interpolant="linear")
    config = SamplingSpec(sampler="sde-euler", num_steps=200, diffusion_form=form, last_step=last_step)
    samples, _ = run_sampler(transport, config, n=3000)
    assert_gaussian(samples)


def test_cfg_moves_samples_towards_the_class_mode():
    """Each class is half its own mode and half a shared mode at 0: guidance favours the own mode."""
    transport = Transport()
    var = torch.full((1,), 0.1, dtype=torch.float64)
    classes = {
        0: [(0.5, torch.tensor([-3.0], dtype=torch.float64), var), (0.5, torch.zeros(1, dtype=torch.float64), var)],
        1: [(0.5, torch.tensor([3.0], dtype=torch.float64), var), (0.5, torch.zeros(1, dtype=torch.float64), var)],
    }
    model = MixtureModel(transport, classes, null=2)
    labels = torch.tensor([0, 1] * 1000)

    def own_mode_fraction(cfg_scale):
        x = torch.randn(2000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        predict = guided_predictor(model, labels, cfg=cfg_scale, null_class=2)
        out, _ = sample(predict, transport, x, SamplingSpec(sampler="heun", num_steps=60))
        sign = torch.where(labels == 0, -1.0, 1.0)
        return ((out[:, 0] * sign) > 1.5).double().mean().item()

    assert abs(own_mode_fraction(1.0) - 0.5) < 0.05  # conditional sampling is exact
    assert own_mode_fraction(4.0) > 0.75


def test_cfg_scale_one_is_the_conditional_model_with_one_forward():
    calls = []

    def model(x, t, y):
        calls.append(x.shape[0])
        return x * 0 + y[:, None].double()

    x = torch.zeros(4, 3, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3])
    out = guided_predictor(model, labels, cfg=1.0, null_class=10)(x, torch.tensor(0.5))
    assert torch.equal(out[:, 0], labels.double()) and calls == [4]


def test_guidance_interval_and_channels():
    def model(x, t, y):  # cond = 1, uncond = 0 on every channel
        return (y != 9).double()[:, None].expand_as(x).clone()

    x = torch.zeros(2, 4, dtype=torch.float64)
    labels = torch.tensor([1, 2])
    predict = guided_predictor(model, labels, cfg=3.0, null_class=9, guidance_low=0.2, guidance_high=0.7)
    assert torch.equal(predict(x, torch.tensor(0.5)), torch.full((2, 4), 3.0, dtype=torch.float64))
    assert torch.equal(predict(x, torch.tensor(0.9)), torch.ones(2, 4, dtype=torch.float64))  # outside: cond
    assert torch.equal(predict(x, torch.tensor(0.1)), torch.ones(2, 4, dtype=torch.float64))
    three = guided_predictor(model, labels, cfg=3.0, null_class=9, cfg_channels=3)(x, torch.tensor(0.5))
    assert torch.equal(three[:, :3], torch.full((2, 3), 3.0, dtype=torch.float64))
    assert torch.equal(three[:, 3], torch.ones(2, dtype=torch.float64))  # channel 4 unguided


def test_cfg_needs_a_conditional_model():
    with pytest.raises(ValueError, match="class-conditional model with a null class"):
        guided_predictor(lambda x, t, y: x, None, cfg=2.0)


@pytest.mark.parametrize("interpolant", INTERPOLANTS)
def test_velocity_target_is_the_time_derivative(interpolant):
    transport = Transport(interpolant=interpolant)
    x, eps = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    h = 1e-6
    plus, _ = transport.interpolate(x, eps, t + h)
    minus, _ = transport.interpolate(x, eps, t - h)
    _, target = transport.interpolate(x, eps, t)
    torch.testing.assert_close(target, (plus - minus) / (2 * h), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("interpolant", INTERPOLANTS)
@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_prediction_conversions_round_trip(interpolant, prediction):
    """Given the true (x, eps), each prediction type's target converts to the same velocity, noise and data."""
    x, eps = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([0.2, 0.4, 0.6, 0.8], dtype=torch.float64)
    reference = Transport(interpolant=interpolant)
    x_t, velocity = reference.interpolate(x, eps, t)
    transport = Transport(interpolant=interpolant, prediction=prediction)
    _, target = transport.interpolate(x, eps, t)
    torch.testing.assert_close(transport.velocity(target, x_t, t), velocity)
    torch.testing.assert_close(transport.noise(target, x_t, t), eps)
    torch.testing.assert_close(transport.data(target, x_t, t), x)


def test_lognormal_time_sampling_matches_the_snr_definition():
    for interpolant in INTERPOLANTS:
        transport = Transport(interpolant=interpolant, time_sampling="lognormal")
        t = transport.sample_time(20000, torch.device("cpu"), torch.Generator().manual_seed(0)).double()
        alpha, sigma, _, _ = transport.interpolant.coefficients(t)
        log_ratio = torch.log(sigma / alpha)
        assert abs(log_ratio.mean()) < 0.05 and abs(log_ratio.std() - 1) < 0.05, interpolant


def test_loss_is_per_sample_and_zero_for_the_exact_target():
    transport = Transport()
    x = torch.randn(6, 2, 4, 4)

    class Oracle:  # knows the noise the loss will draw
        def __call__(self, x_t, t):
            return (x_t - (1 - t)[:, None, None, None] * x) / t[:, None, None, None] - x

    gen = torch.Generator().manual_seed(3)
    losses = transport.loss(Oracle(), x, generator=gen)
    assert losses.shape == (6,) and losses.max() < 1e-8
    extras = transport.loss(lambda x_t, t: (x_t * 0, "features"), x, return_all=True)[1]
    assert extras == "features"


def test_same_sample_index_gives_same_noise_whatever_the_batch():
    a = SampleNoise(7, [0, 1, 2, 3]).randn((2, 3))
    b = SampleNoise(7, [2, 3]).randn((2, 3))
    assert torch.equal(a[2:], b)
    assert not torch.equal(SampleNoise(8, [2]).randn((2, 3)), b[:1])


def test_every_caller_reads_the_one_sampler_table(monkeypatch):
    """sample() dispatches through SAMPLERS (a replaced entry is what runs), names map both ways, and
    each sampler's keyword-only options are SamplingSpec fields (sample.py's flags come from those)."""
    import dataclasses
    import inspect

    fields = {f.name for f in dataclasses.fields(SamplingSpec)}
    for name, function in SAMPLERS.items():
        config = SamplingSpec(sampler=name)
        assert config.sampler == name and name.removeprefix("sde-") in MODES[config.mode]
        keywords = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
        assert set(keywords) <= fields, name
        assert list(inspect.signature(function).parameters)[:5] == ["predict", "transport", "x", "ts", "randn_like"]
    seen = []

    def spy(predict, transport, x, ts, randn_like, *, diffusion_form, diffusion_norm, last_step):
        seen.append({"diffusion_form": diffusion_form, "diffusion_norm": diffusion_norm, "last_step": last_step})
        return x

    monkeypatch.setitem(SAMPLERS, "sde-heun", spy)
    x = torch.zeros(2, 3)
    out, calls = sample(lambda x, t: x, Transport(), x, SamplingSpec(sampler="sde-heun", last_step="none"))
    assert out is x and calls == 0
    assert seen == [{"diffusion_form": "sigma", "diffusion_norm": 1.0, "last_step": "none"}]


def test_sampling_grids():
    transport = Transport()
    torch.testing.assert_close(sampling_grid(transport, SamplingSpec(num_steps=4)), torch.linspace(1, 0, 5).double())
    dopri5 = sampling_grid(transport, SamplingSpec(sampler="dopri5"))  # its own steps between the ends
    assert (dopri5[0].item(), dopri5[-1].item()) == (1.0, 0.0)
    sde = sampling_grid(transport, SamplingSpec(sampler="sde-euler", num_steps=5))
    torch.testing.assert_close(sde[:-1], torch.linspace(1, 0.04, 5).double())  # REPA's grid, then the last step
    assert sde[-1] == 0.0
    noise_model = Transport(prediction="noise")  # singular at both ends: SiT keeps sample_eps from them
    ends = sampling_grid(noise_model, SamplingSpec(sampler="sde-euler", num_steps=5, last_step="none"))
    assert len(ends) == 5 and ends[0] == 1 - noise_model.sample_eps and ends[-1] == noise_model.sample_eps


def test_bad_sampler_configs():
    with pytest.raises(ValueError, match="unknown sampler 'pde-euler'"):
        SamplingSpec(sampler="pde-euler")
    with pytest.raises(ValueError, match="unknown sampler 'sde-dopri5'"):
        SamplingSpec(sampler="sde-dopri5")
    with pytest.raises(ValueError, match="guidance_low 0.8 is above guidance_high 0.2"):
        SamplingSpec(guidance_low=0.8, guidance_high=0.2)
    with pytest.raises(ValueError, match="num_steps must be a positive integer, got -3"):
        SamplingSpec(num_steps=-3)
    with pytest.raises(ValueError, match="unknown sampler 'rk4'; expected one of"):
        SamplingSpec(sampler="rk4")
    with pytest.raises(ValueError, match="unknown last_step 'midpoint'"):
        SamplingSpec(sampler="sde-euler", last_step="midpoint")
    with pytest.raises(ValueError, match="unknown diffusion_form 'cubic'"):
        SamplingSpec(sampler="sde-euler", diffusion_form="cubic")
    with pytest.raises(ValueError, match="unknown interpolant 'sine'"):
        Transport(interpolant="sine")
    with pytest.raises(ValueError, match="unknown prediction 'x0'"):
        Transport(prediction="x0")


def test_the_0_4_spellings_still_work_with_a_warning():
    """SamplerConfig(mode, sampler) and guided_predictor(cfg_scale=...) for one more release: the same spec and
    predictions, a DeprecationWarning; both spellings of one knob with different values is an error."""
    from sit_atconv.transport import SamplerConfig

    with pytest.warns(DeprecationWarning, match="SamplingSpec"):
        old = SamplerConfig(mode="sde", sampler="heun", num_steps=7)
    assert old == SamplingSpec(sampler="sde-heun", num_steps=7)
    model = lambda x, t, y: x * (1 + y.float()[:, None])  # noqa: E731
    x, labels = torch.randn(2, 3), torch.tensor([1, 2])
    with pytest.warns(DeprecationWarning, match="cfg_scale is now called cfg"):
        before = guided_predictor(model, labels, cfg_scale=2.0, null_class=0)(x, torch.tensor(0.5))
    torch.testing.assert_close(before, guided_predictor(model, labels, cfg=2.0, null_class=0)(x, torch.tensor(0.5)))
    with pytest.raises(ValueError, match="cfg_scale=2.0 and cfg=3.0 are the same setting"):
        guided_predictor(model, labels, cfg=3.0, cfg_scale=2.0, null_class=0)


def test_the_0_4_keyword_path_is_the_interpolant():
    with pytest.warns(DeprecationWarning, match="path is now called interpolant"):
        old = Transport(path="cosine")
    assert old.interpolant == Transport(interpolant="cosine").interpolant
    with pytest.warns(DeprecationWarning, match="Transport.path is now Transport.interpolant"):
        assert old.path.name == "cosine"
    with pytest.raises(ValueError, match="path='cosine' and interpolant='vp'"), pytest.warns(DeprecationWarning):
        Transport(interpolant="vp", path="cosine")
