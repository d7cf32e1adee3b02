"""Logit-lens safety layers on hand-built LLMs whose answer is known by construction.

Every decoder layer's attention and MLP outputs are zeroed, so the residual stream (and the lens)
stays at the embedding, which predicts a neutral token. Chosen layers get an MLP that writes a
fixed direction into the stream: the refusal token's unembedding direction (from then on the
refusal token is top-1) or the neutral token's (it takes over again).
"""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pipeline.analysis.model_folder import chat_prompt, load_model_folder
from pipeline.analysis.safety_layers import (SampleLayers, lens_distributions, locate, main, read_prompts,
                                             refusal_tokens, suggested_layers, summarize)

NUM_LAYERS = 6
HIDDEN = 16
NEUTRAL, REFUSAL = 0, 1  # residual-stream directions read out as the neutral / refusal token


def _write_direction(layer, direction: int, strength: float) -> None:
    """The layer's MLP adds ~strength * e_direction whatever its (normalised) input is."""
    mlp = layer.mlp
    # silu(gate) * up, both driven by the neutral component that every residual state keeps > 0
    mlp.gate_proj.weight[0, NEUTRAL] = 10.0
    mlp.up_proj.weight[0, NEUTRAL] = 1.0
    mlp.down_proj.weight[direction, 0] = strength


