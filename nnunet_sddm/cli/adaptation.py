"""``nnUNetv2_sddm_adapt``, ``nnUNetv2_sddm_synthesize``, ``nnUNetv2_sddm_sweep`` (argument parsing only)."""
from __future__ import annotations

import argparse
import time
from typing import Optional, Sequence, Set, Tuple

from nnunet_sddm.utilities.errors import SDDMError, cli_entry

#: ``--method`` values (``nnunet_sddm.adaptation.methods.METHODS``, repeated here so that ``--help``
#: does not import numpy/torch; a test keeps the two equal).
METHODS = ("sddm", "histmatch", "fda")

#: Default ``--beta`` of fda (``nnunet_sddm.adaptation.fda.BETA``).
FDA_BETA = 0.01

#: The option of each parsed destination that only some methods use, for the error messages.
FLAGS = {"model": "-m/--model", "source": "--source", "beta": "--beta", "D": "-D", "N": "-N", "tau": "--tau",
         "steps": "--steps", "seed": "--seed", "guidance": "--guidance",
         "reference_behaviour": "--reference-behaviour", "device": "--device", "amp": "--amp",
         "batch_size": "--batch-size"}

#: Sampler options (``add_sampler_arguments``): SD-DM's; fda uses ``seed`` only.
SAMPLER_DESTS = ("D", "N", "tau", "steps", "seed", "guidance", "reference_behaviour", "device", "amp", "batch_size")

_UNSET = object()


def explicit_options(parser: argparse.ArgumentParser,
                     argv: Optional[Sequence[str]]) -> Tuple[argparse.Namespace, Set[str]]:
    """Parse ``argv``; also return the destinations the user gave explicitly (argparse sets a
    default only on namespace attributes that do not exist yet, so a pre-filled marker survives
    exactly for the options not given)."""
    a = parser.parse_args(argv)
    probe = argparse.Namespace(**{k: _UNSET for k in vars(a)})
    parser.parse_args(argv, namespace=probe)
    return a, {k for k, v in vars(probe).items() if v is not _UNSET}


def check_method_options(method: str, given: Set[str], has_model: bool, has_source: bool,
                         sampler_device: bool = True) -> None:
    """``SDDMError`` if ``method`` lacks what it needs (sddm: -m; histmatch/fda: --source) or got
    options it does not use (sddm: --source, --beta; histmatch: -m, --beta and the sampler
    options; fda: -m and the sampler options but --seed). ``sampler_device``: ``--device`` is a
    sampler option (``nnUNetv2_sddm_predict``'s ``-device`` is nnU-Net's, used by every method)."""
    if not sampler_device:
        given = given - {"device"}
    if method == "sddm":
        unused = [d for d in ("source", "beta") if d in given]
        if not has_model:
            raise SDDMError("--method sddm needs a diffusion model: give -m/--model")
    else:
        used = {"seed", "beta"} if method == "fda" else set()
        unused = [d for d in ("model",) + SAMPLER_DESTS + ("beta",) if d in given and d not in used]
        if not has_source:
            raise SDDMError(f"--method {method} needs the source training images: give --source (a raw dataset "
                            f"id, DatasetXXX_Name or folder, or a folder of images)")
    if unused:
        raise SDDMError(f"--method {method} does not use {', '.join(FLAGS[d] for d in unused)}")


def add_method_arguments(p: argparse.ArgumentParser) -> None:
    """``--method``, ``--source`` and ``--beta`` (``nnUNetv2_sddm_adapt`` and ``nnUNetv2_sddm_predict``)."""
    g = p.add_argument_group("adaptation method")
    g.add_argument("--method", choices=METHODS, default="sddm",
                   help="sddm: the diffusion model -m (default); histmatch: Nyul-Udupa histogram "
                        "standardisation fitted on the source images; fda: Fourier domain adaptation "
                        "(Yang & Soatto 2020), each slice gets a source slice's low-frequency amplitude")
    g.add_argument("--source", default=None,
                   help="histmatch/fda (required there): the source raw dataset (id, DatasetXXX_Name or folder; "
                        "its imagesTr are used) or a folder of nnU-Net-named source images")
    g.add_argument("--beta", type=float, default=None,
                   help=f"fda: half-width of the swapped low-frequency square as a fraction of the slice size, "
                        f"in [0, 0.5) (default {FDA_BETA}; 0 = no change); --seed picks the source slices")


