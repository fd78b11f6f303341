"""Repository layout invariants that are easy to break and expensive to debug."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from mcl.config import load_config

REPO = Path(__file__).resolve().parents[1]
JOB_YAMLS = sorted(p for pattern in ("*.yaml", "*.yml") for p in (REPO / "jobs").rglob(pattern))
# Sweep YAMLs (``sweep*.yaml``) are sweeps over experiment configs, not experiment configs themselves.
SWEEP_YAMLS = [p for p in JOB_YAMLS if p.name.startswith("sweep")]
EXPERIMENT_YAMLS = [p for p in JOB_YAMLS if p not in SWEEP_YAMLS]


def test_platform_is_not_a_package() -> None:
    assert not (REPO / "platform" / "__init__.py").exists(), (
        "platform/__init__.py must not exist: platform/ is a source root, not a package. With that file, "
        "`import platform` from the repo root (Ray's working_dir, `python jobs/...`) imports this folder "
        "instead of Python's stdlib `platform` module, which shadows it and kills every Ray worker on start."
    )


def test_stdlib_platform_importable_from_repo_root() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import platform; "
        "print(platform.system()); print(platform.__file__)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(REPO)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    system, module_file = done.stdout.split("\n")[:2]
    assert system, "platform.system() returned nothing"
    assert not Path(module_file).resolve().is_relative_to(REPO), (
        f"`import platform` resolved to {module_file} inside the repo instead of the stdlib module"
    )


def test_jobs_have_yaml_configs() -> None:
    assert JOB_YAMLS, "expected at least jobs/configs/default.yaml"


@pytest.mark.parametrize("path", EXPERIMENT_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_job_yaml_loads(path: Path) -> None:
    load_config(path)


@pytest.mark.parametrize("path", SWEEP_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_sweep_yaml_loads(path: Path) -> None:
    from mcl.sweep import expand_trials, load_sweep_config

    assert expand_trials(load_sweep_config(path))


# -- import boundaries ---------------------------------------------------------------------------------------

# What methods/ may import from the engine: its public API for methods.
METHOD_API_MODULES = {"mcl.methods_api", "mcl.adapters", "mcl.data", "mcl.worker.losses"}
SOURCE_FILES = sorted(
    p
    for folder in ("platform", "methods", "jobs")
    for p in (REPO / folder).rglob("*.py")
    if ".venv" not in p.parts
)


def _module_name(path: Path) -> str:
    rel = (
        path.relative_to(REPO / "platform")
        if path.is_relative_to(REPO / "platform")
        else path.relative_to(REPO)
    )
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _mcl_imports(tree: ast.AST) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` of every ``import mcl...`` / ``from mcl... import name`` in a module."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "mcl"
        ):
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "mcl"]
    return found


def _private_attribute_uses(tree: ast.AST, aliases: dict[str, str]) -> list[tuple[int, str, str]]:
    """``(line, module, name)`` of ``alias._name`` where ``alias`` is a module imported from mcl."""
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            chain, value = [node.attr], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                module = ".".join([aliases[value.id], *reversed(chain[1:])])
                uses.append((node.lineno, module, node.attr))
    return uses


def _boundary_violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    own = _module_name(path)
    rel = path.relative_to(REPO)
    problems = []
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "mcl":
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else "mcl"
        elif (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "mcl"
        ):
            for a in node.names:
                aliases.setdefault(a.asname or a.name, f"{node.module}.{a.name}")
    private = [
        (line, module, name) for line, module, name in _mcl_imports(tree) if name and name.startswith("_")
    ]
    private += _private_attribute_uses(tree, aliases)
    for line, module, name in private:
        if module != own:
            problems.append(f"{rel}:{line}: private {module}.{name} used outside its module")
    if rel.parts[0] == "methods":
        for line, module, _ in _mcl_imports(tree):
            if module not in METHOD_API_MODULES:
                problems.append(
                    f"{rel}:{line}: methods import only the engine's public API "
                    f"({', '.join(sorted(METHOD_API_MODULES))}), not {module}"
                )
    return problems


def test_modules_use_only_public_names_across_modules_and_methods_only_the_method_api() -> None:
    problems = [p for path in SOURCE_FILES for p in _boundary_violations(path)]
    assert not problems, "\n".join(problems)


def test_boundary_check_catches_private_and_non_api_imports(tmp_path: Path) -> None:
    methods_dir = REPO / "methods"
    probe = methods_dir / "_layout_probe_tmp.py"
    probe.write_text(
        "import mcl.data\n"
        "from mcl.runner import run_experiment\n"
        "from mcl.adapters import _family\n"
        "x = mcl.data._cached_processor\n"
    )
    try:
        problems = _boundary_violations(probe)
    finally:
        probe.unlink()
    text = "\n".join(problems)
    assert "not mcl.runner" in text
    assert "private mcl.adapters._family" in text
    assert "private mcl.data._cached_processor" in text


# -- readable engine code ---------------------------------------------------------------------------------

MAX_ENGINE_FUNCTION_LINES = 60  # docstring included; ruff's C901 (max-complexity 15) bounds the branching


def test_engine_functions_are_short_enough_to_read_at_once() -> None:
    long = []
    for path in sorted((REPO / "platform" / "mcl").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_ENGINE_FUNCTION_LINES:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines")
    assert not long, "split these into named steps:\n" + "\n".join(long)


def test_no_formatter_exemptions() -> None:
    """``# fmt: skip`` hides code from the formatter; write it so the formatter's layout reads well."""
    skipped = [
        f"{path.relative_to(REPO)}:{number}"
        for folder in ("platform", "methods", "jobs", "tests")
        for path in sorted((REPO / folder).rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if line.rstrip().endswith("# fmt" + ": skip")
    ]
    assert not skipped, "\n".join(skipped)
