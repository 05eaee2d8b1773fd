"""``transport.import_httpx``: httpx without its command-line client, and a fallback for an httpx that needs it.

Each check runs in a fresh interpreter: this test process imported httpx long ago.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path


def _run(code: str, *, path: Path | None = None) -> dict:
    env_path = [str(path)] if path else []
    probe = f"import sys\nsys.path[:0] = {env_path!r}\n{textwrap.dedent(code)}"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_httpx_is_imported_without_its_cli_dependencies() -> None:
    result = _run(
        """
        import json
        from edge_agent.transport import import_httpx
        httpx = import_httpx()
        assert import_httpx() is httpx
        with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(204))) as c:
            status = c.get("http://x/").status_code
        print(json.dumps({"status": status, "cli": [m for m in ("rich", "pygments", "click") if m in sys.modules],
                          "main": callable(httpx.main)}))
        """
    )
    assert result == {"status": 204, "cli": [], "main": True}


def test_an_httpx_that_requires_its_cli_module_is_still_imported(tmp_path: Path) -> None:
    # A future httpx might import _main unconditionally; the agent must then pay for it, not fail.
    fake = tmp_path / "httpx"
    fake.mkdir()
    (fake / "__init__.py").write_text("from ._main import main\nVERSION = 'fake'\n")
    (fake / "_main.py").write_text("def main():\n    return 'cli'\n")
    result = _run(
        """
        import json
        from edge_agent.transport import import_httpx
        httpx = import_httpx()
        print(json.dumps({"version": httpx.VERSION, "main": httpx.main()}))
        """,
        path=tmp_path,
    )
    assert result == {"version": "fake", "main": "cli"}
