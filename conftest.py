"""pytest settings shared by the unit tests and the lesson (nbval) run."""

import os

from sdscratch.book import OFFLINE_ENVIRONMENT

# Lessons and tests never reach the network: the Hugging Face libraries must not try.
# (`make lessons` runs the lessons in the same environment.)
for name, value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(name, value)


def pytest_collectstart(collector):
    """Compare stdout and rich outputs of checked lesson cells, never stderr.

    Warnings and progress bars go to stderr and differ from run to run.
    """
    if hasattr(collector, "skip_compare"):
        collector.skip_compare = (*collector.skip_compare, "stderr")
