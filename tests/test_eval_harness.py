import json
import math

import pytest

import llmdeploy
from llmdeploy.eval import EvalResult, evaluate, footprint, speed
from llmdeploy.quant import RTN
from llmdeploy.report import build_report, pareto_front


def test_footprint_dense_and_tied():
    model, _ = llmdeploy.load("tiny-qwen2")  # tied embeddings: counted once
    fp = footprint(model, disk=True)
    assert fp.params == sum(p.numel() for p in model.parameters())  # parameters() dedupes ties
    assert fp.bits_per_param == 32.0 and math.isnan(fp.compressed_bits_per_param)
    assert fp.bytes == fp.params * 4
    assert fp.bytes < fp.disk_bytes < fp.bytes + 64 * 1024  # safetensors header only


def test_footprint_compressed():
    model, _ = llmdeploy.load("tiny-llama")
    dense = footprint(model)
    RTN(bits=4, group_size=32)(model)
    fp = footprint(model, disk=True)
    assert fp.params == dense.params  # dense-equivalent parameter count is unchanged
    assert fp.compressed_bits_per_param == pytest.approx(4.75)
    assert fp.bytes < dense.bytes and fp.disk_bytes < dense.bytes
    linear = fp.compressed_params * 4.75 / 8
    assert fp.bytes == pytest.approx(linear + (dense.params - fp.compressed_params) * 4)


def test_speed_reports_sane_numbers():
    model, tok = llmdeploy.load("tiny-llama")
    s = speed(model, tok, prompt_len=16, new_tokens=6, batch_sizes=(1, 4), repeats=2)
    assert set(s.prefill_tokens_per_s) == {1, 4} and set(s.decode_tokens_per_s) == {1, 4}
    assert all(v > 0 for v in [*s.prefill_tokens_per_s.values(), *s.decode_tokens_per_s.values()])
    assert 0 < s.latency_ms_p50 <= s.latency_ms_p95
    assert s.peak_memory_mb >= 0
    assert json.loads(json.dumps(s.to_dict()))["decode_tokens_per_s"]["4"] > 0


def test_evaluate_result_round_trip_and_report(tmp_path):
    rows = []
    for bits in (None, 8, 3):
        model, tok = llmdeploy.load("tiny-llama")
        if bits:
            RTN(bits=bits, group_size=32)(model)
        r = evaluate(model, tok, name=f"w{bits or 32}", ppl="shakespeare", seq_len=64, max_windows=3,
                     tasks="shakespeare_nextline", limit=4,
                     speed={"prompt_len": 8, "new_tokens": 2, "repeats": 1, "batch_sizes": (1, 8)})
        r.save(tmp_path / "res" / f"{r.name}.json")
        rows.append(r)
    again = EvalResult.load(tmp_path / "res" / "w8.json")
    assert again.to_dict() == json.loads(rows[1].to_json())
    assert again.recipe[0]["bits"] == 8 and "shakespeare" in again.perplexity
    row = again.markdown_row()
    assert row.startswith(f"| w8 | {again.footprint['params'] / 1e6:.1f} | 8.750 |") and f"{again.perplexity['shakespeare']['ppl']:.2f}" in row
    md = build_report(tmp_path / "res", tmp_path / "report", title="T")
    text = md.read_text()
    assert text.count("\n| w") == 3 and "pareto.png" in text
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "report" / "accuracy_vs_size.png").stat().st_size > 1000
    # Rows are sorted from the densest (most bits) to the smallest.
    assert text.index("| w32 ") < text.index("| w8 ") < text.index("| w3 ")


def test_report_names_each_rows_run_day_when_runs_differ():
    from llmdeploy.report import markdown_table

    def result(name, date):
        return EvalResult(name=name, model="m", footprint={"params": 1e6, "bits_per_param": 4.0, "bytes": 1},
                          perplexity={"c": {"ppl": 10.0}}, speed={"decode_tokens_per_s": {"1": 5.0}},
                          meta={"date": date})
    one_day = markdown_table([result("a", "2026-11-25 10:00:00"), result("b", "2026-11-25 18:00:00")])
    assert "measured" not in one_day
    two_days = markdown_table([result("a", "2026-11-25 10:00:00"), result("b", "2026-11-30 09:00:00")]).split("\n")
    assert two_days[0].endswith("| measured |") and two_days[1].count("---|") == two_days[0].count(" | ") + 1
    assert two_days[2].startswith("| a |") and two_days[2].endswith("| 2026-11-25 |")
    assert two_days[3].endswith("| 2026-11-30 |")


def test_pareto_front():
    pts = [(4.0, 50.0), (3.0, 160.0), (8.0, 40.0), (4.5, 60.0), (2.0, 1e4)]
    assert pareto_front(pts) == [4, 1, 0, 2]


def test_cli_eval_and_report(tmp_path, capsys):
    from llmdeploy.cli.main import main

    js = tmp_path / "res" / "dense.json"
    assert main(["eval", "tiny-opt", "--ppl", "shakespeare", "--seq-len", "32", "--max-windows", "2",
                 "--tasks", "shakespeare_lastword", "--limit", "3", "--speed", "--prompt-len", "8",
                 "--new-tokens", "2", "--json", str(js)]) == 0
    assert "shakespeare_lastword" in json.loads(js.read_text())["zero_shot"]
    assert main(["report", str(tmp_path / "res")]) == 0
    assert "| dense |" in capsys.readouterr().out
