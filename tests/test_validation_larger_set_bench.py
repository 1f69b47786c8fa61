"""bench/validation_larger_set.py: held-out scenes are the demo world's next ones, and the verdict reads the files."""

import pytest
from PIL import Image

from lora_studio import demo_data
from lora_studio.paths import DEMO_DATASET_DIR


def test_the_held_out_scenes_follow_the_training_ones_and_differ_from_them(tmp_path, bench_script):
    bench = bench_script("validation_larger_set")
    train, validation = bench.write_world(tmp_path, train_scenes=8, held_out=4)
    trained, held = sorted(train.glob("*.png")), sorted(validation.glob("*.png"))
    assert [p.name[:6] for p in trained] == [f"zkz_{i:02d}" for i in range(8)]
    assert [p.name[:6] for p in held] == [f"zkz_{i:02d}" for i in range(8, 12)]
    for ours in trained:  # the first scenes are the shipped demo set's, byte for byte
        assert ours.read_bytes() == (DEMO_DATASET_DIR / ours.name).read_bytes()
    pixels = {Image.open(p).tobytes() for p in trained}
    assert not any(Image.open(p).tobytes() in pixels for p in held)  # never trained on
    assert all(p.with_suffix(".txt").read_text().startswith(demo_data.TRIGGER) for p in held)


def test_a_short_run_validates_and_scores_every_file(tmp_path, bench_script):
    bench = bench_script("validation_larger_set")
    run = bench.train(42, tmp_path, train_scenes=8, held_out=4, steps=4, every=2)
    rows = bench.score_files(run, bench.scoring_pipeline(), demo_data.eval_cases()[:2], sampling_steps=2)
    assert [r["step"] for r in rows] == [2, 4, 4]  # two checkpoints and the final file
    assert {r["file"] for r in rows} == {"demo-step000002.safetensors", "demo-step000004.safetensors",
                                         "demo.safetensors"}  # fmt: skip
    assert rows[0]["validation_loss"] != rows[1]["validation_loss"]  # other weights, another loss
    assert rows[1]["validation_loss"] == rows[2]["validation_loss"]  # the final file is the last step's weights
    assert all(0.0 <= r[rate] <= 1.0 for r in rows for rate in ("concept", "color", "shape"))
    verdict = bench.judge(rows, final_file="demo.safetensors", best_file=run.best_lora().name)
    assert verdict["best"]["validation_loss"] == min(r["validation_loss"] for r in rows)


def test_the_verdict_compares_the_lowest_loss_file_with_the_final_one(bench_script):
    bench = bench_script("validation_larger_set")
    rows = [{"file": f"f{step}", "step": step, "validation_loss": loss, "concept": concept, "color": 1.0, "shape": 1.0}
            for step, loss, concept in [(1, 0.3, 0.1), (2, 0.2, 0.5), (3, 0.25, 0.7)]]  # fmt: skip
    verdict = bench.judge(rows, final_file="f3", best_file="f2")
    assert verdict["best"]["step"] == 2 and verdict["final"]["step"] == 3
    assert verdict["best_at_least_final"] is False
    assert verdict["loss_vs_concept_rank_correlation"] == pytest.approx(-0.5)
    assert bench.judge(rows, final_file="f2", best_file="f2")["best_at_least_final"] is True
    assert bench.rank_correlation([3, 2, 1], [0.1, 0.2, 0.3]) == pytest.approx(-1.0)
