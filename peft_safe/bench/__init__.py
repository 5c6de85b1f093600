"""``peft-safe bench``: each adapter with and without SAFE, on the same data, seeds and steps, measured side by side.

Default: all-MiniLM-L6-v2 on Rotten Tomatoes (offline asset packages), LoRA against LoRA + SAFE, a plain
PyTorch loop that calls ``SAFEModel.update_and_freeze`` every ``--score-every`` optimizer steps. Per run,
through :class:`~peft_safe.measure.meter.TrainingMeter`:

- training memory of a step: bytes saved for backward (activations, exact, by saved-tensor hooks) + gradient
  bytes + optimizer-state bytes, on every ``--measure-every``-th step and the first step after each freeze;
  reported as the run's average, the average after SAFE's last freeze (over the same steps for both runs) and
  the peak; on CUDA also ``torch.cuda.max_memory_allocated``;
- FLOPs (forward + backward, ``FlopCounterMode``) of every step, counted once per set of trainable
  parameters and batch shape, summed over the run;
- wall time of the training steps, the mean time of a step without meters, and SAFE's scoring time.

The task metric is accuracy for classification, perplexity for WikiText-2 (SmolLM2, causal LM).

Modules, each importing only those before it: :mod:`.data` (tasks, tables, tokenized splits, batches),
:mod:`.runs` (configs, model, training loop, evaluation, :func:`~peft_safe.bench.runs.perplexity`),
:mod:`.report` (statistics over seeds, the table), :mod:`.plots` (PNG plots, matplotlib), :mod:`.cli` (flags,
the whole bench, output). This file only re-exports :func:`~peft_safe.bench.cli.main`, which ``peft-safe
bench`` calls; nothing in the bench imports it.
"""

from .cli import main

__all__ = ["main"]
