"""Persistence: what a SAFE checkpoint holds and how it loads. The freeze state as a payload with its integrity
record (checkpoint), the payload as torch extra state in every state dict (state_dict), which weights file a
config names and writing it atomically (weights_file), the tables that let earlier versions' files load (history),
and the model card's SAFE section.

May import ``safe.method`` and ``safe.savings`` (the cache's options, which a checkpoint ignores), ``core``, peft,
safetensors and torch; never the tuner's own modules (``safe.config``, ``safe.model``).
"""
