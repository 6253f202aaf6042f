"""The model card (README.md) of an exported pipeline folder.

YAML front matter for the Hugging Face Hub (library_name diffusers, the pipeline tag, license, tags), then
what the folder holds: the architecture (registry name where known, mixers, parameters), how the weights
were made (a training checkpoint's config.yaml and step, or the converted file), the sampling settings
recorded in model_index.json, evaluation results when given (eval_fid.py's JSON), and how to load it with
`SiTPipeline` and with plain diffusers.

The Hub has no class-conditional image generation task, so class-conditional models are tagged
"unconditional-image-generation" too (as DiT-style models there are), with a "class-conditional" tag.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from sit_atconv.errors import UserError
from sit_atconv.evaluation.metrics import RESULTS
from sit_atconv.models.registry import describe_mixers

PIPELINE_TAG = "unconditional-image-generation"
# Weights carry the terms of their training data, which export cannot know: "other" claims nothing, and
# export says so when --license is not given.
DEFAULT_LICENSE = "other"
# eval_fid.py's result keys, in the order and with the names the card shows (the metric table's).
METRIC_NAMES = {key: result.name for key, result in RESULTS.items()}
# The training checkpoint layout of sit_atconv.training.checkpoint: step_NNNNNNNN/ with checkpoint.json.
STEP_FOLDER = re.compile(r"^step_(\d+)$")
CHECKPOINT_MARKER = "checkpoint.json"


@dataclass
class CardInfo:
    """What the card says beyond the folder itself. `source`: one sentence on where the weights come from;
    `training`: `training_record`'s dict; `metrics`: eval_fid.py's results (`read_metrics`)."""

    license: str = DEFAULT_LICENSE
    model_name: str | None = None
    source: str | None = None
    ema: bool = True
    training: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# Reading what the card reports
# ------------------------------------------------------------------------------------------------


def training_record(ckpt: str | Path) -> dict:
    """What a training checkpoint folder says about its run: "step" (its checkpoint.json marker, else the
    step_N folder name) and, from its config.yaml, "model", "max_steps", "batch_size", "data", "resolution",
    "repa". Empty for model or pipeline folders, which record no training."""
    path = Path(ckpt).resolve()
    record = {}
    marker = path / CHECKPOINT_MARKER
    if marker.is_file():
        try:
            record["step"] = int(json.loads(marker.read_text())["step"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if "step" not in record and (match := STEP_FOLDER.match(path.name)):
        record["step"] = int(match.group(1))
    if (path / "config.yaml").is_file():
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path / "config.yaml"))
        train, data, model = (config.get(k) or {} for k in ("train", "data", "model"))
        record.update(
            model=model.get("name"),
            max_steps=train.get("max_steps"),
            batch_size=train.get("global_batch_size"),
            data=data.get("kind"),
            data_path=data.get("path"),
            resolution=data.get("resolution"),
            repa=bool((config.get("repa") or {}).get("enabled")) or None,
        )
    return {k: v for k, v in record.items() if v is not None}


def read_metrics(path: str | Path) -> dict:
    """eval_fid.py's JSON (`<samples>.metrics.json`), with the sampling settings of its samples under
    "sampling" when the samples' own settings file (`<samples>.json`, written by sample.py) lies beside it."""
    path = Path(path)
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"could not read the metrics JSON {path}: {error}") from error
    if not isinstance(metrics, dict) or not any(k in metrics for k in METRIC_NAMES):
        raise UserError(f"{path} holds no metrics of eval_fid.py ({', '.join(METRIC_NAMES)})")
    samples_settings = path.with_name(path.name.removesuffix(".metrics.json")).with_suffix(".json")
    if path.name.endswith(".metrics.json") and samples_settings.is_file():
        try:
            generation = json.loads(samples_settings.read_text())["settings"]["generation"]
            metrics = {**metrics, "sampling": generation}
        except (OSError, ValueError, KeyError, TypeError):
            pass  # settings of another shape: the card shows the numbers without them
    return metrics


# ------------------------------------------------------------------------------------------------
# Writing it
# ------------------------------------------------------------------------------------------------


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def format_count(count: int) -> str:
    return f"{count / 1e6:.1f}M ({count:,})" if count >= 1e5 else f"{count:,}"


def front_matter(transformer, info: CardInfo) -> str:
    from huggingface_hub import ModelCardData

    mixers = set(transformer.config.mixers)
    tags = ["sit", "flow-matching", "sit-atconv"]
    tags += ["atconv"] if "atconv" in mixers else []
    tags += ["class-conditional"] if transformer.config.num_classes else []
    data = ModelCardData(library_name="diffusers", pipeline_tag=PIPELINE_TAG, license=info.license, tags=tags)
    return data.to_yaml()


def architecture_lines(transformer, info: CardInfo) -> list[str]:
    config = transformer.config
    name = info.model_name or "SiT"
    size = f"{config.input_size}x{config.input_size}x{config.in_channels}"
    space = "SD-VAE latents" if config.in_channels == 4 else "pixels"
    classes = f"{config.num_classes} classes" if config.num_classes else "unconditional"
    guidance = "classifier-free guidance available" if transformer.null_class is not None else "no guidance"
    mixers = describe_mixers(config.mixers) + ("" if len(set(config.mixers)) == 1 else " (the other blocks attention)")
    return [
        f"- Model: {name}, {config.depth} blocks of width {config.hidden_size}, patch {config.patch_size}",
        f"- Token mixers: {mixers}",
        f"- Parameters: {format_count(parameter_count(transformer))}",
        f"- Generates {size} {space}; {classes} ({guidance})",
        f"- Weights: {'EMA' if info.ema else 'online (non-EMA)'}",
    ]


