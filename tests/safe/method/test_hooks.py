"""SAFE's long-lived forward hooks go through ``peft_safe/safe/method/hooks.py``: one torch hook per module and
kind, the owners' callbacks in the documented order (``hooks.ORDER``), whatever order the parts installed them in."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

from peft_safe.safe import hooks


@pytest.fixture
def everything_on(tiny):
    """A tiny LLaMA under SAFE with the driver, the prefix cache, the memory budget and a backprop cut, after one
    training forward (the cache installs its block hooks there)."""
    base = tiny.llama(layers=4).train()
    base.enable_input_require_grads()  # the cut's embedding hook is installed only where something hooks them
    torch.manual_seed(1)
    model = get_peft_model(base, tiny.safe_config("llama", cache_frozen=True, memory_budget=0.9))
    safe = model.base_model
    safe.freeze(safe.adapter_units[:2])
    model(**tiny.batch(), labels=tiny.ids()).loss.backward()
    return model


def test_each_module_runs_the_owners_hooks_in_the_documented_order(everything_on):
    safe = everything_on.base_model
    layers = safe.model.model.layers
    assert hooks.ORDER == ("driver", "prefix_cache", "backprop_cut", "budget")
    assert hooks.owners(safe, "pre") == ["driver", "prefix_cache"]
    assert hooks.owners(safe, "post_always") == ["driver", "prefix_cache"]
    assert hooks.owners(safe.model, "pre") == ["driver", "prefix_cache", "budget"]
    # the cache installed its block hooks after the cut's (at the forward after the freeze), and still runs first
    assert hooks.owners(layers[2], "pre") == ["prefix_cache", "backprop_cut"]
    assert hooks.owners(layers[0], "pre") == ["prefix_cache", "backprop_cut"]
    assert hooks.owners(layers[0], "post") == ["prefix_cache"]
    assert hooks.owners(safe.model.get_input_embeddings(), "post") == ["backprop_cut"]
    for module in (safe, safe.model, layers[0], layers[2]):  # one torch hook per kind: the slot
        assert len(module._forward_pre_hooks) == 1


def test_removing_an_owners_last_callback_removes_the_torch_hook(everything_on):
    safe = everything_on.base_model
    layers = safe.model.model.layers
    embeddings = safe.model.get_input_embeddings()
    before = len(embeddings._forward_hooks)
    safe.prefix_cache.clear()
    safe._backprop_cut.remove()
    assert hooks.owners(layers[2], "pre") == [] and not layers[2]._forward_pre_hooks
    assert len(embeddings._forward_hooks) == before - 1  # enable_input_require_grads' own stays


def test_pre_hooks_thread_their_arguments_and_post_hooks_their_output_in_order():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(2))
    seen = []

    def step(owner, change):
        return lambda m, a, k: seen.append((owner, a[0].tolist())) or ((change(a[0]),), k)

    late = hooks.add_hook("budget", layer, "pre", step("budget", lambda x: x * 3))
    hooks.add_hook("driver", layer, "pre", step("driver", lambda x: x + 1))
    hooks.add_hook("backprop_cut", layer, "post", lambda m, a, out: out * 10)
    out = layer(torch.zeros(1, 2))
    assert seen == [("driver", [[0.0, 0.0]]), ("budget", [[1.0, 1.0]])]  # the driver first though added second
    assert out.tolist() == [[30.0, 30.0]]
    late.remove()
    assert hooks.owners(layer, "pre") == ["driver"]


def test_an_unknown_owner_or_kind_is_refused_naming_the_order():
    with pytest.raises(ValueError, match="ORDER"):
        hooks.add_hook("profiler", nn.Linear(2, 2), "pre", lambda *a: None)
    with pytest.raises(ValueError, match="post_always"):
        hooks.add_hook("driver", nn.Linear(2, 2), "backward", lambda *a: None)
