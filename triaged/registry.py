"""The model store: immutable model versions, their cards, and which version is live.

Layout on disk (``root`` is ``[models] store`` in config.toml)::

    <root>/<name>/<version>/weights.safetensors   the tensors, safetensors only (no pickle)
    <root>/<name>/<version>/card.json             what the weights are and how they were made
    <root>/<name>/<version>/ood.safetensors       optional: the out-of-distribution fit
    <root>/<name>/live.json                       the live version, earlier live versions, a log

Why it is shaped like this:

- A version is written to a hidden temporary folder, fsynced, then renamed into place; a
  reader therefore sees a complete version or none, and an existing version is never
  overwritten (the rename fails and :class:`VersionExistsError` is raised).
- ``live.json`` is replaced with ``os.replace`` of a fsynced temporary file, so a daemon that
  reads it concurrently sees the old pointer or the new one, never half of one. Promote and
  rollback are read-modify-write, so they hold an ``flock`` on ``<name>/.lock``.
- :meth:`ModelStore.live_token` is one ``stat`` call: a new ``live.json`` is a new inode, so a
  worker can poll it between studies and reload only when the live model changed.
- The card carries enough to rebuild the model from files alone (``architecture``), the
  preprocessing the model expects, the data and split, metrics, settings, seed and code
  version, and the sha256 of the weights, which :meth:`ModelVersion.state_dict` checks.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import triaged
from triaged.atomic import fsync_path, write_atomic
from triaged.pipeline.calibration import StudyDecision

WEIGHTS_FILE = "weights.safetensors"
CARD_FILE = "card.json"
LIVE_FILE = "live.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_AUTO_VERSION_RE = re.compile(r"^v(\d+)$")


class RegistryError(Exception):
    """A model-store problem worth one clear line to the user (unknown name, bad card...)."""


class VersionExistsError(RegistryError):
    """Raised instead of overwriting: versions are immutable."""


class ModelNotFoundError(RegistryError):
    """The requested model name or version is not in the store."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Model):
    """Enough to rebuild the torch module: a builder name known to ``triaged.nets`` + kwargs."""

    name: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class TrainingData(_Model):
    """Which data trained the model and how it was split (``counts``: split -> items)."""

    sources: list[str] = Field(min_length=1)
    split: str = Field(min_length=1)
    counts: dict[str, int] = Field(default_factory=dict)
    positive_class: str = "COVID"


class CodeVersion(_Model):
    triaged: str
    git_commit: str | None = None
    git_dirty: bool | None = None


class OodCard(_Model):
    """Where a version's out-of-distribution fit is (``triaged.pipeline.ood``) and its summary.

    The arrays (mean, precision) live in ``file`` next to the weights, checked by ``sha256``.
    """

    file: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    sha256: str = Field(min_length=64, max_length=64)
    feature: str = Field(min_length=1)
    dims: int = Field(ge=1)
    slices: int = Field(ge=1, description="training slices the fit saw")
    quantile: float = Field(gt=0.0, lt=1.0)
    threshold: float = Field(gt=0.0)
    max_share: float = Field(ge=0.0, lt=1.0)
    data: list[str] = Field(default_factory=list)


class ModelCard(_Model):
    """Everything about one model version except its tensors.

    ``metrics`` are on the validation split named in ``data`` unless a key says otherwise;
    ``weights_sha256`` is filled in by the store and checked on load. ``study_decision``
    (aggregation, calibration and operating points fitted on validation studies by
    ``triaged validate --fit``) is optional: cards written before it existed load without it.
    """

    architecture: Architecture
    data: TrainingData
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    preprocessing: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None
    code: CodeVersion = Field(default_factory=lambda: code_version())
    created: datetime = Field(default_factory=lambda: datetime.now(UTC))
    notes: str = ""
    weights_sha256: str | None = None
    # out-of-distribution fit (triaged.pipeline.ood); None: the version has none
    ood: OodCard | None = None
    # -- study decision (issue 12) --
    study_decision: StudyDecision | None = None


def code_version() -> CodeVersion:
    """The running triaged version and, when run from a git checkout, its commit."""
    repo = Path(triaged.__file__).resolve().parent.parent
    commit: str | None = None
    dirty: bool | None = None
    if (repo / ".git").exists():
        try:
            commit = (
                subprocess.run(
                    ["git", "-C", str(repo), "rev-parse", "HEAD"],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                ).stdout.strip()
                or None
            )
            status = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=5,
                check=True,
            ).stdout
            dirty = bool(status.strip())
        except (OSError, subprocess.SubprocessError):
            commit, dirty = None, None
    return CodeVersion(triaged=triaged.__version__, git_commit=commit, git_dirty=dirty)


