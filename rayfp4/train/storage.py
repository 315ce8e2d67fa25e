"""Where a run's checkpoints live, and reading them back from there.

Ray Train writes each checkpoint to ``<storage_path>/<name>/checkpoint_NNNNNNNN`` and its own record
of them (``checkpoint_manager_snapshot.json``) beside them (``ray.train.RunConfig(storage_path,
name)``). With ``checkpoint.storage`` unset, ``storage_path`` is ``<output_dir>/<run>`` and ``name``
the variant's folder, so the checkpoints sit in the run directory beside the ledger and metrics.
With ``checkpoint.storage: S`` they go to ``S/<run>/<variant>``; ``S`` is a directory (on several
nodes, one that every node mounts at the same path) or a pyarrow filesystem URI (``file:///...``,
``s3://bucket/prefix``, ``gs://...``, ``hdfs://...``), handed to Ray Train as it is.

Besides Ray Train, two readers look there: the driver, for the snapshot that says a run exists
(:func:`rayfp4.train.launch._check_resume`), and the workers, for the checkpoints Ray Train did not
record or that do not load (:func:`open_checkpoint`). Both go through :class:`CheckpointStorage`,
so neither assumes the checkpoints are files on the local disk.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .checkpoint import load_state, step_of
from .errors import CheckpointError

#: Ray Train's record of a run's registered checkpoints, in the run's checkpoint storage.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def is_uri(location: str) -> bool:
    return "://" in location


def resolve_storage(storage: str | None, base: Path | None = None) -> str | None:
    """``checkpoint.storage`` as the driver hands it on: a path made absolute against the driver's
    working directory (a worker's is another), ``~`` expanded; a URI as it is."""
    if storage is None or is_uri(storage):
        return storage
    return str(((base or Path.cwd()) / Path(storage).expanduser()).resolve())


def join(location: str, *parts: str) -> str:
    """``location/part/...`` for a path or a URI (a query string such as ``?region=...`` stays last)."""
    if not is_uri(location):
        return str(Path(location, *parts))
    u = urlsplit(location)
    return urlunsplit(u._replace(path=u.path.rstrip("/") + "".join("/" + p for p in parts)))


@dataclass(frozen=True)
class CheckpointStorage:
    """The location of one variant's checkpoints: Ray Train's ``storage_path`` and run ``name``.

    ``filesystem``: a pyarrow filesystem to read through instead of the one the path resolves to
    (as ``ray.train.RunConfig(storage_filesystem=...)``; ``storage_path`` is then a path on it).
    """

    storage_path: str
    name: str
    filesystem: Any = field(default=None, compare=False, repr=False)

    @classmethod
    def for_run(cls, storage: str | None, run_dir: Path) -> "CheckpointStorage":
        """Where the variant in ``run_dir`` (``<output_dir>/<run>/<variant>``) keeps its checkpoints."""
        run_dir = Path(run_dir)
        if storage is None:
            return cls(str(run_dir.parent), run_dir.name)
        return cls(join(resolve_storage(storage), run_dir.parent.name), run_dir.name)

    def to_dict(self) -> dict:
        return {"storage_path": self.storage_path, "name": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointStorage":
        return cls(data["storage_path"], data["name"])

    @property
    def location(self) -> str:
        """The folder (or URI) holding the checkpoints, for messages."""
        return join(self.storage_path, self.name)

    @cached_property
    def _fs(self) -> tuple[Any, str]:
        import pyarrow.fs

        if self.filesystem is not None:
            fs, root = self.filesystem, self.storage_path
        else:
            fs, root = pyarrow.fs.FileSystem.from_uri(self.storage_path)
        return fs, str(PurePosixPath(root, self.name))

    @property
    def is_local(self) -> bool:
        """The checkpoints are files on this machine's filesystem (a local disk or a mounted share)."""
        import pyarrow.fs

        return isinstance(self._fs[0], pyarrow.fs.LocalFileSystem)

    def exists(self, relative: str) -> bool:
        import pyarrow.fs

        fs, root = self._fs
        return fs.get_file_info(f"{root}/{relative}").type != pyarrow.fs.FileType.NotFound

    def checkpoints(self) -> list[str]:
        """The names of the ``checkpoint_*`` folders, oldest first."""
        import pyarrow.fs

        fs, root = self._fs
        infos = fs.get_file_info(pyarrow.fs.FileSelector(root, allow_not_found=True))
        names = [i.base_name for i in infos
                 if i.type == pyarrow.fs.FileType.Directory and i.base_name.startswith("checkpoint_")]
        return sorted((n for n in names if step_of(Path(n)) >= 0), key=lambda n: step_of(Path(n)))

    @contextlib.contextmanager
    def local_dir(self, name: str, scratch: Path) -> Iterator[Path]:
        """Checkpoint ``name`` as a local directory while the context is open: the folder itself on
        a local filesystem, else a copy downloaded into ``scratch/<name>`` and removed afterwards
        (``scratch`` lies in the run directory, so nothing is left in /tmp when a worker is killed:
        the driver empties the staging area)."""
        import pyarrow.fs

        fs, root = self._fs
        if isinstance(fs, pyarrow.fs.LocalFileSystem):
            yield Path(root, name)
            return
        dest = Path(scratch) / name
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        try:
            try:
                pyarrow.fs.copy_files(f"{root}/{name}", str(dest), source_filesystem=fs,
                                      destination_filesystem=pyarrow.fs.LocalFileSystem(),
                                      chunk_size=64 << 20)
            except (OSError, ValueError) as e:  # pyarrow raises OSError subclasses for missing or unreadable files
                raise CheckpointError(f"{self.location}/{name}: cannot download ({type(e).__name__}: "
                                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
            yield dest
        finally:
            shutil.rmtree(dest, ignore_errors=True)


@contextlib.contextmanager
def open_checkpoint(storage: CheckpointStorage, newest: str, scratch: Path, warn=None) -> Iterator[tuple[dict, Path]]:
    """``(state, directory)`` of checkpoint ``newest`` or, when it does not load, of the newest older
    one in ``storage`` that does; ``warn(message)`` is told about each one skipped. The directory
    stays while the context is open (sharded model state is read from it). CheckpointError when
    none loads: starting over silently would lose the run."""
    older = [n for n in reversed(storage.checkpoints()) if step_of(Path(n)) < step_of(Path(newest))]
    problems = []
    for name in [newest, *older]:
        with contextlib.ExitStack() as stack:
            try:
                d = stack.enter_context(storage.local_dir(name, scratch))
                state = load_state(d)
            except CheckpointError as e:  # damaged, or (remote storage) not downloadable
                problems.append(str(e))
                if warn is not None:
                    warn(f"checkpoint {name} does not load: {e}; trying an older one")
                continue
            yield state, d
            return
    raise CheckpointError("no checkpoint of the run loads: " + "; ".join(problems))
