"""The command table: every subcommand exists; unimplemented ones say so and exit non-zero."""

from agent import cli


def test_every_subcommand_listed():
    for name in ("mn", "ha", "fa", "status", "check-config", "gate", "testbed", "demo", "bench", "doctor"):
        assert name in cli.SUBCOMMANDS


def test_unimplemented_subcommand_fails_loudly(capsys, monkeypatch):
    monkeypatch.setitem(cli.SUBCOMMANDS, "future", (None, "a subcommand not written yet"))
    assert cli.main(["future"]) != 0
    assert "not implemented" in capsys.readouterr().err


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_implemented_modules_import():
    import importlib
    for name, (module, _) in cli.SUBCOMMANDS.items():
        if module:
            mod = importlib.import_module(module)
            assert callable(mod.add_arguments) and callable(mod.run), name
