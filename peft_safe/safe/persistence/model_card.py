"""The SAFE section of the model card (``README.md``) peft writes beside a saved adapter.

peft's card says ``library_name: peft`` and nothing of this package, yet the adapter loads only where peft-safe is
installed and imported (without it peft fails with ``KeyError: 'SAFE'``). :meth:`SAFEConfig.save_pretrained`
(which peft calls after writing the card) adds a section that says what to install and import, with the version,
and that the adapter holds a SAFE freeze state, and adds the ``peft-safe`` and ``safe`` tags.

Imports: ``huggingface_hub``'s ModelCard (what peft writes the card with) and the package version.
"""

from __future__ import annotations

import os

from ..._version import __version__

__all__ = ["HEADING", "add_safe_section"]

HEADING = "## SAFE adapter (peft-safe)"


def _section(adapter_type: str) -> str:
    return f"""{HEADING}

This adapter was trained with SAFE (Selective Adapter FrEezing), the `SAFE` peft type of the `peft-safe`
package, version {__version__}. It wraps a {adapter_type} adapter, and its
`adapter_model.safetensors` also holds a SAFE freeze state (which blocks froze and when, their importance history),
checked against the weights when it loads.

Loading it needs the package, imported before peft reads the adapter:

```bash
pip install "peft-safe>={__version__}"
```

```python
import peft_safe  # registers the SAFE peft type
from peft import AutoPeftModelForCausalLM

model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")
```

Without `import peft_safe`, peft fails with `KeyError: 'SAFE'`. To serve it without the package, merge it first
(`model.merge_and_unload()`) and save the merged model.
"""


def add_safe_section(directory: str, adapter_type: str) -> None:
    """Add the SAFE section and tags to the ``README.md`` peft wrote in ``directory`` (or its parent, for a named
    adapter's subfolder); a card that has the section already, or no card, is left alone."""
    from huggingface_hub import ModelCard

    candidates = [os.path.join(directory, "README.md"), os.path.join(os.path.dirname(directory), "README.md")]
    path = next((p for p in candidates if os.path.isfile(p)), None)
    if path is None:
        return
    card = ModelCard.load(path)
    if card.data.get("library_name") != "peft":
        return  # not the card peft writes beside an adapter
    card.data["tags"] = sorted({*(card.data.get("tags") or []), "peft-safe", "safe"})
    if HEADING not in card.text:
        card.text = card.text.rstrip("\n") + "\n\n" + _section(adapter_type)
    card.save(path)
