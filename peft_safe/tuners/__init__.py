"""The adapters this package adds to peft, each a peft tuner of its own that SAFE can also wrap.

``bottleneck/`` (Houlsby and Pfeiffer, one config with two presets) and ``bitfit/``: each keeps its maths, its
placement and its peft shell (config, layer, model) apart, the layout a new tuner follows (docs/architecture.md).
``safe.py`` only forwards the class path pickles of 0.1 recorded. Imports peft and torch, never the Trainer.
"""
