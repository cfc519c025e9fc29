"""The exporter contract (winq.exporters): an ABC with write and verify, the reference passed to verify,
options dataclasses that generate the CLI's flags, and exports that leave nothing behind, even when killed."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from winq.exporters import Exporter, Verified, Written, export, exporter_class, formats, option


@pytest.fixture
def ck(tiny_ckpt) -> Path:
    return tiny_ckpt


def test_write_and_verify_are_required():
    @dataclasses.dataclass(frozen=True)
    class Opts:
        level: int = option(1, "a level")

    class WriteOnly(Exporter):
        Options = Opts

        def write(self, folder, source, options):
            return Written(tensors=[])

    with pytest.raises(TypeError, match="abstract method.* verify"):
        WriteOnly()

    class Both(WriteOnly):
        def verify(self, folder, written, reference):
            return Verified({})

    assert Both().options(level=2) == Opts(level=2)


def test_every_option_is_a_cli_flag():
    """The export command's flags are generated from each format's Options dataclass, help text included."""
    from winq.cli.main import app

    r = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "300", "NO_COLOR": "1"})
    assert r.exit_code == 0, r.output
    text = " ".join(r.stdout.split())
    for fmt in formats():
        for f in dataclasses.fields(exporter_class(fmt).Options):
            assert "--" + f.name.replace("_", "-") in text, (fmt, f.name)
            assert f"{fmt}: {f.metadata['help'][:30]}" in text, (fmt, f.name)


def test_verify_gets_the_reference_and_records_its_checks(ck, tmp_path, monkeypatch):
    """verify receives the checkpoint's QuantizedWeights and model explicitly; what it checked lands in the manifest."""
    from winq.exporters.gptq import GPTQExporter

    real = GPTQExporter.verify
    seen = {}

    def verify(self, folder, written, reference):
        seen["names"] = sorted(reference.qweights)
        seen["model"] = reference.model
        v = real(self, folder, written, reference)
        return Verified(v.errors, checks={"extra_check": {"ok": True}})

    monkeypatch.setattr(GPTQExporter, "verify", verify)
    res = export("gptq", ck, tmp_path / "g")
    assert seen["names"] == sorted(json.loads((ck / "winq.json").read_text())["quantized_modules"])
    assert seen["model"] is not None and res.manifest["info"]["extra_check"] == {"ok": True}


def test_a_killed_export_leaves_nothing_for_long(ck, tmp_path):
    """A SIGKILLed export cannot clean up; its hidden temporary is removed by the next export to the same place."""
    out = tmp_path / "g"
    code = ("import os, signal, winq.exporters.gptq as g\n"
            "real = g.GPTQExporter.write\n"
            "def write(self, folder, *a):\n"
            "    real(self, folder, *a)\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n"
            "g.GPTQExporter.write = write\n"
            f"from winq.exporters import export\nexport('gptq', {str(ck)!r}, {str(out)!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == -9, p.stderr[-2000:]
    stale = [x for x in tmp_path.iterdir() if x.name.startswith(".g.tmp-")]
    assert len(stale) == 1 and (stale[0] / "model.safetensors").is_file() and not out.exists()
    export("gptq", ck, out)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["g"]
