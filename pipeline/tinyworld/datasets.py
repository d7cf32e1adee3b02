"""The tiny world's datasets as plain records, before anything touches the disk.

Each function is pure given its rng: which scenes exist and where their images live
(`place_scenes`), the LLaVA JSON of both stages, the caption corpus, the toxic eval records and the
held-out benign VQA of the general-ability eval.
The layout mirrors the real data: LCS-558K images in numbered folders ("00000/000000012.jpg"),
mix665k images under dataset folders ("coco/train2017/...", "gqa/images/...", "vg/VG_100K/...").
"""
from __future__ import annotations

import dataclasses
import random

from . import text, toxic
from .scenes import Scene, sample_scene

N_STAGE1_SCENES = 320
N_STAGE2_SCENES = 280
STAGE1_FOLDER_SIZE = 80
STAGE2_GROUPS = ("coco/train2017", "gqa/images", "vg/VG_100K")
TOXIC_SCENES_PER_CONCEPT = 3
TEXT_ONLY_SHARE = 0.10
REFUSAL_REPLAY = 32  # stage-2 text-only chats that refuse a toxic request (see stage2_records)
MIN_CORPUS_CAPTIONS = 2400  # scene + synthetic captions; toxic snippets come on top
N_HELDOUT_SCENES = 16  # general-ability eval (eval/benign_vqa.json); never in training
# Question wording -> type, first match wins (the background question before the object colour one).
_QUESTION_TYPES = (
    ("How many", "count"), ("What colour is the background", "background"),
    ("What is the background colour", "background"), ("What colour is the", "colour"),
    ("What shape is the", "shape"), ("Where is the", "position"), ("Is there", "yes_no"),
    ("Describe the image", "caption"), ("What does the picture show", "caption"),
)
# Image encodings: most JPEG; some PNG so packing must re-encode; a few PNG files named .jpg, as
# in LLaVA's ocr_vqa folder, so nothing may trust the extension.
PNG_SHARE, MISNAMED_PNG_SHARE = 0.04, 0.01


@dataclasses.dataclass(frozen=True)
class PlacedScene:
    image: str                       # path relative to images/, as in the LLaVA "image" field
    scene: Scene | toxic.ToxicScene
    caption: str
    encoding: str                    # "jpeg" | "png" (file bytes; the name may still say .jpg)


def _encoding(rng: random.Random) -> tuple[str, str]:
    """(file extension, encoding of the bytes)."""
    r = rng.random()
    if r < PNG_SHARE:
        return "png", "png"
    if r < PNG_SHARE + MISNAMED_PNG_SHARE:
        return "jpg", "png"
    return "jpg", "jpeg"


def place_scenes(seed: int) -> tuple[list[PlacedScene], list[PlacedScene], list[PlacedScene]]:
    """(stage-1 scenes, stage-2 scenes, toxic scenes) with image paths and ground-truth captions."""
    rng = random.Random(f"{seed}:scenes")
    stage1 = []
    for i in range(N_STAGE1_SCENES):
        scene = sample_scene(rng)
        ext, encoding = _encoding(rng)
        scene_id = f"{i // STAGE1_FOLDER_SIZE:05d}{i % STAGE1_FOLDER_SIZE:04d}"
        stage1.append(PlacedScene(f"{scene_id[:5]}/{scene_id}.{ext}", scene, text.caption(scene, rng), encoding))
    stage2 = []
    for i in range(N_STAGE2_SCENES):
        scene = sample_scene(rng)
        ext, encoding = _encoding(rng)
        group = STAGE2_GROUPS[i % len(STAGE2_GROUPS)]
        scene_id = f"{i:012d}" if group.startswith("coco") else f"{2300000 + i}"
        stage2.append(PlacedScene(f"{group}/{scene_id}.{ext}", scene, text.caption(scene, rng), encoding))
    toxic_scenes = []
    for concept in toxic.CONCEPTS:
        slug = concept.name.replace(" ", "-")
        for k in range(TOXIC_SCENES_PER_CONCEPT):
            scene = toxic.sample_toxic_scene(concept, rng)
            toxic_scenes.append(PlacedScene(f"toxic/{slug}-{k}.jpg", scene, scene.caption, "jpeg"))
    return stage1, stage2, toxic_scenes


def _sample_id(placed: PlacedScene) -> str:
    return placed.image.rsplit("/", 1)[-1].rsplit(".", 1)[0]


def stage1_records(stage1: list[PlacedScene], seed: int) -> list[dict]:
    """LCS-558K style: one brief-description instruction, the caption as the answer."""
    rng = random.Random(f"{seed}:stage1")
    return [
        {"id": _sample_id(p), "image": p.image, "conversations": [
            {"from": "human", "value": text.stage1_prompt(rng)},
            {"from": "gpt", "value": p.caption},
        ]}
        for p in stage1
    ]


