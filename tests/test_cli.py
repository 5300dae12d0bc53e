import subprocess
import sys


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "sdscratch", *args], capture_output=True, text=True
    )


def test_unknown_recipe_is_one_line_and_exit_code_2():
    result = run("train", "no-such-recipe")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "Unknown recipe 'no-such-recipe'" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_number_is_one_line_and_exit_code_2():
    result = run("train", "vae", "--steps", "0")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "must be 1 or more" in result.stderr


def test_missing_command_is_one_line():
    result = run()
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
