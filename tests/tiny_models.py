"""What the tests share beyond conftest's ``tiny`` fixture: the tiny BERT, the MARKER task, adapter lookup.

A plain module, not fixtures, so that module-level builders of test files and the two-process worker (which
runs outside pytest) use the same code; conftest's :class:`TinyModels` builds its BERT here too.

The task: label 1 iff token MARKER occurs in the sequence. Half of the sequences carry MARKER at a random
position (never the first, a CLS-like token 1); the other tokens are drawn above MARKER, so the label is a
function of the input that a tiny model learns in a few steps.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

VOCAB = 100
MARKER = 7
# The paper's freezing rule (SAFE's default before 0.2): every unit whose importance, divided by the top unit's,
# is below the threshold freezes. Tests of that rule's exact decisions pin it.
PAPER_RULE = {"freeze_order": "any", "importance_scale": "normalized"}
SEQ = 12


def tiny_bert(layers: int = 2, seed: int = 0, hidden: int = 32, positions: int = 512) -> BertForSequenceClassification:
    """A seeded random BERT classifier (2 labels, 2 heads, FFN 64), in training mode as built."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=positions, num_labels=2,
    )
    return BertForSequenceClassification(config)


def marker_task(n: int, seed: int, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, labels)`` of ``n`` sequences of ``seq`` tokens."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(MARKER + 1, VOCAB, (n, seq), generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    positions = torch.randint(1, seq, (n,), generator=gen)
    rows = torch.nonzero(labels == 1).flatten()
    ids[rows, positions[rows]] = MARKER
    ids[:, 0] = 1
    return ids, labels


def marker_examples(n: int, seed: int, seq: int = SEQ) -> list[dict[str, torch.Tensor]]:
    """The same task as tokenized examples (``input_ids``, ``attention_mask``, ``labels``), one dict each."""
    ids, labels = marker_task(n, seed, seq)
    mask = torch.ones(seq, dtype=torch.long)
    return [{"input_ids": ids[i], "attention_mask": mask, "labels": labels[i]} for i in range(n)]


def adapter_params(model: nn.Module, adapter: str = "default") -> dict[str, nn.Parameter]:
    """Adapter parameters found structurally (tuner layers' adapter containers), by full name."""
    found = {}
    for module_name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        for attr in module.adapter_layer_names:
            container = getattr(module, attr, None)
            if container is None or adapter not in container:
                continue
            entry = container[adapter]
            if isinstance(entry, nn.Parameter):
                found[f"{module_name}.{attr}.{adapter}"] = entry
            else:
                for name, param in entry.named_parameters():
                    found[f"{module_name}.{attr}.{adapter}.{name}"] = param
    return found


def tiny_tokenizer():
    """A word-level fast tokenizer over VOCAB ids (``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3, words ``w4``...),
    built in memory (no download), for TRL's trainers on the tiny LLaMA; :func:`tiny_texts` writes its text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, **{f"w{i}": i for i in range(4, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_texts(n: int, words: int = 12, seed: int = 0) -> list[str]:
    """``n`` random texts of ``words`` words of :func:`tiny_tokenizer`'s vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return [" ".join(f"w{i}" for i in torch.randint(4, VOCAB, (words,), generator=gen).tolist()) for _ in range(n)]


def load_example(name: str):
    """The module of ``examples/<name>.py``, loaded from its file (the examples are scripts, not a package)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_4bit_llama(path, quant_type: str = "nf4", double_quant: bool = False,
                    compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """A LLaMA saved at ``path`` loaded back in 4 bits (bitsandbytes); skips the test where 4-bit does not load.

    On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight on its first eval forward without grad (an
    evaluation; SAFE's scoring keeps it from doing so, tests/safe/method/test_scoring_4bit_cpu.py) and from then on
    computes with bfloat16 scales: other numbers than a freshly loaded base gives, and an error for rows shorter
    than the 64-value quantization block, as tiny ones are. The tests compare exact numbers across machines, so
    they keep one kernel.
    """
    import pytest

    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                      bnb_4bit_use_double_quant=double_quant, bnb_4bit_compute_dtype=compute_dtype)
    try:
        model = LlamaForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=compute_dtype)
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes 4-bit does not load on this machine ({type(exc).__name__}: {exc})")
    import bitsandbytes as bnb

    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return model
