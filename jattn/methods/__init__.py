"""Paper methods, one file per method: jattn/methods/<family>/<method>.py (docstring names its Pxx id)."""
