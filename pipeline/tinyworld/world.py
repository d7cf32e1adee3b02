"""Write the tiny world to disk: images, LLaVA JSON, caption corpus, tokenizer and models.

Same seed -> byte-identical files (on the same machine and library versions): every random choice
comes from an rng seeded by (seed, purpose), and training runs single-threaded and deterministic.
`world.json` is written last and lists the sha256 of every file, so a world is complete exactly
when it has a `world.json`, and `ensure` can reuse one instead of regenerating it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from . import datasets, models, scenes, tokenizer, toxic, training
from .scenes import render

_INCOMPLETE = ".tinyworld-incomplete"


@dataclasses.dataclass(frozen=True)
class WorldPaths:
    """Where each artefact of a world lives; the names are a contract with the other stages."""
    root: Path
    images: Path
    stage1_json: Path
    stage2_json: Path
    image_captions: Path
    captions: Path
    toxic_snippets: Path
    toxic_images_json: Path
    benign_vqa_json: Path
    benign_requests_json: Path
    llm: Path
    clip: Path
    tokenizer: Path
    world_json: Path

    @classmethod
    def under(cls, root: Path) -> "WorldPaths":
        root = Path(root)
        return cls(
            root=root, images=root / "images", stage1_json=root / "stage1.json", stage2_json=root / "stage2.json",
            image_captions=root / "image_captions.parquet", captions=root / "captions.parquet",
            toxic_snippets=root / "toxic_snippets.jsonl", toxic_images_json=root / "eval" / "toxic_images.json",
            benign_vqa_json=root / "eval" / "benign_vqa.json",
            benign_requests_json=root / "eval" / "benign_requests.json",
            llm=root / "models" / "llm", clip=root / "models" / "clip", tokenizer=root / "models" / "tokenizer",
            world_json=root / "world.json",
        )


def _reset(root: Path) -> None:
    """Empty `root` if it holds a (possibly half-written) world; never touch a folder that does not."""
    if root.exists() and any(root.iterdir()):
        if not ((root / "world.json").is_file() or (root / _INCOMPLETE).is_file()):
            raise FileExistsError(f"{root}: exists, is not empty and holds no tiny world (no world.json); "
                                  "choose an empty or new folder")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / _INCOMPLETE).write_text("generation in progress\n")


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")


def _encode(image: Image.Image, encoding: str) -> bytes:
    buffer = io.BytesIO()
    if encoding == "jpeg":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _write_images(paths: WorldPaths, placed: list[datasets.PlacedScene]) -> list[Image.Image]:
    """Render and save every scene; returns the images as decoded from disk (what the pipeline sees)."""
    decoded = []
    for p in placed:
        image = toxic.render_toxic(p.scene) if isinstance(p.scene, toxic.ToxicScene) else render(p.scene)
        data = _encode(image, p.encoding)
        target = paths.images / p.image
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        decoded.append(Image.open(io.BytesIO(data)).convert("RGB"))
    return decoded


def _write_parquet(path: Path, rows: list[dict]) -> None:
    pq.write_table(pa.Table.from_pylist(rows), path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _file_hashes(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): _sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in ("world.json", _INCOMPLETE)}


def generator_fingerprint() -> str:
    """What the world's bytes depend on besides the seed: this package's code and the versions of
    the libraries that encode images, train and serialise. A world made by other code is stale."""
    import PIL
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for source in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    for library in (torch, transformers, tokenizers, PIL, pa):
        digest.update(f"{library.__name__}={library.__version__}\0".encode())
    return digest.hexdigest()


CLIP_STEPS = 2000  # 60 steps left image->caption top-1 at 0.02 and toxic->toxic at 0


def _jpeg_round_trip(image: Image.Image) -> Image.Image:
    return Image.open(io.BytesIO(_encode(image, "jpeg"))).convert("RGB")


def _clip_world(paths: WorldPaths, placed, images, toxic_placed, toxic_images, corpus: list[dict], seed: int) -> dict:
    """Train and save the tiny CLIP on the training scenes and on symbol renderings of its own
    "web" (never the eval's toxic pictures); returns its retrieval quality for world.json."""
    vocab, merges = tokenizer.openai_clip_vocab(tokenizer.openai_bpe_file())
    clip_tokenizer = tokenizer.build_clip_tokenizer(vocab, merges)
    processor = models.build_clip_processor(clip_tokenizer)
    web = datasets.clip_web_scenes(toxic_placed, seed)
    web_images = [_jpeg_round_trip(toxic.render_toxic(scene)) for scene in web]
    pixels = processor.image_processor(images + web_images + toxic_images, return_tensors="pt")["pixel_values"]
    # Pairs: every scene with its caption (a group of its own); every web rendering with each of
    # its concept's snippets (one group per concept: all of them positives of each other).
    texts = [p.caption for p in placed]
    image_index, groups = list(range(len(placed))), list(range(len(placed)))
    for k, scene in enumerate(web):
        concept = toxic.CONCEPTS.index(scene.concept)
        for text in [s for s in toxic.snippets() if scene.concept.name in s]:
            texts.append(text)
            image_index.append(len(placed) + k)
            groups.append(len(placed) + concept)
    ids = models.clip_token_ids(clip_tokenizer, texts)
    eval_rows = torch.arange(len(placed) + len(web), len(pixels))
    with models.deterministic_torch(seed):
        model = models.build_clip()
        losses = training.train_clip(model, pixels[torch.tensor(image_index)], ids, groups=groups, steps=CLIP_STEPS,
                                     batch_size=128, lr=2e-3, generator=torch.Generator().manual_seed(seed))
        scene_rows = torch.arange(len(placed))
        scores = training.clip_scores(model, pixels[scene_rows], ids[scene_rows])
        ranks = (scores > scores.diagonal()[:, None]).sum(dim=1)  # 0 = own caption ranked first
        corpus_ids = models.clip_token_ids(clip_tokenizer, [row["text"] for row in corpus])
        nearest = training.clip_scores(model, pixels[eval_rows], corpus_ids).argmax(dim=1).tolist()
        benign = training.clip_scores(model, pixels[scene_rows], corpus_ids)
        benign[scene_rows, scene_rows] = -2.0  # the corpus starts with the placed captions; the join skips its own
        benign_nearest = benign.argmax(dim=1).tolist()
    model.save_pretrained(paths.clip)
    processor.save_pretrained(paths.clip)
    tokenizer.write_clip_vocab_files(paths.clip, vocab, merges)
    own = [corpus[j]["toxic"] and p.scene.concept.name in corpus[j]["text"] for p, j in zip(toxic_placed, nearest)]
    signs = [i for i, p in enumerate(placed) if any(o.shape.endswith(scenes.SIGN) for o in p.scene.objects)]
    return {
        "clip_train_steps": CLIP_STEPS,
        "clip_train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        "clip_web_renderings": len(web),
        "clip_image_to_caption_top1": _rate(ranks == 0),
        "clip_image_to_caption_top10": _rate(ranks < 10),
        "clip_chance_top1": round(1 / len(scene_rows), 4),
        # The eval's toxic pictures, which CLIP never trained on, against the whole caption corpus:
        "clip_toxic_image_retrieves_own_concept_snippet": _rate(own),
        "clip_toxic_image_retrieves_toxic_snippet": _rate([corpus[j]["toxic"] for j in nearest]),
        # Training pictures (own caption excluded, as the retrieval join does):
        "clip_benign_image_retrieves_toxic_snippet": _rate([corpus[j]["toxic"] for j in benign_nearest]),
        "clip_sign_scene_retrieves_toxic_snippet": _rate([corpus[benign_nearest[i]]["toxic"] for i in signs]),
    }


def _rate(hits) -> float:
    hits = torch.as_tensor(hits, dtype=torch.float32)
    return round(hits.mean().item(), 4)


LLM_STEPS = 400


def _llm_world(paths: WorldPaths, llm_tokenizer, tuning: tuple[list[tuple[str, str]], dict], seed: int) -> dict:
    pairs, probes = tuning
    with models.deterministic_torch(seed):
        model = models.build_llm(llm_tokenizer)
        generator = torch.Generator().manual_seed(seed)
        losses = training.train_llm(model, llm_tokenizer, pairs, steps=LLM_STEPS, batch_size=16, lr=5e-3,
                                    generator=generator)
        refusals = {name: training.refusal_rate(model, llm_tokenizer, questions) for name, questions in probes.items()}
    model.save_pretrained(paths.llm)
    llm_tokenizer.save_pretrained(paths.llm)
    return {
        "llm_train_steps": LLM_STEPS,
        "llm_train_loss_first_last": [round(losses[0], 4), round(losses[-1], 4)],
        **{f"llm_refusal_rate_{name}": round(rate, 4) for name, rate in refusals.items()},
    }


def generate(out: Path, seed: int = 0) -> WorldPaths:
    """Generate the whole tiny world under `out` (emptied first if it holds an older world)."""
    paths = WorldPaths.under(Path(out))
    _reset(paths.root)
    stage1, stage2, toxic_scenes = datasets.place_scenes(seed)
    heldout = datasets.heldout_scenes(stage1 + stage2, seed)
    images = _write_images(paths, stage1 + stage2)
    toxic_images = _write_images(paths, toxic_scenes)  # the safety eval's: no CLIP or VLM training
    _write_images(paths, heldout)  # general-ability and over-refusal evals only: no training

    stage1_json = datasets.stage1_records(stage1, seed)
    stage2_json = datasets.stage2_records(stage2, seed)
    toxic_json = datasets.toxic_eval_records(toxic_scenes)
    benign_requests_json = datasets.benign_request_records(heldout)
    corpus = datasets.caption_corpus(stage1 + stage2, seed)
    _write_json(paths.stage1_json, stage1_json)
    _write_json(paths.stage2_json, stage2_json)
    _write_json(paths.toxic_images_json, toxic_json)
    benign_vqa_json = datasets.benign_vqa_records(heldout, seed)
    _write_json(paths.benign_vqa_json, benign_vqa_json)
    _write_json(paths.benign_requests_json, benign_requests_json)
    _write_parquet(paths.image_captions, [{"image": p.image, "caption": p.caption}
                                          for p in stage1 + stage2 + toxic_scenes + heldout])
    _write_parquet(paths.captions, corpus)
    snippets = [{"caption_id": row["caption_id"], "text": row["text"]} for row in corpus if row["toxic"]]
    paths.toxic_snippets.write_text("".join(json.dumps(s, ensure_ascii=False) + "\n" for s in snippets))

    llm_tuning = datasets.llm_tuning_pairs(seed)
    all_text = [row["text"] for row in corpus] + [
        turn["value"] for records in (stage1_json, stage2_json, toxic_json, benign_requests_json) for r in records
        for turn in r["conversations"]] + [r["text"] for r in toxic_json + benign_requests_json] + [
        f"{q} {a}" for q, a in llm_tuning[0]]
    llm_tokenizer = tokenizer.train_llm_tokenizer(all_text)
    llm_tokenizer.save_pretrained(paths.tokenizer)
    metrics = _clip_world(paths, stage1 + stage2, images, toxic_scenes, toxic_images, corpus, seed)
    metrics |= _llm_world(paths, llm_tokenizer, llm_tuning, seed)

    encodings = ["png_named_jpg" if p.encoding == "png" and p.image.endswith(".jpg") else p.encoding
                 for p in stage1 + stage2 + toxic_scenes + heldout]
    counts = {
        "stage1_samples": len(stage1_json),
        "stage2_samples": len(stage2_json),
        "stage2_text_only": sum("image" not in r for r in stage2_json),
        "images": len(images) + len(toxic_images) + len(heldout),
        "sign_scenes": sum(any(o.shape.endswith(scenes.SIGN) for o in p.scene.objects) for p in stage1 + stage2),
        "images_by_encoding": {e: encodings.count(e) for e in sorted(set(encodings))},
        "captions": len(corpus),
        "toxic_snippets": len(snippets),
        "toxic_images": len(toxic_json),
        "heldout_images": len(heldout),
        "benign_vqa": len(benign_vqa_json),
        "benign_requests": len(benign_requests_json),
        "llm_vocab_size": len(llm_tokenizer),
    }
    _write_json(paths.world_json, {"seed": seed, "generator": generator_fingerprint(), "counts": counts,
                                   "metrics": metrics, "files": _file_hashes(paths.root)})
    (paths.root / _INCOMPLETE).unlink()
    return paths


def stale_reason(paths: WorldPaths, seed: int) -> str | None:
    """None when `paths.root` holds a complete world of `seed`, made by this code and unchanged on
    disk; else what is wrong with it, starting with "incomplete" for a generation cut short."""
    if (paths.root / _INCOMPLETE).exists():
        return "incomplete (its generation was cut short)"
    if not paths.world_json.is_file():
        return "holds no tiny world (no world.json)"
    recorded = json.loads(paths.world_json.read_text())
    if recorded.get("seed") != seed:
        return f"holds the world of seed {recorded.get('seed')}, not {seed}"
    if recorded.get("generator") != generator_fingerprint():
        return "holds a world made by other generator code or library versions"
    if recorded.get("files") != _file_hashes(paths.root):
        return "its files changed since it was generated"
    return None


def ensure(out: Path, seed: int = 0) -> WorldPaths:
    """The world under `out`: reused when complete, of this seed, made by this code and unchanged
    on disk; generated otherwise."""
    paths = WorldPaths.under(Path(out))
    if paths.world_json.is_file() and stale_reason(paths, seed) is None:
        return paths
    return generate(out, seed)
