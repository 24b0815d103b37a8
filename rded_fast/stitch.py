"""Stitch: pack ipc * factor^2 ranked crops into ipc images of factor x factor cells (RDED.md 1.7).

Cells are filled row-major; cell k of image j gets rank k * ipc + j. When input_size is not divisible
by factor, the first input_size % factor rows/columns of cells are one pixel larger and the crop is
resized to the cell with nearest-neighbour interpolation, as the reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cell_boxes(input_size: int, factor: int) -> list[tuple[int, int, int, int]]:
    """(top, left, height, width) of each cell, row-major."""
    base, extra = divmod(input_size, factor)
    sides = [base + 1 if i < extra else base for i in range(factor)]
    starts = [sum(sides[:i]) for i in range(factor)]
    return [(starts[r], starts[c], sides[r], sides[c]) for r in range(factor) for c in range(factor)]


def rank_of_cell(image: int, cell: int, ipc: int) -> int:
    """The RDED rank that lands in `cell` of output image `image`."""
    return cell * ipc + image


def stitch(cells: torch.Tensor, ipc: int, factor: int, input_size: int) -> torch.Tensor:
    """[ipc * factor^2, C, p, p] crops in rank order -> [ipc, C, input_size, input_size], same dtype."""
    n = ipc * factor * factor
    if cells.shape[0] != n:
        raise ValueError(f"stitch needs {n} cells, got {cells.shape[0]}")
    out = torch.zeros((ipc, cells.shape[1], input_size, input_size), dtype=cells.dtype, device=cells.device)
    for k, (top, left, h, w) in enumerate(cell_boxes(input_size, factor)):
        part = cells[rank_of_cell(0, k, ipc) : rank_of_cell(ipc, k, ipc)]
        if part.shape[-2:] != (h, w):
            part = F.interpolate(part.float(), size=(h, w), mode="nearest").to(cells.dtype)
        out[:, :, top : top + h, left : left + w] = part
    return out