def add_sampler_arguments(p: argparse.ArgumentParser, sweep: bool = False, device: bool = True) -> None:
    """The sampler options shared by the adaptation commands (and ``nnUNetv2_sddm_predict``).

    sweep: -D/-N/--tau take several values and there is no --batch-size; device: add --device
    (``nnUNetv2_sddm_predict`` has nnU-Net's own ``-device``).
    """
    g = p.add_argument_group("sampler (see docs/explanation/algorithm.md)")
    many = dict(nargs="+") if sweep else {}
    g.add_argument("-D", type=int, default=[2, 4, 8] if sweep else 2, **many,
                   help="low-pass factor(s), a power of 2 smaller than the model size (default "
                        + ("2 4 8)" if sweep else "2)"))
    g.add_argument("-N", type=int, default=[25] if sweep else 25, **many,
                   help="diffusion range(s) in respaced steps, 0..K (default 25; 0 = no adaptation)")
    g.add_argument("--tau", type=float, default=[6.0] if sweep else 6.0, **many,
                   help="guidance step(s) >= 0 (default 6; 0 = unguided SDEdit)")
    g.add_argument("--steps", type=int, default=100, help="respaced chain length K (default 100)")
    g.add_argument("--seed", type=int, default=0, help="seed of the per-slice random streams (default 0)")
    g.add_argument("--guidance", choices=("gradient", "projection"), default="gradient",
                   help="gradient: DDA's guidance step through the network (the paper's; default); "
                        "projection: ILVR's low-pass replacement after each step, no backward pass "
                        "(faster; --tau is unused)")
    g.add_argument("--reference-behaviour", action="store_true",
                   help="DDA's exact sampler: one guidance norm over the whole batch, noise at N but "
                        "first step at N-1, zero-padded filter (results depend on the batch size)")
    if device:
        g.add_argument("--device", default=None,
                       help="auto, cpu, cuda, cuda:1, mps (default auto: CUDA if available, else MPS, else the "
                            "CPU; under torchrun each rank takes cuda:LOCAL_RANK)")
    g.add_argument("--amp", nargs="?", const="bf16", choices=("bf16", "fp16"), default=None,
                   help="mixed precision of the diffusion network (--amp = bf16; fp16 only on CUDA; "
                        "default fp32)")
    if not sweep:
        g.add_argument("--batch-size", type=int, default=None,
                       help="slices per sampler batch, taken across volumes (default 16 on CPU, 64 on CUDA)")


def sampler_settings(a: argparse.Namespace):
    """``SamplerSettings`` from parsed ``add_sampler_arguments`` options (validated)."""
    from nnunet_sddm.sampling.guided import SamplerSettings

    return SamplerSettings(D=a.D, N=a.N, tau=a.tau, steps=a.steps, seed=a.seed,
                           reference_behaviour=a.reference_behaviour, guidance=a.guidance)


