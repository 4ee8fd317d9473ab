"""The tests' forked command runner (commands.py) gives what ``subprocess.run`` gives for the same command."""

import os
import subprocess
import sys
import textwrap

import commands
import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys, warnings
    print("argv", sys.argv[1:], "cwd", os.getcwd(), "env", os.environ.get("SHIQ_HELPER_VALUE"))
    print("stdin", sys.stdin.read() == "")
    warnings.warn("a warning the command line ignores")
    print("to stderr é", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
    """
)


@pytest.mark.parametrize("code", [0, 3])
def test_a_script_runs_as_in_a_fresh_interpreter(tmp_path, code):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "SHIQ_HELPER_VALUE": "x y", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(script), str(code), "two words"]
    want = subprocess.run(
        cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60, stdin=subprocess.DEVNULL
    )
    got = commands.run(cmd, env=env, cwd=tmp_path, timeout=60)
    assert (
        (got.returncode, got.stdout, got.stderr)
        == (want.returncode, want.stdout, want.stderr)
        == (
            code,
            f"argv ['{code}', 'two words'] cwd {tmp_path} env x y\nstdin True\n",
            "to stderr é\n",
        )
    )


def test_a_module_runs_with_its_exit_status_and_an_exception_is_a_traceback(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    cmd = [sys.executable, "-m", "json.tool", "bad.json"]  # (it exits with SystemExit(the JSON error))
    want = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ), cwd=tmp_path, timeout=60)
    got = commands.run(cmd, env=dict(os.environ), cwd=tmp_path, timeout=60)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), (got, want)
    assert want.returncode == 1 and "Expecting property name" in want.stderr
    script = tmp_path / "raises.py"
    script.write_text("raise RuntimeError('from the command')\n")
    got = commands.run([sys.executable, str(script)], env=dict(os.environ), cwd=tmp_path, timeout=60)
    assert got.returncode == 1 and "Traceback" in got.stderr and "RuntimeError: from the command" in got.stderr


def test_a_command_past_its_timeout_is_killed(tmp_path):
    script = tmp_path / "sleeps.py"
    script.write_text("import time\ntime.sleep(60)\n")
    with pytest.raises(subprocess.TimeoutExpired):
        commands.run([sys.executable, str(script)], env=dict(os.environ), cwd=tmp_path, timeout=1)
