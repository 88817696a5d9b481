"""What a job prints: fluxray's own lines, and of the libraries under it only what a user can act on.

One policy for every process of a job: `setup` in the driver (the CLI, `jobs/train.py`), and
`setup_worker` in each Ray Train worker and the preview actor, which get `worker_env()` too.
Quiet by default: the libraries' notices, deprecations and progress bars are dropped (fluxray
says what matters once, in its own words: the advice counts the captions CLIP truncates);
their errors never are. `-v` (`FLUXRAY_VERBOSE=1` in the workers) shows everything.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

#: Set by `setup` in the driver; Ray workers get it with the other `FLUXRAY_*` variables.
VERBOSE_ENV = "FLUXRAY_VERBOSE"

#: Read by the libraries when first imported, in every process of the job.
QUIET_ENV = {
    # Tokenizer length notes and CLIP/T5 truncation (the advice counts those captions once),
    # the torchvision fallback notice, `torch_dtype` deprecations.
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # "Loading weights", "Writing model shards" (transformers and the hub share this switch).
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # "Creating initial MLflow database tables...".
    "MLFLOW_LOGGING_LEVEL": "WARNING",
    # Deprecation notices are for the developers of the calling code, not for a user; set
    # here too so that a worker ignores the ones its imports raise before `setup_worker`.
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}

#: Loggers that speak at WARNING about nothing a user can change ("Setting accelerator to CPU").
_ERRORS_ONLY = ("DeepSpeed",)

#: Libraries that warn when imported (peft imports the quantization libraries it finds) about
#: kernels a CPU or this GPU does not use: torchao's "Failed to load ... _C_mxfp8", "Detected no
#: triton"; bitsandbytes' "Failed to load CPU gemm_4bit_forward"; torch's pytree notice on torchao's
#: enums. A missing kernel that matters fails the quantized job with its own error.
_IMPORT_NOTICES = ("torchao", "bitsandbytes", "torch.utils._pytree")


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "0") not in ("", "0")


def setup(verbose_flag: bool = False) -> None:
    """The driver's logging: fluxray's INFO lines as `LEVEL name: message`; of the libraries, their
    warnings and errors, less those a user cannot act on; everything with `verbose_flag`."""
    os.environ[VERBOSE_ENV] = "1" if verbose_flag else "0"
    # Other libraries' INFO lines only with -v.
    logging.basicConfig(level=logging.DEBUG if verbose_flag else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fluxray").setLevel(logging.DEBUG if verbose_flag else logging.INFO)
    if not verbose_flag:
        _quiet(models=False)  # nothing heavy is imported for a command that may fail on its config


def setup_worker() -> None:
    """A Ray Train worker's or the preview actor's logging (after Ray Train configured its own)."""
    if verbose():
        logging.getLogger().setLevel(logging.DEBUG)
        return
    # Ray Train sends the root logger's INFO to the console ("Reporting training result ...").
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("fluxray").setLevel(logging.INFO)
    _quiet(models=True)


def worker_env() -> dict[str, str]:
    """Environment every Ray worker of the job starts with (its imports read it before any call)."""
    return {VERBOSE_ENV: "1"} if verbose() else {VERBOSE_ENV: "0", **QUIET_ENV}


def ray_train_log_level() -> str:
    """Ray Train's own console lines: errors only. Its INFO lines (resources, worker group,
    checkpoints) and its warnings ("Failed to send resource request ... safe to ignore" on a
    busy machine) say nothing a user can act on; fluxray prints what the job does, and a
    failed worker's traceback and the job's error reach the console as before."""
    return "DEBUG" if verbose() else "ERROR"


def _quiet(models: bool) -> None:
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in _ERRORS_ONLY:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _ErrorsOnly) for f in logger.filters):
            logger.addFilter(_ErrorsOnly())
    # A library imported before this call read its level already.
    for name in ("transformers", "diffusers", *_IMPORT_NOTICES):
        logging.getLogger(name).setLevel(logging.ERROR)
    if models or "diffusers" in sys.modules:
        # "Loading pipeline components..." is diffusers' own tqdm switch, not an environment variable.
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.disable_progress_bar()
        diffusers_logging.set_verbosity_error()


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR
