"""Every command the docs name starts with the virtualenv its own set-up makes (issue 19:
``bench/faults/run-all`` set the venv up without the ``test`` extra its scenarios import,
and three of five scenarios died with ``No module named 'httpx'`` on a clean clone).

No network and no fresh install: each shell script's venv is simulated. Its
``ensure_venv [extras]`` call says which of pyproject.toml's requirements it installs; the
closure of their dependencies is what a clean clone's venv holds. A child interpreter then
refuses every module of any other installed distribution, imports every module the script
can reach (read from the source, function-level imports included, through omniroute's own
modules) and runs each Python script the shell script runs, or the docs quote, with
``--help``. A missing dependency fails here, not in a user's hands."""

import ast
import json
import os
import re
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = ("scripts/demo", "scripts/test", "bench/run-all", "bench/faults/run-all")
#: the venv a documented script that no shell script runs is used with: the set-up of the
#: shell script beside it (bench/README: "bench/run-all ... installs what it needs")
BY_PREFIX = (
    ("bench/faults/", "bench/faults/run-all"),
    ("bench/", "bench/run-all"),
    ("scripts/", "scripts/test"),
)
#: omniroute's own packages: what the ``omniroute`` command may import, by import string too
PACKAGES = ("config", "ingest", "connectors", "routers")
_SCRIPT_PATH = re.compile(r"(?<![\w./])((?:bench|scripts)/[\w/${}.-]*?\.py)\b")
_NOT_OURS = re.compile(r"\.\./shared/")

# The child: stdlib only, it runs before anything it could be refused is imported.
RUNNER = r"""
import contextlib, importlib, importlib.abc, io, json, os, runpy, sys
spec = json.loads(sys.argv[1])
blocked = set(spec["blocked"])

class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            raise ModuleNotFoundError(
                f"No module named {name!r} (its distribution is not in this venv)", name=name
            )
        return None

sys.meta_path.insert(0, Guard())
sys.path[:0] = spec["path"]
failures = []
for kind, target, argv in spec["runs"]:
    sys.argv = [target, *argv]
    out = io.StringIO()
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            if kind == "path":
                sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
                runpy.run_path(target, run_name="__main__")
            else:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
    except BaseException as exc:
        code = f"{type(exc).__name__}: {exc}"
    if code not in (0, None):
        failures.append(f"{target} {' '.join(argv)}: exit {code}: {out.getvalue()[-500:]}")
    elif kind == "path" and "usage" not in out.getvalue().lower():
        failures.append(f"{target} --help printed no usage: {out.getvalue()[-300:]}")
for module in spec["modules"]:  # after the runs: pytest must be the first to import tests
    try:
        importlib.import_module(module)
    except BaseException as exc:
        failures.append(f"import {module}: {type(exc).__name__}: {exc}")
print(json.dumps(failures))
"""


@dataclass
class Venv:
    """What a shell script sets up and runs."""

    script: str
    extras: set[str]
    #: ("path", file, argv) for a Python script, ("module", name, argv) for ``-m``
    runs: list[tuple[str, str, list[str]]] = field(default_factory=list)
    #: files whose imports are followed; modules imported as they are
    sources: list[Path] = field(default_factory=list)
    modules: set[str] = field(default_factory=set)


def _text(script: str) -> str:
    return (ROOT / script).read_text(encoding="utf-8")


def _extras(script: str) -> set[str]:
    calls = re.findall(r"^\s*ensure_venv\b(.*)$", _text(script), re.MULTILINE)
    assert len(calls) == 1, f"{script}: one ensure_venv call expected, found {len(calls)}"
    named = re.search(r"\[([\w,-]+)\]", calls[0])
    return set(named.group(1).split(",")) if named else set()


def _python_scripts(text: str) -> list[str]:
    """The Python files a shell script runs, its ``for x in a b c`` loops expanded."""
    loops = {m.group(1): m.group(2).split() for m in re.finditer(r"for (\w+) in ([\w ]+);", text)}
    found: list[str] = []
    for path in _SCRIPT_PATH.findall(text):
        variable = re.search(r"\$\{?(\w+)\}?", path)
        if variable is None:
            found.append(path)
            continue
        for word in loops[variable.group(1)]:
            found.append(path.replace(variable.group(0), word))
    return list(dict.fromkeys(found))


