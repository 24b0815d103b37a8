"""Which torch device a command runs on: `auto` (CUDA when present, else CPU), `cpu`, or `cuda[:N]`."""

from __future__ import annotations

import os
import platform

import torch

from rded_fast.errors import UserError


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device for `--device name`; under torchrun (`local_rank` given) plain `cuda` means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here; use --device cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    if name != "cpu" and not name.startswith("cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda[:N]")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    """A name for result files: the GPU's model, or the CPU's architecture and thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo); empty where unreadable."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16) and torch may use it; elsewhere
    torch emulates bf16, 3-5x slower than fp32. An instruction-set cap (ONEDNN_MAX_CPU_ISA below the bf16
    sets, ATEN_CPU_CAPABILITY avx2/default) makes the CPU behave as one without it, so it counts too."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags()) and not _bf16_capped_by_env()


def _bf16_capped_by_env() -> bool:
    onednn = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    onednn_ok = onednn == "ALL" or any(part in onednn for part in ("BF16", "AMX", "AVX10"))
    return not onednn_ok or aten in ("default", "avx2")


# --amp: the autocast dtype. Training (student, observer) takes auto/none/bf16: fp16 would need a loss scaler.
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
AMP_CHOICES = ("auto", *AMP_DTYPES)
TRAIN_AMP_CHOICES = ("auto", "none", "bf16")


def resolve_amp(name: str, device: torch.device | str = "cpu", choices: tuple[str, ...] = AMP_CHOICES) -> torch.dtype | None:
    """`auto` is bf16 on CUDA, and on a CPU only when it has native bf16 (AVX512-BF16 or AMX): there it was
    1.8x faster than fp32 for scoring and 2x for student training; on an AVX2-only CPU bf16 is emulated and
    4-8x slower, so `auto` is fp32 there. `none` is fp32 (the reference path)."""
    if name not in choices:
        raise UserError(f"--amp {name}: choose {', '.join(choices)}")
    if name != "auto":
        return AMP_DTYPES[name]
    if torch.device(device).type == "cuda" or cpu_has_native_bf16():
        return torch.bfloat16
    return None


def amp_name(dtype: torch.dtype | None) -> str:
    """The `--amp` name of a resolved dtype, for results: bf16, fp16, or fp32 for None."""
    return next((k for k, v in AMP_DTYPES.items() if v == dtype and v is not None), "fp32")


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device`'s type; off (fp32) for None."""
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, not the machine's total)."""
    return len(os.sched_getaffinity(0))


def cpu_description() -> dict:
    """The CPU a measurement ran on: model name, usable cores, and the flags that decide its fast paths."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    flags = cpu_flags()
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    caps = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    return {
        "model": model,
        "cores": available_cores(),
        "flags": {k: k in flags for k in wanted},
        "native_bf16": cpu_has_native_bf16(),
        **({"isa_caps": caps} if caps else {}),
    }


# --workers: at most this many decoding workers (processes or threads) per usable core. Decoding is CPU-bound:
# workers beyond the cores only hide I/O waits (slow disks, network file systems), which 4 per core covers;
# more only contend for the cores and memory (10000 forked decoders made no progress at all on 2 cores).
WORKERS_PER_CORE = 4


def max_workers() -> int:
    """The most decoding workers any command accepts: WORKERS_PER_CORE per usable core."""
    return WORKERS_PER_CORE * available_cores()


def check_workers(workers: int | None, flag: str = "--workers") -> None:
    """The one rule for every command's worker count: refuse more than `max_workers()` (None: the default)."""
    if workers is not None and workers > max_workers():
        raise UserError(
            f"{flag} {workers}: more than {WORKERS_PER_CORE} per usable core ({available_cores()} here) only makes "
            f"them contend; use at most {max_workers()}, or leave it out for the default"
        )


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_free() -> int | None:
    """Bytes left under this process's cgroup memory limit (v2, else v1); None without a limit."""
    for limit, usage in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            with open(limit) as f:
                cap = f.read().strip()
            with open(usage) as f:
                used = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if cap.isdigit() and int(cap) < 2**60:  # v1 writes a huge number for "no limit"
            return max(0, int(cap) - used)
    return None


def available_memory(device: torch.device | str) -> int | None:
    """Bytes a new allocation on `device` can get: free memory of the GPU; on a CPU the kernel's MemAvailable plus
    free swap, capped by the cgroup's limit. None when unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    ram, swap = _meminfo("MemAvailable"), _meminfo("SwapFree") or 0
    known = [v for v in (None if ram is None else ram + swap, _cgroup_free()) if v is not None]
    return min(known) if known else None


def check_fits(need: int, device: torch.device | str, what: str, fix: str) -> None:
    """Refuse, before the work, a run whose `need` bytes on `device` exceed what is available; the message says
    `what` needs them and `fix` (the argument to change)."""
    have = available_memory(device)
    if have is not None and need > have:
        where = "the GPU" if torch.device(device).type == "cuda" else "this machine"
        raise UserError(f"{what} needs at least {need / 2**30:,.1f} GiB but {where} has {have / 2**30:,.1f} GiB free; {fix}")


def worker_count(text: str) -> int:
    """argparse `type` of the benchmark scripts' --workers: a whole number >= 0 within `check_workers`' rule."""
    import argparse

    try:
        workers = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if workers < 0:
        raise argparse.ArgumentTypeError(f"{workers}: must be >= 0")
    try:
        check_workers(workers)
    except UserError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return workers
