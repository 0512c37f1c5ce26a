"""The scale-out client libraries are extras: a server that needs none never imports them,
and a config naming a kind whose library is missing fails with one line naming the extra."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCALE_OUT = ("boto3", "botocore", "redis", "psycopg", "psycopg_pool")


def _python(code: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True, text=True, timeout=60,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_server_and_cli_import_no_scale_out_library() -> None:
    code = textwrap.dedent(f"""
        import sys
        import casbah.cli, casbah.server.app, casbah.storage.loader, casbah.storage.action_cache, casbah.assets.index
        from casbah.storage.loader import load_builtin_kinds
        load_builtin_kinds()
        print(sorted({{m.split('.')[0] for m in sys.modules}} & set({SCALE_OUT!r})))
    """)
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# The one injected fault: the library is made unimportable (sys.modules[name] = None makes
# `import name` raise ImportError), as if casbah were installed without that extra.
_BLOCKED_SERVE = """
import sys
for name in sys.argv[1].split(","):
    sys.modules[name] = None
sys.argv = ["casbah", *sys.argv[2:]]
from casbah.cli import main
main()
"""


def _serve_blocked(tmp_path: Path, blocked: str, config: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "casbah.yaml"
    path.write_text(textwrap.dedent(config))
    return _python(_BLOCKED_SERVE, blocked, "serve", "--config", str(path), "--listen", "127.0.0.1:0",
                   "--data-dir", str(tmp_path / "data"))


def test_s3_storage_without_boto3_names_the_extra(tmp_path: Path) -> None:
    result = _serve_blocked(tmp_path, "boto3", """
        storages:
          cas: {kind: s3, endpoint: "http://127.0.0.1:1", bucket: b}
        instances:
          "": {storage: cas}
    """)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].endswith(
        "storage kind 's3' needs boto3: install casbah with the 's3' extra: pip install 'casbah[s3]'"), result.stderr
    assert "Traceback" not in result.stderr


def test_postgres_action_cache_without_psycopg_names_the_extra(tmp_path: Path) -> None:
    result = _serve_blocked(tmp_path, "psycopg,psycopg_pool", """
        instances:
          "":
            action-cache: {kind: postgres, url: "postgresql://127.0.0.1:1/x"}
    """)
    assert result.returncode != 0
    assert ("ActionCache kind 'postgres' needs psycopg: install casbah with the 'postgres' extra: "
            "pip install 'casbah[postgres]'") in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_redis_action_cache_needs_no_psycopg() -> None:
    """The Redis and PostgreSQL ActionCache kinds share a module: each needs only its own library."""
    code = textwrap.dedent("""
        import sys
        sys.modules["psycopg"] = None
        sys.modules["psycopg_pool"] = None
        from casbah.storage.action_cache import ACTION_CACHE
        kind, options = ACTION_CACHE.parse({"kind": "redis", "url": "redis://127.0.0.1:1"}, "ac")
        print(type(kind.build(options, "ac")).__name__)
    """)
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "RedisActionCache"
