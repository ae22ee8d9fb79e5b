"""The official AsyncAPI JSON Schemas, from the npm package the AsyncAPI initiative publishes
them in (``@asyncapi/specs``, built from github.com/asyncapi/spec-json-schemas): no PyPI
package ships them. Installed once with npm under ``var/npm/`` (ignored by git); the
validation itself is Python (``jsonschema_rs``), so npm is needed only for that download."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

PACKAGE = "@asyncapi/specs"
#: pinned: a new release may change what the 3.0.0 schema accepts
VERSION = "6.11.1"
ROOT = Path(__file__).resolve().parents[2]
HOME = ROOT / "var" / "npm" / f"asyncapi-specs-{VERSION}"


class NpmMissing(RuntimeError):
    """npm is not installed: the schemas cannot be fetched."""


def official_schema(asyncapi: str = "3.0.0") -> Path:
    """The JSON Schema of AsyncAPI ``asyncapi``, installing the package first if needed."""
    path = HOME / "node_modules" / "@asyncapi" / "specs" / "schemas" / f"{asyncapi}.json"
    if not path.is_file():
        _install()
    return path


def _install() -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise NpmMissing(
            f"npm is not installed, so {PACKAGE} (the official AsyncAPI JSON Schemas) "
            "cannot be fetched: install Node.js with npm (Debian: apt-get install npm)"
        )
    HOME.parent.mkdir(parents=True, exist_ok=True)
    # into a directory of our own first: a run that stops half-way leaves no broken HOME
    work = Path(tempfile.mkdtemp(prefix=f"{HOME.name}.", dir=HOME.parent))
    try:
        done = subprocess.run(
            [
                npm,
                "install",
                "--prefix",
                str(work),
                "--ignore-scripts",
                "--no-audit",
                "--no-fund",
                "--loglevel=error",
                f"{PACKAGE}@{VERSION}",
            ],
            capture_output=True,
            text=True,
            timeout=90,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"npm install {PACKAGE}@{VERSION} failed: {done.stderr[-2000:]}")
        try:
            os.replace(work, HOME)
        except OSError:  # another run installed it meanwhile
            if not HOME.is_dir():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":  # scripts/test: fetch it before the tests run
    print(official_schema())
