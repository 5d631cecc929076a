"""Model/diffusion/data/training configurations: named presets and command-line overrides.

A configuration is a plain JSON-able dict with four sections::

    {"model": {...UNet hyper-parameters...}, "diffusion": {...}, "data": {...}, "training": {...}}

``model.attention_resolutions`` are feature-map sizes in PIXELS (guided-diffusion's flag
convention, ``"16"`` = attention at 16 x 16); the UNet gets the downsampling rates
``image_size // r``. The network's output channels follow from ``diffusion.learn_sigma``.
The UNet is fully convolutional: attention sits at fixed downsampling LEVELS, so a model trained
on ``image_size`` crops samples whole slices of any multiple of ``2^(len(channel_mult) - 1)``
with attention at the same levels (spacing mode, ``data.spacing``).
"""
from __future__ import annotations

import copy
import json
from typing import Any, Dict, Mapping, Optional

from nnunet_sddm.utilities.errors import SDDMError

#: The paper's cardiac model (docs/explanation/algorithm.md) at 128 x 128 (1 channel in, 2 out).
_PAPER_MODEL = {
    "image_size": 128, "in_channels": 1, "model_channels": 128, "num_res_blocks": 1,
    "channel_mult": [1, 1, 2, 3, 4], "attention_resolutions": [16], "num_heads": 4,
    "num_head_channels": 64, "num_heads_upsample": -1, "dropout": 0.0, "use_scale_shift_norm": True,
    "resblock_updown": True, "use_new_attention_order": False, "use_checkpoint": False,
    "norm_groups": 32,
    # Conditioning (diffusion/conditioning.py): null = unconditional (today's model, unchanged);
    # "labels" = label map as extra one-hot input channels (label_values: foreground ints, background
    # 0 excluded), optionally a domain token (domains: names, e.g. ["source", "target"]).
    "condition": None, "label_values": None, "domains": None,
    # What the model generates (diffusion/label_maps.py): "images" (default; also when the key is
    # absent) or "labels", a label-map generator: one-hot label maps with the background channel,
    # in_channels = 1 + len(label_values), label_names their dataset.json names.
    "generates": "images", "label_names": None,
}
_PAPER_DIFFUSION = {
    "steps": 1000, "noise_schedule": "linear", "learn_sigma": True, "loss": "hybrid",
    "predict_xstart": False, "sigma_small": False, "rescale_timesteps": False, "sample_respacing": 100,
}
_DATA = {
    "dataset": None, "include_test": False, "cases": None, "vendor": None, "centre": None, "percentiles": [0.5, 99.5],
    "spacing": None,  # null: resize mode; a number: spacing mode at that in-plane spacing in mm (data/slices.py)
    "pseudo_labelled": None,  # conditional models: a second raw dataset (pseudo-labels), domain "target"
    # label-map generators: the median slice geometry of the training label maps, the default grid
    # of generated maps ({"shape": [h, w], "spacing": [sz, sy, sx]}, mm; diffusion/label_maps.py)
    "label_geometry": None,
}
_PAPER_TRAINING = {
    "iterations": 120000, "batch_size": 32, "microbatch": None, "lr": 1e-4, "weight_decay": 0.0,
    "ema_rate": 0.9999, "schedule_sampler": "uniform", "seed": 0, "amp": "bf16", "compile": False,
    "log_interval": 100, "save_interval": 10000, "sample_interval": 10000, "num_samples": 16,
    "grad_clip": None,
    "label_dropout": 0.1,  # conditional models: P(null condition) per sample (classifier-free guidance)
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "paper128": {"model": _PAPER_MODEL, "diffusion": _PAPER_DIFFUSION, "data": _DATA, "training": _PAPER_TRAINING},
    "paper256": {
        "model": {**_PAPER_MODEL, "image_size": 256, "channel_mult": [1, 1, 2, 2, 4, 4]},
        "diffusion": _PAPER_DIFFUSION, "data": _DATA, "training": _PAPER_TRAINING,
    },
    # Small enough to train to recognisable phantoms on a 2-core CPU in minutes.
    # Same architecture family, 16 base channels (8 GroupNorm groups), 64 px: ~1.4 GFLOP per
    # image per training step instead of the paper model's ~100 GFLOP at 128 px.
    "tiny": {
        "model": {**_PAPER_MODEL, "image_size": 64, "model_channels": 16, "channel_mult": [1, 1, 2, 4],
                  "attention_resolutions": [16], "num_head_channels": 32, "norm_groups": 8},
        "diffusion": {**_PAPER_DIFFUSION, "sample_respacing": 50},
        "data": _DATA,
        "training": {**_PAPER_TRAINING, "iterations": 1200, "batch_size": 16, "lr": 5e-4, "ema_rate": 0.99,
                     "log_interval": 20, "save_interval": 300, "sample_interval": 400, "num_samples": 16},
    },
    # Between tiny and paper128, for real cardiac MR on a CPU, in spacing mode at 2 mm by default
    # (a 64 px crop is 128 mm; on the real recipe's source round trip it lost 0.011 Dice against
    # resize mode's 0.059): 32 base channels (16 groups), attention only at the lowest level (8 x 8 of a
    # 64 px crop), so a whole 176 x 176 slice costs 42 GFLOP per guided sampler step instead of the
    # 170 of attention one level up. 3.70 M parameters, 8.2 GFLOP per image per training step
    # (benchmarks/preset_cost.py).
    "small": {
        "model": {**_PAPER_MODEL, "image_size": 64, "model_channels": 32, "channel_mult": [1, 2, 2, 4],
                  "attention_resolutions": [8], "num_head_channels": 32, "norm_groups": 16},
        "diffusion": {**_PAPER_DIFFUSION, "sample_respacing": 50},
        "data": {**_DATA, "spacing": 2.0},
        "training": {**_PAPER_TRAINING, "iterations": 2000, "batch_size": 16, "lr": 2e-4, "ema_rate": 0.99,
                     "log_interval": 50, "save_interval": 500, "sample_interval": 500, "num_samples": 16},
    },
}

