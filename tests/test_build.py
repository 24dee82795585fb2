"""BUILD files stay true to the tree: every module and test file has a target, every named file exists, every
label resolves, every test file has a sized py_test. The BUILD files are read by evaluating them in Python with
the few rules they use (they are Starlark, a Python subset)."""
import glob as globlib
import os

# Real paths: under `bazel test` this file is a symlink into the workspace.
ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
PACKAGES_WITH_CODE = ("cud_tf", "trainers", "benchmarks", "tests")


def read_targets(root):
    """{package: {name: {"kind", "srcs", "data", "deps", "main", "size"}}} of every BUILD file under `root`."""
    packages = {}
    for build in sorted(globlib.glob(os.path.join(root, "**", "BUILD"), recursive=True)):
        pkg = os.path.relpath(os.path.dirname(build), root).replace(os.sep, "/")
        if pkg.startswith(("bazel-", "tools/offline")):
            continue
        pkg = "" if pkg == "." else pkg
        targets = {}

        def rule(kind):
            def define(name, **kw):
                targets[name] = dict(kind=kind, **kw)
            return define

        def glob(patterns, exclude=()):
            base = os.path.join(root, pkg)
            found = {os.path.relpath(p, base) for pat in patterns for p in globlib.glob(os.path.join(base, pat))}
            return sorted(found - set(exclude))

        scope = dict(glob=glob, package=lambda **kw: None, load=lambda *args: None,
                     **{k: rule(k) for k in ("py_library", "py_binary", "py_test", "filegroup", "py_runtime",
                                             "py_runtime_pair", "toolchain")})
        scope["exports_files"] = lambda files, **kw: targets.update({f: dict(kind="file") for f in files})
        with open(build) as f:
            exec(compile(f.read(), build, "exec"), scope)  # noqa: S102 - our own BUILD files
        packages[pkg] = targets
    return packages


def resolve(label, pkg):
    """('pkg', 'name') of a label written in package `pkg`."""
    if label.startswith("//"):
        path, _, name = label[2:].partition(":")
        return path, name or path.rsplit("/", 1)[-1]
    if label.startswith("@"):
        return None, None
    return pkg, label.lstrip(":")


def problems(root):
    """Every way in which the BUILD files under `root` disagree with its files; [] when they agree."""
    packages = read_targets(root)
    out, covered = [], set()
    for pkg, targets in packages.items():
        for name, t in targets.items():
            if t["kind"] == "file":
                if not os.path.exists(os.path.join(root, pkg, name)):
                    out.append(f"//{pkg}: exports_files names {name}, which does not exist")
                continue
            for src in list(t.get("srcs", [])) + ([t["main"]] if t.get("main") else []):
                path = os.path.normpath(os.path.join(pkg, src))
                covered.add(path)
                if not os.path.isfile(os.path.join(root, path)):
                    out.append(f"//{pkg}:{name} names {src}, which does not exist")
            for label in list(t.get("deps", [])) + list(t.get("data", [])):
                p, n = resolve(label, pkg)
                if p is not None and n not in packages.get(p, {}) and not os.path.exists(os.path.join(root, p, n)):
                    out.append(f"//{pkg}:{name} refers to {label}, which is neither a target nor a file")
            if t["kind"] == "py_test" and t.get("size") not in ("small", "medium", "large", "enormous"):
                out.append(f"//{pkg}:{name} has no size")
    for top in PACKAGES_WITH_CODE:
        for path in globlib.glob(os.path.join(root, top, "**", "*.py"), recursive=True):
            rel = os.path.relpath(path, root)
            if rel not in covered:
                out.append(f"{rel} is in no BUILD target's srcs")
    tests = {n for n, t in packages.get("tests", {}).items() if t["kind"] == "py_test"}
    for path in globlib.glob(os.path.join(root, "tests", "test_*.py")):
        name = os.path.basename(path)[:-3]
        if name not in tests:
            out.append(f"tests/{name}.py has no py_test")
    return out


def test_build_files_match_the_tree():
    assert problems(ROOT) == []
    assert {"cud", "evaluate", "export", "onestep", "tract"} <= set(read_targets(ROOT)["trainers"])


def test_a_missing_file_and_an_uncovered_module_are_reported(tmp_path):
    for pkg in ("cud_tf", "tests"):
        (tmp_path / pkg).mkdir()
    (tmp_path / "cud_tf" / "BUILD").write_text('py_library(name = "core", srcs = ["a.py", "gone.py"])\n')
    (tmp_path / "cud_tf" / "a.py").write_text("")
    (tmp_path / "cud_tf" / "new.py").write_text("")
    (tmp_path / "tests" / "BUILD").write_text('py_test(name = "test_a", srcs = ["test_a.py"], deps = ["//x:y"])\n')
    (tmp_path / "tests" / "test_a.py").write_text("")
    (tmp_path / "tests" / "test_b.py").write_text("")
    found = problems(str(tmp_path))
    assert "//cud_tf:core names gone.py, which does not exist" in found
    assert "cud_tf/new.py is in no BUILD target's srcs" in found
    assert "//tests:test_a refers to //x:y, which is neither a target nor a file" in found
    assert "//tests:test_a has no size" in found
    assert "tests/test_b.py has no py_test" in found
    assert "tests/test_b.py is in no BUILD target's srcs" in found
