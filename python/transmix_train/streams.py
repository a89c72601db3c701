"""Streams (``hfids/``, ``wds/``, ``tfds/``) as the trainer reads them: unreadable samples counted or named.

timm's WebDataset reader skips a sample it cannot decode with a warning ("Handling webdataset
error ... Ignoring.") in whichever worker met it; nothing adds them up, and the warning names no
sample. A Hugging Face stream raises from inside its decoder instead, and the error names no row.
:class:`SourceStream` wraps timm's ``IterableImageDataset`` so that a skip is counted (a counter
shared with the worker processes; the trainer says each epoch's count in its log) and an error
becomes a :class:`~transmix_train.data.SampleError` naming the source, the worker and the
sample's position in that worker's part of the stream (a stream has no file name to give).
"""

from __future__ import annotations

import logging
import multiprocessing
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

from torch.utils.data import get_worker_info, IterableDataset

from .data import apply_transforms, SampleError

__all__ = ["SourceStream"]

# timm's readers that skip a sample with a warning, and how the warning starts.
_SKIP_WARNINGS = {"timm.data.readers.reader_wds": "Handling webdataset error"}


class _SkipCounter(logging.Filter):
    def __init__(self, counter) -> None:
        super().__init__()
        self.counter = counter

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith(_SKIP_WARNINGS.get(record.name, "\0")):
            with self.counter.get_lock():
                self.counter.value += 1
        return True  # the warning is still logged


@contextmanager
def _counting_skips(counter):
    loggers = [logging.getLogger(name) for name in _SKIP_WARNINGS]
    counting = _SkipCounter(counter)
    for logger in loggers:
        logger.addFilter(counting)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(counting)


class SourceStream(IterableDataset):
    """timm's ``IterableImageDataset`` (``dataset``) with its samples' failures counted or named.

    Yields ``(transform(image), target_transform(label))``; ``transform`` is set by the loader.
    ``take_skipped()`` returns the samples skipped since its last call, over all workers.
    """

    def __init__(self, dataset: IterableDataset, source: str) -> None:
        self.dataset, self.source = dataset, source
        self.transform: Optional[Callable] = None
        self.target_transform: Optional[Callable] = None
        # Shared with the worker processes (created before they start): they add, the main process reads.
        self._skipped = multiprocessing.Value("i", 0)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)

    def set_loader_cfg(self, num_workers: Optional[int] = None) -> None:
        self.dataset.set_loader_cfg(num_workers=num_workers)

    def take_skipped(self) -> int:
        with self._skipped.get_lock():
            count, self._skipped.value = self._skipped.value, 0
        return count

    def _read(self) -> Iterator[tuple[Any, Any]]:
        samples = iter(self.dataset.reader)
        position = 0
        while True:
            try:
                image, label = next(samples)
            except StopIteration:
                return
            except Exception as error:  # noqa: BLE001 (PIL and the readers raise OSError, ValueError ...)
                worker = get_worker_info()
                where = f"worker {worker.id} of {worker.num_workers}" if worker else "the main process"
                raise SampleError(f"cannot read sample {position} of {self.source} as read by {where} "
                                  f"(a stream names no file): {type(error).__name__}: {error}") from error
            position += 1
            yield image, label

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        with _counting_skips(self._skipped):
            for image, label in self._read():
                yield apply_transforms(self, image, label)
