"""benchmarks/search_quality.py --quick runs end to end and prints a well-formed table (the figures of the full run
are in docs/search_quality.md; nothing here asserts a result or a timing)."""

import math
import re

import pytest

from tests.benchmarks.conftest import load_script  # pytest (importlib mode) registers it

pytestmark = pytest.mark.bench


def test_search_quality_quick_prints_a_well_formed_table(tmp_path, capsys):
    mod = load_script("search_quality")
    out_md = tmp_path / "search_quality.md"
    assert mod.main(["--quick", "--out", str(out_md)]) == 0
    text = capsys.readouterr().out
    assert out_md.read_text(encoding="utf-8") == text  # the final file, no longer marked partial
    assert not text.startswith("PARTIAL")
    lines = text.splitlines()
    start = lines.index(mod.HEADER[0])
    assert lines[start + 1] == mod.HEADER[1]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == len(mod.HEADER[0].strip("|").split("|"))
        rows.append(cells)
    plain = list(mod.arms())
    for study in ("digits", "lowdata"):
        got = [c for c in rows if c[0] == study]
        assert [c[1] for c in got[:-1]] == ["base config", *plain]
        confirm_arm = got[-1][1]
        assert confirm_arm.endswith("+confirm") and confirm_arm.removesuffix("+confirm") in mod.PRUNING_ARMS
        base = got[0]
        assert base[2:7] == ["-"] * 5 and base[-1] == "-" and int(base[11]) == 1  # --quick: 1 retrain seed
        base_mean = float(base[8])
        for cells in got:
            val_loss, mean, sd, se = (float(cells[i]) for i in (7, 8, 9, 10))
            assert math.isfinite(val_loss) and val_loss > 0
            assert 0.0 <= mean <= 1.0 and sd >= 0.0 and se >= 0.0
        for cells in got[1:]:
            epochs, trials, pruned, seconds = int(cells[2]), float(cells[3]), float(cells[4]), float(cells[5])
            assert trials >= 1 and 0 <= pruned <= trials and seconds >= 0
            chose, of = (int(x) for x in cells[6].split("/"))
            assert of == 1 and 0 <= chose <= of  # 1 sampler seed
            assert int(cells[11]) == 1  # 1 sampler seed x 1 retrain seed
            if cells is got[-1]:
                assert epochs >= 1  # searched up to budget - confirm's reserve, then confirmed
            else:
                assert epochs >= 2  # --quick's budget: trials run until their epochs reach it
            delta = re.fullmatch(r"([+-]\d+\.\d\d) ± (\d+\.\d\d)", cells[12])
            assert delta is not None
            assert float(delta.group(1)) == pytest.approx(100 * (float(cells[8]) - base_mean), abs=0.02)
    goals = lines[lines.index("Goals:") + 1:]
    assert len(goals) == len(plain) + 1 + 2  # lowdata: every arm vs base; each study: confirm vs without
    assert all(g.endswith(": holds") or g.endswith(": does not hold") for g in goals)
    assert sum(g.startswith("- lowdata ") and "vs base" in g for g in goals) == len(plain) + 1
    assert {g.split(" confirm:")[0] for g in goals if " confirm: " in g} == {"- digits", "- lowdata"}