def documented_scripts() -> list[str]:
    """Every ``bench/…`` or ``scripts/…`` Python file the docs name (``../shared/…`` is
    another repository's), and the scripts of bench/README's table."""
    found: list[str] = []
    for doc in DOCS:
        for line in doc.read_text(encoding="utf-8").splitlines():
            for match in _SCRIPT_PATH.finditer(line):
                if not _NOT_OURS.search(line[max(0, match.start() - 10) : match.start()]):
                    found.append(match.group(1))
    table = (ROOT / "bench" / "README.md").read_text(encoding="utf-8")
    found += [f"bench/{name}" for name in re.findall(r"^\| `(\w+\.py)`", table, re.MULTILINE)]
    return sorted(set(found))


def _is_script(path: str) -> bool:
    return '__name__ == "__main__"' in _text(path)


def venvs() -> dict[str, Venv]:
    out: dict[str, Venv] = {}
    for script in SHELL:
        text = _text(script)
        venv = out[script] = Venv(script, _extras(script))
        for path in _python_scripts(text):
            venv.runs.append(("path", path, ["--help"]))
        if re.search(r"^\s*(exec\s+)?omniroute\s", text, re.MULTILINE):
            venv.runs.append(("module", "config.cli", ["--help"]))
            for package in PACKAGES:  # channels are loaded by import string, so: all of it
                venv.modules |= {
                    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                    for p in (ROOT / package).rglob("*.py")
                    if p.name != "env.py" or p.parent.name != "migrations"
                }
        if "-m pytest" in text:
            collect = ["--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_layers.py"]
            venv.runs.append(("module", "pytest", collect))
            venv.sources += sorted((ROOT / "tests").rglob("*.py"))
        for tool in re.findall(r"\$VENV/bin/(\w+)", text):
            if tool != "python":
                venv.modules.add(tool)
    run = {path for venv in out.values() for _, path, _ in venv.runs}
    for path in documented_scripts():
        if path in run or not _is_script(path):
            continue
        owner = next(shell for prefix, shell in BY_PREFIX if path.startswith(prefix))
        out[owner].runs.append(("path", path, ["--help"]))
    for venv in out.values():
        venv.sources += [ROOT / path for kind, path, _ in venv.runs if kind == "path"]
    return out


# -- what a script can import, read from its source ----------------------------------------


def _imports(path: Path) -> list[tuple[str, int, list[str]]]:
    """``(module, level, names)`` of every import executed at some point: function bodies
    included; ``if TYPE_CHECKING:`` blocks and ``try: … except ImportError`` fallbacks not."""
    found: list[tuple[str, int, list[str]]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Try) and any(
            "ImportError" in ast.unparse(h.type) for h in node.handlers if h.type is not None
        ):
            return
        if isinstance(node, ast.Import):
            found.extend((alias.name, 0, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level, [a.name for a in node.names]))
        for inner in ast.iter_child_nodes(node):
            visit(inner)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _local(module: str, roots: list[Path]) -> Path | None:
    parts = module.split(".")
    for root in roots:
        for candidate in (
            root.joinpath(*parts).with_suffix(".py"),
            root.joinpath(*parts, "__init__.py"),
        ):
            if candidate.is_file():
                return candidate
    return None


def _module_name(path: Path, roots: list[Path]) -> str:
    for root in roots:
        if path.is_relative_to(root):
            return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
    raise AssertionError(path)


