"""How the commands report errors: one line for a user's mistake, the traceback on request."""

import pytest

from keras_mixer import cli


def failing(error):
    def main(argv):
        raise error

    return main


def test_a_user_error_is_one_line_and_status_1(capsys, monkeypatch):
    monkeypatch.delenv(cli.DEBUG_ENV, raising=False)
    for error in (ValueError("`batch_size` must be a positive integer, got 0."),
                  FileNotFoundError("Checkpoint 'x.keras' does not exist."),
                  OSError(28, "No space left on device"), FloatingPointError("The loss became nan"),
                  ImportError('pip install "keras-mixer[train]"'), RuntimeError("Another run is using runs/x")):
        assert cli.run(failing(error), []) == 1
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines == [f"error: {error}", "(run with --debug or KERAS_MIXER_DEBUG=1 for the traceback)"]


def test_debug_shows_the_traceback_and_is_not_passed_on(monkeypatch):
    seen = []

    def main(argv):
        seen.append(argv)
        raise ValueError("bad")

    with pytest.raises(ValueError, match="bad"):
        cli.run(main, ["--model", "m.keras", "--debug"])
    assert seen == [["--model", "m.keras"]]
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    with pytest.raises(ValueError):
        cli.run(main, [])


def test_a_bug_keeps_its_traceback_and_statuses_pass_through():
    with pytest.raises(KeyError):
        cli.run(failing(KeyError("bug")), [])
    assert cli.run(lambda argv: 0, []) == 0
    assert cli.run(lambda argv: 3, []) == 3
    assert cli.run(lambda argv: {"results": 1}, []) == 0  # train.py's main returns its results
