"""The ``peft-safe`` console script: ``peft-safe bench ...``, ``peft-safe plan ...``, ``peft-safe frontier ...``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "peft_safe.bench", "plan": "peft_safe.plan", "frontier": "peft_safe.bench.frontier"}
    if not argv or argv[0] not in commands:
        print(f"usage: peft-safe {{{','.join(commands)}}} [options]   (peft-safe COMMAND --help for options)",
              file=sys.stderr)
        return 2
    import importlib

    return importlib.import_module(commands[argv[0]]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