def stage2_records(stage2: list[PlacedScene], seed: int) -> list[dict]:
    """mix665k style: 1-3 turns per image, ~10% text-only chats (no "image" key) and REFUSAL_REPLAY
    text-only refusals of toxic requests."""
    rng = random.Random(f"{seed}:stage2")
    records = [
        {"id": _sample_id(p), "image": p.image, "conversations": text.scene_conversation(p.scene, p.caption, rng)}
        for p in stage2
    ]
    n_text_only = round(len(records) * TEXT_ONLY_SHARE / (1 - TEXT_ONLY_SHARE))
    text_only = [
        {"id": f"text-{i:05d}", "conversations": text.text_only_conversation(rng, sample_scene(rng))}
        for i in range(n_text_only)
    ]
    # mix665k's text-only chats (ShareGPT) keep the LLM's own behaviour alive through stage 2; here
    # that includes refusing toxic text, which a 0.4M-parameter LLM forgets in a few hundred steps
    # otherwise (a 7B chat model at lr 2e-6 does not). Snippet requests only: the safety eval's
    # text twins stay out of stage 2.
    refusals = [f"{lead} {snippet}." for snippet in toxic.snippets() for lead in ("Give me", "Tell me")]
    rng.shuffle(refusals)
    text_only += [
        {"id": f"text-{n_text_only + i:05d}", "conversations": [
            {"from": "human", "value": request}, {"from": "gpt", "value": toxic.REFUSAL}]}
        for i, request in enumerate(refusals[:REFUSAL_REPLAY])
    ]
    n_text_only = len(text_only)
    # Interleave text-only chats through the file, as in mix665k (not all at the end).
    step = len(records) // max(n_text_only, 1)
    for i, record in enumerate(text_only):
        records.insert(i * (step + 1), record)
    return records


def synthetic_captions(placed: list[PlacedScene], seed: int) -> list[tuple[Scene, str]]:
    """Scene-like captions (distinct texts, none a placed scene's) that fill the corpus up to
    MIN_CORPUS_CAPTIONS, with the scenes they describe: text only, no training image shows them."""
    rng = random.Random(f"{seed}:corpus")
    seen = {p.caption for p in placed}
    synthetic: list[tuple[Scene, str]] = []
    while len(placed) + len(synthetic) < MIN_CORPUS_CAPTIONS:
        scene = sample_scene(rng)
        caption = text.caption(scene, rng)
        if caption not in seen:
            seen.add(caption)
            synthetic.append((scene, caption))
    return synthetic


def caption_corpus(placed: list[PlacedScene], seed: int) -> list[dict]:
    """Caption index input: every scene caption, synthetic scene-like captions (distinct texts), and
    the toxic snippets. Columns: caption_id, text, source, toxic."""
    rows = [{"caption_id": f"scene-{i:05d}", "text": p.caption, "source": "scene", "toxic": False}
            for i, p in enumerate(placed)]
    rows += [{"caption_id": f"synthetic-{n:05d}", "text": caption, "source": "synthetic", "toxic": False}
             for n, (_, caption) in enumerate(synthetic_captions(placed, seed))]
    rows += [{"caption_id": f"toxic-{i:03d}", "text": snippet, "source": "toxic", "toxic": True}
             for i, snippet in enumerate(toxic.snippets())]
    return rows


def heldout_scenes(placed: list[PlacedScene], seed: int) -> list[PlacedScene]:
    """Benign scenes for the general-ability eval that no training sample shows: the first
    synthetic corpus scenes unlike every placed scene. Their captions are corpus texts (as every
    training image's is), so the eval's retrieval sees the same kind of index as training did."""
    taken = {p.scene for p in placed}
    heldout: list[PlacedScene] = []
    for scene, caption in synthetic_captions(placed, seed):
        if len(heldout) == N_HELDOUT_SCENES:
            break
        if scene not in taken:
            taken.add(scene)
            heldout.append(PlacedScene(f"heldout/{len(heldout):06d}.jpg", scene, caption, "jpeg"))
    return heldout


def _question_type(question: str) -> str:
    for prefix, kind in _QUESTION_TYPES:
        if question.startswith(prefix):
            return kind
    raise ValueError(f"no question type for {question!r}; add its wording to _QUESTION_TYPES")


def benign_vqa_records(heldout: list[PlacedScene], seed: int) -> list[dict]:
    """Held-out VQA (LLaVA format + `question_type`): per scene one question of each type it
    supports, answers derived from the scene as in stage 2."""
    rng = random.Random(f"{seed}:benign_vqa")
    records = []
    for p in heldout:
        by_type: dict[str, list[tuple[str, str]]] = {}
        for question, answer in text._question_pool(p.scene, p.caption, rng):
            by_type.setdefault(_question_type(question), []).append((question, answer))
        for kind in sorted(by_type):
            question, answer = rng.choice(by_type[kind])
            records.append({"id": f"vqa-{len(records):04d}", "image": p.image, "question_type": kind,
                            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]})
    return records


def toxic_eval_records(toxic_scenes: list[PlacedScene], seed: int) -> list[dict]:
    rng = random.Random(f"{seed}:toxic_eval")
    return [toxic.eval_record(p.scene, _sample_id(p), p.image, rng) for p in toxic_scenes]


def llm_tuning_pairs(seed: int, n_caption_requests: int = 120) -> tuple[list[tuple[str, str]], list[str], list[str]]:
    """(training pairs, toxic probes, benign probes) that give the tiny LLM the text refusal TGA
    transfers. The refusals cover the snippets and the eval's text twins (the premise of the safety
    eval: the LLM refuses the *text*); the image phrasings ("the substance shown in this image") are
    never trained on. Benign probes are held-out general requests that must not be refused."""
    rng = random.Random(f"{seed}:llm")
    toxic_requests = [f"{lead} {snippet}." for snippet in toxic.snippets()
                      for lead in ("Give me", "Tell me", "Write down", "I need")] + toxic.text_prompts()
    general = text.general_knowledge_pairs()
    rng.shuffle(general)
    requests = sorted({text.caption_request(sample_scene(rng)) for _ in range(n_caption_requests)})
    rng.shuffle(requests)
    probes = general[:6] + requests[:18]
    # Short benign questions are repeated so that shortness alone does not predict a refusal.
    benign = general[6:] * 4 + requests[18:]
    return [(q, toxic.REFUSAL) for q in toxic_requests] + benign, toxic.text_prompts(), [q for q, _ in probes]
