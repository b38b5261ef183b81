"""Model families: `config.model.family` -> the Family that loads, encodes, denoises and decodes that kind of model.

Adding a family is one module here (a `Family` subclass, see `base.py`) and one line in `FAMILIES`.
"""

import importlib
import os

from alignprop.errors import ConfigError
from alignprop.families.base import Components, Family, Source, parse_source

__all__ = ["FAMILIES", "Components", "Family", "Source", "get", "load_frozen", "parse_source", "problems", "resolve"]

# name -> "module:class"; imported when used.
FAMILIES = {
    "sd": "alignprop.families.sd:StableDiffusion",
    "sdxl": "alignprop.families.sdxl:StableDiffusionXL",
    "sd3": "alignprop.families.sd3:StableDiffusion3",
    "flux": "alignprop.families.flux:Flux",
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# config.model.vae_dtype -> the VAE's dtype ("auto": the family's pipeline's choice for the inference dtype).
VAE_DTYPES = {"auto": None, "fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def get(name, key="config.model.family"):
    """The Family registered as `name`; a ConfigError listing the valid names otherwise."""
    if name not in FAMILIES:
        raise ConfigError(f"{key}={name!r} is not a model family; valid: {', '.join(FAMILIES)}.")
    module, cls = FAMILIES[name].split(":")
    return getattr(importlib.import_module(module), cls)()


def resolve(model):
    """(Family, Source) of `config.model`; a ConfigError naming each wrong key."""
    family = get(model.family)
    return family, parse_source(model.source, model.revision, family)


def load_frozen(family, source, config, device):
    """The config's model, frozen and cast to its inference dtype on `device` (tiny and random ones built there)."""
    from alignprop.speed import inference_dtype

    import torch

    components = family.load(source, config.model, config.seed, device)
    vae_dtype = VAE_DTYPES[config.model.vae_dtype]
    family.freeze_and_cast(components, device, inference_dtype(config.mixed_precision),
                           vae_dtype=vae_dtype and getattr(torch, vae_dtype))
    return components


def problems(config):
    """Start-up checks of `config.model` (and of the image size against the family's size multiple)."""
    m, s = config.model, config.sample
    try:
        family, _ = resolve(m)
    except ConfigError as e:
        return [str(e)]
    out = []
    if m.prediction_type and m.prediction_type not in PREDICTION_TYPES:
        out.append(f"config.model.prediction_type={m.prediction_type!r}: must be one of {', '.join(PREDICTION_TYPES)} "
                   f"(unset: the checkpoint's scheduler config)")
    if m.vae_dtype not in VAE_DTYPES:
        out.append(f"config.model.vae_dtype={m.vae_dtype!r}: must be one of {', '.join(VAE_DTYPES)} (auto: as the "
                   f"family's pipeline decodes, e.g. SDXL's VAE in fp32 under fp16)")
    if not isinstance(m.vae, str):
        out.append(f"config.model.vae={m.vae!r}: must be a hub id or a local folder (\"\": the checkpoint's VAE)")
    elif m.vae.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(m.vae)):
        out.append(f"config.model.vae={m.vae!r}: no such folder (a hub id looks like 'org/name'; \"\": the "
                   f"checkpoint's VAE)")
    step = family.size_multiple
    for key in ("height", "width"):
        value = s[key]
        if value is not None and (value <= 0 or value % step):
            lower = max(step, value // step * step)
            out.append(
                f"config.sample.{key}={value!r}: must be a positive multiple of {step} pixels ({family.description}'s "
                f"size factor), e.g. {lower} or {lower + step}; unset, it is the model's native size"
            )
    return out + family.problems(config)
