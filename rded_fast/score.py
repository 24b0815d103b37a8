"""Score crops: how typical the observer finds each crop of its class (RDED.md 1.3-1.5).

uint8 crops -> float [0, 1] -> ImageNet normalisation (for every dataset, as the reference does) ->
zero-pad centrally to the observer's input size (zero = the mean colour) -> observer (eval, no grad)
-> per-crop cross-entropy with the true class. Lower is more realistic.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rded_fast.compile_rule import compile_step
from rded_fast.errors import UserError

# distill --score-mode: faithful pads each crop to the input size as RDED does; native scores it at its own size
SCORE_MODES = ("faithful", "native")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Dynamo keeps one cache entry per (scorer, crop shape) on the shared code of the fused step; each compiled
# scorer raises the recompile limit by this many entries so a long-lived process never falls back to eager.
SHAPES_PER_SCORER = 4
SCORE_CHUNK_MAX = 512  # crops per observer call at most (`score_chunk`)

log = logging.getLogger(__name__)
_compiled_scorers = 0


def score_chunk(mipc: int, num_crop: int) -> int:
    """Crops per observer call: a full class (mipc x num_crop crops) split into equal chunks of at most
    SCORE_CHUNK_MAX. It depends on output-relevant parameters only, never on --batch-size: on a GPU the
    kernels, and so the last bits of each score, depend on the batch shape, and the selection must not."""
    crops = mipc * num_crop
    return -(-crops // -(-crops // SCORE_CHUNK_MAX))


def nonfinite_scores(observer: str, amp: str, bad: int, total: int, where: str) -> UserError:
    """The error for `bad` of `total` observer scores that are NaN or infinite (NaN logits, or an fp16 overflow)."""
    fix = (
        "--amp fp16 overflows in this observer: use --amp bf16 or --amp none"
        if amp == "fp16"
        else "check the observer and its --weights"
    )
    return UserError(f"observer {observer} gives NaN or infinite scores for {bad} of {total} {where}; {fix}")


def _stats(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).view(1, 3, 1, 1)


def normalize(
    images: torch.Tensor, mean: torch.Tensor | Sequence[float] = IMAGENET_MEAN, std: torch.Tensor | Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """[N, 3, H, W] float in [0, 1] -> normalised, same dtype. `mean`/`std`: per-channel values, or [1, 3, 1, 1]
    tensors already on the images' device (what the scorer passes, so no constant is built per call)."""
    mean = mean if isinstance(mean, torch.Tensor) else _stats(mean, images)
    std = std if isinstance(std, torch.Tensor) else _stats(std, images)
    return (images - mean) / std


def normalize_uint8(
    images: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    mean: torch.Tensor | Sequence[float] = IMAGENET_MEAN,
    std: torch.Tensor | Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """[N, 3, H, W] uint8 -> normalised float (ImageNet statistics unless given)."""
    return normalize(images.to(dtype) / 255.0, mean, std)


def center_pad(images: torch.Tensor, size: int) -> torch.Tensor:
    """Zero-pad [N, C, p, p] to size x size: top/left get floor(pad/2), bottom/right the rest."""
    ph, pw = size - images.shape[-2], size - images.shape[-1]
    if ph == 0 and pw == 0:
        return images
    return F.pad(images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


def crop_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """-log softmax(logits)[label] per row, in float32."""
    return F.cross_entropy(logits.float(), labels, reduction="none")


def _raise_recompile_limit() -> None:
    """Give every compiled scorer its own room in dynamo's cache (see SHAPES_PER_SCORER)."""
    global _compiled_scorers
    import torch._dynamo.config as dynamo_config

    _compiled_scorers += 1
    need = 8 + SHAPES_PER_SCORER * _compiled_scorers
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, need)
    dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4 * need)


