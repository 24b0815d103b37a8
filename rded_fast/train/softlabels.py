"""Stored soft labels: per epoch, the augmentation parameters and the teacher's top-k logits (fp16).

Layout of a labels folder: `header.json` (the recipe, the distilled set's file list, the teacher's
identity, k) and either one `epoch_EEEE.npz` per epoch holding the EpochAug arrays, `values` [N, k] fp16 logits
in training order, `indices` [N, k] (absent when k = all classes) and `lse` [N] fp32, the
log-sum-exp of logits / T, so the top-k probabilities are exact and the remaining mass is spread
evenly over the other classes (the reference's keep_top_k rule), or (`relabel --region`, header
`region_grid`) one `regions.npz` with the same arrays for every cell of every image. Files are written
atomically, so an interrupted relabel keeps its finished epochs.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_bytes, atomic_write_text
from rded_fast.train.augment import AUG_FIELDS, EpochAug, host_to_device
from rded_fast.train.recipe import RECIPE_VERSION

FORMAT_VERSION = 1
REGIONS_FILE = "regions.npz"  # `relabel --region`: one label per cell instead of per-epoch files
# Storage dtypes of the augmentation parameters (images up to 32767 px, up to 2^31 samples).
COMPACT_DTYPES = {
    "order": np.int32,
    "row_perm": np.int8,
    "col_perm": np.int8,
    "boxes": np.int16,
    "flip": np.bool_,
    "mix_perm": np.int32,
    "mix_box": np.int16,
    "mix_lam": np.float32,
}


def epoch_path(folder: Path, epoch: int) -> Path:
    return Path(folder) / f"epoch_{epoch:04d}.npz"


def write_header(folder: Path, header: dict) -> None:
    atomic_write_text(Path(folder) / "header.json", json.dumps({"format": FORMAT_VERSION, **header}, indent=1))


def read_header(folder: Path) -> dict:
    path = Path(folder) / "header.json"
    if not path.is_file():
        raise UserError(f"--soft-labels {folder}: no header.json; make it with `rded-fast relabel`")
    header = json.loads(path.read_text())
    if header.get("format") != FORMAT_VERSION:
        raise UserError(f"{path}: format {header.get('format')}, expected {FORMAT_VERSION}; relabel again")
    made_by = header.get("recipe_version", 1)
    if "region_grid" not in header and made_by != RECIPE_VERSION:  # region labels hold no augmented views
        raise UserError(
            f"--soft-labels {folder}: stored by recipe version {made_by}, which applies the augmentation another way "
            f"than this rded-fast (recipe version {RECIPE_VERSION}); make them again with `rded-fast relabel`"
        )
    return header


def encode_logits(logits: torch.Tensor, k: int, temperature: float) -> dict[str, np.ndarray]:
    """Compact form of teacher logits [B, C]: top-k values (fp16), their indices, and lse of logits / T."""
    logits = logits.float()
    lse = torch.logsumexp(logits / temperature, dim=1)
    if k >= logits.shape[1]:
        return {"values": logits.half().cpu().numpy(), "lse": lse.cpu().numpy()}
    values, indices = logits.topk(k, dim=1)
    index_dtype = np.int16 if logits.shape[1] <= np.iinfo(np.int16).max else np.int32
    return {"values": values.half().cpu().numpy(), "indices": indices.cpu().numpy().astype(index_dtype), "lse": lse.cpu().numpy()}


def decode_probs(
    values: torch.Tensor, indices: torch.Tensor | None, lse: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """Teacher probabilities softmax(logits / T) [B, C] from the compact form (exact on the top k), on the
    tensors' device: `values` [B, k] (fp16 logits), `indices` [B, k] or None (all classes kept), `lse` [B]."""
    v = values.float()
    if indices is None:
        return torch.softmax(v / temperature, dim=1)
    top = torch.exp(v / temperature - lse.float()[:, None])
    rest = ((1.0 - top.sum(1)) / max(num_classes - v.shape[1], 1)).clamp_min(0)
    probs = rest[:, None].expand(len(v), num_classes).clone()
    return probs.scatter_(1, indices.long(), top)


def encoded_to_device(encoded: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """An epoch's (or the regions') compact labels on `device`, copied once (see augment.host_to_device)."""
    return {k: host_to_device(v, device) for k, v in encoded.items()}


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> int:
    """Write `arrays` as one .npz atomically; returns its size in bytes."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())
    return buf.getbuffer().nbytes


def write_regions(folder: Path, encoded: dict[str, np.ndarray]) -> int:
    """Write the per-cell labels of `relabel --region` (rows: image-major, then cell); returns the bytes written."""
    return _write_npz(Path(folder) / REGIONS_FILE, encoded)


def read_region_probs(folder: Path, header: dict, num_classes: int) -> torch.Tensor:
    """Per-cell teacher probabilities at the header's temperature: [N, grid^2, C]."""
    path = Path(folder) / REGIONS_FILE
    if not path.is_file():
        raise UserError(f"{path}: missing; relabel --region again")
    with np.load(path) as z:
        encoded = {k: torch.from_numpy(z[k]) for k in ("values", "indices", "lse") if k in z.files}
    probs = decode_probs(encoded["values"], encoded.get("indices"), encoded["lse"], num_classes, header["temperature"])
    return probs.view(-1, header["region_grid"] ** 2, num_classes)


def write_epoch(folder: Path, epoch: int, aug: EpochAug, encoded: dict[str, np.ndarray]) -> int:
    """Write one epoch's file; returns its size in bytes."""
    arrays = {k: v.astype(COMPACT_DTYPES[k]) for k, v in aug.arrays().items()}
    return _write_npz(epoch_path(folder, epoch), {"batch_size": np.int64(aug.batch_size), **arrays, **encoded})


def read_epoch(folder: Path, epoch: int) -> tuple[EpochAug, dict[str, np.ndarray]]:
    path = epoch_path(folder, epoch)
    if not path.is_file():
        raise UserError(f"{path}: missing; the labels folder holds fewer epochs than asked for")
    with np.load(path) as z:
        aug = EpochAug(
            **{k: z[k].astype(np.float64 if k == "mix_lam" else np.int64) if k != "flip" else z[k] for k in AUG_FIELDS},
            batch_size=int(z["batch_size"]),
        )
        encoded = {k: z[k] for k in ("values", "indices", "lse") if k in z.files}
    return aug, encoded
