"""pytest settings shared by the unit tests and the lesson (nbval) run."""

import os

# Lessons and tests never reach the network: the Hugging Face libraries must not try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def pytest_collectstart(collector):
    """Compare stdout and rich outputs of checked lesson cells, never stderr.

    Warnings and progress bars go to stderr and differ from run to run.
    """
    if hasattr(collector, "skip_compare"):
        collector.skip_compare = (*collector.skip_compare, "stderr")
