"""The multistep solvers (DPM-Solver++(2M), UniPC) against closed forms and against diffusers' own schedulers, and
the model-call budget (`nfe`) that picks a sampler's steps."""

import math

import pytest
import torch
from test_transport import MEAN, VAR, MixtureModel, assert_gaussian, run_sampler

from sit_atconv.transport import SamplingSpec, Transport, guided_predictor, sample, sampling_grid, time_grid
from sit_atconv.transport.samplers import SAMPLERS, model_calls

MULTISTEP = ["dpm++2m", "unipc"]


def gaussian_flow(transport, x, ts):
    """Where the probability-flow ODE of N(MEAN, VAR) data carries x from ts[0] to ts[-1]: the map keeps each
    coordinate's standard score, x_t = alpha_t MEAN + sqrt(alpha_t^2 VAR + sigma_t^2) z."""
    alpha, sigma, _, _ = transport.interpolant.coefficients(ts[[0, -1]])
    mean, var = MEAN.double(), VAR.double()
    z = (x - alpha[0] * mean) / torch.sqrt(alpha[0] ** 2 * var + sigma[0] ** 2)
    return alpha[1] * mean + torch.sqrt(alpha[1] ** 2 * var + sigma[1] ** 2) * z


def gaussian_predictor(transport):
    model = MixtureModel(transport, {0: [(1.0, MEAN.double(), VAR.double())]})
    return guided_predictor(model, None, cfg=1.0, null_class=None)


