"""The line every benchmark prints about the machine its figures come from."""

import os
import platform

import numpy as np
import torch


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as file:
            names = [line.split(":", 1)[1] for line in file if "model name" in line]
        cpu = names[0].strip() if names else cpu
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"{cpu}, {os.cpu_count()} cores, load average {load}; Python "
        f"{platform.python_version()}, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, numpy {np.__version__}"
    )
