"""One public entry point per kernel family (``attention``, ``block_sparse``, ``linear``, ``neighborhood``).

Each picks its implementation through ``jattn.ops.dispatch`` (``impl="auto"`` is decided when the program
is lowered) and validates its arguments before any kernel runs. Users import these from ``jattn``.
"""
