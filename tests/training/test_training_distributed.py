"""Training under torchrun: two CPU processes (gloo) take the update one process takes on the whole batch.

Every distributed run here is a real ``torchrun`` launch (``python -m torch.distributed.run``, 2 processes, gloo)
of the real command or of the real ``Trainer``; the reference is one process on the same recipe. The encoders
are tiny ResNets with BatchNorm in training mode, synchronised across the ranks (``AllReduceBatchNorm``).

Why ``optim.eps: 1.0`` in these recipes: AdamW divides every gradient element by its own running RMS, so an
element whose gradient is rounding noise (GeM's ``p`` gets ~1e-7 on the first step here) takes a full ``lr``-sized
step in the noise's sign. Two half-batch sums and one whole-batch sum round differently, so with the default eps
the comparison would be decided by noise; with eps = 1 the update is Lipschitz in the gradient and the weights
measure how well the gradients agree. (The first step's loss must agree exactly either way.)
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tiny_synthetic import TINY_DATA

from retrieval.config import ConfigError
from training import distributed
from training.checkpoints import TRAIN_STATE_FILE
from training.config import load_recipe_config
from training.data_factory import build_datasets
from training.metrics_log import read_metrics
from training.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
#: Runs of the slow test: a DM² cohort, an AML student, and Metrix mixing images / feature maps across ranks.
OBJECTIVES = ("mutual", "distillation", "mixup-input", "mixup-feature")
#: Largest |weight difference| accepted between 2 processes and 1 (measured: ~2.4e-7 on the metric recipe).
TOLERANCE = 1e-5

# Runs several training jobs in one torchrun launch (imports are most of a launch's cost): each job is a recipe,
# an output directory and an optional stop step.
_JOBS_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from training.config import load_recipe_config
    from training.data_factory import build_datasets
    from training.trainer import Trainer

    for job in json.loads(sys.argv[1]):
        cfg = load_recipe_config(job["recipe"])
        train, val = build_datasets(cfg.data)
        Trainer(cfg, train, val, out_dir=job["out"], progress=False).fit(stop_at_step=job["stop_at_step"])
    """
)


