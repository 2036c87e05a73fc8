"""SIGKILL at random moments of `index add`, `index calibrate` and `train`, then run to the end.

Each command runs as a real process and is killed (``SIGKILL``: no handler, no cleanup) after a seeded
random delay drawn over its whole run, start-up and the final directory swap included; then the same
command is run again until it completes. After every kill an index must be at the path, open and pass
``verify_index_dir`` (checksums included), holding either the old or the new version; at the end the
result must equal an uninterrupted run: the same index file and rows (add), the same thresholds
(calibrate), bit-identical weights (train). The default run kills each command twice; ``-m slow`` kills
it 20 times (bounded: a few minutes on 2 cores).
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexing import open_index_dir
from indexing.verify import verify_index_dir

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
CLI = [sys.executable, "-m", "retrieval.cli.main"]
TRAIN_SETTINGS = [
    "--set", "schedule.max_steps=16",
    "--set", "eval_every=100",
    "--set", "checkpoint_every=2",
    "--set", "data.synthetic.image_size=32",
    "--set", "model.preprocess.input_size=32",
    "--set", "data.synthetic.train_per_class=4",
    "--set", "data.synthetic.val_per_class=1",
    "--set", "data.synthetic.test_per_class=1",
]  # fmt: skip


def _gallery(root: Path, count: int, seed: int) -> Path:
    """``count`` seeded PNGs in two colour families, with ``fine``/``middle`` labels, and their CSV."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        fine = i % 4
        base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200], [200, 200, 40]][fine])
        pixels = np.clip(base + rng.normal(0, 25, (36, 36, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{seed}_{i}.png")
        rows.append({"path": f"{seed}_{i}.png", "fine": f"c{fine}", "middle": f"m{fine // 2}"})
    with open(root / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "fine", "middle"])
        writer.writeheader()
        writer.writerows(rows)
    return root / "labels.csv"


@pytest.fixture(scope="module")
def base_index(tiny_checkpoint, tmp_path_factory) -> Path:
    from indexing.builder import build_index
    from retrieval.data.gallery import open_gallery

    csv_path = _gallery(tmp_path_factory.mktemp("crash_gallery"), 24, seed=1)
    out = tmp_path_factory.mktemp("crash_base") / "index"
    build_index(tiny_checkpoint, open_gallery(csv_path), out, batch_size=4, progress=False)
    return out


@pytest.fixture(scope="module")
def extra_images(tmp_path_factory) -> Path:
    return _gallery(tmp_path_factory.mktemp("crash_extra"), 40, seed=2)


def _run_to_end(command: list[str]) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _kill_at_random_moments(command: list[str], kills: int, span_s: float, seed: int, check, published=None) -> int:
    """Start ``command`` up to ``kills`` times, SIGKILL each after a random delay in [0, span_s), then ``check()``.

    ``published()`` says whether the command's effect is already in place: a command that is not idempotent
    (``index add``) is then not started again, as an operator would not. Returns how many runs were really killed
    (a run that finished before its delay is not counted).
    """
    rng = random.Random(seed)
    killed = 0
    for attempt in range(kills):
        if published is not None and published():
            break
        process = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # the first delay stays well inside the run (a run can be quicker than the timed one on a busy machine),
        # so at least one kill lands; the others range over the whole run, the final swap included
        deadline = time.monotonic() + rng.uniform(0.0, span_s * (0.6 if attempt == 0 else 1.0))
        while process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            killed += 1
        process.wait(timeout=60)
        check()
    return killed


def _timed(command: list[str]) -> float:
    start = time.monotonic()
    _run_to_end(command)
    return time.monotonic() - start


def _index_check(path: Path, counts: set[int]):
    def check() -> None:
        with open_index_dir(path) as directory:
            assert len(directory) in counts
        report = verify_index_dir(path, record=False)  # raises IndexFormatError on any corrupt or mismatched file
        assert report.checksums == "verified" and report.vectors_checked == report.count

    return check


@pytest.mark.parametrize("kills", [pytest.param(2, id="2-kills"), pytest.param(20, marks=pytest.mark.slow, id="20")])
def test_index_add_killed_at_random_moments(base_index, extra_images, tmp_path, kills):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    shutil.copytree(base_index, reference)
    shutil.copytree(base_index, crashed)
    args = ["--images", str(extra_images), "--batch-size", "4", "--chunk-size", "8"]
    span = _timed([*CLI, "index", "add", str(reference), *args])
    before = len(open_index_dir(base_index))
    check = _index_check(crashed, {before, before + 40})

    def published() -> bool:
        with open_index_dir(crashed) as directory:
            return len(directory) == before + 40

    command = [*CLI, "index", "add", str(crashed), *args]
    killed = _kill_at_random_moments(command, kills, span, seed=kills, check=check, published=published)
    assert killed >= 1
    if not published():  # the last kill came before the swap: the operator runs the add once more
        _run_to_end(command)
    with open_index_dir(crashed) as got, open_index_dir(reference) as want:
        assert len(got) == len(want) == before + 40
        assert got.manifest.index_sha256 == want.manifest.index_sha256
    assert (crashed / "index.faiss").read_bytes() == (reference / "index.faiss").read_bytes()


@pytest.mark.parametrize("kills", [pytest.param(2, id="2-kills"), pytest.param(20, marks=pytest.mark.slow, id="20")])
def test_index_calibrate_killed_at_random_moments(base_index, extra_images, tmp_path, kills):
    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    shutil.copytree(base_index, reference)
    shutil.copytree(base_index, crashed)
    args = ["--labels", str(extra_images), "--batch-size", "4"]
    span = _timed([*CLI, "index", "calibrate", str(reference), *args])
    count = len(open_index_dir(base_index))
    killed = _kill_at_random_moments(
        [*CLI, "index", "calibrate", str(crashed), *args],
        kills,
        span,
        seed=100 + kills,
        check=_index_check(crashed, {count}),
    )
    assert killed >= 1
    _run_to_end([*CLI, "index", "calibrate", str(crashed), *args])
    with open_index_dir(crashed) as got, open_index_dir(reference) as want:
        assert got.manifest.thresholds == want.manifest.thresholds and got.manifest.thresholds


@pytest.mark.parametrize("kills", [pytest.param(2, id="2-kills"), pytest.param(20, marks=pytest.mark.slow, id="20")])
def test_training_killed_at_random_moments_resumes_to_identical_weights(tmp_path, kills):
    def command(out: Path) -> list[str]:
        return [*CLI, "train", "--config", "quickstart", "--set", f"out_dir={out}", *TRAIN_SETTINGS, "--json"]

    reference, crashed = tmp_path / "reference", tmp_path / "crashed"
    span = _timed(command(reference))

    def check() -> None:  # whatever the kill left must not stop the next run from resuming (checked below)
        assert not (crashed / "encoder").exists() or (crashed / "encoder" / "model.safetensors").is_file()

    killed = _kill_at_random_moments(command(crashed), kills, span, seed=200 + kills, check=check)
    assert killed >= 1
    result = json.loads(_run_to_end(command(crashed)).stdout)
    expected = json.loads((reference / "encoder" / "config.json").read_text())["encoder_id"]
    assert result["encoder_id"] == expected
    assert (crashed / "encoder" / "model.safetensors").read_bytes() == (
        reference / "encoder" / "model.safetensors"
    ).read_bytes()