@dataclass(frozen=True)
class ModelVersion:
    """One immutable version in the store."""

    name: str
    version: str
    path: Path
    card: ModelCard

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_FILE

    def card_files(self) -> dict[str, bytes]:
        """The version's further files that its card names (e.g. the out-of-distribution
        fit), to carry over when a new version is registered with the same weights."""
        named = [self.card.ood.file] if self.card.ood is not None else []
        return {name: (self.path / name).read_bytes() for name in named}

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE

    @property
    def ref(self) -> str:
        """``name:version``, the way logs, SRs and the CLI name a model."""
        return f"{self.name}:{self.version}"

    def state_dict(self, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Load the tensors, refusing weights whose hash differs from the card's."""
        if self.card.weights_sha256 is not None:
            actual = _sha256(self.weights_path)
            if actual != self.card.weights_sha256:
                raise RegistryError(
                    f"{self.ref}: weights.safetensors sha256 {actual[:12]} does not match "
                    f"the card ({self.card.weights_sha256[:12]}); the version was altered"
                )
        return load_file(str(self.weights_path), device=str(device))


class ModelStore:
    """The model store rooted at ``root`` (created on first write)."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    # ----------------------------------------------------------------- reading
    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name
            for p in self.root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and _NAME_RE.match(p.name)
        )

    def list(self, name: str | None = None) -> builtins.list[ModelVersion]:
        """Every version of ``name`` (or of every model), oldest first within a name."""
        names = [name] if name is not None else self.names()
        out: list[ModelVersion] = []
        for n in names:
            _check_name(n, "model name")
            folder = self.root / n
            if not folder.is_dir():
                if name is not None:
                    raise ModelNotFoundError(f"no model named {n!r} in {self.root}")
                continue
            versions = [
                p.name
                for p in folder.iterdir()
                if p.is_dir() and not p.name.startswith(".") and (p / CARD_FILE).is_file()
            ]
            out.extend(self.get(n, v) for v in sorted(versions, key=_version_key))
        return out

    def get(self, name: str, version: str) -> ModelVersion:
        _check_name(name, "model name")
        _check_name(version, "version")
        path = self.root / name / version
        card_path = path / CARD_FILE
        if not card_path.is_file():
            raise ModelNotFoundError(f"no version {version!r} of model {name!r} in {self.root}")
        try:
            card = ModelCard.model_validate_json(card_path.read_text(encoding="utf-8"))
        except ValidationError as exc:
            raise RegistryError(f"{name}:{version}: invalid card.json: {exc}") from exc
        return ModelVersion(name=name, version=version, path=path, card=card)

    def live(self, name: str) -> ModelVersion | None:
        state = self._read_live(name)
        if state is None:
            return None
        return self.get(name, state["version"])

    def resolve(self, ref: str) -> ModelVersion:
        """The version a reference names: ``name:version``; ``name`` or ``name:live`` is the
        live version. The one reading of a model reference, for the CLI, training and
        scoring; :class:`ModelNotFoundError` when there is no such (or no live) version.
        """
        name, _, version = ref.partition(":")
        if version in ("", "live"):
            mv = self.live(name)
            if mv is None:
                raise ModelNotFoundError(f"no live version of {name!r} in {self.root}")
            return mv
        return self.get(name, version)

    def live_token(self, name: str) -> str | None:
        """A cheap value that changes whenever the live version of ``name`` changes."""
        try:
            st = os.stat(self.root / name / LIVE_FILE)
        except FileNotFoundError:
            return None
        return f"{st.st_ino}:{st.st_mtime_ns}:{st.st_size}"

    def history(self, name: str) -> builtins.list[dict[str, Any]]:
        """The promote/rollback log of ``name``, oldest first."""
        state = self._read_live(name)
        return [] if state is None else list(state.get("log", []))

    # ----------------------------------------------------------------- writing
    def register(
        self,
        name: str,
        weights: Mapping[str, torch.Tensor] | Path | str,
        card: ModelCard,
        version: str | None = None,
        files: Mapping[str, bytes] | None = None,
    ) -> ModelVersion:
        """Store a new immutable version; ``version`` defaults to the next ``v<N>``.

        ``weights`` is a state dict or the path of an existing ``.safetensors`` file
        (pickled checkpoints are refused: loading them can run code). ``files``: further
        files of the version by name (e.g. the out-of-distribution fit), written with it.
        """
        _check_name(name, "model name")
        if version is not None:
            _check_name(version, "version")
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder))
        try:
            weights_tmp = tmp / WEIGHTS_FILE
            if isinstance(weights, (str, Path)):
                _copy_safetensors(Path(weights), weights_tmp)
            else:
                _save_state_dict(weights, weights_tmp)
            for fname, content in (files or {}).items():
                _check_name(fname, "file name")
                if fname in (WEIGHTS_FILE, CARD_FILE):
                    raise RegistryError(f"{fname} is reserved")
                (tmp / fname).write_bytes(content)
                fsync_path(tmp / fname)
            card = card.model_copy(update={"weights_sha256": _sha256(weights_tmp)})
            (tmp / CARD_FILE).write_text(card.model_dump_json(indent=2), encoding="utf-8")
            fsync_path(tmp / CARD_FILE)
            fsync_path(tmp)
            final = self._rename_into_place(tmp, folder, version)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_path(folder)
        return ModelVersion(name=name, version=final.name, path=final, card=card)

    def promote(self, name: str, version: str, reason: str = "") -> ModelVersion:
        """Make ``version`` live; the previous live version is kept for :meth:`rollback`."""
        target = self.get(name, version)
        with self._locked(name):
            state = self._read_live(name) or {"version": None, "previous": [], "log": []}
            if state["version"] == version:
                return target
            if state["version"] is not None:
                state["previous"].append(state["version"])
            state["version"] = version
            state["log"].append(_event("promote", version, reason))
            self._write_live(name, state)
        return target

    def rollback(self, name: str, reason: str = "") -> ModelVersion:
        """Make the previously live version live again and return it."""
        with self._locked(name):
            state = self._read_live(name)
            if state is None or not state["previous"]:
                raise RegistryError(f"model {name!r} has no earlier live version to roll back to")
            version = state["previous"].pop()
            target = self.get(name, version)
            state["version"] = version
            state["log"].append(_event("rollback", version, reason))
            self._write_live(name, state)
        return target

    # ----------------------------------------------------------------- internals
    def _rename_into_place(self, tmp: Path, folder: Path, version: str | None) -> Path:
        if version is not None:
            final = folder / version
            if final.exists():
                raise VersionExistsError(f"{name_ref(folder.name, version)} already exists")
            try:
                os.rename(tmp, final)
            except OSError as exc:  # lost a race with another writer of the same version
                raise VersionExistsError(
                    f"{name_ref(folder.name, version)} already exists"
                ) from exc
            return final
        for _ in range(1000):
            taken = [_version_key(p.name)[0] for p in folder.iterdir() if p.is_dir()]
            final = folder / f"v{max(taken, default=0) + 1}"
            with contextlib.suppress(OSError):  # a concurrent register took that number
                if not final.exists():
                    os.rename(tmp, final)
                    return final
        raise RegistryError(f"could not allocate a version number under {folder}")

    def _read_live(self, name: str) -> dict[str, Any] | None:
        _check_name(name, "model name")
        path = self.root / name / LIVE_FILE
        try:
            state: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise RegistryError(f"{path}: unreadable live pointer: {exc}") from exc
        return state

    def _write_live(self, name: str, state: dict[str, Any]) -> None:
        write_atomic(self.root / name / LIVE_FILE, json.dumps(state, indent=2), mode=0o600)

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        folder = self.root / name
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def name_ref(name: str, version: str) -> str:
    return f"{name}:{version}"


def _event(action: str, version: str, reason: str) -> dict[str, Any]:
    return {
        "action": action,
        "version": version,
        "at": datetime.now(UTC).isoformat(),
        "reason": reason,
    }


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise RegistryError(
            f"invalid {what} {value!r}: use letters, digits, '.', '_' or '-' (max 100)"
        )


def _version_key(version: str) -> tuple[int, str]:
    """Auto versions sort numerically (v2 < v10); explicit names sort after, by name."""
    m = _AUTO_VERSION_RE.match(version)
    return (int(m.group(1)), "") if m else (0, version)


def _save_state_dict(weights: Mapping[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared or non-contiguous storage: give every tensor its own copy.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()}
    if not tensors:
        raise RegistryError("refusing to register an empty state dict")
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync_path(path)


def _copy_safetensors(src: Path, dst: Path) -> None:
    if not src.is_file():
        raise RegistryError(f"weights file not found: {src}")
    try:
        with safe_open(str(src), framework="pt") as fh:
            if not list(fh.keys()):
                raise RegistryError(f"{src}: holds no tensors")
    except RegistryError:
        raise
    except Exception as exc:  # safetensors raises its own error types for a non-safetensors file
        raise RegistryError(f"{src}: not a safetensors file ({exc})") from exc
    shutil.copyfile(src, dst)
    fsync_path(dst)


def file_sha256(path: Path) -> str:
    """sha256 of a file of a version (public: the OOD fit checks its file with it)."""
    return _sha256(path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
