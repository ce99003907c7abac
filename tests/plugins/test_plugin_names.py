"""Plugin names that collide: a preset named after a dataset, registered by a script before the
built-in presets load, leaves every other built-in preset in place and makes the name ambiguous,
said in one line naming both."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_an_in_script_preset_named_digits_keeps_the_other_builtin_presets():
    script = textwrap.dedent('''
        from suncet.registry import PRESETS, DuplicatePluginError, register_preset

        @register_preset("digits")
        def my_digits():
            """My digits recipe."""
            return {"epochs": 3}

        names = PRESETS.names()
        assert {"cifar10", "paper-cifar10", "paper-imagenet-10pct"} <= set(names), names
        try:
            PRESETS.get("digits")
        except DuplicatePluginError as exc:
            print(exc)
    ''')
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd="/")
    assert result.returncode == 0, result.stderr
    assert "preset plugin 'digits' is registered twice" in result.stdout and "my_digits" in result.stdout
