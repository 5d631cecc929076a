"""Reference-guided sampling (Algorithm 1 of the paper): ``lowpass`` (phi_D as two precomputed
matrices) and ``guided`` (``SamplerSettings``, ``guided_sample``); ``conditional``: classifier-free
guidance of a mask-conditioned model (``ClassifierFreeGuidance``)."""