def _recipe(path: Path, **sections) -> Path:
    recipe = {
        "name": "tiny-ddp",
        "data": {"source": "synthetic", "synthetic": TINY_DATA.model_dump(), "num_workers": 0},
        "model": {"backbone": "resnet10t", "embedding_dim": 32, "preprocess": {"input_size": 32}},
        "sampler": {"classes_per_batch": 8, "images_per_class": 4},  # 32 images: 16 per process
        "loss": {"name": "multiscale_proxy_anchor"},  # proxies: gradients averaged, the encoder's summed
        "optim": {"lr": 0.02, "eps": 1.0},
        "schedule": {"max_steps": STEPS, "warmup_steps": 1},
        "log_every": 1,
        "eval_every": 0,
        "checkpoint_every": 0,
        "device": "cpu",
        "seed": 7,
        **sections,
    }
    path.write_text(yaml.safe_dump(recipe))
    return path


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node 2`` on this machine's loopback, one thread per process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1"]
    command += ["--master-port", str(_free_port()), *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def _one_process(recipe: Path, out: Path, **fit) -> Trainer:
    cfg = load_recipe_config(recipe)
    train, val = build_datasets(cfg.data)
    trainer = Trainer(cfg, train, val, out_dir=out, progress=False)
    trainer.fit(**fit)
    return trainer


def _max_difference(a: Path, b: Path, name: str = "encoder") -> float:
    first, second = load_file(a / name / "model.safetensors"), load_file(b / name / "model.safetensors")
    assert first.keys() == second.keys()
    return max(float((first[key].double() - second[key].double()).abs().max()) for key in first)


def _train_losses(run: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["event"] == "train"]


@pytest.fixture(scope="module")
def recipes(tmp_path_factory, make_checkpoint) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    teacher = make_checkpoint(11)
    return {
        "metric": _recipe(root / "metric.yaml"),
        "mutual": _recipe(
            root / "mutual.yaml",
            objective="mutual",
            # every triplet rather than the recipe's distance-weighted draws: those are drawn from a distribution
            # of the distances, so rounding-level differences can flip a draw (seen: the step-4 loss moved 1e-3)
            loss={"name": "multiscale_triplet", "params": {"margin": 0.2}},
            mutual={"size": 2, "weight": 5.0, "warmup_epochs": 0, "temporal_diversity": True, "view_diversity": True},
        ),
        "distillation": _recipe(
            root / "distill.yaml",
            objective="distillation",
            loss={"name": "aml_triplet"},
            distill={"teacher": str(teacher), "num_negatives": 3},
        ),
        **{
            f"mixup-{kind}": _recipe(root / f"mixup-{kind}.yaml", mixup={"kind": kind, "alpha": 2.0, "weight": 0.4})
            for kind in ("input", "feature")
        },
    }


@pytest.fixture(scope="module")
def reference(recipes, tmp_path_factory, one_torch_thread):
    """``reference(name)``: the recipe trained straight through by one process (once per module).

    One torch thread, as each torchrun process has: a single process's own result moves by ~1e-4 on the DM²
    recipe between one thread and two (reductions split differently), which would swamp the comparison.
    """
    root = tmp_path_factory.mktemp("one-process")
    runs: dict[str, Path] = {}

    def run(name: str) -> Path:
        if name not in runs:
            _one_process(recipes[name], root / name)
            runs[name] = root / name
        return runs[name]

    return run


def _launch_jobs(root: Path, jobs: list[dict]) -> dict[str, Path]:
    """Several ``Trainer`` runs in one torchrun launch; ``{output directory name: path}``."""
    script = root / "jobs.py"
    script.write_text(_JOBS_SCRIPT)
    _torchrun(str(script), json.dumps(jobs), cwd=root)
    return {Path(job["out"]).name: Path(job["out"]) for job in jobs}


@pytest.fixture(scope="module")
def half_run(recipes, tmp_path_factory) -> Path:
    """The metric recipe trained by two processes and stopped halfway (a pre-empted job's checkpoint)."""
    root = tmp_path_factory.mktemp("two-processes-half")
    job = {"recipe": str(recipes["metric"]), "out": str(root / "metric-half"), "stop_at_step": STEPS // 2}
    return _launch_jobs(root, [job])["metric-half"]


@pytest.fixture(scope="module")
def objective_runs(recipes, tmp_path_factory) -> dict[str, Path]:
    """Each of :data:`OBJECTIVES` trained through by two processes (one launch)."""
    root = tmp_path_factory.mktemp("two-processes")
    jobs = [{"recipe": str(recipes[name]), "out": str(root / name), "stop_at_step": None} for name in OBJECTIVES]
    return _launch_jobs(root, jobs)


def test_the_train_command_under_torchrun_takes_one_process_updates(recipes, reference, tmp_path):
    done = _torchrun("-m", "retrieval.cli.main", "train", "--config", str(recipes["metric"]), "--out", "run", "--json",
                     cwd=tmp_path)  # fmt: skip
    run = tmp_path / "run"

    summary = json.loads(done.stdout)  # rank 0 alone prints: one JSON document
    assert summary["steps"] == STEPS and summary["stopped"] == "completed"
    # rank 0 alone writes the log: one line per step, not two
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["event"] == "train"] == list(range(1, 5))
    one = reference("metric")
    assert _train_losses(run)[0] == pytest.approx(_train_losses(one)[0], rel=1e-6, abs=0)  # same batch, same loss

    difference = _max_difference(run, one)
    assert difference < TOLERANCE, difference
    moved = _max_difference(one, _initial_encoder(recipes["metric"], tmp_path / "init"))
    assert moved > 1000 * TOLERANCE, moved  # the weights did move: the agreement is not that of untouched weights

    proxies_two = torch.load(run / "checkpoints/last" / TRAIN_STATE_FILE, weights_only=True)["loss"]
    proxies_one = torch.load(one / "checkpoints/last" / TRAIN_STATE_FILE, weights_only=True)["loss"]
    for key, value in proxies_one.items():
        assert float((proxies_two[key] - value).abs().max()) < TOLERANCE, key


def _initial_encoder(recipe: Path, out: Path) -> Path:
    """The recipe's encoder before any step (a run stopped at step 0 saves it)."""
    _one_process(recipe, out, stop_at_step=0)
    return out


def test_a_two_process_checkpoint_resumes_on_one_process(recipes, reference, half_run):
    half = half_run
    state = torch.load(half / "checkpoints/last" / TRAIN_STATE_FILE, weights_only=True)
    assert state["step"] == STEPS // 2

    _one_process(recipes["metric"], half)  # the same directory: resumes at step 2 on one process

    assert [r["step"] for r in read_metrics(half / "metrics.jsonl") if r["event"] == "train"] == list(range(1, 5))
    difference = _max_difference(half, reference("metric"))
    assert difference < TOLERANCE, difference


@pytest.mark.slow  # one more torchrun launch of four runs
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_cohorts_and_students_take_one_process_updates(objective, reference, objective_runs):
    run, one = objective_runs[objective], reference(objective)
    assert _train_losses(run)[0] == pytest.approx(_train_losses(one)[0], rel=1e-6, abs=0)
    difference = _max_difference(run, one)
    assert difference < TOLERANCE, difference
    if objective == "mutual":  # each cohort member too (the second one steps only on some steps)
        for member in ("members/0", "members/1"):
            assert _max_difference(run, one, member) < TOLERANCE


def test_a_batch_the_processes_cannot_share_is_refused():
    with pytest.raises(ConfigError, match="divisible by 3"):
        distributed.check_batch_divisible(32, 3)
    distributed.check_batch_divisible(32, 2)
    assert list(distributed.shard_keys([[1, 2, 3, 4], [5, 6, 7, 8]], 1, 2)) == [[3, 4], [7, 8]]


def test_a_partial_torchrun_environment_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match="WORLD_SIZE"):
        distributed.setup(torch.device("cpu"))


def test_one_process_initialises_nothing(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    world, device = distributed.setup(torch.device("cpu"))
    assert not world.distributed and world.is_main and device == torch.device("cpu")
    assert not torch.distributed.is_initialized()
    embeddings = torch.randn(4, 3, requires_grad=True)
    assert distributed.gather_embeddings(embeddings) is embeddings
