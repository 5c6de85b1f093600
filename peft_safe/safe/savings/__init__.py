"""The savings: what freezing buys. The backprop cut below the frozen prefix (truncation), per-block checkpointing
under a memory budget (budget), and the frozen blocks' outputs cached per example on later epochs (prefix_cache,
with its row store prefix_rows and its options cache_options).

May import ``safe.method`` (the frozen prefix, the hooks registry, the tuner's view), ``core``, ``measure``, peft
and torch; never ``safe.persistence`` or the tuner's own modules (``safe.config``, ``safe.model``).
"""