def build_lens_model(folder, tokenizer_dir, *, refusal_from: int | None, neutral_again_at: int | None = None):
    """A Llama whose lens says `neutral_id` up to layer refusal_from - 1, the refusal token from
    `refusal_from` on, and the neutral token again from `neutral_again_at` (hidden_states indices)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    refusal_id = tokenizer(" Sorry", add_special_tokens=False)["input_ids"][0]
    neutral_id = tokenizer(" the", add_special_tokens=False)["input_ids"][0]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=4,
                         num_hidden_layers=NUM_LAYERS, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=256, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, NEUTRAL] = 1.0
        # a non-uniform final norm: normalising the last hidden state twice would change its logits
        model.model.norm.weight.copy_(torch.linspace(1.0, 2.0, HIDDEN))
        model.lm_head.weight.zero_()
        model.lm_head.weight[neutral_id, NEUTRAL] = 5.0
        model.lm_head.weight[refusal_id, REFUSAL] = 5.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.gate_proj.weight.zero_()
            layer.mlp.up_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        if refusal_from is not None:  # hidden_states[k] is the output of decoder layer k - 1
            _write_direction(model.model.layers[refusal_from - 1], REFUSAL, 0.05)
        if neutral_again_at is not None:
            _write_direction(model.model.layers[neutral_again_at - 1], NEUTRAL, 20.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, refusal_id, neutral_id


@pytest.fixture(scope="module")
def lens_models(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("lens_models")
    return {
        "band": build_lens_model(root / "band", tiny_world.tokenizer, refusal_from=2, neutral_again_at=5),
        "late": build_lens_model(root / "late", tiny_world.tokenizer, refusal_from=4),
        "never": build_lens_model(root / "never", tiny_world.tokenizer, refusal_from=None),
    }


def test_construction_makes_the_refusal_token_top1_exactly_in_the_built_layers(lens_models):
    folder, refusal_id, neutral_id = lens_models["band"]
    loaded = load_model_folder(folder)
    probs = lens_distributions(loaded, chat_prompt(loaded, "How do I brew glorbium poison?"))
    assert probs.shape == (NUM_LAYERS + 1, loaded.model.config.vocab_size)
    assert probs.argmax(dim=-1).tolist() == [neutral_id, neutral_id, refusal_id, refusal_id, refusal_id,
                                             neutral_id, neutral_id]
    # the last layer is the model's own output: the lens must not normalise it a second time
    ids = loaded.tokenizer(chat_prompt(loaded, "x"), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = loaded.model(input_ids=ids, output_hidden_states=True)
    final = out.logits[0, -1].softmax(-1)
    assert torch.allclose(lens_distributions(loaded, chat_prompt(loaded, "x"))[-1], final, atol=1e-6)
    twice = loaded.model.lm_head(loaded.model.model.norm(out.hidden_states[-1][0, -1]))
    assert not torch.allclose(twice, out.logits[0, -1], atol=1e-3)


def test_start_and_end_layers_are_the_constructed_ones(lens_models):
    folder, refusal_id, _ = lens_models["band"]
    loaded = load_model_folder(folder)
    result = locate(lens_distributions(loaded, chat_prompt(loaded, "q")), [refusal_id], top_k=5)
    assert (result.start_layer, result.end_layer) == (2, 4)
    assert result.best_rank[2:5] == [1, 1, 1] and min(result.best_rank[:2] + result.best_rank[5:]) > 1

    folder, refusal_id, _ = lens_models["late"]
    loaded = load_model_folder(folder)
    result = locate(lens_distributions(loaded, chat_prompt(loaded, "q")), [refusal_id], top_k=5)
    assert (result.start_layer, result.end_layer) == (4, NUM_LAYERS)


def test_a_model_that_never_refuses_has_no_layers_and_is_counted_not_averaged(lens_models):
    loaded = load_model_folder(lens_models["never"][0])
    never = locate(lens_distributions(loaded, chat_prompt(loaded, "q")), [lens_models["never"][1]], top_k=5)
    # no layer changes anything: the top-k of an all-zero change must not count as a refusal
    assert (never.start_layer, never.end_layer) == (None, None)
    band = SampleLayers(2, 4, [2, 2, 1, 1, 1, 2, 2], [0.1] * 7, [0] * 7)
    late = SampleLayers(4, 6, [2, 2, 2, 2, 1, 1, 1], [0.1] * 7, [0] * 7)
    summary = summarize([band, never, late])
    assert summary["samples"] == 3
    assert (summary["start_found"], summary["start_not_found"]) == (2, 1)
    assert (summary["end_found"], summary["end_not_found"]) == (2, 1)
    assert summary["mean_start_layer"] == 3.0 and summary["mean_end_layer"] == 5.0
    assert summary["suggested_layers"] == [3, 4, 5]
    assert summarize([never])["suggested_layers"] is None


def test_suggested_layers_round_halves_up_and_need_a_band():
    assert suggested_layers(2.5, 4.49) == [3, 4]
    assert suggested_layers(None, 4.0) is None
    assert suggested_layers(5.0, 3.0) is None


def test_refusal_words_resolve_to_first_answer_tokens_through_the_tokenizer(tiny_world):
    tokenizer = AutoTokenizer.from_pretrained(tiny_world.llm)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                           add_generation_prompt=True)
    tokens = refusal_tokens(tokenizer, prompt, ["Sorry", "Unfortunately"])
    by_variant = {(t.word, t.variant): t for t in tokens}
    assert by_variant[("Sorry", "no space")].token == "Sorry"
    assert by_variant[("Sorry", "leading space")].token == " Sorry"
    assert by_variant[("Sorry", "leading space")].token_id == tokenizer(prompt + " Sorry",
                                                                       add_special_tokens=False)["input_ids"][-1]
    # " Unfortunately" starts with a bare-space token here: that variant says nothing and is left out
    assert all(t.token.strip() for t in tokens)
    assert len({t.token_id for t in tokens}) == len(tokens)
    with pytest.raises(ValueError, match="resolve to no token"):
        refusal_tokens(tokenizer, prompt, [" "])


def test_prompts_file_accepts_strings_prompt_objects_and_llava_records(tmp_path):
    items = ["plain question", {"prompt": "from prompt"}, {"text": "from text"},
             {"conversations": [{"from": "human", "value": "<image>\nimage question"},
                                {"from": "gpt", "value": "Sorry."}], "text": "text twin"},
             {"conversations": [{"from": "human", "value": "<image>\nimage question"}]}]
    listed = tmp_path / "prompts.json"
    listed.write_text(json.dumps(items))
    expected = ["plain question", "from prompt", "from text", "text twin", "image question"]
    assert read_prompts(listed) == expected
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps(i) for i in items) + "\n")
    assert read_prompts(lines) == expected
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(["ok", {"question": "no known key"}]))
    with pytest.raises(ValueError, match=r"bad\.json: item 1"):
        read_prompts(bad)


def test_cli_writes_json_plot_and_config_snippet_and_logs_to_mlflow(lens_models, tmp_path):
    from mlflow import MlflowClient

    prompts = tmp_path / "toxic.jsonl"
    prompts.write_text("\n".join(json.dumps({"text": q}) for q in ["How to brew it?", "Where to buy it?"]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    main(["--model", str(lens_models["band"][0]), "--prompts", str(prompts), "--out", str(out),
          "--refusal-words", "Sorry", "--mlflow-uri", uri])
    report = json.loads((out / "safety_layers.json").read_text())
    assert report["summary"]["mean_start_layer"] == 2.0 and report["summary"]["mean_end_layer"] == 4.0
    assert [s["start_layer"] for s in report["samples"]] == [2, 2]
    assert {t["token"] for t in report["refusal_tokens"]} == {"Sorry", " Sorry"}
    assert (out / "safety_layers.png").read_bytes()[:4] == b"\x89PNG"
    assert "layers: [2, 3, 4]" in (out / "tga_layers.yaml").read_text()

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("tga-eval").experiment_id])
    assert run.info.run_name == "safety_layers" and run.data.tags["tga.tool"] == "safety_layers"
    assert run.data.metrics["mean_start_layer"] == 2.0
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "safety_layers.json", "safety_layers.png", "tga_layers.yaml"}


def test_cli_on_a_model_without_refusal_suggests_no_layers(lens_models, tmp_path, capsys):
    prompts = tmp_path / "toxic.json"
    prompts.write_text(json.dumps(["How to brew it?"]))
    main(["--model", str(lens_models["never"][0]), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
          "--refusal-words", "Sorry", "--no-mlflow"])
    summary = json.loads((tmp_path / "o" / "safety_layers.json").read_text())["summary"]
    assert summary["start_not_found"] == 1 and summary["mean_start_layer"] is None
    assert not (tmp_path / "o" / "tga_layers.yaml").exists()
    assert "no TGA layers suggested" in capsys.readouterr().out


def test_the_lens_of_a_llava_folder_is_the_lens_of_its_llm(tiny_world, tmp_path):
    from tests.test_alignment_tool import save_tiny_llava

    llm = load_model_folder(tiny_world.llm)
    llava = load_model_folder(save_tiny_llava(tiny_world, tmp_path / "llava", template="tokenizer"))
    question = "Where can I get glorbium poison without being traced?"
    assert chat_prompt(llava, question) == chat_prompt(llm, question)
    assert torch.allclose(lens_distributions(llava, chat_prompt(llava, question)),
                          lens_distributions(llm, chat_prompt(llm, question)), atol=1e-5)
