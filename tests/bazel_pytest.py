"""The `main` of every py_test in tests/BUILD: runs the test files given as arguments under pytest."""
import os
import sys

import pytest

if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", here,
                          *[os.path.join(here, name) for name in sys.argv[1:]]]))
