"""bench/compile_equality.py, the device check that compiled training (and CUDA graphs) matches eager training."""

import pytest

from lora_studio.config import TrainConfig

ACCUMULATING_GRAPHS = {"torch_compile": True, "compile_mode": "reduce-overhead",
                       "optimizer": {"gradient_accumulation_steps": 2}}  # fmt: skip


def test_two_eager_runs_agree_and_a_different_run_is_caught(tmp_path, bench_script):
    bench = bench_script("compile_equality")
    (row,) = bench.check(steps=2, precisions=["no"], modes=[], folder=tmp_path / "check")
    assert row["case"] == "eager again" and row["within"]
    assert row["gradient_errors"] == row["loss_errors"] == ["0.00e+00", "0.00e+00"]
    assert row["largest_weight_difference"] == 0.0
    eager = bench.trained(tmp_path / "a", 2, "no", [])
    assert len(eager.gradients) == len(eager.losses) == 2  # one per optimizer step
    assert all(g.norm() > 0 for g in eager.gradients) and all(loss > 0 for loss in eager.losses)
    other_seed = bench.trained(tmp_path / "b", 2, "no", ["seed=1"])
    assert min(bench.gradient_errors(eager.gradients, other_seed.gradients)) > bench.GRADIENT_TOLERANCE["bf16"]
    assert max(bench.loss_errors(eager.losses, other_seed.losses)) > bench.GRADIENT_TOLERANCE["no"]
    assert bench.largest_difference(eager.weights, other_seed.weights) > 0


def test_accumulated_gradients_are_recorded_once_per_optimizer_step(tmp_path, bench_script):
    bench = bench_script("compile_equality")
    plain = bench.trained(tmp_path / "a", 2, "no", [])
    accumulating = bench.trained(tmp_path / "b", 2, "no", ["optimizer.gradient_accumulation_steps=2"])
    assert len(accumulating.gradients) == 2
    assert bench.gradient_errors(plain.gradients, accumulating.gradients)[0] > 1e-3  # two batches, not one


def test_the_accumulation_guard_is_lifted_only_inside_the_check(bench_script):
    bench = bench_script("compile_equality")
    assert TrainConfig(**ACCUMULATING_GRAPHS).combination_problems()
    with bench.accumulation_guard_lifted():
        assert not TrainConfig(**ACCUMULATING_GRAPHS).combination_problems()
        assert TrainConfig(compile_mode="reduce-overhead").combination_problems()  # other rules still hold
    assert any(bench.ACCUMULATION_GUARD in p for p in TrainConfig(**ACCUMULATING_GRAPHS).combination_problems())


def test_the_compared_cases_cover_both_modes_and_accumulation(bench_script):
    names = [name for name, _, _ in bench_script("compile_equality").cases(["default", "reduce-overhead"])]
    assert names == ["eager again", "compiled default", "compiled reduce-overhead", "accumulating, reduce-overhead"]
    with pytest.raises(ValueError, match="different tensors"):
        bench_script("compile_equality").largest_difference({"a": 1}, {"b": 1})


def test_a_failing_case_is_a_row_and_the_figures_so_far_are_kept(tmp_path, bench_script, monkeypatch):
    bench = bench_script("compile_equality")
    real = bench.trained

    def graphs_fail(out, steps, precision, overrides):
        if "torch_compile=true" in overrides:
            raise RuntimeError("CUDA graph capture failed")
        return real(out, steps, precision, overrides)

    monkeypatch.setattr(bench, "trained", graphs_fail)
    seen = []
    rows = bench.check(1, ["no"], ["default"], tmp_path, progress=lambda rows: seen.append(len(rows)))
    assert [r["case"] for r in rows] == ["eager again", "compiled default"] and seen == [1, 2]
    assert rows[0]["within"] and not rows[1]["within"] and "CUDA graph capture failed" in rows[1]["error"]