def reachable(venv: Venv) -> tuple[set[str], list[str]]:
    """The modules its files can import, theirs and those of every local module they reach,
    and the directories they are found from (the repository, each script's own)."""
    sources = venv.sources
    scripts = {(ROOT / path).parent for kind, path, _ in venv.runs if kind == "path"}
    roots = [ROOT, *sorted(scripts - {ROOT})]
    modules: set[str] = set()
    seen: set[Path] = set()
    todo = list(sources)
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = _module_name(path, roots).split(".")
        if path.name != "__init__.py":
            package = package[:-1]
        for module, level, names in _imports(path):
            if level:
                base = package[: len(package) - level + 1]
                module = ".".join([*base, *([module] if module else [])])
            candidates = [module, *(f"{module}.{name}" for name in names)]
            for name in candidates:
                local = _local(name, roots)
                if local is not None:
                    todo.append(local)
                    modules.add(_module_name(local, roots))
                elif name == module and module:
                    modules.add(module)
    # alembic's env.py runs inside alembic's migration context, never imported
    modules = {m for m in modules if not m.endswith(".migrations.env")}
    return modules, [str(root) for root in roots]


# -- the venv a clean clone gets -----------------------------------------------------------


def allowed_distributions(extras: set[str]) -> set[str]:
    """pyproject.toml's requirements for ``extras`` and everything they require, as the
    installed metadata says (markers evaluated; a requirement's own extras followed)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    todo = [Requirement(text) for text in project["dependencies"]]
    for extra in extras:
        todo += [Requirement(text) for text in project["optional-dependencies"][extra]]
    seen: set[tuple[str, frozenset[str]]] = set()
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(requirement.name).requires or []
        except metadata.PackageNotFoundError:
            continue
        wanted = [{"extra": extra} for extra in (requirement.extras or {""})]
        for text in requires:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate(env) for env in wanted):
                todo.append(sub)
    return {name for name, _ in seen} | {"pip", "omniroute"}


def blocked_modules(extras: set[str]) -> list[str]:
    """Top-level modules installed here by a distribution that venv would not have."""
    allowed = allowed_distributions(extras)
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if not any(canonicalize_name(d) in allowed for d in dists)
        and not (ROOT / module).exists()
        and module.isidentifier()
    )


# -- the checks ----------------------------------------------------------------------------

VENVS = venvs()


def test_every_script_the_docs_name_exists() -> None:
    """A command in the docs that names a missing file fails a user on its first line."""
    named = documented_scripts() + [s for doc in DOCS for s in _named_shell_scripts(doc)]
    missing = sorted({path for path in named if not (ROOT / path).is_file()})
    assert missing == []


def _named_shell_scripts(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    return [s for s in SHELL if s in text]


def test_every_documented_command_is_checked() -> None:
    """A script the docs quote, or a shell script runs, is started by a check below."""
    checked = {path for venv in VENVS.values() for kind, path, _ in venv.runs if kind == "path"}
    documented = {path for path in documented_scripts() if _is_script(path)}
    assert documented - checked == set()
    for venv in VENVS.values():
        assert venv.runs, f"{venv.script} runs nothing that is checked"


@pytest.mark.parametrize("script", SHELL)
def test_the_shell_script_parses(script: str) -> None:
    result = subprocess.run(
        ["bash", "-n", str(ROOT / script)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert os.access(ROOT / script, os.X_OK), f"{script} is not executable"


@pytest.mark.parametrize("script", SHELL)
def test_what_the_script_runs_starts_in_the_venv_it_sets_up(script: str) -> None:
    """Every module its Python scripts can import is there, and each answers ``--help``,
    with only what its ``ensure_venv`` line installs (plus their dependencies)."""
    venv = VENVS[script]
    modules, path = reachable(venv)
    spec = {
        "blocked": blocked_modules(venv.extras),
        "path": path,
        "modules": sorted(modules | venv.modules),
        "runs": venv.runs,
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("OMNIROUTE_")}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, json.dumps(spec)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    extras = f"[{','.join(sorted(venv.extras))}]" if venv.extras else "(no extras)"
    assert failures == [], f"{script} sets up omniroute{extras}: " + "\n".join(failures)


def test_the_guard_refuses_what_the_venv_lacks() -> None:
    """The simulated venv is not the test venv: without extras, httpx and pytest are
    refused (the very failure of issue 19), while omniroute's own modules import."""
    blocked = blocked_modules(set())
    assert {"httpx", "pytest", "_pytest", "hypothesis"} <= set(blocked)
    assert not {"aio_pika", "fastapi", "sqlalchemy", "pydantic"} & set(blocked)
    assert "httpx" not in blocked_modules({"test"})
