"""--cache-memory: how much the prefix cache may take, and the line that says what it holds."""
import argparse
import contextlib
import os
import re
import torch

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
# --cache-memory auto: the other half stays for the model, its gradients and AdamW's
# two moments, the activations of a batch, and (on the CPU) the data and the OS
CACHE_SHARE = 0.5


def memory_size(text):
    """--cache-memory: auto, 0 (no cache) or a size such as 500MB, 2GB, 1.5GiB."""
    if text == "auto":
        return text
    match = re.fullmatch(r"(\d+(?:\.\d*)?)\s*([KMGT]I?B|B)?", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use auto, 0 (no cache) or a number with B, KB, MB, "
            f"GB, TB (or KiB, MiB, GiB, TiB), such as 500MB or 2GB")
    return int(float(match[1]) * SIZE_UNITS[(match[2] or "").upper()])


def available_memory(device):
    """(bytes free now, what they are), bytes None if unknown. MPS before torch 2.5: the RAM
    its GPU shares; where the system does not say what RAM is available (macOS), all of it."""
    if device.type == "cuda":
        # an index, not the device: before torch 2.5 "cuda" without one is refused
        index = torch.cuda.current_device() if device.index is None else device.index
        return torch.cuda.mem_get_info(index)[0], "free GPU memory"
    if device.type == "mps" and hasattr(torch.mps, "recommended_max_memory"):
        return (torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory(),
                "memory Metal recommends for this process")
    with contextlib.suppress(OSError), open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "available RAM"
    for pages, what in [("SC_AVPHYS_PAGES", "available RAM"), ("SC_PHYS_PAGES", "RAM")]:
        with contextlib.suppress(ValueError, OSError, AttributeError):
            return os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE"), what
    return None, "available RAM"


def cache_budget(setting, device):
    """--cache-memory in bytes (None: no limit) and where the figure comes from."""
    if setting != "auto":
        return setting, "--cache-memory"
    free, where = available_memory(device)
    if free is None:
        return None, f"--cache-memory auto: the {where} is unknown, no limit"
    # torchrun's processes on a machine share its RAM; each has its own GPU
    sharing = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    shared = f", shared by {sharing} processes" if sharing != 1 else ""
    return int(free * CACHE_SHARE / sharing), f"--cache-memory auto: half the {where}{shared}"


def human_bytes(n):
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else \
        f"{n / 1e3:.0f} kB"


def cache_plan(needed, budget, source, out):
    """The one line that says what the prefix cache will hold, and its cost."""
    if budget is None or needed <= budget:
        limit = "no memory limit" if budget is None else f"the budget of {human_bytes(budget)}"
        return f"Prefix cache: {human_bytes(needed)}, within {limit} ({source})"
    return (f"Prefix cache: {human_bytes(needed)}, over the budget of {human_bytes(budget)} "
            f"({source}): {human_bytes(budget)} stays in memory, the other "
            f"{human_bytes(needed - budget)} goes to a temporary file in {out} and is read "
            f"back from disk at every pass over the data")
