"""SiTPipeline: a SiT (attention, ATConv or hybrid) as a diffusers pipeline.

    import sit_atconv                                  # makes the SiT classes known to diffusers' loader
    from sit_atconv.pipelines import SiTPipeline
    pipe = SiTPipeline.from_pretrained("path/to/exported-model")
    images = pipe(class_labels=[207, "otter"], guidance_scale=1.8, num_inference_steps=50).images

A pipeline folder holds model_index.json (with `id2label` and the `transport` the model was trained
on), transformer/ (SiT config.json + diffusion_pytorch_model.safetensors), scheduler/
(FlowMatchEulerDiscreteScheduler) and, for latent models, vae/. Converted checkpoints may also keep
model/ (non-EMA weights) and projector.safetensors (REPA) for continued training. `sit_atconv.export`
writes such folders, with a model card (README.md) and this module's code generated into
pipeline_sit_atconv.py (`sit_atconv.pipelines.remote_code`), so that plain diffusers loads them too:
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`. Code that this module runs at sampling
time must therefore be importable at the top of its modules (see remote_code's docstring).

Sampling runs through the project's own code: guidance from `guided_predictor`, the default Euler
steps from the diffusers scheduler on the project's time grid (identical to `sample_euler`; diffusers' Heun,
DPM-Solver++ and UniPC flow schedulers swapped in give the project's heun, dpm++2m and unipc samples), and any
name of `sit_atconv.transport.SAMPLERS` (or a `SamplingSpec`) through `sit_atconv.transport.sample`.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

from sit_atconv import vae as autoencoder
from sit_atconv.errors import UserError
from sit_atconv.generation import GenerationConfig, check_generation
from sit_atconv.models.loading import from_pretrained_strict, load_sit, transport_settings
from sit_atconv.models.sit import SiT
from sit_atconv.transport import SAMPLERS, SamplingSpec, Transport, sample, sampling_grid

DEFAULT_TRANSPORT = {"interpolant": "linear", "prediction": "velocity"}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
# Files of a pipeline folder that sampling does not need (skipped when fetching from the hub).
TRAINING_ONLY = ["model/*", "projector.safetensors"]


# diffusers' flow-matching schedulers the pipeline drives, and the sampler of the table each one steps like. Their
# x_sigma = (1 - sigma) x + sigma eps is the linear interpolant at t = sigma, and their "flow" model output
# (flow_prediction) is its velocity dx/dt = eps - x: `scheduler_times` is the whole mapping. The Euler and Heun
# schedulers step dx/dsigma = u whatever the interpolant; the multistep ones assume the linear one.
SCHEDULER_SAMPLERS = {
    "FlowMatchEulerDiscreteScheduler": "euler",
    "FlowMatchHeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpm++2m",
    "UniPCMultistepScheduler": "unipc",
}
MULTISTEP_SCHEDULERS = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")


def scheduler_sampler(scheduler, interpolant: str) -> str:
    """The name in the sampler table that `scheduler` steps like (its model calls per step), after checking that
    it is set up for a flow model trained on `interpolant`; a clear error otherwise."""
    kind = type(scheduler).__name__
    if kind not in SCHEDULER_SAMPLERS:
        raise UserError(
            f"the pipeline drives diffusers' flow schedulers ({', '.join(SCHEDULER_SAMPLERS)}), not {kind}; "
            "or pass sampler=... to use the project's samplers"
        )
    if kind in MULTISTEP_SCHEDULERS:
        config = scheduler.config
        if not config.get("use_flow_sigmas") or config.get("prediction_type") != "flow_prediction":
            raise UserError(
                f"{kind} must be built with use_flow_sigmas=True and prediction_type='flow_prediction' for a flow "
                f"model, got use_flow_sigmas={config.get('use_flow_sigmas')}, "
                f"prediction_type={config.get('prediction_type')!r}"
            )
        if interpolant != "linear":
            raise UserError(
                f"{kind} assumes the linear interpolant, and this model was trained on the {interpolant} one; "
                "use sampler='dpm++2m' or 'unipc' (the project's solvers take any interpolant)"
            )
    return SCHEDULER_SAMPLERS[kind]


def scheduler_times(scheduler) -> list[torch.Tensor]:
    """The model's time t at each of the scheduler's calls (after `set_timesteps`): its sigma there."""
    return [scheduler.sigmas[i] for i in range(len(scheduler.timesteps))]


def flow_match_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler whose steps are the project's Euler ODE sampler: no shift, and the pipeline hands
    it the project's time grid as `sigmas` (its own default grid stops at 1/1000, not 0)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class SiTPipeline(DiffusionPipeline):
    r"""Class-conditional or unconditional image generation with a SiT and flow-matching samplers.

    Args:
        transformer: the `SiT` (predicts velocity, noise or score at time t; t = 0 data, t = 1 noise).
        scheduler: `FlowMatchEulerDiscreteScheduler` for the default Euler steps.
        vae: `AutoencoderKL` decoding latents scaled by 0.18215; None for pixel-space models.
        id2label: class index -> name ("tench, Tinca tinca" style synonyms separated by commas).
        transport: {"interpolant": "linear" | "cosine" | "vp", "prediction": "velocity" | "noise" | "score"}
            the model was trained with.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: SiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL | None = None,
        id2label: dict | None = None,
        transport: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        unknown = sorted(set(transport or {}) - {*DEFAULT_TRANSPORT, "path"})  # "path": 0.4's word for interpolant
        if unknown:
            raise UserError(f"unknown transport setting(s) {unknown}; a pipeline records {list(DEFAULT_TRANSPORT)}")
        transport = {**DEFAULT_TRANSPORT, **transport_settings(transport)}
        Transport(**transport)  # rejects unknown interpolants or predictions now, not at the first call
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        # JSON object keys are strings; they come back as ints above.
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()}, transport=transport)
        self.id2label = id2label
        self.labels = {
            name.strip().lower(): index
            for index, names in id2label.items()
            for name in names.split(",")
            if name.strip()
        }
        self.image_processor = VaeImageProcessor(vae_scale_factor=autoencoder.downsample_factor(vae))

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' model_index.json reader. Exported folders name their shipped code there
        (`_class_name: [module, "SiTPipeline"]`, `transformer: [module, "SiT"]`, for
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`); this class loads them with its
        own classes instead, as if the entries named `SiTPipeline` and the module defining `SiT`."""
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if isinstance(config.get("_class_name"), (list, tuple)) and config["_class_name"][1] == cls.__name__:
            config["_class_name"] = cls.__name__
        transformer = config.get("transformer")
        if isinstance(transformer, (list, tuple)) and transformer[1] == SiT.__name__:
            config["transformer"] = [SiT.__module__, SiT.__name__]
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SiTPipeline:
        """Load a pipeline folder (or hub id) strictly: a weight file that does not match its config
        raises instead of leaving parameters random or on the meta device. Accepts diffusers' keyword
        arguments (dtype, components to replace, cache_dir, revision, token, local_files_only)."""
        folder = _local_pipeline_folder(pretrained_model_name_or_path, kwargs)
        index = json.loads((folder / "model_index.json").read_text())
        if (index.get("transformer") or [None, None])[1] != SiT.__name__:
            raise UserError(
                f"{folder / 'model_index.json'} does not describe a SiT pipeline: its transformer is "
                f"{index.get('transformer')}, expected a {SiT.__name__} (export one with python -m sit_atconv.export)"
            )
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))  # diffusers renamed torch_dtype to dtype
        if "transformer" not in kwargs:
            kwargs["transformer"] = load_sit(folder / "transformer", dtype)
        if "vae" not in kwargs and (index.get("vae") or [None])[0] is not None:
            kwargs["vae"] = from_pretrained_strict(AutoencoderKL, folder / "vae", dtype)
        return super().from_pretrained(folder, **kwargs)

    # -- labels ----------------------------------------------------------------------------------

    def get_label_ids(self, labels: int | str | Sequence[int | str]) -> list[int]:
        """Class indices of `labels`, given as indices or names from `id2label` (case-insensitive)."""
        if isinstance(labels, (int, str)) or (torch.is_tensor(labels) and labels.ndim == 0):
            labels = [labels]
        num_classes = self.transformer.config.num_classes
        ids = []
        for label in labels:
            if isinstance(label, str):
                key = label.strip().lower()
                if key not in self.labels:
                    close = difflib.get_close_matches(key, list(self.labels), n=3)
                    hint = f"; did you mean {close}?" if close else " (see pipe.id2label)"
                    raise UserError(f"unknown class name {label!r}{hint}")
                ids.append(self.labels[key])
                continue
            index = int(label)
            if not 0 <= index < num_classes:
                raise UserError(f"class label {index} is outside [0, {num_classes})")
            ids.append(index)
        return ids

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        cfg_channels: int | None = None,
        sampler: str | SamplingSpec | None = None,
        batch_size: int | None = None,
        time_shift: float | None = None,
        nfe: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels: indices or names, one per image (class-conditional models).
            guidance_scale: classifier-free guidance scale; 1 disables guidance (one forward per step).
            num_inference_steps: sampler steps (model calls: N for Euler and the multistep solvers, 2N - 1 for Heun).
            generator: torch generator(s) for the initial noise and SDE noise (a list: one per image).
            latents: initial noise (B, C, H, W) at t = 1 instead of drawing it.
            output_type: "pil", "np" (B, H, W, C) floats in [0, 1], "pt" (B, C, H, W) in [0, 1], or
                "latent" (the sampler's output, not decoded).
            guidance_interval: (low, high) times in [0, 1] where guidance applies (REPA: (0, 0.7)).
            cfg_channels: guide only the first N channels (3 reproduces SiT/DiT's published sampler).
            sampler: None for the scheduler's steps (`pipe.scheduler`: FlowMatchEuler by default; FlowMatchHeun,
                and DPMSolverMultistep or UniPCMultistep built with use_flow_sigmas=True and
                prediction_type="flow_prediction", step like "heun", "dpm++2m" and "unipc"); a name of
                `sit_atconv.transport.SAMPLERS` ("euler", "heun", "dopri5", "dpm++2m", "unipc", "sde-euler",
                "sde-heun") or a `SamplingSpec`, to run the project's samplers (a spec's own guidance and steps
                apply where the keywords are left at their defaults; both set to different values is an error).
            batch_size: number of images of an unconditional or single-class model (default 1).
            time_shift: SD3's shift s of the time grid (`sit_atconv.transport.time_grid`; s > 1 puts more of
                few steps near the noise); the scheduler's Euler steps follow the same grid. None: 1 (no
                shift), or the `SamplingSpec`'s own.
            nfe: a budget of model calls per image (guidance counted once) instead of num_inference_steps: the
                steps the sampler (or the scheduler's equivalent) can take within it.
        Returns:
            `ImagePipelineOutput` with `.images`, or a one-element tuple when return_dict is False.

        Example:
            >>> pipe = SiTPipeline.from_pretrained("path/to/exported-model")
            >>> pipe(class_labels=["golden retriever"], guidance_scale=1.8, sampler="sde-euler").images[0]
        """
        labels = self.prepare_labels(class_labels, batch_size, latents)
        count = len(labels) if labels is not None else batch_size or (len(latents) if latents is not None else 1)
        config = self.generation_config(
            guidance_scale, guidance_interval, cfg_channels, sampler, num_inference_steps, time_shift, nfe
        )
        self.check_inputs(config, labels, count, latents, output_type)
        x = self.prepare_latents(count, generator, latents)
        x = self.denoise(x, labels, config, use_scheduler=sampler is None, generator=generator)
        images = self.decode(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def prepare_labels(
        self, class_labels: int | str | Sequence[int | str] | None, batch_size: int | None, latents: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The (B,) label tensor of a class-conditional model (None for unconditional ones)."""
        num_classes = self.transformer.config.num_classes
        if not num_classes:
            if class_labels is not None:
                raise UserError("this model is unconditional: leave class_labels out and set batch_size")
            return None
        if class_labels is None and num_classes == 1:  # a single class, e.g. FFHQ
            class_labels = [0] * (batch_size or (len(latents) if latents is not None else 1))
        if class_labels is None:
            raise UserError("this model is class-conditional: pass class_labels (indices or names)")
        return torch.tensor(self.get_label_ids(class_labels), device=self._execution_device)

    def generation_config(
        self,
        guidance_scale: float,
        guidance_interval: tuple[float, float],
        cfg_channels: int | None,
        sampler: str | SamplingSpec | None,
        num_inference_steps: int,
        time_shift: float | None = None,
        nfe: int | None = None,
    ) -> GenerationConfig:
        """The sampling settings of a call: diffusers' keywords mapped onto a SamplingSpec (guidance_scale is its
        `cfg`, num_inference_steps its `num_steps`; without `sampler`, the scheduler's equivalent sampler); the
        transport is the one the model was trained with."""
        low, high = guidance_interval
        keywords = {
            "cfg": (guidance_scale, 1.0, "guidance_scale"),
            "guidance_low": (low, 0.0, "guidance_interval"),
            "guidance_high": (high, 1.0, "guidance_interval"),
            "cfg_channels": (cfg_channels, None, "cfg_channels"),
            "num_steps": (num_inference_steps, 50, "num_inference_steps"),
            "time_shift": (time_shift, None, "time_shift"),
            "nfe": (nfe, None, "nfe"),
        }
        if isinstance(sampler, SamplingSpec):
            spec, defaults = sampler, SamplingSpec()
            changes = {}
            for name, (value, default, keyword) in keywords.items():
                if value == default or value == getattr(spec, name):
                    continue
                if getattr(spec, name) != getattr(defaults, name):
                    raise UserError(
                        f"{keyword}={value!r} and the SamplingSpec's {name}={getattr(spec, name)!r} are the same "
                        "setting; give it once"
                    )
                changes[name] = value
            spec = dataclasses.replace(spec, **changes)
        else:
            if sampler is not None and sampler not in SAMPLERS:
                raise UserError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)} or a SamplingSpec")
            values = {name: value for name, (value, default, _) in keywords.items() if value is not None}
            spec = SamplingSpec(
                sampler=sampler or scheduler_sampler(self.scheduler, self.config.transport["interpolant"]), **values
            )
        return GenerationConfig(spec=spec, **self.config.transport)

    def check_inputs(
        self,
        config: GenerationConfig,
        labels: torch.Tensor | None,
        count: int,
        latents: torch.Tensor | None,
        output_type: str,
    ) -> None:
        """Reject what the model cannot do before any work."""
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        check_generation(self.transformer, config, labels.tolist() if labels is not None else None)
        if latents is not None and tuple(latents.shape) != self.latent_shape(count):
            raise UserError(f"latents have shape {tuple(latents.shape)}, expected {self.latent_shape(count)}")

    def latent_shape(self, count: int) -> tuple[int, int, int, int]:
        model_config = self.transformer.config
        return (count, model_config.in_channels, model_config.input_size, model_config.input_size)

    def prepare_latents(
        self, count: int, generator: torch.Generator | list[torch.Generator] | None, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """The initial noise at t = 1, float32: `latents`, or drawn from `generator` like diffusers does."""
        if latents is not None:
            return latents.to(device=self._execution_device, dtype=torch.float32)
        shape = self.latent_shape(count)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)

    def denoise(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        config: GenerationConfig,
        use_scheduler: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Integrate x from t = 1 to 0 with guidance: the scheduler's Euler steps where it can (it always
        ends at t = 0), else `config.spec` (SDE noise drawn from `generator`)."""
        model = self.transformer

        def model_fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            return model(x_t.to(model.dtype), t, y).float()  # t stays float32 for its embedding

        predict = config.predictor(model_fn, labels, model.null_class)
        transport = Transport(interpolant=config.interpolant, prediction=config.prediction)
        grid = sampling_grid(transport, config.spec)
        if use_scheduler and grid[-1] == 0.0:
            return self._scheduler_loop(predict, transport, x, grid)

        def randn_like(like: torch.Tensor) -> torch.Tensor:
            return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

        return sample(predict, transport, x, config.spec, randn_like)[0]

    def decode(self, x: torch.Tensor, output_type: str):
        """Samples -> images of `output_type` (latent models through the VAE)."""
        if output_type == "latent":
            return x
        if self.vae is not None:
            images = autoencoder.decode(self.vae, x)
        elif not autoencoder.is_latent_model(self.transformer.config):
            images = x.clamp(-1, 1)
        else:
            raise UserError(
                f"this pipeline has no vae to decode its {self.transformer.config.in_channels}-channel latents: "
                "pass vae=AutoencoderKL... to from_pretrained, or output_type='latent'"
            )
        return self.image_processor.postprocess(images, output_type=output_type)

    def _scheduler_loop(
        self, predict: Callable, transport: Transport, x: torch.Tensor, grid: torch.Tensor
    ) -> torch.Tensor:
        """The scheduler's steps over `grid` (decreasing, ending at 0) where it takes a grid (the Euler and UniPC
        schedulers), else over its own grid of as many steps (DPM-Solver++, Heun)."""
        device = self._execution_device
        if "sigmas" in inspect.signature(self.scheduler.set_timesteps).parameters:
            self.scheduler.set_timesteps(sigmas=grid[:-1].numpy(), device=device)
        else:
            self.scheduler.set_timesteps(len(grid) - 1, device=device)
        times = scheduler_times(self.scheduler)
        for t, timestep in zip(times, self.progress_bar(self.scheduler.timesteps), strict=True):
            velocity = transport.velocity(predict(x, t), x, t)
            x = self.scheduler.step(velocity, timestep, x).prev_sample
        return x


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


def _local_pipeline_folder(name_or_path: str | os.PathLike, kwargs: dict) -> Path:
    """A local pipeline folder, fetched from the hub (or its cache) when `name_or_path` is not a path."""
    path = Path(name_or_path)
    if not path.exists():
        from huggingface_hub import snapshot_download

        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        try:
            path = Path(snapshot_download(str(name_or_path), ignore_patterns=TRAINING_ONLY, **hub_kwargs))
        except Exception as error:  # offline, unknown repository, invalid id: one message for all
            raise UserError(
                f"{name_or_path!r} is not a local folder, and fetching it from the Hugging Face hub failed "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). On an offline "
                "machine pass the path of a pipeline folder (python -m sit_atconv.export writes one)"
            ) from error
    if not (path / "model_index.json").is_file():
        raise UserError(
            f"{path} is not a pipeline folder: expected model_index.json, transformer/ and scheduler/ "
            "(python -m sit_atconv.export turns a training checkpoint into one)"
        )
    return path
