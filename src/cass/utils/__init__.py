"""The ground floor: atomic writes, safetensors checkpoints, run-directory files, schedules, RNG, plots.

Nothing here imports from the rest of ``cass``; every other layer may import from here.
"""
