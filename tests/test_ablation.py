"""The ablation runner: resuming, stopping on a step that did not finish, the results table, the
suite's plan (seeds, shared training, the eval joins, alignment and over-refusal steps), and (slow)
ablation iv's evaluation path for real: corpus without toxic texts -> caption index -> retrieval
join of the eval file -> DSR reading the join's shards. The suite's results: test_ablation_results.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from pipeline.config import load_config
from pipeline.eval import dsr
from pipeline.eval.ablation import (ALIGNMENT_OPTIONS, AblationConfig, ConfigRun, Step, configured_layers,
                                    export_dir, main, options_named, plan, results, run, suite_plan, table)
from pipeline.eval.corpus_filter import main as corpus_filter
from pipeline.train.run_folder import RunFolder
from tests.tiny_llava import build_tiny_llava

REPO = Path(__file__).resolve().parent.parent


def _touch(path: Path) -> list[str]:
    return [sys.executable, "-c", f"import pathlib; pathlib.Path({str(path)!r}).write_text('x')"]


def test_steps_whose_products_exist_are_skipped_and_the_others_run_in_order(tmp_path, capsys):
    done, first, second = tmp_path / "done", tmp_path / "first", tmp_path / "second"
    done.write_text("x")
    run([Step("skipped", [sys.executable, "-c", "raise SystemExit(3)"], skip_if=(done,)),
         Step("first", _touch(first), produces=first), Step("second", _touch(second), skip_if=(second,))])
    assert first.exists() and second.exists()
    out = capsys.readouterr().out
    assert "[ablation 1/3] skipped: done already" in out and "[ablation 3/3] second: " in out


def test_a_failing_step_or_one_that_ends_without_its_product_stops_the_ablation(tmp_path):
    with pytest.raises(SystemExit, match=r"\[ablation 1/2\] broken failed \(exit 3\)"):
        run([Step("broken", [sys.executable, "-c", "raise SystemExit(3)"]), Step("never", _touch(tmp_path / "x"))])
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit, match="stage1 ended without writing .*projector.safetensors \\(preempted\\?\\)"):
        run([Step("stage1", [sys.executable, "-c", "pass"], produces=tmp_path / "projector.safetensors")])


def test_dry_run_prints_every_command_and_runs_none(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((REPO / "configs/ablations/tiny/i_plain_llava.yaml").read_text())
    spec.update(tiny_world=str(tmp_path / "world"), train_dir=str(tmp_path / "train"), eval_dir=str(tmp_path / "eval"))
    (tmp_path / "ablation.yaml").write_text(yaml.safe_dump(spec))
    main([str(tmp_path / "ablation.yaml"), "--dry-run"])
    out = capsys.readouterr().out
    assert f"pipeline.tinyworld --out {tmp_path / 'world'}" in out
    assert "CONFIG=configs/tiny/stage1.yaml bash launch/stage1.sh prompt.insert_retrieved=false" in out
    assert f"pipeline.eval.dsr --model {tmp_path / 'train' / 'export' / 'hf'}" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ablation.yaml"]


def test_table_lines_up_the_headline_numbers_of_finished_ablations(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cfg = load_config(AblationConfig, "configs/ablations/tiny/iii_tga.yaml", [f"eval_dir={tmp_path}"])
    (tmp_path / "dsr").mkdir()
    (tmp_path / "dsr" / "summary.json").write_text(json.dumps({"dsr": {"image": 0.5, "text": 1.0, "gap": 0.5}}))
    assert results(cfg) == {"ablation": "iii_tga", "dsr_image": 0.5, "dsr_text": 1.0, "dsr_gap": 0.5,
                            "exact_match": None, "token_f1": None}
    assert table([results(cfg)]).splitlines()[2] == "| iii_tga | 0.500 | 1.000 | 0.500 | — | — |"


def test_table_after_a_suite_reads_every_seed_folder_it_left(tmp_path, monkeypatch, capsys):
    """`make ablations` evaluates into eval_dir/seed-<N>/: --table shows a row per seed found,
    or the seeds asked for."""
    monkeypatch.chdir(REPO)
    for seed, image in ((0, 0.25), (1, 0.75)):
        (tmp_path / f"seed-{seed}" / "dsr").mkdir(parents=True)
        (tmp_path / f"seed-{seed}" / "dsr" / "summary.json").write_text(
            json.dumps({"dsr": {"image": image, "text": 1.0, "gap": 1.0 - image}}))
    config = tmp_path / "iii.yaml"
    config.write_text(yaml.safe_dump({**yaml.safe_load((REPO / "configs/ablations/tiny/iii_tga.yaml").read_text()),
                                      "eval_dir": str(tmp_path)}))
    main(["--table", str(config)])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert rows == ["| iii_tga seed 0 | 0.250 | 1.000 | 0.750 | — | — |",
                    "| iii_tga seed 1 | 0.750 | 1.000 | 0.250 | — | — |"]
    main(["--table", "--seeds", "1", "--", str(config)])
    assert capsys.readouterr().out.splitlines()[2:] == rows[1:]


def test_corpus_filter_drops_rows_marked_toxic_and_snippet_texts(tiny_world, tmp_path):
    snippets = tmp_path / "snippets.txt"
    first_scene = pq.read_table(tiny_world.captions).to_pylist()[0]["text"]
    snippets.write_text(first_scene + "\n")
    dropped = corpus_filter(["--captions", str(tiny_world.captions), "--toxic-snippets", str(snippets),
                             "--out", str(tmp_path / "clean.parquet")])
    before = pq.read_table(tiny_world.captions).to_pylist()
    after = pq.read_table(tmp_path / "clean.parquet").to_pylist()
    assert dropped == sum(r["toxic"] for r in before) + 1 == len(before) - len(after)
    assert not any(r["toxic"] for r in after) and first_scene not in {r["text"] for r in after}


@pytest.mark.slow
def test_ablation_iv_retrieves_for_eval_images_from_an_index_without_toxic_texts(tiny_world, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    python = REPO / ".retrieval-venv" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run `make retrieval-env` (the retrieval stages need it)")
    clip = [f"clip_model=hf_clip:{tiny_world.clip}", f"retrieval_python={python}"]
    cfg = load_config(AblationConfig, "configs/ablations/tiny/iv_no_toxic_index.yaml", [
        "tiny_world=null", f"train_dir={tmp_path / 'train'}", f"eval_dir={tmp_path / 'eval'}",
        f"eval.toxic={tiny_world.toxic_images_json}", f"eval.benign={tiny_world.benign_vqa_json}",
        f"eval.index_dir={tmp_path / 'eval' / 'index_no_toxic'}", f"eval.retrieved_dir={tmp_path / 'eval' / 'retrieved'}",
        f"eval.join.overrides={json.dumps([*clip, f'caption_map={tiny_world.image_captions}'])}",
        f"no_toxic_index.captions={tiny_world.captions}", f"no_toxic_index.toxic_snippets={tiny_world.toxic_snippets}",
        f"no_toxic_index.index.overrides={json.dumps(clip)}"])
    steps = {s.name: s for s in plan(cfg)}
    run([steps[name] for name in ("corpus without toxic texts", "caption_index without toxic texts",
                                  "retrieval_join dsr data")])
    index_stats = json.loads((cfg.eval.index_dir / "stats.json").read_text())
    assert index_stats["counts"]["toxic"] == 0 and index_stats["counts"]["indexed"] > 2000

    model = build_tiny_llava(tiny_world, tmp_path / "llava", insert_retrieved=True)
    out = tmp_path / "eval" / "dsr"
    dsr.main(["--model", str(model), "--data", str(tiny_world.toxic_images_json), "--out", str(out),
              "--retrieved", str(tmp_path / "eval" / "retrieved" / "dsr"), "--limit", "4", "--max-new-tokens", "4",
              "--no-mlflow"])
    corpus = {r["text"] for r in pq.read_table(tmp_path / "eval" / "captions_no_toxic.parquet").to_pylist()}
    images = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()
              if json.loads(line)["modality"] == "image"]
    assert len(images) == 4
    for row in images:
        retrieved = row["prompt"].split("Retrieved Text: ", 1)[1].split(". <image>", 1)[0]
        assert retrieved in corpus, row["id"]


# ---- the suite: seeds, shared training, eval steps ----------------------------------------------

TINY = [REPO / "configs" / "ablations" / "tiny" / f"{name}.yaml"
        for name in ("i_plain_llava", "ii_retrieved_text_only", "iii_tga", "iv_no_toxic_index")]


def _tiny(name: str, overrides: list[str] = ()) -> AblationConfig:
    return load_config(AblationConfig, REPO / "configs" / "ablations" / "tiny" / f"{name}.yaml", list(overrides))


def _by_name(steps: list[Step]) -> dict[str, Step]:
    return {s.name: s for s in steps}


def test_a_suite_trains_each_ablation_once_per_seed_in_its_seed_folder_and_iv_reuses_iiis_training(monkeypatch):
    monkeypatch.chdir(REPO)
    configs = [load_config(AblationConfig, path) for path in TINY]
    steps = _by_name(suite_plan(configs, [0, 1], python="python"))
    trained = [name for name in steps if name.endswith(": stage1")]
    assert trained == [f"{a} seed {s}: stage1" for a in ("i_plain_llava", "ii_retrieved_text_only", "iii_tga")
                       for s in (0, 1)]
    for seed in (0, 1):
        stage1, stage2 = steps[f"i_plain_llava seed {seed}: stage1"], steps[f"i_plain_llava seed {seed}: stage2"]
        run_dir = Path(f"work/ablations/i_plain_llava/seed-{seed}/runs")
        assert stage1.argv[2:] == ["prompt.insert_retrieved=false", "tga.align_on=false", "tga.pair_on=false",
                                   f"seed={seed}", f"run_dir={run_dir / 'stage1'}"]
        assert f"seed={seed}" in stage2.argv and f"model.projector={RunFolder(run_dir / 'stage1').projector}" in stage2.argv
        iv = steps[f"iv_no_toxic_index seed {seed}: dsr"]
        assert iv.argv[iv.argv.index("--model") + 1] == f"work/ablations/iii_tga/seed-{seed}/export/hf"
        assert iv.argv[iv.argv.index("--out") + 1] == f"work/ablations/iv_no_toxic_index/eval/seed-{seed}/dsr"
    # shared work is planned once: the tiny world, the index, the training shards
    assert [n for n in steps if n.endswith("tiny world")] == ["i_plain_llava seed 0: tiny world"]
    assert len([n for n in steps if "caption_index configs/tiny" in n]) == 1
    # the eval files' joins depend on the index only: i, ii and iii query work/index and share them,
    # iv's index without toxic texts gets its own
    joins = [n for n in steps if n.endswith("retrieval_join dsr data")]
    assert joins == ["i_plain_llava seed 0: retrieval_join dsr data", "iv_no_toxic_index seed 0: retrieval_join dsr data"]
    # the index without toxic texts does not depend on the seed
    assert {steps[f"iv_no_toxic_index seed {s}: caption_index without toxic texts"].argv[-1] for s in (0, 1)} == \
        {"output_dir=work/ablations/iv_no_toxic_index/eval/index_no_toxic"}


def test_a_suite_refuses_two_ablations_of_one_name_or_a_repeated_seed(monkeypatch):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit, match="distinct ablation names and seeds"):
        suite_plan([_tiny("iii_tga"), _tiny("iii_tga")], [0])
    with pytest.raises(SystemExit, match="distinct ablation names and seeds"):
        suite_plan([_tiny("iii_tga")], [1, 1])


def test_plain_llava_joins_its_eval_images_for_the_alignment_but_prompts_without_retrieved_text(monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = _tiny("i_plain_llava")
    steps = _by_name(plan(cfg, python="python"))
    joined = cfg.eval.retrieved_dir / "dsr"
    assert f"output_dir={joined}" in steps["retrieval_join dsr data"].argv
    assert "--no-insert-retrieved" in steps["dsr"].argv and "--retrieved" not in steps["dsr"].argv
    alignment = steps["alignment"].argv
    assert alignment[2:] == ["pipeline.analysis.alignment", "--model", str(export_dir(cfg)), "--shards", str(joined),
                             "--out", str(cfg.eval_dir / "alignment"), "--no-mlflow", "--include-toxic"]
    assert steps["alignment"].produces == cfg.eval_dir / "alignment" / "alignment.json"
    assert [s.name for s in plan(cfg, python="python")][-7:] == [
        "retrieval_join dsr data", "dsr", "alignment", "retrieval_join over_refusal data", "over_refusal",
        "retrieval_join ability data", "ability"]


def test_the_dsr_join_never_takes_the_refusal_as_caption_and_is_aligned_only_with_real_captions(monkeypatch):
    monkeypatch.chdir(REPO)
    real = load_config(AblationConfig, REPO / "configs/ablations/real/iii_tga.yaml")  # image_caption: answer
    steps = _by_name(plan(real, python="python"))
    assert "image_caption=none" in steps["retrieval_join dsr data"].argv and "alignment" not in steps
    assert "image_caption=answer" in steps["retrieval_join ability data"].argv  # VQA answers never leak
    tiny = _by_name(plan(_tiny("iii_tga"), python="python"))  # caption_map: the toxic scenes' captions
    assert "image_caption=caption_map" in tiny["retrieval_join dsr data"].argv and "alignment" in tiny


def test_the_alignment_step_takes_only_the_eval_options_the_alignment_tool_has(monkeypatch):
    monkeypatch.chdir(REPO)
    real = load_config(AblationConfig, REPO / "configs/ablations/real/iii_tga.yaml",
                       ["eval.join.overrides=[image_caption=retrieved]"])
    assert "--max-new-tokens" in real.eval.args
    assert _by_name(plan(real, python="python"))["alignment"].argv[-6:] == [
        "--device", "cuda", "--dtype", "bf16", "--batch-size", "16"]
    assert options_named(["--limit", "3", "--device=cuda", "--dtype", "bf16"], ALIGNMENT_OPTIONS) == [
        "--device=cuda", "--dtype", "bf16"]


def test_benign_requests_add_an_over_refusal_join_and_dsr_run_that_stays_out_of_the_training_run(monkeypatch):
    monkeypatch.chdir(REPO)
    assert not any("over_refusal" in s.name for s in plan(_tiny("iii_tga", ["eval.benign_requests=null"]),
                                                          python="python"))
    requests = Path("work/tiny/eval/benign_requests.json")
    cfg = _tiny("iii_tga", [f"eval.benign_requests={requests}", "eval.retrieved_dir=null"])
    steps = _by_name(plan(cfg, python="python"))
    joined = cfg.eval_dir / "retrieved" / "over_refusal"
    assert f"input={requests}" in steps["retrieval_join over_refusal data"].argv
    argv = steps["over_refusal"].argv
    assert argv[2] == "pipeline.eval.dsr" and argv[argv.index("--data") + 1] == str(requests)
    assert argv[argv.index("--out") + 1] == str(cfg.eval_dir / "over_refusal")
    assert argv[argv.index("--retrieved") + 1] == str(joined) and argv[-1] == "--no-mlflow"
    assert argv[argv.index("--expect") + 1] == "answer"  # reported as over-refusal, not as DSR
    assert requests in steps["tiny world"].skip_if  # a world without the file is generated again
    assert list(steps)[-2:] == ["retrieval_join ability data", "ability"]


def test_the_safety_layers_of_a_config_are_its_tga_layers_after_overrides(monkeypatch):
    monkeypatch.chdir(REPO)
    stage2 = _tiny("iii_tga").stage2
    assert configured_layers(stage2) == (2, 3, 4)
    assert configured_layers(ConfigRun(stage2.config, ["tga.layers=[1, 5]"])) == (1, 5)


def test_suite_options_are_refused_without_suite_and_the_suite_needs_an_out_folder(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main([str(TINY[2]), "--seeds", "0", "1"])
    assert "are options of --suite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--suite", *map(str, TINY)])
    assert "--suite needs --out" in capsys.readouterr().err
