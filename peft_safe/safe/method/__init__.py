"""The method: what SAFE decides and when. The tuner's units (one per transformer block), the probe pass that
scores them (1 - CKA), freezing them (requires_grad, the optimizer's state, the frozen prefix they leave, AdaLoRA's
ranks, DeepSpeed ZeRO), the ranks agreeing under torch.distributed, the automatic schedule (driver, trainer_clock),
the one registry of long-lived hooks, and the typed view of the tuner its parts hold (tuner_view).

May import ``core``, ``measure``, the package's leaves (batch, reporting), peft and torch; nothing else of
``safe``: the savings and persistence build on it, never the other way.
"""
