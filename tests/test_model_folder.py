"""Model folders the analysis tools accept, and the ones they refuse with a message naming the folder."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM,
                          PretrainedConfig, PreTrainedModel)
from transformers.modeling_outputs import CausalLMOutput

from pipeline.analysis import alignment, safety_layers
from pipeline.analysis.model_folder import (TRAINING_FILE, ModelFolderError, chat_prompt, check_device, load_model_folder,
                                            text_parts)
from tests.test_alignment_tool import save_tiny_llava


def _tiny_llama(folder, tokenizer_dir, *, vocab_size: int | None = None, chat_template: bool = True):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=vocab_size or len(tokenizer), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
                         max_position_embeddings=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    if not chat_template:
        tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    if not chat_template:
        (folder / "chat_template.jinja").unlink(missing_ok=True)
    return folder


@pytest.fixture(scope="module")
def llava_dir(tiny_world, tmp_path_factory):
    return save_tiny_llava(tiny_world, tmp_path_factory.mktemp("folder_llava") / "llava")


def test_a_causal_lm_folder_loads_in_eval_mode_with_its_logit_lens_parts(tiny_world):
    loaded = load_model_folder(tiny_world.llm)
    assert not loaded.is_llava and loaded.processor is None and loaded.training == {}
    assert loaded.num_layers == 6 and not loaded.model.training
    norm, lm_head, num_layers = text_parts(loaded)
    assert norm is loaded.model.model.norm and lm_head is loaded.model.lm_head and num_layers == 6
    assert chat_prompt(loaded, "Where is the dog?").endswith("Where is the dog? [/INST]")


def test_a_llava_folder_loads_with_processor_and_the_recorded_training(llava_dir, tmp_path):
    folder = shutil.copytree(llava_dir, tmp_path / "export")
    (folder / TRAINING_FILE).write_text(json.dumps({"stage": "stage2", "tga_layers": [2, 3]}))
    loaded = load_model_folder(folder, require_llava=True)
    assert loaded.is_llava and loaded.processor.image_token == "<image>"
    assert loaded.training["tga_layers"] == [2, 3]
    norm, lm_head, _ = text_parts(loaded)
    assert norm is loaded.model.model.language_model.norm and lm_head is loaded.model.lm_head


def test_a_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ModelFolderError, match=rf"{tmp_path / 'nothing'}: no config\.json"):
        load_model_folder(tmp_path / "nothing")


def test_a_tokenizer_larger_than_the_embeddings_is_refused(tiny_world, tmp_path):
    folder = _tiny_llama(tmp_path / "small_vocab", tiny_world.tokenizer, vocab_size=100)
    with pytest.raises(ModelFolderError, match=rf"{folder}: the tokenizer has \d+ tokens but the model embeds only 100"):
        load_model_folder(folder)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["q"]))
    with pytest.raises(SystemExit, match=rf"safety_layers error: {folder}: the tokenizer has"):
        safety_layers.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                            "--no-mlflow"])


def test_a_folder_without_tokenizer_or_chat_template_is_refused(tiny_world, tmp_path):
    folder = _tiny_llama(tmp_path / "no_template", tiny_world.tokenizer, chat_template=False)
    with pytest.raises(ModelFolderError, match=rf"{folder}: the tokenizer has no chat template"):
        load_model_folder(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelFolderError, match=rf"{folder}: no usable tokenizer"):
        load_model_folder(folder)


def test_a_llava_folder_whose_tokenizer_lacks_the_image_token_is_refused(llava_dir, tmp_path):
    folder = shutil.copytree(llava_dir, tmp_path / "other_image_token")
    processor_config = json.loads((folder / "processor_config.json").read_text())
    (folder / "processor_config.json").write_text(json.dumps({**processor_config, "image_token": "<img>"}))
    with pytest.raises(ModelFolderError, match=rf"{folder}: the tokenizer does not map the image token '<img>'"):
        load_model_folder(folder)

    folder = shutil.copytree(llava_dir, tmp_path / "other_image_id")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "image_token_index": config["image_token_index"] + 1}))
    with pytest.raises(ModelFolderError, match=rf"{folder}: the tokenizer does not map the image token '<image>'"):
        load_model_folder(folder)


def test_unsupported_model_types_are_refused(tiny_world, tmp_path):
    clip = shutil.copytree(tiny_world.clip, tmp_path / "clip")
    with pytest.raises(ModelFolderError, match=rf"{clip}: unsupported model_type 'clip'"):
        load_model_folder(clip)
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    with pytest.raises(ModelFolderError, match=rf"{unknown}: config\.json cannot be read"):
        load_model_folder(unknown)


def test_a_causal_lm_is_refused_where_images_are_needed(tiny_world, tmp_path, capsys):
    with pytest.raises(ModelFolderError, match="is not a Llava model"):
        load_model_folder(tiny_world.llm, require_llava=True)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-000000.tar").write_bytes(b"")
    with pytest.raises(SystemExit, match=rf"alignment error: {tiny_world.llm}: model_type 'llama' is not a Llava"):
        alignment.main(["--model", str(tiny_world.llm), "--shards", str(shards), "--out", str(tmp_path / "o"),
                        "--no-mlflow"])


class _NoHiddenConfig(PretrainedConfig):
    model_type = "tga-test-no-hidden-lm"

    def __init__(self, vocab_size: int = 1000, num_hidden_layers: int = 2, **kwargs):
        self.vocab_size, self.num_hidden_layers = vocab_size, num_hidden_layers
        super().__init__(**kwargs)


class _NoHiddenLM(PreTrainedModel):
    """A causal LM that ignores output_hidden_states (as some custom architectures do)."""
    config_class = _NoHiddenConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(config.vocab_size, 8)
        self.head = torch.nn.Linear(8, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def forward(self, input_ids, **kwargs):
        return CausalLMOutput(logits=self.head(self.embed(input_ids)))


def test_a_model_that_does_not_return_all_hidden_states_is_refused(tiny_world, tmp_path):
    AutoConfig.register(_NoHiddenConfig.model_type, _NoHiddenConfig, exist_ok=True)
    AutoModelForCausalLM.register(_NoHiddenConfig, _NoHiddenLM, exist_ok=True)
    folder = tmp_path / "no_hidden"
    _NoHiddenLM(_NoHiddenConfig()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_world.llm).save_pretrained(folder)
    with pytest.raises(ModelFolderError, match=rf"{folder}: the model returns none hidden states, expected 3"):
        load_model_folder(folder)
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["q"]))
    with pytest.raises(SystemExit, match=rf"safety_layers error: {folder}: the model returns none"):
        safety_layers.main(["--model", str(folder), "--prompts", str(prompts), "--out", str(tmp_path / "o"),
                            "--no-mlflow"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_in_every_tool(tiny_world, tmp_path):
    from pipeline.eval import ability, dsr

    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"id": "a", "prompt": "hi"}]))
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "train-000000.tar").write_bytes(b"")
    cuda = ["--device", "cuda", "--no-mlflow"]
    calls = {
        "safety_layers": lambda: safety_layers.main(["--model", str(tiny_world.llm), "--prompts", str(prompts),
                                                     "--out", str(tmp_path / "s"), *cuda]),
        "alignment": lambda: alignment.main(["--model", str(tiny_world.llm), "--shards", str(tmp_path / "shards"),
                                             "--out", str(tmp_path / "a"), *cuda]),
        "dsr": lambda: dsr.main(["--model", str(tiny_world.llm), "--data", str(tiny_world.root / "eval" / "toxic_images.json"),
                                 "--out", str(tmp_path / "d"), *cuda]),
        "ability": lambda: ability.main(["--model", str(tiny_world.llm), "--data",
                                         str(tiny_world.root / "eval" / "benign_vqa.json"), "--out", str(tmp_path / "b"), *cuda]),
    }
    for tool, call in calls.items():
        with pytest.raises(SystemExit) as exited:
            call()
        message = str(exited.value)
        assert "--device cuda: torch" in message and "sees no CUDA GPU" in message and "\n" not in message, tool
    with pytest.raises(ModelFolderError, match="--device tpu: not a torch device"):
        check_device("tpu")
