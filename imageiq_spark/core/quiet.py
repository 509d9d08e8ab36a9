"""Quiet logging, the same in the driver and in every Python worker: our progress lines and
summaries, not the libraries' start-up noise; `imageiq --verbose` (IMAGEIQ_VERBOSE=1) keeps it all.

- TensorFlow's C++ core writes start-up lines (absl's "All log messages before
  absl::InitializeLog() is called...", oneDNN, the CUDA stub) to file descriptor 2 while it loads,
  and its CUDA probe ("failed call to cuInit") on first use, whatever TF_CPP_MIN_LOG_LEVEL says.
  `import_quietly` imports a module that brings TensorFlow in, and probes the devices, with
  descriptor 2 pointed at /dev/null: the driver does it for each stage, and a worker before it
  loads a model (`inference.cached_model`).
- The executors' environment (`worker_env`, set by `session`) carries TensorFlow's and gRPC's log
  levels and ignores FutureWarnings (petastorm's pyarrow deprecations), as the driver does
  (`quiet_driver`, which also keeps petastorm's converter advice to itself), and petastorm's
  warning that a dataset is iterated again (validation, once per epoch).
- The driver JVM of a session started here logs through `log4j2.properties` beside this module
  (`jvm_settings`): Spark's warnings and errors, less the notices every local run prints.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType

VERBOSE_ENV = "IMAGEIQ_VERBOSE"
#: Petastorm warns each time a dataset is iterated again: training validates on its split once per
#: epoch, on purpose (the training split streams with a fixed number of steps instead).
PETASTORM_RESET = "Running multiple iterations over make_petastorm_dataset"


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def worker_env() -> dict[str, str]:
    """`spark.executorEnv.*` settings: the Python workers log as this process does."""
    if verbose():
        env = {VERBOSE_ENV: "1", "TF_CPP_MIN_LOG_LEVEL": "0"}
    else:
        env = {"TF_CPP_MIN_LOG_LEVEL": "2", "GRPC_VERBOSITY": "ERROR",
               "PYTHONWARNINGS": f"ignore::FutureWarning,ignore:{PETASTORM_RESET}:UserWarning"}
    return {f"spark.executorEnv.{key}": value for key, value in env.items()}


def jvm_settings() -> dict[str, str]:
    """The Spark setting that points the driver JVM's log4j at our `log4j2.properties` (none under
    --verbose: Spark's own defaults, with everything they print). Executor JVMs, where a session
    has any (`local-cluster`), log to their own files and keep Spark's defaults."""
    if verbose():
        return {}
    config = (Path(__file__).parents[1] / "log4j2.properties").as_uri()
    return {"spark.driver.extraJavaOptions": f"-Dlog4j2.configurationFile={config}"}


def quiet_driver() -> None:
    """This process's share of `worker_env`: the log levels and the warnings filter."""
    if verbose():
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0"
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    warnings.simplefilter("ignore", FutureWarning)
    warnings.filterwarnings("ignore", PETASTORM_RESET, UserWarning)
    # Advice to petastorm's caller (float32 conversion, "parquet files too small"), not to our users.
    logging.getLogger("petastorm.spark.spark_dataset_converter").setLevel(logging.ERROR)


@contextmanager
def native_stderr_muted() -> Iterator[None]:
    """File descriptor 2 goes to /dev/null for the block (unless verbose): what C++ libraries
    write there directly never passes Python's logging."""
    if verbose():
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def import_quietly(name: str) -> ModuleType:
    """Import module `name`; if TensorFlow is then loaded, probe its devices too, all with fd 2
    muted. Errors still raise: an exception is not written to fd 2 until it is handled."""
    with native_stderr_muted():
        module = importlib.import_module(name)
        tf = sys.modules.get("tensorflow")
        if tf is not None:
            tf.config.list_physical_devices()
    return module
