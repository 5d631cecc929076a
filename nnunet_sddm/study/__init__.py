"""The study: the paper's whole experiment (Table 1 and figures) as one resumable command.

``config``       STUDY.json defaults, the ``--quick`` preset, parsing and validation (once)
``config_tree``  the typed, frozen configuration (``StudyConfig``) and the study's design constants
``context``      what the stages share: configuration, folders, datasets, device
``ownership``    ``study_created.json``: the paths a study created in the user's nnU-Net folders
``provenance``   ``study.json``: configuration, software versions, hardware
``stages``       a small stage runner (fingerprints, skip when done, ``--from``, stage times)
``stage_*``      one module per stage: data, diffusion, synthesis (DG), adaptation (DA),
                 alternatives (histogram matching, FDA), preprocess, train, [the generative rows'
                 pseudo_labels, generative_model, generation, generative_preprocess,
                 generative_train, adherence: with ``generative.rows`` only], in_domain (held-out
                 source cases and the source round trip), predict, evaluate, compare, quality
                 (fidelity, privacy, utility of the DG and DA image sets), figures, report
``nnunet_steps`` nnU-Net's planning and training commands
``pipeline``     assembles the stages and runs them
``figures``, ``report``   the figures and ``report.md``
"""

#: The stages of a study, in order (``--from`` / ``--until`` take these names).
STAGE_NAMES = ("data", "diffusion", "synthesis", "adaptation", "alternatives", "preprocess", "train", "pseudo_labels",
               "generative_model", "generation", "generative_preprocess", "generative_train", "adherence", "in_domain",
               "predict", "evaluate", "compare", "quality", "figures", "report")
#: The stages of the generative rows (``generative.rows``; otherwise not part of a study).
GENERATIVE_STAGES = ("pseudo_labels", "generative_model", "generation", "generative_preprocess", "generative_train",
                     "adherence")
