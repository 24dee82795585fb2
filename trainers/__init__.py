"""Command-line trainers: `python -m trainers.<name> --flagfile=configs/...`."""
import os

# oneDNN's CPU kernels, which TF turns on by default only on Intel CPUs: on the AMD CPU measured here they made
# train steps 1.05-1.35x faster, graph mode and XLA alike (docs/speed.md). Must be set before TensorFlow is
# imported; TF_ENABLE_ONEDNN_OPTS=0 in the environment keeps them off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
