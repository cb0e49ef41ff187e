"""The pure core does no I/O (STYLE.md §1): it imports and works with trio,
socket and logging made unimportable, and its source imports none of the
I/O modules.

``time`` cannot be blocked at run time: attrs imports ``threading``, which
imports ``time``.  The AST scan below covers it (and ``os``) for our own code.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import phpsess

PURE_MODULES = ["protocol", "store", "locks", "engine", "sqlstore"]
FORBIDDEN = {"trio", "socket", "time", "logging", "os", "asyncio", "selectors", "threading"}
PACKAGE_DIR = Path(phpsess.__file__).parent

SCRIPT = textwrap.dedent(
    """
    import sys
    for name in ("trio", "socket", "logging"):
        sys.modules[name] = None  # "import trio" now raises ImportError

    from phpsess import protocol as p
    from phpsess.engine import WAIT, Completion, Engine, Limits
    import phpsess.locks, phpsess.store

    for name in ("trio", "socket", "logging"):
        assert sys.modules[name] is None, name

    engine = Engine(Limits(), lambda n: bytes(range(n)), 0.0)
    engine.connect("a")
    engine.connect("b")
    parser = p.RequestParser()
    parser.receive_data(
        b"HELLO 1\\nWRITE s1 60 3\\n\\x00\\n\\xffREAD s1\\nCREATE 22 4 NOLOCK\\n"
    )
    replies = []
    while True:
        event = parser.next_event()
        if event is p.NEED_DATA:
            break
        replies.append(p.encode_reply(engine.handle("a", event, 1.0)))
    assert replies == [
        b"OK 1\\n", b"OK\\n", b"DATA 3\\n\\x00\\n\\xff", b"OK 0123456789abcdef012345\\n"
    ], replies
    assert engine.handle("b", p.Hello(1), 1.0) == p.Ok(("1",))
    assert engine.handle("b", p.Read("s1"), 1.0) is WAIT
    engine.tick(31.0)
    assert [c.owner for c in engine.completions] == ["b"]
    print("pure")
    """
)


def test_pure_modules_work_without_io_modules() -> None:
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PACKAGE_DIR.parent,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "pure\n"


def test_blocking_works() -> None:
    """The subprocess trick really blocks imports (the test above can fail)."""
    script = (
        'import sys; sys.modules["trio"] = None\n'
        "try:\n import trio\nexcept ImportError:\n print('blocked')"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout == "blocked\n", result.stderr


def imported_modules(source: str) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
        ):
            names.add("__import__")
    return names


def package_imports(source: str) -> set[str]:
    """The phpsess modules that ``source`` imports (``phpsess.x`` -> ``x``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("phpsess"):
            target = node.module.removeprefix("phpsess").lstrip(".")
            if target:
                names.add(target.split(".")[0])
            else:
                names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(
                alias.name.split(".")[1]
                for alias in node.names
                if alias.name.startswith("phpsess.")
            )
    return names


def pure_closure() -> dict[str, set[str]]:
    """The pure modules and every phpsess module they import, transitively:
    those must be pure too.  Maps module -> the non-phpsess modules it imports."""
    seen: dict[str, set[str]] = {}
    todo = list(PURE_MODULES)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        source = (PACKAGE_DIR / f"{module}.py").read_text(encoding="utf-8")
        seen[module] = imported_modules(source) - {"phpsess"}
        todo += package_imports(source)
    return seen


def test_pure_modules_import_no_io() -> None:
    closure = pure_closure()
    assert set(PURE_MODULES) <= set(closure)
    for module, imports in closure.items():
        assert imports, f"the scan found no imports in {module}; it is broken"
        bad = imports & (FORBIDDEN | {"__import__", "importlib", "subprocess", "mmap"})
        assert not bad, f"phpsess.{module} (imported by the pure core) imports {sorted(bad)}"
    # The I/O shell stays out of the core.
    assert not set(closure) & {"server", "persist", "__main__", "logs", "addresses"}, closure


def test_ast_scan_sees_forbidden_imports() -> None:
    assert imported_modules("import time\nfrom os import path\nimport trio.lowlevel") == {
        "time",
        "os",
        "trio",
    }
    assert package_imports("from phpsess import protocol as p\nfrom phpsess.locks import X") == {
        "protocol",
        "locks",
    }
