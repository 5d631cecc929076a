"""Evaluation and reporting.

``surface``         MedPy-identical surface distances, both directions at once, on a crop
``metrics``         DSC, IoU, ASD, ASSD, HD, HD95 per structure; empty-mask policy; per-slice mode
``io``              label-map reading and geometry checks (no torch / nnU-Net imports)
``evaluate``        folders of predictions vs references -> per_case.csv, summary.json, summary.md
``statistics``      mean/std/median/95% CI, Welch's t-test
``compare``         Welch's tests vs the baseline, Table-1 tables (``tables``), CI bar charts (``figures``)
``image_features``  the 22 DSMRI image features per slice/volume
``domain_shift``    features of image sets, t-SNE, random-forest domain separability

Python entry points for other commands: ``evaluate.evaluate_folders``, ``compare.compare_results``,
``domain_shift.domain_shift``. The package imports none of its modules, so that a command loads
only what it uses (``nnUNetv2_sddm_evaluate`` starts without scipy.stats, scikit-learn or matplotlib).
"""
