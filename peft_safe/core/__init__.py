"""SAFE's algorithm, pure: linear CKA (``cka``), the schedule (``schedule``, ``policy``), the freeze state (``state``).

Imports torch and the standard library only, never peft, transformers or the rest of this package, so every
piece is tested alone against float64 references and invariants (tests/core).
"""
