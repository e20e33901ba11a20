"""experiments/profile.py: a traced call of a real mixer, charged to the project's source lines."""

from __future__ import annotations

import pytest

from experiments import profile


def test_profile_charges_the_layer_time_to_its_source_lines(tmp_path, capsys):
    out = tmp_path / "p.md"
    assert profile.main(["ttt_linear", "--n", "64", "--width", "32", "--heads", "2", "--runs",
                         "1", "--top", "50", "--by", "function", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.strip() == capsys.readouterr().out.strip()
    rows = [r for r in text.splitlines() if r.startswith("| ") and "thunk ms" not in r]
    ms = {r.split(" | ")[-1].rstrip(" |"): float(r.split(" | ")[0].lstrip("| ")) for r in rows}
    total = float(text.split("thunk time ")[1].split(" ms")[0])
    assert total > 0 and sum(ms.values()) == pytest.approx(total, rel=0.05, abs=0.5)
    # the TTT op and the layer's projections are both named, and most time has a source line
    assert any(k.startswith("ops/") and "ttt" in k for k in ms), sorted(ms)
    assert any(k.startswith("layers/ttt_layer.py") for k in ms), sorted(ms)
    unknown = sum(v for k, v in ms.items() if k.startswith("(no source)"))
    assert unknown < 0.5 * total, (unknown, total)


def test_hlo_stack_frames_resolve_to_the_calling_line():
    text = "\n".join([
        "HloModule m", "", "FileNames", '1 "/x/ttt/ops/a.py"', "FunctionNames", '1 "f"', '2 "g"',
        "FileLocations", "1 {file_name_id=1 function_name_id=1 line=10}",
        "2 {file_name_id=1 function_name_id=2 line=20}",
        "StackFrames", "1 {file_location_id=1}", "2 {file_location_id=2 parent_frame_id=1}", "",
        "%fused (p: f32[2]) -> f32[2] {",
        "  %p = f32[2]{0} parameter(0)",
        "  ROOT %e = f32[2]{0} exponential(%p), metadata={op_name=\"exp\" stack_frame_id=2}",
        "}", "",
        "ENTRY %main (a: f32[2]) -> f32[2] {",
        "  %a = f32[2]{0} parameter(0)",
        "  %d = f32[2]{0} negate(%a)",
        "  ROOT %fusion = f32[2]{0} fusion(%d), kind=kLoop, calls=%fused",
        "}"])
    hlo = profile.parse_hlo(text)
    assert profile.charge(hlo, "fusion") == "ops/a.py:20 g < ops/a.py:10 f"
    assert profile.charge(hlo, "fusion", by="function") == "ops/a.py g < ops/a.py f"
    assert profile.charge(hlo, "d").startswith("(no source) negate f32[2]")


def test_profile_rejects_bad_input_in_one_line(capsys):
    for argv, what in ((["rnn"], "unknown label 'rnn'"), (["ttt_linear", "--n", "0"], "--n"),
                       (["ttt_linear", "--width", "30", "--heads", "4"], "multiple")):
        with pytest.raises(SystemExit) as done:
            profile.main(argv)
        assert done.value.code == 2
        assert what in capsys.readouterr().err