def adapt_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_adapt", allow_abbrev=False,
        description="Adapt every nnU-Net-named image of a folder (CASE_0000.nii.gz, ...) to the source domain "
                    "of a diffusion model; outputs keep file names, shape and geometry (float32, clipped to each "
                    "input's intensity window). Records the run and every finished output (with its digest) "
                    "in OUT/sddm_adapt.json; the same command resumes an interrupted run and redoes only "
                    "what the record does not list as finished. --method histmatch / fda use a classical "
                    "method fitted on --source instead (no model): the output folder is written complete or "
                    "not at all, with the record OUT/adaptation.json.")
    p.add_argument("-i", "--input", required=True, help="input folder of nnU-Net-named images")
    p.add_argument("-o", "--output", required=True, help="output folder (must differ from the input)")
    p.add_argument("-m", "--model", default=None,
                   help="diffusion model folder or DATASET[:PRESET] (--method sddm, required there)")
    add_method_arguments(p)
    add_sampler_arguments(p)
    p.add_argument("--overwrite", action="store_true",
                   help="redo and replace existing outputs (histmatch/fda: replace an existing output folder)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_entry
def adapt_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``nnUNetv2_sddm_adapt``."""
    a, given = explicit_options(adapt_parser(), argv)
    check_method_options(a.method, given, a.model is not None, a.source is not None)
    t0 = time.time()
    if a.method == "sddm":
        from nnunet_sddm.adaptation.folders import adapt_folder

        n = len(adapt_folder(a.input, a.output, a.model, sampler_settings(a), batch_size=a.batch_size,
                             device=a.device, amp=a.amp, overwrite=a.overwrite, progress=not a.quiet))
    else:
        from nnunet_sddm.adaptation.methods import adapt_folder_classical

        n = len(adapt_folder_classical(a.method, a.input, a.output, source_images=a.source,
                                       beta=FDA_BETA if a.beta is None else a.beta, seed=a.seed,
                                       overwrite=a.overwrite, progress=not a.quiet)["cases"])
    print(f"nnUNetv2_sddm_adapt: {n} image(s) written to {a.output} "
          f"({a.method}) in {time.time() - t0:.1f} s")
    return 0


#: ``nnUNetv2_sddm_synthesize`` options of one mode only (destination -> option), for the error messages.
RESTYLE_ONLY = {"D": "-D", "N": "-N", "tau": "--tau", "guidance": "--guidance",
                "reference_behaviour": "--reference-behaviour", "amp": "--amp", "include_test": "--include-test"}
LABELS_ONLY = {"labels": "--labels", "labels_from": "--labels-from", "domain": "--domain",
               "guidance_scale": "--guidance-scale"}


def synthesize_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_synthesize", allow_abbrev=False,
        description="Create a new nnU-Net raw dataset. --mode restyle (default, DG use): the source dataset's "
                    "images adapted by the diffusion model, with the ORIGINAL labels. --mode labels: NEW images "
                    "sampled from label maps by a mask-conditioned model (nnUNetv2_sddm_train --condition "
                    "labels), paired with those label maps (the source's labelsTr as they are or deformed, "
                    "or --labels-from). Writes dataset.json, cases.json (provenance) and patient-level splits.")
    p.add_argument("-d", "--source", required=True, help="source raw dataset: id, DatasetXXX_Name or folder")
    p.add_argument("-o", "--new-id", type=int, required=True, help="id of the new dataset (1-999)")
    p.add_argument("--name", default=None,
                   help="name of the new dataset (default <source name>SDDM; --mode labels: <source name>SDDMGen)")
    p.add_argument("-m", "--model", required=True,
                   help="diffusion model folder or DATASET[:PRESET] (--mode labels: a mask-conditioned model)")
    p.add_argument("--mode", choices=("restyle", "labels"), default="restyle",
                   help="restyle: adapt the source images, keep their labels (default); labels: sample new images "
                        "from label maps")
    add_sampler_arguments(p, device=False)
    p.add_argument("--device", "-device", default=None,
                   help="auto, cpu, cuda, cuda:1, mps (default auto: CUDA if available, else MPS, else the CPU; "
                        "under torchrun each rank takes cuda:LOCAL_RANK)")
    g = p.add_argument_group("--mode labels")
    g.add_argument("--labels", choices=("as-is", "deformed"), default=None,
                   help="as-is: condition on the label maps unchanged, written as byte copies (default); deformed: "
                        "each copy gets its own seeded, topology-preserving random deformation of the map")
    g.add_argument("--labels-from", default=None,
                   help="a folder of label maps <name><file ending> to condition on instead of the source's "
                        "labelsTr (each keeps its own geometry)")
    g.add_argument("--domain", default=None,
                   help="domain token of the samples, for a model trained with --pseudo-labelled (default source)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale w >= 0 (default 1 = plain conditional sampling; > 1 follows "
                        "the mask more closely)")
    p.add_argument("--copies", type=int, default=1,
                   help="differently seeded copies per training case or label map (seeds seed..seed+K-1; default 1)")
    p.add_argument("--include-test", action="store_true", help="restyle: also adapt imagesTs (one copy)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset with the new id")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_entry
def synthesize_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``nnUNetv2_sddm_synthesize``."""
    a, given = explicit_options(synthesize_parser(), argv)
    other = RESTYLE_ONLY if a.mode == "labels" else LABELS_ONLY
    unused = [flag for dest, flag in other.items() if dest in given]
    if unused:
        raise SDDMError(f"--mode {a.mode} does not use {', '.join(unused)}")
    t0 = time.time()
    if a.mode == "labels":
        from nnunet_sddm.adaptation.synthesize_labels import synthesize_from_labels

        out = synthesize_from_labels(a.source, a.new_id, a.model, labels=a.labels or "as-is",
                                     labels_from=a.labels_from, domain=a.domain,
                                     guidance_scale=1.0 if a.guidance_scale is None else a.guidance_scale,
                                     copies=a.copies, steps=a.steps, seed=a.seed, name=a.name,
                                     overwrite=a.overwrite, batch_size=a.batch_size, device=a.device,
                                     progress=not a.quiet)
    else:
        from nnunet_sddm.adaptation.synthesize import synthesize_dataset

        out = synthesize_dataset(a.source, a.new_id, a.model, sampler_settings(a), name=a.name, copies=a.copies,
                                 include_test=a.include_test, overwrite=a.overwrite, batch_size=a.batch_size,
                                 device=a.device, amp=a.amp, progress=not a.quiet)
    print(f"nnUNetv2_sddm_synthesize: wrote {out} in {time.time() - t0:.1f} s")
    return 0


def sweep_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnUNetv2_sddm_sweep", allow_abbrev=False,
        description="Adapt one slice for every combination of the given D, N and tau values and draw the grid "
                    "(the paper's Fig. 3-5): one row per (N, tau), the reference then one column per D.")
    p.add_argument("-i", "--image", required=True, help="a 3D image file (NIfTI or any nnU-Net-readable format)")
    p.add_argument("-m", "--model", required=True, help="diffusion model folder or DATASET[:PRESET]")
    p.add_argument("-o", "--output", required=True, help="output PNG (settings recorded in OUT.json)")
    p.add_argument("--slice", type=int, default=None, help="slice index z (default: the middle slice)")
    add_sampler_arguments(p, sweep=True)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


@cli_entry
def sweep_main(argv: Optional[Sequence[str]] = None) -> int:
    """Console script ``nnUNetv2_sddm_sweep``."""
    a = sweep_parser().parse_args(argv)
    from nnunet_sddm.adaptation.sweep import sweep_grid
    from nnunet_sddm.sampling.guided import SamplerSettings

    base = SamplerSettings(D=a.D[0], N=a.N[0], tau=a.tau[0], steps=a.steps, seed=a.seed,
                           reference_behaviour=a.reference_behaviour, guidance=a.guidance)
    out = sweep_grid(a.image, a.model, a.output, Ds=a.D, Ns=a.N, taus=a.tau, slice_index=a.slice, base=base,
                     device=a.device, amp=a.amp, progress=not a.quiet)
    print(f"nnUNetv2_sddm_sweep: wrote {out}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    adapt_main()
