"""The Python environment against the lock: which packages are installed, and which differ.

    python -m cqil.tracking.environment requirements.lock.txt    # every package that differs from the lock

`requirements.lock.txt` pins every package of the environment that made `results/` (see pyproject.toml
for how it is made). Track records store `installed()`, so `cqil track compare` can name the package
versions that changed beside the metrics that moved; `scripts/canary.sh` prints `drift` for the newest
releases the dependencies allow.
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import distributions
from pathlib import Path

LOCK = Path(__file__).resolve().parents[2] / "requirements.lock.txt"  # in a checkout; not in an installed wheel
UNLOCKED = {"cqil", "pip"}  # the project itself, and the installer that venv brings


def canonical(name: str) -> str:
    """A package name as pip compares them (PEP 503): `Jinja2`, `jinja_2` and `jinja-2` are one name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def public(version: str) -> str:
    """A version without its local label: torch's CPU build `2.13.0+cpu` is release 2.13.0."""
    return version.split("+", 1)[0]


def installed() -> dict[str, str]:
    """Every distribution of this environment: canonical name -> version, sorted by name."""
    found = {canonical(d.metadata["Name"]): d.version for d in distributions() if d.metadata["Name"]}
    return dict(sorted(found.items()))


def locked(path=LOCK) -> dict[str, str]:
    """The `name==version` pins of a requirements lock file."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)", Path(path).read_text(encoding="utf-8"), re.M)
    return {canonical(name): version for name, version in pins}


def drift(lock: dict[str, str], have: dict[str, str], ignore=UNLOCKED) -> list[tuple[str, str | None, str | None]]:
    """(name, locked version, installed version) for every package that differs; None where one side lacks it."""
    names = sorted((lock.keys() | have.keys()) - set(ignore))
    return [
        (name, lock.get(name), have.get(name))
        for name in names
        if public(lock.get(name) or "") != public(have.get(name) or "")
    ]


def changes(old: dict[str, str], new: dict[str, str], both_complete: bool = True) -> list[str]:
    """`name old -> new` for every package whose version differs between two environments.

    With `both_complete=False` (a record that stored only a few packages) only the names in both count.
    """
    names = (old.keys() | new.keys()) if both_complete else (old.keys() & new.keys())
    return [
        f"{name} {old.get(name, '-')} -> {new.get(name, '-')}"
        for name in sorted(names)
        if old.get(name) != new.get(name)
    ]


def main(argv: list[str]) -> int:
    """Print the packages of this environment that differ from a lock file; exit 1 if any do."""
    lock = Path(argv[0]) if argv else LOCK
    found = drift(locked(lock), installed())
    if not found:
        print(f"every package matches {lock}")
        return 0
    width = max(len(name) for name, _, _ in found)
    print(f"{len(found)} package(s) differ from {lock}:")
    print(f"  {'package':{width}}  {'locked':>14}  {'installed':>14}")
    for name, was, now in found:
        print(f"  {name:{width}}  {was or '-':>14}  {now or '-':>14}")
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