def cudagraph_skips() -> int:
    """How many times inductor has declined CUDA graphs in this process (its own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"])


class Scorer:
    """The scoring engine: (crops [N, 3, p, p] uint8, labels [N]) -> (scores [N] float32, top-1 [N] int64).

    Everything between the loader's uint8 batch and the scores is one function: uint8 -> float,
    normalise, centre-pad to `input_size` (skipped when `native`: the p x p crop is scored as it is,
    which is not RDED), channels-last, autocast in `amp_dtype` (None = the fp32 reference path), the
    observer, per-crop cross-entropy. Results stay on `device` (no host sync). With `compile`, the
    function goes through torch.compile with fixed shapes: every call is padded to `batch_size` crops,
    so it compiles once per crop size (CUDA graphs on CUDA via mode "reduce-overhead"); `warm(p)` does that
    compile ahead of time and adds its seconds to `compile_seconds`. `fixed_shape` (default: `compile`)
    controls the padding. `mean`/`std` are the observer's normalisation (ImageNet's by default), built
    once on the device. With `head` (the observer split by rded_fast.models.heads.split_head: `model` is then
    its body, whose output is the penultimate features, and `head` its Linear head), the same forward pass
    also keeps the features, and `with_features` returns them.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: int,
        device: torch.device | str = "cpu",
        amp_dtype: torch.dtype | None = None,
        channels_last: bool = True,
        compile: bool = False,
        batch_size: int = 512,
        native: bool = False,
        fixed_shape: bool | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        head: nn.Module | None = None,
    ):
        self.device = torch.device(device)
        self.batch_size, self.input_size, self.native = int(batch_size), int(input_size), native
        self.fixed_shape = compile if fixed_shape is None else fixed_shape
        self.compiled, self.features = compile, head is not None
        self.amp_dtype = amp_dtype
        self.compile_seconds = 0.0
        self.cudagraph_skips = 0
        self._warmed: set[int] = set()
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(self.device).eval().to(memory_format=memory_format)
        device_type = self.device.type
        mean_t = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)

        def prepare(crops: torch.Tensor) -> torch.Tensor:
            x = normalize_uint8(crops, torch.float32, mean_t, std_t)
            if not native:
                x = center_pad(x, input_size)
            return x.contiguous(memory_format=memory_format)

        if head is not None:
            head = head.to(self.device).eval()

        def fused(crops: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                out = model(prepare(crops))  # the logits, or with a head the features it reads
                logits = out if head is None else head(out)
            scored = (crop_cross_entropy(logits, labels), logits.argmax(1))
            return scored if head is None else (*scored, out.flatten(1).float())

        self._step = self._eager = fused
        # cudnn.benchmark stays off: it picks kernels by timing them, so two runs may round differently and
        # select different crops; cuDNN's heuristics pick the same kernels for the same shapes every time.
        # (benchmarks/gpu_suite.py measures what autotuning would gain.)
        if compile:
            _raise_recompile_limit()
            self._step = compile_step(fused, self.device)

    def warm(self, crop_size: int) -> float:
        """Compile (and on CUDA record the graphs for) the step at `crop_size` now, not inside a timed class.
        Returns the seconds it took (0 when eager or already warm)."""
        if not self.compiled or crop_size in self._warmed:
            return 0.0
        t = time.perf_counter()
        skips = cudagraph_skips()
        crops = torch.zeros((self.batch_size, 3, crop_size, crop_size), dtype=torch.uint8, device=self.device)
        labels = torch.zeros(self.batch_size, dtype=torch.int64, device=self.device)
        with torch.no_grad():  # not inference_mode: its tensors would make the padded chunk a new guard case
            for _ in range(3 if self.device.type == "cuda" else 1):  # cudagraph trees record on the 2nd/3rd call
                self._step(crops, labels)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        new_skips = cudagraph_skips() - skips
        if new_skips:
            log.warning(
                "scorer at %d px: inductor skipped CUDA graphs %d time(s); scoring runs without them (see TORCH_LOGS=perf_hints)",
                crop_size,
                new_skips,
            )
        self.cudagraph_skips += new_skips
        self._warmed.add(crop_size)
        seconds = time.perf_counter() - t
        self.compile_seconds += seconds
        return seconds

    def __call__(self, crops: torch.Tensor, labels: torch.Tensor, eager: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores [N] float32, top-1 [N] int64) on the scorer's device. `eager`: through the uncompiled step (the
        same function), for a few crops of a size the scorer is not compiled for: no compile for them."""
        scores, preds, *_ = self._run(crops, labels, eager)
        return scores, preds

    def with_features(self, crops: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(scores [N], top-1 [N], penultimate features [N, D] float32) from one forward pass; needs `head`."""
        if not self.features:
            raise ValueError("this Scorer was built without a head: it has no features to return")
        return self._run(crops, labels)

    def _run(self, crops: torch.Tensor, labels: torch.Tensor, eager: bool = False) -> tuple[torch.Tensor, ...]:
        n, bs = len(crops), self.batch_size
        run_step, pad = (self._eager, False) if eager else (self._step, self.fixed_shape)
        outs: list[torch.Tensor] = []
        with torch.no_grad():  # not inference_mode: its tensors would make the padded chunk a new guard case
            for start in range(0, n, bs):
                chunk = crops[start : start + bs].to(self.device, non_blocking=True)
                y = labels[start : start + bs].to(self.device, non_blocking=True)
                m = len(chunk)
                if pad and m < bs:  # fixed shapes: pad with zero crops, drop their results
                    chunk = torch.cat([chunk, chunk.new_zeros((bs - m, *chunk.shape[1:]))])
                    y = torch.cat([y, y.new_zeros(bs - m)])
                step = run_step(chunk, y)
                if not outs:  # allocated once the first chunk tells the features' width
                    outs = [torch.empty((n, *t.shape[1:]), dtype=t.dtype, device=self.device) for t in step]
                for out, t in zip(outs, step):
                    out[start : start + m] = t[:m]
        if not outs:  # no crops: empty results of the step's dtypes
            outs = [
                torch.empty(0, dtype=torch.float32, device=self.device),
                torch.empty(0, dtype=torch.int64, device=self.device),
            ]
            outs += [torch.empty((0, 0), dtype=torch.float32, device=self.device)] if self.features else []
        return tuple(outs)
