"""The installed package must hold every subpackage: a non-editable install leaves out any not listed."""

from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10 (requires-python allows it): the [test] extra brings tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_subpackage_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {str(p.parent.relative_to(ROOT)).replace("/", ".")
             for top in ("portable", "backends", "caches") for p in (ROOT / top).rglob("__init__.py")}
    assert found - listed == set(), f"missing from pyproject's packages: {sorted(found - listed)}"


def test_non_python_sources_are_package_data():
    """Files a package reads at run time (the embedded model, CUDA sources compiled by NVRTC) must be package data."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for package, pattern in (("backends.kernels", "*.cu"), ("portable.data", "default_model/*")):
        assert pattern in data.get(package, []), (package, pattern)
        assert list((ROOT / package.replace(".", "/")).glob(pattern)), (package, pattern)


def test_an_installed_copy_records_no_commit_of_the_repository_around_it(tmp_path):
    """A non-editable install in a project's .venv: git, asked from site-packages, would answer with that project's
    commit, which reports would then carry as ours."""
    import subprocess

    from portable.environment import commit_of

    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "-C", str(tmp_path), "-c", "user.name=u", "-c", "user.email=u@example.com", "commit", "-q",
                    "--allow-empty", "-m", "someone else's project"], check=True)
    site = tmp_path / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    assert commit_of(site) is None
    head = subprocess.run(["git", "-C", str(tmp_path), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert commit_of(tmp_path) == head  # a checkout still records its commit


def test_every_environment_variable_of_ours_is_in_the_readme():
    """A user of the installed package has the README and --help, not the source: each PORTABLE_* variable the code
    reads must be documented there."""
    import re

    read = {name for top in ("portable", "backends", "caches") for f in (ROOT / top).rglob("*.py")
            for name in re.findall(r"\bPORTABLE_[A-Z_]+\b", f.read_text())}
    assert read, "no PORTABLE_* variable found: the pattern is stale"
    readme = (ROOT / "README.md").read_text()
    assert {name for name in read if name not in readme} == set()


def test_the_code_keeps_to_the_oldest_python_that_pyproject_allows():
    """requires-python says 3.10: no newer syntax anywhere (ast checks it per version), and no import of a standard
    module that 3.10 lacks unless a fallback catches its ImportError (the tests on 3.10 once failed to collect)."""
    import ast
    import subprocess

    newer = {"tomllib"}  # standard modules added in 3.11 or later that this code base could reach for
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"] == ">=3.10"
    files = subprocess.run(["git", "-C", str(ROOT), "ls-files", "*.py"], capture_output=True, text=True,
                           check=True).stdout.split()
    assert files
    for name in files:
        tree = ast.parse((ROOT / name).read_text(), name, feature_version=(3, 10))
        guarded = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try)
                   if any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                          for h in t.handlers) for node in t.body}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in guarded:
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {m.split(".")[0] for m in modules} & newer, f"{name}:{node.lineno} needs Python 3.11"


def test_the_dependencies_are_what_the_code_imports():
    """Every third-party module the package imports is a declared dependency (an undeclared one arrives only while
    another package happens to pull it in), and every declared dependency is used (psutil once was not)."""
    import ast
    import re
    import sys
    from importlib.metadata import packages_distributions

    optional = {"flash_attn"}  # --attn flash_attention_2 only, refused in one line without it
    ours = {"portable", "backends", "caches", "tests"}
    imported = set()
    for top in ("portable", "backends", "caches"):
        for f in (ROOT / top).rglob("*.py"):
            tree = ast.parse(f.read_text())
            fallbacks = {id(node) for t in ast.walk(tree) if isinstance(t, ast.Try)  # `except ImportError:` imports
                         if any(isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                                for h in t.handlers) for h in t.handlers for node in h.body}
            for node in ast.walk(tree):
                if id(node) in fallbacks:  # e.g. click, for a typer that does not carry its own copy
                    continue
                if isinstance(node, ast.Import):
                    imported |= {a.name.split(".")[0] for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - ours - optional
    normalize = lambda name: re.sub(r"[-_.]+", "-", name).lower()  # noqa: E731
    distributions = packages_distributions()
    needed = {normalize(distributions.get(m, [m])[0]) for m in third_party}
    declared = {normalize(re.match(r"[A-Za-z0-9_.-]+", d).group())
                for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert needed - declared == set(), "imported but not declared"
    # used through another package that does not declare them: torch.onnx.export(dynamo=True) needs onnx and
    # onnxscript; safetensors: the weights' format, which from_pretrained reads (our cache files are written by hand)
    indirect = {"onnx", "onnxscript", "safetensors"}
    assert declared - needed - indirect == set(), "declared but never imported"


def test_the_console_script_starts_where_the_entry_points_do():
    """`portable` must start through the same first step as prefill.py and decode.py (quiet Ctrl-C while importing)."""
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"portable": "portable.launch:main"}
    for entry in ("prefill.py", "decode.py", "portable/__main__.py"):
        assert "from portable.launch import main" in (ROOT / entry).read_text(), entry
