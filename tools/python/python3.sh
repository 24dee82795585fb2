#!/bin/sh
# The interpreter of Bazel's Python toolchain: the python3 on PATH, which has the project's dependencies.
exec python3 "$@"
