"""A bad JPEG in a DALI batch is found from DALI's own error (it names the sample), not by trying rows alone."""

from __future__ import annotations

from rded_fast.formats import FOLDER, Source
from rded_fast.formats.folder import build_index
from rded_fast.loaders.dali_loader import DaliCropLoader, failing_sample
from rded_fast.loaders.jpeg_gate import JpegGate
from rded_fast.plan import make_plan
from tests.conftest import write_synthetic_jpegs


def test_failing_sample_reads_dalis_message():
    message = "Critical error in pipeline:\nError in CPU operator `decoders.image`\nFailed to decode sample #3 : \n"
    assert failing_sample(message) == 3
    assert failing_sample("something else went wrong") is None


def test_bad_jpeg_is_named_without_probing_the_batch(tmp_path, monkeypatch):
    root = write_synthetic_jpegs(tmp_path / "tree", classes=2, per_class=6)
    good = (root / "class_00" / "img_000.jpg").read_bytes()
    (root / "class_00" / "img_002.jpg").write_bytes(good[: len(good) // 3])  # truncated, mid-batch
    index = build_index(root, show_progress=False)
    plan = make_plan(index, 0, 6, 2)
    probed = []
    monkeypatch.setattr(DaliCropLoader, "_failing", lambda self, rows, reader: probed.append(rows) or {})
    monkeypatch.setattr(JpegGate, "verdicts", lambda self, rows: {})  # the structure check misses it: DALI sees it
    monkeypatch.setattr(JpegGate, "known", lambda self: {})
    loader = DaliCropLoader(Source(FOLDER, index), plan, 16, batch_size=12, workers=2, device="cpu")
    batches = list(loader)
    ok = [bool(v) for b in batches for v in b.ok]
    assert len(ok) == len(plan) and ok.count(False) == 1
    reasons = {row: why for batch in batches for row, why in batch.reasons.items()}
    assert [index.paths[int(plan.image_ids[r])] for r in reasons] == ["class_00/img_002.jpg"]
    assert probed == [], "the failing row should come from DALI's message"
    reason = next(iter(reasons.values()))
    assert "truncated" in reason.lower() or "DALI" in reason
