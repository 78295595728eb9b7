import textwrap

from plugins.registry import discover

GOOD_PLUGIN = textwrap.dedent("""
    from dataclasses import dataclass
    from plugins.base import Plugin, PluginOptions, QuantizeReport

    @dataclass(frozen=True)
    class Options(PluginOptions):
        pass

    class Identity(Plugin):
        id = "identity"
        name = "Identity"
        description = "Leaves the model as it is."
        reference = "none"
        parts = ("unet",)
        families = ("*",)
        options_class = Options

        def available(self):
            return False, "needs a GPU"

        def quantize(self, part, options, progress=None):
            return part, QuantizeReport(self.id, {}, 0, [], 32.0, 0, 0, 0.0)

    plugin = Identity()
""")


def test_builtins_found(registry):
    assert {"full", "gguf"} <= set(registry.plugins)
    assert registry.plugins["gguf"].available() == (True, "available")


def test_broken_plugins_reported_and_rest_load(tmp_path):
    (tmp_path / "raises.py").write_text("raise ImportError('needs the frobnicate package')\n")
    (tmp_path / "no_plugin.py").write_text("plugin = 42\n")
    (tmp_path / "duplicate.py").write_text("from plugins.gguf import plugin\n")
    (tmp_path / "identity.py").write_text(GOOD_PLUGIN)
    (tmp_path / "notes.txt").write_text("not a plugin")

    registry = discover(user_dir=tmp_path)

    assert {"full", "gguf", "qdiffusion", "identity"} == set(registry.plugins)
    assert registry.plugins["identity"].available() == (False, "needs a GPU")
    errors = {path.rsplit("/", 1)[-1]: message for path, message in registry.errors.items()}
    assert errors["raises.py"] == "ImportError: needs the frobnicate package"
    assert errors["no_plugin.py"].startswith("TypeError:")
    assert "already registered" in errors["duplicate.py"]
    assert len(errors) == 3


def test_unknown_plugin_lists_known(registry):
    try:
        registry.get("awq")
    except KeyError as error:
        assert "unknown plugin 'awq'; available: full, gguf, qdiffusion" in error.args[0]
    else:
        raise AssertionError("expected KeyError")