DEFAULT_PRESET = "tiny"


def preset_config(name: str) -> Dict[str, Any]:
    """A deep copy of the named preset (``paper128``, ``paper256``, ``small``, ``tiny``)."""
    if name not in PRESETS:
        raise SDDMError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    cfg = copy.deepcopy(PRESETS[name])
    cfg["preset"] = name
    return cfg


def parse_value(text: str) -> Any:
    """``"64"`` -> 64, ``"[1,2]"`` -> [1, 2], ``"true"`` -> True, ``"null"`` -> None,
    anything not JSON -> the string itself; ``"1,2,2"`` -> [1, 2, 2]."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    if "," in text:
        return [parse_value(p) for p in text.split(",") if p.strip()]
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    return text


def apply_overrides(config: Dict[str, Any], overrides: Optional[Mapping[str, Any]]) -> Dict[str, Any]:
    """Return a copy of ``config`` with ``{"section.key": value}`` (or nested
    ``{"section": {"key": value}}``) applied. Unknown sections or keys raise ``SDDMError``."""
    cfg = copy.deepcopy(config)
    for key, value in (overrides or {}).items():
        if isinstance(value, Mapping) and "." not in key:
            for sub, v in value.items():
                cfg = apply_overrides(cfg, {f"{key}.{sub}": v})
            continue
        if key.count(".") != 1:
            raise SDDMError(f"override {key!r}: expected SECTION.KEY (e.g. model.model_channels)")
        section, name = key.split(".")
        if section not in ("model", "diffusion", "data", "training"):
            raise SDDMError(f"override {key!r}: unknown section {section!r}")
        if name not in cfg[section]:
            raise SDDMError(f"override {key!r}: unknown key {name!r}; {section} has {sorted(cfg[section])}")
        old = cfg[section][name]
        if isinstance(old, list) and value is not None and not isinstance(value, list):
            value = [value]  # "--set model.attention_resolutions=16" -> [16]
        if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if old is not None and value is not None and type(old) is not type(value) and \
                not (isinstance(old, list) and isinstance(value, list)):
            raise SDDMError(f"override {key!r}: expected a {type(old).__name__} like {old!r}, got {value!r}")
        cfg[section][name] = value
    return cfg


def parse_set_options(items) -> Dict[str, Any]:
    """``["model.model_channels=64", "training.lr=3e-4"]`` -> overrides dict."""
    out: Dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise SDDMError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        k, v = item.split("=", 1)
        out[k.strip()] = parse_value(v.strip())
    return out


def validate_config(config: Mapping[str, Any]) -> None:
    """Raise ``SDDMError`` for inconsistent model/diffusion settings (before any work)."""
    for section in ("model", "diffusion"):
        if section not in config:
            raise SDDMError(f"configuration lacks the {section!r} section")
    m, d = config["model"], config["diffusion"]
    size, mult = int(m["image_size"]), list(m["channel_mult"])
    if size < 1 or not mult:
        raise SDDMError(f"model.image_size {size} / channel_mult {mult} are invalid")
    factor = 2 ** (len(mult) - 1)
    if size % factor:
        raise SDDMError(f"model.image_size {size} is not divisible by 2^{len(mult) - 1} = {factor}, "
                        f"which channel_mult {mult} ({len(mult)} levels) needs")
    for r in m["attention_resolutions"]:
        if int(r) < 1 or size % int(r) or (size // int(r)) & (size // int(r) - 1) or size // int(r) > factor:
            raise SDDMError(f"model.attention_resolutions: {r} px is not one of the UNet's feature-map sizes "
                            f"{[size >> k for k in range(len(mult))]}")
    chans = [int(x * m["model_channels"]) for x in mult]
    groups = int(m.get("norm_groups", 32))
    for c in chans:
        if c % groups:
            raise SDDMError(f"model: {c} channels (model_channels x channel_mult) are not divisible by the "
                            f"{groups} GroupNorm groups (model.norm_groups)")
    hc = int(m["num_head_channels"])
    if hc != -1:
        levels = {(size // int(r)).bit_length() - 1 for r in m["attention_resolutions"]} | {len(mult) - 1}
        for lv in sorted(x for x in levels if x < len(mult)):
            if chans[lv] % hc:
                raise SDDMError(f"model: {chans[lv]} channels at attention level {lv} are not divisible by "
                                f"num_head_channels {hc}")
    if d["noise_schedule"] not in ("linear", "cosine"):
        raise SDDMError(f"diffusion.noise_schedule {d['noise_schedule']!r}: choose linear or cosine")
    if int(d["steps"]) < 2:
        raise SDDMError(f"diffusion.steps must be >= 2, got {d['steps']}")
    if d["loss"] not in ("hybrid", "rescaled_hybrid", "mse", "kl", "rescaled_kl"):
        raise SDDMError(f"diffusion.loss {d['loss']!r}: choose hybrid, rescaled_hybrid, mse, kl or rescaled_kl")
    if d["loss"] == "mse" and d["learn_sigma"]:
        raise SDDMError("diffusion.loss 'mse' with learn_sigma trains no variance: use 'hybrid'")
    validate_conditioning(config)
    from nnunet_sddm.data.slices import check_working_spacing  # torch: imported only when validating

    check_working_spacing((config.get("data") or {}).get("spacing"), name="data.spacing")


def validate_conditioning(config: Mapping[str, Any]) -> None:
    """``model.condition`` / ``label_values`` / ``domains`` and ``training.label_dropout``
    checked (``SDDMError`` naming the key). Configurations without the keys (written before they
    existed) are unconditional."""
    m = config["model"]
    cond, values, domains = m.get("condition"), m.get("label_values"), m.get("domains")
    pseudo = (config.get("data") or {}).get("pseudo_labelled")
    generates = m.get("generates") or "images"
    if generates not in ("images", "labels"):
        raise SDDMError(f"model.generates {generates!r}: choose 'images' or 'labels' (a label-map generator)")
    if generates == "labels":
        validate_label_generator(config)
        return
    for key in ("model.label_names", "data.label_geometry"):
        section, name = key.split(".")
        if (config.get(section) or {}).get(name) is not None:
            raise SDDMError(f"{key} is set but model.generates is 'images'; it belongs to label-map generators "
                            f"(--generate labels)")
    if cond is None:
        for key, v in (("model.label_values", values), ("model.domains", domains), ("data.pseudo_labelled", pseudo)):
            if v is not None:
                raise SDDMError(f"{key} is {v!r} but model.condition is null (an unconditional model); "
                                f"set model.condition to 'labels' (--condition labels) or {key} to null")
        return
    if cond != "labels":
        raise SDDMError(f"model.condition {cond!r}: choose null (unconditional) or 'labels'")
    _check_label_values(values)
    if domains is not None:
        if (not isinstance(domains, list) or not domains or any(not isinstance(d, str) or not d for d in domains)
                or len(set(domains)) != len(domains)):
            raise SDDMError(f"model.domains {domains!r}: expected null or a list of distinct domain names "
                            f"such as [\"source\", \"target\"]")
    p = (config.get("training") or {}).get("label_dropout", 0.0)
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise SDDMError(f"training.label_dropout {p!r}: expected a probability in [0, 1]")


def _check_label_values(values: Any) -> None:
    """``model.label_values``: null or distinct foreground values 1 .. 32767 (``SDDMError``)."""
    if values is not None:
        if (not isinstance(values, list) or not values
                or any(isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32767 for v in values)
                or len(set(values)) != len(values)):
            raise SDDMError(f"model.label_values {values!r}: expected a list of distinct foreground label "
                            f"values (integers 1 .. 32767; background 0 is not one of them)")


def validate_label_generator(config: Mapping[str, Any]) -> None:
    """A label-map generator (``model.generates`` "labels") checked: unconditional (``model.condition``,
    ``model.domains``, ``data.pseudo_labelled`` null), resize mode (``data.spacing`` null),
    ``model.label_values`` valid and ``model.in_channels`` = 1 + their number (the background
    channel), ``model.label_names`` one distinct name per value, ``data.label_geometry`` null or
    ``{"shape": [h, w], "spacing": [sz, sy, sx]}``. ``SDDMError`` naming the key."""
    m, data = config["model"], config.get("data") or {}
    for key, v in (("model.condition", m.get("condition")), ("model.domains", m.get("domains")),
                   ("data.pseudo_labelled", data.get("pseudo_labelled"))):
        if v is not None:
            raise SDDMError(f"{key} is {v!r}, but a label-map generator (model.generates 'labels') is unconditional; "
                            f"set {key} to null")
    if data.get("spacing") is not None:
        raise SDDMError(f"data.spacing is {data['spacing']!r}: a label-map generator trains in resize mode only; "
                        f"set data.spacing to null (--set data.spacing=null; the preset 'small' defaults to "
                        f"spacing mode)")
    values, names = m.get("label_values"), m.get("label_names")
    _check_label_values(values)
    if values is not None and int(m["in_channels"]) != len(values) + 1:
        raise SDDMError(f"model.in_channels {m['in_channels']}: a label-map generator of {len(values)} foreground "
                        f"labels {values} has {len(values) + 1} input channels (background first)")
    if names is not None:
        if (not isinstance(names, list) or any(not isinstance(n, str) or not n for n in names)
                or len(set(names)) != len(names) or values is None or len(names) != len(values)):
            raise SDDMError(f"model.label_names {names!r}: expected one distinct name per model.label_values "
                            f"{values!r}")
    geo = data.get("label_geometry")
    if geo is not None:
        ok = (isinstance(geo, Mapping) and isinstance(geo.get("shape"), list) and len(geo["shape"]) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in geo["shape"])
              and isinstance(geo.get("spacing"), list) and len(geo["spacing"]) == 3
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in geo["spacing"]))
        if not ok:
            raise SDDMError(f"data.label_geometry {geo!r}: expected null or {{\"shape\": [h, w], "
                            f"\"spacing\": [sz, sy, sx]}} (positive pixels and mm)")
