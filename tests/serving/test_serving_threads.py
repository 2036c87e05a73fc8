"""``--threads`` / ``RETRIEVAL_THREADS``: one setting caps torch, FAISS and ONNX Runtime threads on every command."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from retrieval.cli.main import app
from retrieval.threads import THREADS_ENV, compute_threads

COMPUTING_COMMANDS = [
    ["quickstart"],
    ["train"],
    ["distill"],
    ["search"],
    ["export"],
    ["serve"],
    ["data", "synth"],
    ["index", "build"],
    ["index", "merge"],
    ["index", "add"],
    ["index", "calibrate"],
    ["evaluate", "recall"],
    ["evaluate", "dyml"],
    ["evaluate", "revisited"],
]


@pytest.mark.parametrize("command", COMPUTING_COMMANDS, ids=" ".join)
def test_every_computing_command_takes_threads(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "--threads" in result.output
    assert THREADS_ENV in result.output


def _run(script: str, env: dict[str, str] | None = None) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in {THREADS_ENV, "OMP_NUM_THREADS", "MKL_NUM_THREADS"}}
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout.strip()


def test_threads_option_caps_libraries_already_imported_and_those_imported_later() -> None:
    out = _run(
        """
        import typer, torch, faiss
        from typer.testing import CliRunner
        from retrieval.cli.common import computes

        torch.set_num_threads(2)
        faiss.omp_set_num_threads(2)
        app = typer.Typer()

        def work() -> None:
            import os
            print(torch.get_num_threads(), faiss.omp_get_max_threads(), os.environ["OMP_NUM_THREADS"])

        app.command()(computes(work))
        result = CliRunner().invoke(app, ["--threads", "1"])
        print(result.output.strip(), result.exit_code)
        """
    )
    assert out == "1 1 1 0"


def test_environment_setting_reaches_onnx_runtime_sessions(serving_onnx) -> None:
    script = f"""
        from serving.runtimes.onnx_runtime import OnnxRuntimeQueryEncoder
        encoder = OnnxRuntimeQueryEncoder({str(serving_onnx)!r})
        print(encoder.session.get_session_options().intra_op_num_threads)
        """
    assert _run(script, {THREADS_ENV: "1"}) == "1"
    assert _run(script) == "0"  # ONNX Runtime's own default: all cores


def test_bad_environment_value_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(THREADS_ENV, "lots")
    with pytest.raises(ValueError, match=THREADS_ENV):
        compute_threads()
    monkeypatch.setenv(THREADS_ENV, "3")
    assert compute_threads() == 3
    result = CliRunner().invoke(app, ["data", "synth", "--out", "x", "--threads", "0"])
    assert result.exit_code == 2
    assert "--threads" in result.output