@pytest.mark.parametrize("interpolant", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("sampler", MULTISTEP)
def test_error_falls_at_second_order_as_the_steps_double(interpolant, sampler):
    """From t = 0.9 to 0.1 (a grid inside the interpolant's regular part): halving the step divides the error by
    about 4 (the first and last steps are first order, as in diffusers, which keeps the global order at 2)."""
    transport = Transport(interpolant=interpolant)
    predict, x = gaussian_predictor(transport), torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    errors = []
    for steps in (16, 32, 64):
        ts = time_grid(0.9, 0.1, steps + 1)
        out = SAMPLERS[sampler](predict, transport, x.double(), ts)
        errors.append((out - gaussian_flow(transport, x.double(), ts)).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(1.8 < order < 2.4 for order in orders), (errors, orders)


@pytest.mark.parametrize("prediction", ["velocity", "noise", "score"])
def test_multistep_solvers_beat_euler_and_heun_at_the_same_model_calls(prediction):
    """On the sampling grid itself (t = 1 to 0 for velocity, the singular ends kept away from otherwise): 10 calls
    of a multistep solver land closer to the exact flow than 10 Euler steps or Heun's 9 calls."""
    transport = Transport(prediction=prediction)
    predict, x = gaussian_predictor(transport), torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    errors = {}
    for sampler in ["euler", "heun", *MULTISTEP]:
        spec = SamplingSpec(sampler=sampler, nfe=10)
        out, calls = sample(predict, transport, x.double(), spec)
        assert calls <= 10
        errors[sampler] = (out - gaussian_flow(transport, x.double(), sampling_grid(transport, spec))).abs().max()
    assert max(errors["dpm++2m"], errors["unipc"]) < min(errors["euler"], errors["heun"]), errors


@pytest.mark.parametrize("sampler", MULTISTEP)
def test_multistep_solvers_reproduce_a_gaussian(sampler):
    samples, calls = run_sampler(Transport(), SamplingSpec(sampler=sampler, num_steps=20))
    assert_gaussian(samples)
    assert calls == 20


def diffusers_run(scheduler, predict, x):
    """Sample with a diffusers scheduler, the model evaluated at t = the scheduler's sigma (linear interpolant:
    t = sigma, and flow_prediction is our velocity)."""
    for i, timestep in enumerate(scheduler.timesteps):
        t = scheduler.sigmas[i].double().expand(1)
        x = scheduler.step(predict(x, t), timestep, x).prev_sample
    return x


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' numpy call
@pytest.mark.parametrize("steps", [5, 12, 25])
def test_the_solvers_agree_with_diffusers_schedulers_in_float64(steps):
    """Our DPM-Solver++(2M), UniPC-2 (bh2) and Heun against diffusers' DPMSolverMultistepScheduler,
    UniPCMultistepScheduler (flow sigmas, flow_prediction) and FlowMatchHeunDiscreteScheduler, driven by the same
    exact model on the schedulers' own grids: relative difference <= 1e-5 (their sigmas are float32)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

    transport = Transport()
    components = [(0.5, MEAN.double(), VAR.double()), (0.5, -MEAN.double(), 0.5 * VAR.double())]
    predict = guided_predictor(MixtureModel(transport, {0: components}), None, cfg=1.0, null_class=None)
    x = torch.randn(16, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
    schedulers = {
        "dpm++2m": DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++", solver_order=2),
        "unipc": UniPCMultistepScheduler(**flow, solver_order=2, solver_type="bh2"),
        "heun": FlowMatchHeunDiscreteScheduler(),
    }
    for sampler, scheduler in schedulers.items():
        scheduler.set_timesteps(steps)
        sigmas = scheduler.sigmas.double()
        if sampler == "heun":  # its sigmas repeat each inner point for the second stage
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        ours = SAMPLERS[sampler](predict, transport, x.clone(), sigmas)
        theirs = diffusers_run(scheduler, predict, x.clone())
        assert ((ours - theirs).abs().max() / ours.abs().max()).item() <= 1e-5, sampler


# ------------------------------------------------------------------------------------------------
# nfe: a budget of model calls
# ------------------------------------------------------------------------------------------------


def test_nfe_picks_the_steps_each_sampler_needs_for_its_calls():
    expected = {"euler": 10, "dpm++2m": 10, "unipc": 10, "heun": 5, "sde-euler": 10, "sde-heun": 5}
    for sampler, steps in expected.items():
        spec = SamplingSpec(sampler=sampler, nfe=10)
        assert spec.num_steps == steps and spec.nfe is None  # one form: the steps
        assert spec == SamplingSpec(sampler=sampler, num_steps=steps)
        assert model_calls(spec) == (9 if sampler.endswith("heun") else 10)
    assert SamplingSpec(sampler="sde-euler", last_step="none", nfe=10).num_steps == 11
    assert SamplingSpec(nfe=10, num_steps=10).num_steps == 10  # agreeing values are fine


@pytest.mark.parametrize(
    "values,message",
    [
        ({"sampler": "dopri5", "nfe": 10}, "dopri5 chooses its own steps"),
        ({"sampler": "euler", "nfe": 0}, "nfe=0 is below euler's minimum of 1"),
        ({"sampler": "euler", "nfe": 2.5}, "nfe must be a positive integer"),
        ({"sampler": "heun", "nfe": 10, "num_steps": 10}, "nfe=10 and num_steps=10 disagree: heun takes 5 steps"),
    ],
)
def test_a_budget_that_cannot_be_met_is_one_clear_error(values, message):
    with pytest.raises(ValueError, match=message):
        SamplingSpec(**values)


@pytest.mark.parametrize("sampler", MULTISTEP)
def test_each_sample_is_solved_on_its_own(sampler):
    """No coupling across the batch (so any batch size or process count gives the same samples): a batch of four
    equals the four solved one at a time."""
    transport = Transport()
    components = [(0.5, MEAN.double(), VAR.double()), (0.5, -MEAN.double(), 0.5 * VAR.double())]
    predict = guided_predictor(MixtureModel(transport, {0: components}), None, cfg=1.0, null_class=None)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spec = SamplingSpec(sampler=sampler, num_steps=7)
    together, _ = sample(predict, transport, x, spec)
    alone = torch.cat([sample(predict, transport, x[i : i + 1], spec)[0] for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-12)
