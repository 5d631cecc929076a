"""``nnUNetv2_sddm_train``, ``nnUNetv2_sddm_generate_labels`` and ``nnUNetv2_sddm_import_checkpoint``:
argument parsing only."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List, Optional

from nnunet_sddm.utilities.errors import cli_entry


def build_train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_train",
        description="Train a diffusion model (improved DDPM + ADM UNet) on all 2D slices of an nnU-Net raw "
                    "dataset: the source-domain image model SD-DM adapts with, a mask-conditioned image model "
                    "(--condition labels) or a label-map generator (--generate labels). Output: $nnUNet_results/DatasetXXX_Name/sddm__<preset>/ "
                    "(config.json, ema/raw safetensors weights, training_state.pt, log.csv, progress.png, "
                    "samples.png). Ctrl-C saves a checkpoint; --resume continues exactly.")
    p.add_argument("dataset", help="dataset id, DatasetXXX_Name or raw dataset folder")
    p.add_argument("-p", "--preset", default=None, help="paper128, paper256, small or tiny (default tiny; with "
                   "--resume: the stored one). small is in spacing mode at 2 mm (--set data.spacing=null: "
                   "resize mode); the others in resize mode")
    p.add_argument("-o", "--output", default=None, help="model folder (default "
                   "$nnUNet_results/DatasetXXX_Name/sddm__<preset>)")
    p.add_argument("--iterations", type=int, default=None, help="total optimizer steps (may be raised on --resume)")
    p.add_argument("--batch-size", type=int, default=None, help="global batch size (over all DDP processes)")
    p.add_argument("--microbatch", type=int, default=None, help="gradient-accumulation chunk per process")
    p.add_argument("--lr", type=float, default=None, help="AdamW learning rate")
    p.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay")
    p.add_argument("--ema-rate", type=float, default=None, help="EMA decay per step (paper: 0.9999)")
    p.add_argument("--seed", type=int, default=None, help="seed of initialisation, data order and noise")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default auto)")
    p.add_argument("--amp", choices=["bf16", "fp16", "off"], default=None,
                   help="mixed precision on CUDA (ignored on CPU); default bf16")
    p.add_argument("--compile", action="store_true", default=None, help="torch.compile the model")
    p.add_argument("--schedule-sampler", choices=["uniform", "loss-second-moment"], default=None,
                   help="timestep sampler (default uniform)")
    p.add_argument("--resume", action="store_true", help="continue the run in the model folder")
    p.add_argument("--overwrite", action="store_true", help="delete an existing model folder and start again")
    p.add_argument("--include-test", action="store_true", default=None, help="also train on imagesTs")
    p.add_argument("--cases", default=None, help="restrict to these cases: comma list or a file (one per line "
                   "or a JSON list)")
    p.add_argument("--vendor", default=None, help="restrict to cases.json records of this vendor")
    p.add_argument("--centre", default=None, help="restrict to cases.json records of this centre")
    p.add_argument("--condition", choices=["labels"], default=None,
                   help="train a mask-conditioned model: the case's label map (one-hot, background excluded) as "
                        "extra input channels; model.label_values defaults to dataset.json's foreground labels. "
                        "Needs labelsTr. Default: unconditional")
    p.add_argument("--generate", choices=["images", "labels"], default=None,
                   help="what the model generates: images (default) or labels, a label-map generator: an "
                        "unconditional model of the cases' label maps (labelsTr), one-hot with the background "
                        "channel, that nnUNetv2_sddm_generate_labels samples new anatomies from (resize mode only)")
    p.add_argument("--label-dropout", type=float, default=None, metavar="P",
                   help="conditional models: probability of training a sample with the null condition (empty "
                        "mask, null domain) for classifier-free guidance at sampling (default 0.1)")
    p.add_argument("--pseudo-labelled", default=None, metavar="DATASET2",
                   help="conditional models: a second raw dataset (imagesTr + labelsTr, e.g. target cases with "
                        "pseudo-labels, same dataset.json labels) added to the training slices as domain "
                        "'target' (the main dataset: 'source'); the model gets a domain token")
    p.add_argument("--log-interval", type=int, default=None, help="iterations per log.csv row")
    p.add_argument("--save-interval", type=int, default=None, help="iterations between checkpoints")
    p.add_argument("--sample-interval", type=int, default=None, help="iterations between samples.png updates")
    p.add_argument("--num-samples", type=int, default=None, help="images in samples.png (0: none)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override any configuration field, e.g. --set model.model_channels=64 "
                        "--set model.channel_mult=1,2,2 --set diffusion.noise_schedule=cosine (repeatable)")
    p.add_argument("--cache-dir", default=None, help="slice cache folder (default "
                   "$nnUNet_preprocessed/DatasetXXX_Name/sddm_slices)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice; "
                   "1 is fastest for small models on a busy machine)")
    p.add_argument("--print-config", action="store_true", help="print the resulting configuration and exit")
    return p


_FLAG_KEYS = {
    "iterations": "training.iterations", "batch_size": "training.batch_size", "microbatch": "training.microbatch",
    "lr": "training.lr", "weight_decay": "training.weight_decay", "ema_rate": "training.ema_rate",
    "seed": "training.seed", "amp": "training.amp", "compile": "training.compile",
    "schedule_sampler": "training.schedule_sampler", "log_interval": "training.log_interval",
    "save_interval": "training.save_interval", "sample_interval": "training.sample_interval",
    "num_samples": "training.num_samples", "include_test": "data.include_test", "cases": "data.cases",
    "vendor": "data.vendor", "centre": "data.centre", "condition": "model.condition", "generate": "model.generates",
    "label_dropout": "training.label_dropout",
}


def overrides_from_args(args: argparse.Namespace) -> Dict[str, Any]:
    """Configuration overrides of the options that were given explicitly (``--set`` last)."""
    from nnunet_sddm.diffusion.presets import parse_set_options

    out = {key: getattr(args, name) for name, key in _FLAG_KEYS.items() if getattr(args, name) is not None}
    out.update(parse_set_options(args.set))
    return out


@cli_entry
def train_main(argv: Optional[List[str]] = None) -> int:
    """``nnUNetv2_sddm_train``."""
    args = build_train_parser().parse_args(argv)
    overrides = overrides_from_args(args)
    if args.print_config:
        import json

        from nnunet_sddm.diffusion.presets import DEFAULT_PRESET, apply_overrides, preset_config, validate_config

        cfg = apply_overrides(preset_config(args.preset or DEFAULT_PRESET), overrides)
        validate_config(cfg)
        print(json.dumps(cfg, indent=2))
        return 0
    from nnunet_sddm.diffusion.trainer import train_model

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    model_dir, status = train_model(args.dataset, preset=args.preset, overrides=overrides, model_dir=args.output,
                                    resume=args.resume, overwrite=args.overwrite, device=args.device,
                                    cache_dir=args.cache_dir, pseudo_labelled=args.pseudo_labelled)
    if status == "interrupted":
        print(f"interrupted: checkpoint saved in {model_dir}; continue with the same command plus --resume",
              file=sys.stderr)
        return 130
    if int(os.environ.get("RANK", "0")) == 0:
        print(model_dir)
    return 0


def build_generate_labels_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_generate_labels",
        description="Sample new label maps (anatomies) from a label-map generator (nnUNetv2_sddm_train --generate "
                    "labels), clean them (argmax, largest connected component per structure, holes filled) and "
                    "redraw those that lack a structure. Output: OUT/labelsTr/<case>.nii.gz (one 2D slice per "
                    "file, a (1, H, W) volume), OUT/cases.json (settings, draws per case), OUT/shape_report.md and "
                    "OUT/shape_stats.csv (shape statistics, compared with --real).")
    p.add_argument("-m", "--model", required=True, help="label-map generator folder or DATASET[:PRESET]")
    p.add_argument("-n", "--num", type=int, required=True, help="number of label maps")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--steps", type=int, default=None, help="steps of the respaced chain (default: the model's "
                   "diffusion.sample_respacing)")
    p.add_argument("--like", default=None, metavar="DATASET", help="raw dataset whose median slice geometry (shape "
                   "and spacing of its labelsTr) the maps get (default: the training data's, recorded in the model)")
    p.add_argument("--real", default=None, metavar="DATASET", help="raw dataset whose labelsTr slices (those holding "
                   "every structure) the shape report compares with")
    p.add_argument("-b", "--batch-size", type=int, default=16, help="maps sampled at once (part of the seeding)")
    p.add_argument("--max-draws", type=int, default=20, help="draws per map before giving up (default 20)")
    p.add_argument("-device", "--device", default=None, help="cpu, cuda, cuda:N, mps or auto (default auto)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    return p


@cli_entry
def generate_labels_main(argv: Optional[List[str]] = None) -> int:
    """``nnUNetv2_sddm_generate_labels``."""
    a = build_generate_labels_parser().parse_args(argv)
    from nnunet_sddm.sampling.label_generation import GenerationSettings, generate_label_maps

    settings = GenerationSettings(n=a.num, seed=a.seed, steps=a.steps, batch_size=a.batch_size,
                                  max_draws=a.max_draws)
    print(generate_label_maps(a.model, a.output, settings, like=a.like, real=a.real, overwrite=a.overwrite,
                              device=a.device))
    return 0


@cli_entry
def import_checkpoint_main(argv: Optional[List[str]] = None) -> int:
    """``nnUNetv2_sddm_import_checkpoint``."""
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_import_checkpoint",
        description="Turn a guided-diffusion / improved-diffusion UNet checkpoint into a model folder "
                    "(config.json + safetensors weights) usable by nnUNetv2_sddm_adapt.")
    p.add_argument("checkpoint", help="state dict (.pt/.pth, loaded weights-only, or .safetensors)")
    p.add_argument("-o", "--output", required=True, help="model folder to create")
    p.add_argument("--flags", default="", help="the flags the model was trained with, in the reference "
                   "scripts' syntax, e.g. \"--image_size 128 --num_channels 128 --num_res_blocks 1 "
                   "--channel_mult 1,1,2,3,4 --attention_resolutions 16 --num_head_channels 64 "
                   "--resblock_updown True --use_scale_shift_norm True --learn_sigma True "
                   "--diffusion_steps 1000 --noise_schedule linear --rescale_timesteps False\"")
    p.add_argument("--defaults", choices=["guided", "improved"], default="guided",
                   help="defaults of flags not given: guided-diffusion's or improved-diffusion's "
                        "(rescale_timesteps and rescale_learned_sigmas True)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    a = p.parse_args(argv)
    from nnunet_sddm.diffusion.import_checkpoint import import_checkpoint

    print(import_checkpoint(a.checkpoint, a.output, flags=a.flags, defaults=a.defaults, overwrite=a.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(train_main())
