"""Write: distilled images as an ImageFolder and a contact sheet (manifest.json: rded_fast.manifest).

Every file is written to a temporary name and renamed, so a file is either complete or absent; the
journal (rded_fast.journal) records which classes are complete.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from rded_fast.errors import UserError
from rded_fast.fileio import atomic_write_bytes, atomic_write_many
from rded_fast.png import encode_png
from rded_fast.recipe import CONTACT_SHEET_CLASSES

IMAGE_FORMATS = ("png", "jpg")  # distill --format: how the distilled images are written (encode_image)


def prepare_out_dir(out: str | os.PathLike, overwrite: bool, resume: bool, create: bool = True) -> None:
    """Check, then (with `create`) make `out`. Nothing is ever deleted here: replacing an earlier output
    (`overwrite`) is done by rded_fast.outputs.claim_output, which moves it aside before the run; a
    non-empty folder is accepted only with `resume` (finished classes are skipped)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder; choose another path")
    if out.is_dir() and any(out.iterdir()) and not resume:
        hint = "" if overwrite else "pass --overwrite, --resume, or another path"
        raise UserError(f"--out {out}: folder exists and is not empty; {hint or 'it changed while this run started; run again'}")
    if create:
        out.mkdir(parents=True, exist_ok=True)


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """[3, H, W] uint8 of an image we wrote."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


def encode_image(image: torch.Tensor, fmt: str, jpeg_quality: int = 90) -> bytes:
    """[3, H, W] uint8 -> PNG (rded_fast.png: lossless, fast) or JPEG bytes (deterministic for the same pixels)."""
    arr = image.detach().cpu().permute(1, 2, 0).numpy()
    if fmt == "png":
        return encode_png(arr)
    if fmt != "jpg":
        raise UserError(f"--format {fmt}: choose {' or '.join(IMAGE_FORMATS)}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(jpeg_quality))
    return buf.getvalue()


def image_name(label: int, j: int, fmt: str) -> str:
    return f"class{label:05d}_id{j:05d}.{fmt}"


def encode_class_images(images: torch.Tensor, fmt: str, jpeg_quality: int) -> list[bytes]:
    """[ipc, 3, S, S] uint8 -> one encoded file per image (PIL's encoders release the GIL)."""
    return [encode_image(image, fmt, jpeg_quality) for image in images]


def write_classes_files(out: Path, classes: list[tuple[str, int, list[bytes]]], fmt: str) -> None:
    """Write several classes' encoded images ((class_name, label, payloads) each) with one durability pass."""
    atomic_write_many(
        [
            (out / class_name / image_name(label, j, fmt), data)
            for class_name, label, payloads in classes
            for j, data in enumerate(payloads)
        ]
    )


def contact_sheet(rows: list[tuple[str, torch.Tensor]], thumb: int | None = None) -> Image.Image:
    """A grid for people: one row per class (name, [ipc, 3, S, S] uint8), first 20 classes."""
    rows = rows[:CONTACT_SHEET_CLASSES]
    ipc = max(len(images) for _, images in rows)
    size = rows[0][1].shape[-1]
    thumb = thumb or int(min(128, max(64, size)))
    label_w, pad = 110, 2
    sheet = Image.new("RGB", (label_w + ipc * (thumb + pad), len(rows) * (thumb + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(rows):
        y = r * (thumb + pad)
        draw.text((4, y + thumb // 2 - 6), name[:16], fill="black")
        for j, image in enumerate(images):
            tile = Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).resize((thumb, thumb), Image.NEAREST)
            sheet.paste(tile, (label_w + j * (thumb + pad), y))
    return sheet


def write_contact_sheet(path: Path, rows: list[tuple[str, torch.Tensor]]) -> None:
    buf = io.BytesIO()
    contact_sheet(rows).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
