"""Evaluation and reporting.

``surface``         MedPy-identical surface distances, both directions at once, on a crop
``metrics``         DSC, IoU, ASD, ASSD, HD, HD95 per structure; empty-mask policy; per-slice mode
``io``              label-map reading and geometry checks (no torch / nnU-Net imports)
``evaluate``        folders of predictions vs references -> per_case.csv, summary.json, summary.md
                    (the structures both label maps name)
``statistics``      mean/std/median/95% CI; paired tests (Wilcoxon, paired t), bootstrap CIs, Holm; Welch
``compare``         every row vs its baseline (paired tests, Holm, repeats, Welch), Table-1 tables
                    (``tables``), missing/spurious structure counts, CI bar charts (``figures``)
``image_features``  the 22 DSMRI image features per slice/volume
``domain_shift``    features of image sets, t-SNE, random-forest domain separability
``quality_slices``  the quality report's image sets, as slices at one scale, and their pairs
``fidelity``        paired SSIM / MS-SSIM / PSNR, Frechet and kernel distances, optional ImageNet networks
``privacy``         nearest-neighbour distances, NNDR, copy threshold and flags
``membership``      membership inference against a diffusion model (denoising errors, cross-validated AUC)
``quality``         the quality report (``nnUNetv2_sddm_quality``): fidelity, privacy, utility

Python entry points for other commands: ``evaluate.evaluate_folders``, ``compare.compare_results``,
``domain_shift.domain_shift``, ``quality.quality_report``. The package imports none of its modules, so that a command loads
only what it uses (``nnUNetv2_sddm_evaluate`` starts without scipy.stats, scikit-learn or matplotlib).
"""
