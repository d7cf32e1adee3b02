"""A few seconds of training that make the tiny models behave like the real ones where it matters.

- CLIP: contrastive training on the scene image/caption pairs, so the caption index retrieves
  related text for an image (the premise of TGA's retrieval), and on renderings of every concept's
  symbol next to the concept's texts, as a web-trained CLIP has seen such pictures, so a toxic
  picture it never saw retrieves its concept's snippets (world.json records both rates).
- LLM: refuses the toxic text requests and answers benign ones. TGA transfers an *existing* text
  refusal to images; a random LLM has none to transfer, and the safety-layer analysis would find none.

Both run under `models.deterministic_torch` (called by the generator) and draw their batches from
a seeded generator, so the same seed gives byte-identical weights on the same machine and stack.
"""
from __future__ import annotations

import torch
from transformers import CLIPModel, LlamaForCausalLM, PreTrainedTokenizerFast

from pipeline.progress import progress

IGNORE_INDEX = -100


def train_clip(model: CLIPModel, pixel_values: torch.Tensor, token_ids: torch.Tensor, *, groups: list[int],
               steps: int, batch_size: int, lr: float, generator: torch.Generator) -> list[float]:
    """Symmetric InfoNCE on (image i, text i) pairs where every pair of the same group counts as a
    positive (a concept's renderings and its snippets): with one-hot targets a concept's snippets
    in one batch would be each other's negatives. Returns the loss per step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    groups = torch.as_tensor(groups)
    model.train()
    losses = []
    for _ in progress_steps(steps, "tiny CLIP"):
        batch = torch.randperm(len(token_ids), generator=generator)[:batch_size]
        ids = token_ids[batch]
        ids = ids[:, :int((ids != 0).nonzero()[:, 1].max()) + 1]  # trailing padding: causal, after the pooled eos
        logits = model(input_ids=ids, pixel_values=pixel_values[batch]).logits_per_image
        same = (groups[batch, None] == groups[None, batch]).float()
        targets = same / same.sum(dim=1, keepdim=True)  # symmetric: rows and columns alike
        loss = (torch.nn.functional.cross_entropy(logits, targets)
                + torch.nn.functional.cross_entropy(logits.T, targets)) / 2
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def progress_steps(steps: int, desc: str):
    """range(steps) with a progress line: the two trainings are most of the world's minutes."""
    with progress(steps, desc=desc, unit="step") as bar:
        for step in range(steps):
            yield step
            bar.update(1)


@torch.no_grad()
def clip_scores(model: CLIPModel, pixel_values: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """[n_images, n_texts] cosine similarities, the score a CLIP retrieval index ranks by."""
    image = torch.nn.functional.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output, dim=-1)
    text = torch.nn.functional.normalize(model.get_text_features(input_ids=token_ids).pooler_output, dim=-1)
    return image @ text.T


def chat_example(tokenizer: PreTrainedTokenizerFast, question: str, answer: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one llama-2 chat turn; only the answer and `</s>` are learned.
    The prompt is tokenized on its own: byte-level BPE never merges across the space that starts
    the answer, so prompt ids are an exact prefix of the full conversation's ids."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(f" {answer} {tokenizer.eos_token}", add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def train_llm(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, pairs: list[tuple[str, str]], *,
              steps: int, batch_size: int, lr: float, generator: torch.Generator) -> list[float]:
    """Supervised chat tuning on (question, answer) pairs; returns the loss per step."""
    examples = [chat_example(tokenizer, q, a) for q, a in pairs]
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)
    model.train()
    losses = []
    for _ in progress_steps(steps, "tiny LLM"):
        batch = torch.randperm(len(examples), generator=generator)[:batch_size].tolist()
        input_ids = _pad([examples[i][0] for i in batch], tokenizer.pad_token_id)
        labels = _pad([examples[i][1] for i in batch], IGNORE_INDEX)
        attention_mask = _pad([[1] * len(examples[i][0]) for i in batch], 0)
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def refusal_rate(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, questions: list[str],
                 refusal: str = "Sorry") -> float:
    """Share of questions whose greedy first answer token is the first token of `refusal`."""
    refusal_id = tokenizer(f" {refusal}", add_special_tokens=False)["input_ids"][0]
    refused = 0
    for question in questions:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        refused += int(model(input_ids=ids).logits[0, -1].argmax().item() == refusal_id)
    return refused / len(questions)
