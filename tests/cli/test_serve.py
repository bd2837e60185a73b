"""reformer-serve's options and errors (cli/serve.py). Serving a real repository through it:
tests/exporters/test_triton_server.py."""

from __future__ import annotations

from click.testing import CliRunner

from cli.serve import main as serve


def test_a_missing_repository_is_refused(tmp_path):
    result = CliRunner().invoke(serve, [str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output


def test_a_server_that_exits_at_once_is_one_error_line_with_its_status(tmp_path):
    result = CliRunner().invoke(serve, [str(tmp_path), "--server", "/bin/false"])
    assert result.exit_code == 1
    assert "Error: tritonserver exited with status 1 before it was ready" in result.output
    assert "Traceback" not in result.output
