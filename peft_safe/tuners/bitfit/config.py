"""BitFitConfig: train the biases of the targeted layers, and nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

from peft.config import PeftConfig

from ..._peft_types import BITFIT_PEFT_TYPE


@dataclass
class BitFitConfig(PeftConfig):
    """Configuration of a :class:`BitFitModel` (BitFit, Ben Zaken et al. 2022): train only bias terms.

    Each targeted layer gets a zero-initialised bias delta added to its output. Training the delta is training
    the layer's bias (same gradient, same Adam update), while the base bias is never written: disabling or
    unloading the adapter gives the base model back exactly, and only the deltas are saved. A layer without a
    bias (LLaMA's projections) gets the delta as a new bias. ``merge`` adds the delta into the bias, creating
    one where there was none.

    Args:
        target_modules: layers whose bias to train: names (exact or suffix match) or a regex (full match).
            ``None``: every ``nn.Linear`` (including bitsandbytes 4/8-bit), transformers ``Conv1D`` and
            ``nn.LayerNorm`` with affine parameters, except the output embedding layer (``lm_head``); RMSNorm
            has no bias by design and is left alone. The resolved names are written back into this field, so
            the saved config lists exactly the layers that were adapted.
        exclude_modules: layers to leave out: names (exact or suffix match) or a regex (full match).
        modules_to_save: modules besides the biases to train and save (e.g. a classifier head).
        init_weights: ``True`` (default): deltas start at zero, the model is unchanged. ``False``: deltas drawn
            from N(0, 0.02), for tests.

    Raises:
        ValueError: for a non-bool ``init_weights`` or a ``target_modules``/``exclude_modules`` that is neither
            a string nor a list of strings.

    Example:
        >>> from peft import get_peft_model
        >>> model = get_peft_model(base_model, BitFitConfig(task_type="SEQ_CLS"))
        >>> model.print_trainable_parameters()
    """

    target_modules: list[str] | str | None = field(
        default=None,
        metadata={
            "help": "Layers whose bias to train: names (exact or suffix match) or a regex (full match). None: every "
            "Linear, Conv1D and affine LayerNorm except the output embedding layer."
        },
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Layers to leave out: names (exact or suffix match) or a regex (full match)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the biases to train and save, e.g. ['classifier']."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: bias deltas start at zero (model unchanged at init). False: N(0, 0.02)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = BITFIT_PEFT_TYPE
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"init_weights must be True or False, got {self.init_weights!r}.")
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if isinstance(value, (list, set, tuple)):
                if not all(isinstance(v, str) for v in value):
                    raise ValueError(f"{name} must be a string (regex) or a list of module names, got {value!r}.")
                setattr(self, name, set(value))
            elif value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string (regex) or a list of module names, got {value!r}.")