def training_lines(info: CardInfo) -> list[str]:
    record = info.training
    lines = [f"- {info.source}"] if info.source else []
    if "step" in record:
        of = f" of {record['max_steps']:,}" if "max_steps" in record else ""
        lines.append(f"- Training steps: {record['step']:,}{of}")
    elif "max_steps" in record:
        lines.append(f"- Training steps: {record['max_steps']:,} planned (the checkpoint's step is not recorded)")
    if "batch_size" in record:
        lines.append(f"- Global batch size: {record['batch_size']}")
    if "data" in record:
        where = f" ({Path(record['data_path']).name})" if record.get("data_path") else ""
        resolution = f" at {record['resolution']} px" if record.get("resolution") else ""
        lines.append(f"- Data: {record['data']}{where}{resolution}")
    if record.get("repa"):
        lines.append("- REPA representation alignment during training")
    return lines or ["- Not recorded in the exported checkpoint."]


def metrics_lines(metrics: dict) -> list[str]:
    if not metrics:
        return []
    lines = ["## Evaluation", "", "| Metric | Value |", "| --- | --- |"]
    for key, label in METRIC_NAMES.items():
        value = metrics.get(key)
        if isinstance(value, (int, float)):
            encoder = (
                f" ({metrics['fd_dinov2_encoder']})" if key == "fd_dinov2" and "fd_dinov2_encoder" in metrics else ""
            )
            lines.append(f"| {label}{encoder} | {value:.4g} |")
    counts = []
    if "num_samples" in metrics:
        counts.append(f"{metrics['num_samples']:,} samples")
    if "reference" in metrics:
        reference = Path(str(metrics["reference"])).name
        counts.append(
            f"against {reference}" + (f" ({metrics['num_reference']:,} images)" if "num_reference" in metrics else "")
        )
    lines += ["", f"Computed by eval_fid.py (ADM's evaluator definitions){': ' + ', '.join(counts) if counts else ''}."]
    sampling = metrics.get("sampling")
    if isinstance(sampling, dict):
        spec = sampling.get("spec") or {}  # a SamplingSpec, as the samples' record keeps it
        parts = [f"{spec.get('sampler', '?')}, {spec.get('num_steps', '?')} steps"]
        if spec.get("cfg") is not None:
            parts.append(f"guidance scale {spec['cfg']}")
        if (spec.get("guidance_low"), spec.get("guidance_high")) not in ((None, None), (0.0, 1.0)):
            parts.append(f"guidance interval [{spec.get('guidance_low')}, {spec.get('guidance_high')}]")
        lines.append(f"Samples drawn with: {', '.join(parts)}.")
    return lines + [""]


def usage_lines(transformer, folder_name: str) -> list[str]:
    config = transformer.config
    if config.num_classes:
        guidance = ", guidance_scale=1.5" if transformer.null_class is not None else ""
        call = f"pipe(class_labels=[0, {min(1, config.num_classes - 1)}]{guidance}, num_inference_steps=50).images"
    else:
        call = "pipe(batch_size=4, num_inference_steps=50).images"
    return [
        "## Usage",
        "",
        "With plain diffusers (runs the code shipped in this folder, pipeline_sit_atconv.py; read it first):",
        "",
        "```python",
        "from diffusers import DiffusionPipeline",
        "",
        f'pipe = DiffusionPipeline.from_pretrained("{folder_name}", trust_remote_code=True)  # a folder or Hub id',
        f"images = {call}",
        "```",
        "",
        "With the sit-atconv package installed (the same pipeline from the package, which also trains and has",
        "ATConv's fused Triton kernels):",
        "",
        "```python",
        "from sit_atconv.pipelines import SiTPipeline",
        "",
        f'pipe = SiTPipeline.from_pretrained("{folder_name}")',
        f"images = {call}",
        "```",
        "",
    ]


def render_card(transformer, transport: dict, has_vae: bool, info: CardInfo, folder_name: str) -> str:
    """The README.md text of a pipeline folder holding `transformer`."""
    config = transformer.config
    vae = (
        "vae/ (decodes latents scaled by 0.18215)"
        if has_vae
        else "none shipped: pass `vae=AutoencoderKL.from_pretrained(...)` to from_pretrained"
        if config.in_channels == 4
        else "none (pixel-space model)"
    )
    lines = [
        "---",
        front_matter(transformer, info).rstrip("\n"),
        "---",
        "",
        f"# {info.model_name or 'SiT'} ({folder_name})",
        "",
        "A SiT diffusion transformer trained with flow matching, exported by sit-atconv as a diffusers pipeline.",
        "",
        "## Architecture",
        "",
        *architecture_lines(transformer, info),
        "",
        "## Training",
        "",
        *training_lines(info),
        "",
        "## Sampling",
        "",
        f"- Transport: {transport['interpolant']} interpolant, {transport['prediction']} prediction"
        " (t = 0 data, t = 1 noise)",
        "- Default sampler: Euler ODE steps of the FlowMatchEulerDiscreteScheduler on a uniform time grid",
        f"- Autoencoder: {vae}",
        "",
        *metrics_lines(info.metrics),
        *usage_lines(transformer, folder_name),
        "## License",
        "",
        f"`{info.license}` (as set at export{'' if info.license != DEFAULT_LICENSE else '; not specified'}).",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str | Path, transformer, transport: dict, has_vae: bool, info: CardInfo, name: str):
    """Write README.md into pipeline folder `folder`; `name` is how the usage snippets call the folder."""
    (Path(folder) / "README.md").write_text(render_card(transformer, transport, has_vae, info, name))
