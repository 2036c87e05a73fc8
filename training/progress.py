"""A training progress bar on stderr (rich), showing steps, loss and throughput; a no-op when disabled."""

from __future__ import annotations

from types import TracebackType

__all__ = ["TrainProgress"]


class TrainProgress:
    """Context manager around a rich progress bar.

    Args:
        total: the run's last step.
        start: the step the bar starts at (a resumed run starts part-way).
        enabled: ``False`` draws nothing (tests, logs redirected to files).
    """

    def __init__(self, total: int, start: int = 0, enabled: bool = True) -> None:
        self.total = total
        self.start = start
        self.enabled = enabled
        self._progress = None
        self._task = None

    def __enter__(self) -> TrainProgress:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                console=Console(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=self.total, completed=self.start, status="")
        return self

    def set_total(self, total: int) -> None:
        """Change the last step (a schedule fitted to a time budget), so the bar and its ETA show the real end."""
        self.total = total
        if self._progress is not None:
            self._progress.update(self._task, total=total)

    def update(self, step: int, loss: float | None = None, images_per_second: float | None = None) -> None:
        if self._progress is None:
            return
        fields = {}
        if loss is not None and images_per_second is not None:
            fields["status"] = f"loss {loss:.4f}  {images_per_second:.0f} img/s"
        self._progress.update(self._task, completed=step, **fields)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
