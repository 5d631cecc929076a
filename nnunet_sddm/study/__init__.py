"""The study: the paper's whole experiment (Table 1 and figures) as one resumable command.

``config``    STUDY.json schema, defaults, the ``--quick`` preset, validation
``stages``    a small stage runner (fingerprints, skip when done, ``--from``, stage times)
``pipeline``  the stages: data, diffusion, synthesis (DG), adaptation (DA), nnU-Net plan /
              train / predict, evaluation, comparison, figures, report
``report``    ``report.md``
"""
