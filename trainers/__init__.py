"""Command-line trainers: `python -m trainers.<name> --flagfile=configs/...`.

Importing this package sets up a quiet console before TensorFlow loads: TF's C++ logging at warnings and above
(unless TF_CPP_MIN_LOG_LEVEL is set), and the notices TF prints while it loads, before its logging reads that
setting (oneDNN, abseil's InitializeLog), left out; every other line of the import is shown.
"""
import os
import sys
import tempfile

# oneDNN's CPU kernels, which TF turns on by default only on Intel CPUs: on the AMD CPU measured here they made
# train steps 1.05-1.35x faster, graph mode and XLA alike (docs/speed.md). Must be set before TensorFlow is
# imported; TF_ENABLE_ONEDNN_OPTS=0 in the environment keeps them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

_LOAD_NOTICES = ("All log messages before absl::InitializeLog() is called", "oneDNN custom operations are on")


def _import_tensorflow_quietly():
    if "tensorflow" in sys.modules or os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        return
    with tempfile.TemporaryFile() as captured:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow  # noqa: F401
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors="replace").splitlines(keepends=True):
                if not any(notice in line for notice in _LOAD_NOTICES):
                    sys.stderr.write(line)


_import_tensorflow_quietly()
