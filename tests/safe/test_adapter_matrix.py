"""One table of cases, adapter x base architecture, through one shared tester.

Every adapter SAFE wraps (LoRA, AdaLoRA, Houlsby, Pfeiffer, BitFit) on every base it promises (tiny BERT,
GPT-2, LLaMA, and a 4-bit LLaMA where bitsandbytes runs) goes through the same checks: forward and backward,
an optimizer step that changes adapter parameters only, a save/load round trip with identical outputs,
``disable_adapter()`` equal to the base model, merging where the adapter has a merged form, lower saved
activation bytes once the bottom half of the units is frozen, and a freeze state that survives save/load.
Each adapter also trains on its own, without SAFE.

The models are tiny, seeded and dropout-free, so every output is deterministic in train mode (bitsandbytes
repacks 4-bit weights for CPU inference in eval mode, so the 4-bit model stays in train mode too).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from tiny_models import adapter_params
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import peft_safe  # noqa: F401  (registers the SAFE, BOTTLENECK and BITFIT peft types)
from peft_safe import BitFitConfig, HoulsbyConfig, PfeifferConfig, SAFEConfig, SAFEModel
from peft_safe.measure import SavedTensorMeter

VOCAB = 100
LAYERS = 4
ARCHS = ("bert", "gpt2", "llama", "llama-4bit")
ADAPTERS = ("lora", "adalora", "houlsby", "pfeiffer", "bitfit")
MERGEABLE = ("lora", "adalora", "bitfit")

_LORA_TARGETS = {"bert": ["query", "value"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"]}
_TASK = {"bert": "SEQ_CLS", "gpt2": "CAUSAL_LM", "llama": "CAUSAL_LM"}


pytestmark = pytest.mark.usefixtures("single_thread_torch")  # conftest: one intra-op thread


# ---------------------------------------------------------------------------------------------- the table
def _family(arch: str) -> str:
    return arch.removesuffix("-4bit")


def _adapter_config(adapter: str, arch: str) -> object:
    """The adapter's config for ``arch``, initialised so that the adapter is not a no-op."""
    family = _family(arch)
    task = _TASK[family]
    if adapter == "lora":
        return LoraConfig(
            r=4, lora_alpha=8, target_modules=_LORA_TARGETS[family], init_lora_weights=False,
            fan_in_fan_out=family == "gpt2", task_type=task,
        )
    if adapter == "adalora":
        # AdaLoRA starts with zero singular values; the tester's optimizer steps make them non-zero
        return AdaLoraConfig(
            init_r=4, target_r=2, lora_alpha=8, target_modules=_LORA_TARGETS[family], total_step=20, tinit=2,
            tfinal=4, fan_in_fan_out=family == "gpt2", task_type=task,
        )
    if adapter == "houlsby":
        return HoulsbyConfig(init_weights=False, reduction_factor=4, task_type=task)
    if adapter == "pfeiffer":
        return PfeifferConfig(init_weights=False, reduction_factor=4, task_type=task)
    if adapter == "bitfit":
        return BitFitConfig(init_weights=False, task_type=task)
    raise ValueError(adapter)


def _base_model(arch: str, checkpoint_4bit: Callable[[], str]) -> nn.Module:
    """A tiny dropout-free model in train mode; the same arch gives the same weights."""
    torch.manual_seed(0)
    if arch == "bert":
        config = BertConfig(
            vocab_size=VOCAB, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        )
        model = BertForSequenceClassification(config)
    elif arch == "gpt2":
        config = GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=LAYERS, n_head=2, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = GPT2LMHeadModel(config)
    elif arch == "llama":
        model = LlamaForCausalLM(_llama_config())
    elif arch == "llama-4bit":
        model = _load_4bit(checkpoint_4bit())
    else:
        raise ValueError(arch)
    return model.train()


def _llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=64,
    )


def _load_4bit(path: str) -> nn.Module:
    from transformers import BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    return LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.float32)


@pytest.fixture(scope="module")
def checkpoint_4bit(tmp_path_factory) -> Callable[[], str]:
    """A tiny full-precision LLaMA saved once, loadable in 4-bit; skips the case where bitsandbytes cannot run."""

    @functools.cache
    def path() -> str:
        try:
            import bitsandbytes  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the installation
            return f"skip: bitsandbytes is not importable ({exc})"
        directory = tmp_path_factory.mktemp("tiny-llama")
        torch.manual_seed(0)
        LlamaForCausalLM(_llama_config()).save_pretrained(directory)
        try:
            model = _load_4bit(str(directory)).train()
            with torch.no_grad():
                model(input_ids=torch.ones(1, 4, dtype=torch.long))
        except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
            return f"skip: bitsandbytes 4-bit does not run on this machine ({type(exc).__name__}: {exc})"
        return str(directory)

    def get() -> str:
        result = path()
        if result.startswith("skip: "):
            pytest.skip(result.removeprefix("skip: "))
        return result

    return get


@dataclass(frozen=True)
class Case:
    adapter: str
    arch: str

    @property
    def id(self) -> str:
        return f"{self.adapter}-{self.arch}"

    @property
    def mergeable(self) -> bool:
        return self.adapter in MERGEABLE

    @property
    def quantized(self) -> bool:
        return self.arch.endswith("-4bit")


CASES = [Case(adapter, arch) for arch in ARCHS for adapter in ADAPTERS]


# ---------------------------------------------------------------------------------------------- the tester
def requires_grad_pattern(model: nn.Module) -> dict[str, bool]:
    return {name: param.requires_grad for name, param in model.named_parameters()}


class AdapterCaseTester:
    """Builds one case's SAFE model and checks the promises every adapter x base case must keep."""

    def __init__(self, case: Case, checkpoint_4bit: Callable[[], str], tmp_path) -> None:
        self.case = case
        self.checkpoint_4bit = checkpoint_4bit
        self.tmp_path = tmp_path
        family = _family(case.arch)
        generator = torch.Generator().manual_seed(1)
        ids = torch.randint(1, VOCAB, (2, 8), generator=generator)
        self.inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        self.labels = torch.tensor([0, 1]) if family == "bert" else ids

    # ------------------------------------------------------------------ building blocks
    def base(self) -> nn.Module:
        return _base_model(self.case.arch, self.checkpoint_4bit)

    def safe_config(self) -> SAFEConfig:
        return SAFEConfig(
            adapter_config=_adapter_config(self.case.adapter, self.case.arch), task_type=_TASK[_family(self.case.arch)]
        )

    def build(self) -> tuple[PeftModel, torch.Tensor]:
        """The SAFE model and the base model's logits, taken before the adapters were injected."""
        base = self.base()
        reference = self.logits(base)
        torch.manual_seed(1)
        model = get_peft_model(base, self.safe_config())
        assert isinstance(model.base_model, SAFEModel)
        return model, reference

    def logits(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return model(**self.inputs).logits.detach().clone()

    def loss(self, model: nn.Module) -> torch.Tensor:
        return model(**self.inputs, labels=self.labels).loss

    @staticmethod
    def optimizer(model: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)

    def train(self, model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2) -> None:
        for _ in range(steps):
            self.loss(model).backward()
            optimizer.step()
            optimizer.zero_grad()

    def trained(self) -> tuple[PeftModel, torch.Tensor, torch.optim.Optimizer]:
        """A SAFE model after two optimizer steps (adapters no longer at their initialisation)."""
        model, reference = self.build()
        optimizer = self.optimizer(model)
        self.train(model, optimizer)
        return model, reference, optimizer

    def freeze_bottom_half(self, model: PeftModel, optimizer: torch.optim.Optimizer | None = None) -> list[str]:
        safe = model.base_model
        units = safe.adapter_units
        assert len(units) >= 2, units
        bottom = units[: len(units) // 2]
        assert safe.freeze(bottom, optimizer=optimizer) == bottom
        return bottom

    def reload(self, model: PeftModel) -> PeftModel:
        directory = self.tmp_path / "adapter"
        model.save_pretrained(directory)
        return PeftModel.from_pretrained(self.base(), directory, is_trainable=True)

    def assert_same_outputs(self, actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
        torch.testing.assert_close(
            actual, expected, rtol=1e-6, atol=1e-6, msg=lambda m: f"{self.case.id}: {what}\n{m}"
        )

    # ------------------------------------------------------------------ the checks
    def check_forward_backward(self) -> None:
        model, _ = self.build()
        logits = model(**self.inputs).logits
        assert torch.isfinite(logits).all()
        loss = self.loss(model)
        assert torch.isfinite(loss)
        loss.backward()
        adapters = set(adapter_params(model).values())
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert any(p in adapters for p in trainable.values())
        for name, param in model.named_parameters():
            if param.requires_grad:
                assert param in adapters or ".modules_to_save." in name, f"{name} is trainable but not an adapter"
                assert param.grad is not None and torch.isfinite(param.grad).all(), name
            else:
                assert param.grad is None, name
        assert any(p.grad.abs().sum() > 0 for p in trainable.values())

    def check_step_changes_only_adapters(self) -> None:
        model, _ = self.build()
        optimizer = self.optimizer(model)
        before = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        self.train(model, optimizer)
        after = model.state_dict()
        adapters = {name for name, p in model.named_parameters() if p.requires_grad}
        changed = {k for k, v in before.items() if not torch.equal(v, after[k])}
        assert changed, "an optimizer step changed nothing"
        assert changed & set(adapter_params(model)), "no adapter parameter changed"
        assert changed <= adapters, f"base weights changed: {sorted(changed - adapters)}"

    def check_save_load_round_trip(self) -> None:
        model, _, _ = self.trained()
        adapted = self.logits(model)
        loaded = self.reload(model)
        assert isinstance(loaded.base_model, SAFEModel)
        self.assert_same_outputs(self.logits(loaded), adapted, "outputs after save/load")

    def check_disable_adapter_is_base(self) -> None:
        model, reference, _ = self.trained()
        adapted = self.logits(model)
        assert not torch.allclose(adapted, reference), "the adapter does not change the outputs: vacuous check"
        with model.disable_adapter():
            self.assert_same_outputs(self.logits(model), reference, "disable_adapter() against the base model")
        self.assert_same_outputs(self.logits(model), adapted, "outputs after disable_adapter() is left")

    def check_merge(self) -> None:
        model, reference, _ = self.trained()
        adapted = self.logits(model)
        if not self.case.mergeable:
            with pytest.raises(ValueError, match="merge"):
                model.merge_and_unload()
            return
        if self.case.adapter == "adalora" and self.case.quantized:
            # peft's AdaLoRA has no merge for bitsandbytes layers (SVDLinear4bit), with or without SAFE
            with pytest.raises(NotImplementedError):
                model.merge_and_unload()
            return
        merged = model.merge_and_unload()
        assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
        merged_logits = self.logits(merged)
        if self.case.quantized and self.case.adapter == "lora":
            # LoRA merges into 4-bit weights by dequantize, add, requantize: close to the adapted model, not equal
            error = (merged_logits - adapted).abs().mean()
            assert error < 0.25 * (adapted - reference).abs().mean(), error
        else:
            torch.testing.assert_close(merged_logits, adapted, rtol=1e-5, atol=1e-5)

    def check_freezing_bottom_half_saves_activations(self) -> None:
        model, _, optimizer = self.trained()

        def saved_bytes() -> int:
            with SavedTensorMeter(exclude=model) as meter:
                loss = self.loss(model)
            loss.backward()
            optimizer.zero_grad()
            return meter.activation_bytes

        all_trainable = saved_bytes()
        self.freeze_bottom_half(model, optimizer)
        bottom_frozen = saved_bytes()
        assert 0 < bottom_frozen < 0.9 * all_trainable, (all_trainable, bottom_frozen)

    def check_frozen_state_survives_save_load(self) -> None:
        model, _, optimizer = self.trained()
        frozen = self.freeze_bottom_half(model, optimizer)
        self.train(model, optimizer, steps=1)
        pattern = requires_grad_pattern(model)
        frozen_params = [name for name, param in adapter_params(model).items() if not param.requires_grad]
        assert frozen_params, "freezing left every adapter parameter trainable"
        state = model.base_model.freeze_state.to_dict()

        loaded = self.reload(model)
        assert loaded.base_model.frozen_units == frozen
        assert loaded.base_model.freeze_state.to_dict() == state
        assert requires_grad_pattern(loaded) == pattern
        # and they stay frozen through peft's gradient toggles and further training
        with loaded.disable_adapter():
            pass
        loaded.base_model.set_adapter("default")
        assert requires_grad_pattern(loaded) == pattern
        before = {name: p.detach().clone() for name, p in adapter_params(loaded).items()}
        self.train(loaded, self.optimizer(loaded), steps=1)
        after = adapter_params(loaded)
        assert all(torch.equal(before[name], after[name]) for name in frozen_params)
        assert any(not torch.equal(before[name], after[name]) for name in after if name not in frozen_params)


CHECKS = (
    "forward_backward",
    "step_changes_only_adapters",
    "save_load_round_trip",
    "disable_adapter_is_base",
    "merge",
    "freezing_bottom_half_saves_activations",
    "frozen_state_survives_save_load",
)

# (case id, check) -> reason, for known bugs outside this test (strict xfail).
KNOWN_FAILURES: dict[tuple[str, str], str] = {}


def _params():
    for case in CASES:
        for check in CHECKS:
            reason = KNOWN_FAILURES.get((case.id, check))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            yield pytest.param(case, check, id=f"{case.id}-{check}", marks=marks)


@pytest.mark.parametrize(("case", "check"), list(_params()))
def test_adapter_matrix(case: Case, check: str, checkpoint_4bit, tmp_path):
    getattr(AdapterCaseTester(case, checkpoint_4bit, tmp_path), f"check_{check}")()


def test_table_covers_every_adapter_and_base():
    assert {(c.adapter, c.arch) for c in CASES} == {(a, b) for a in ADAPTERS for b in ARCHS}


# ---------------------------------------------------------------------------------------------- without SAFE
@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_trains_without_safe(adapter: str, arch: str, checkpoint_4bit, tmp_path):
    tester = AdapterCaseTester(Case(adapter, arch), checkpoint_4bit, tmp_path)
    base = tester.base()
    torch.manual_seed(1)
    model = get_peft_model(base, _adapter_config(adapter, arch))
    assert not isinstance(model.base_model, SAFEModel)
    assert set(adapter_params(model)), "no adapter was injected"
    optimizer = tester.optimizer(model)
    losses = []
    for _ in range(6):
        loss = tester.loss(model)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < losses[0], losses
