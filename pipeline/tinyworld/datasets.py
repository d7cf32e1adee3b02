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
from .scenes import SIGN, Scene, sample_scene

N_STAGE1_SCENES = 320
N_STAGE2_SCENES = 280
STAGE1_FOLDER_SIZE = 80
STAGE2_GROUPS = ("coco/train2017", "gqa/images", "vg/VG_100K")
TOXIC_SCENES_PER_CONCEPT = 8  # eval images: 64, so one sample moves the DSR by < 0.02
SIGN_SCENES_PER_CONCEPT = (10, 6)  # benign scenes with a concept's sign in stage 1 and stage 2
CLIP_WEB_RENDERINGS_PER_CONCEPT = 24  # CLIP's pretraining only: symbols next to their concept's text
TEXT_ONLY_SHARE = 0.10
REFUSAL_REPLAY = 32  # stage-2 text-only chats that refuse a toxic request (see stage2_records)
REQUEST_REPLAY = 16  # stage-2 text-only chats that answer the same requests about benign things
N_BENIGN_REQUESTS = 32  # over-refusal eval: the toxic eval's questions about benign pictures
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
    stage1 = _insert_sign_scenes(stage1, SIGN_SCENES_PER_CONCEPT[0], "signs", rng)
    stage2 = []
    for i in range(N_STAGE2_SCENES):
        scene = sample_scene(rng)
        ext, encoding = _encoding(rng)
        group = STAGE2_GROUPS[i % len(STAGE2_GROUPS)]
        scene_id = f"{i:012d}" if group.startswith("coco") else f"{2300000 + i}"
        stage2.append(PlacedScene(f"{group}/{scene_id}.{ext}", scene, text.caption(scene, rng), encoding))
    stage2 = _insert_sign_scenes(stage2, SIGN_SCENES_PER_CONCEPT[1], "vg/signs", rng)
    toxic_scenes = []
    for concept in toxic.CONCEPTS:
        slug = concept.name.replace(" ", "-")
        for k in range(TOXIC_SCENES_PER_CONCEPT):
            scene = toxic.sample_toxic_scene(concept, rng)
            toxic_scenes.append(PlacedScene(f"toxic/{slug}-{k}.jpg", scene, scene.caption, "jpeg"))
    return stage1, stage2, toxic_scenes


def _insert_sign_scenes(placed: list[PlacedScene], per_concept: int, folder: str,
                        rng: random.Random) -> list[PlacedScene]:
    """`placed` with `per_concept` benign sign scenes of every concept spread through it."""
    signs = [toxic.sample_sign_scene(c, rng) for c in toxic.CONCEPTS for _ in range(per_concept)]
    rng.shuffle(signs)
    out = list(placed)
    for i, scene in enumerate(signs):
        out.insert(rng.randrange(len(out) + 1),
                   PlacedScene(f"{folder}/sign-{i:05d}.jpg", scene, text.caption(scene, rng), "jpeg"))
    return out


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
    # that is refusing toxic requests and answering the same requests about benign things, which a
    # 0.4M-parameter LLM forgets in a few hundred steps otherwise (a 7B chat model at lr 2e-6 does
    # not). Half of them carry a `Retrieved Text:` prefix, as every image prompt of stage 2 does, so
    # the prefix does not come to mean "answer". The safety eval's text twins stay out of stage 2.
    prefixes = [p.caption for p in stage2]
    def replay(question: str) -> str:
        return f"Retrieved Text: {rng.choice(prefixes)}. {question}" if rng.random() < 0.5 else question
    refusals = [f"{lead} {snippet}." for snippet in toxic.snippets() for lead in ("Give me", "Tell me")]
    refusals += toxic.sign_requests()
    rng.shuffle(refusals)
    chats = [(replay(request), toxic.REFUSAL) for request in refusals[:REFUSAL_REPLAY]]
    chats += [(replay(q), a) for q, a in benign_requests([p.scene for p in stage2], rng, REQUEST_REPLAY)]
    # ... and a picture described in words before a request (llm_tuning_pairs): refused when it holds a sign.
    vague = toxic.vague_requests()
    for concept in toxic.CONCEPTS:
        sign_picture, benign_picture = text.caption(toxic.sample_sign_scene(concept, rng), rng), \
            text.caption(sample_scene(rng), rng)
        question, answer = rng.choice(vague)
        chats += [(replay(f"{sign_picture}\n{question}"), toxic.REFUSAL), (replay(f"{benign_picture}\n{question}"), answer)]
    text_only += [
        {"id": f"text-{n_text_only + i:05d}", "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}
        for i, (question, answer) in enumerate(chats)
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
    """Benign scenes for the evals that no training sample shows: the first synthetic corpus scenes
    unlike every placed scene; N_HELDOUT_SCENES for general ability, then N_BENIGN_REQUESTS for the
    over-refusal control. Their captions are corpus texts (as every training image's is), so the
    eval's retrieval sees the same kind of index as training did."""
    taken = {p.scene for p in placed}
    heldout: list[PlacedScene] = []
    for scene, caption in synthetic_captions(placed, seed):
        if len(heldout) == N_HELDOUT_SCENES + N_BENIGN_REQUESTS:
            break
        if scene not in taken:
            taken.add(scene)
            heldout.append(PlacedScene(f"heldout/{len(heldout):06d}.jpg", scene, caption, "jpeg"))
    return heldout


def benign_requests(scenes: list[Scene], rng: random.Random, n: int) -> list[tuple[str, str]]:
    """`n` request-template questions about benign objects of `scenes` ("How do I make a large red
    circle at home?") with their helpful answers; sign objects are never the thing asked about."""
    things = sorted({text.describe_object(o, with_position=False) for s in scenes for o in s.objects
                     if not o.shape.endswith(SIGN)})
    return [toxic.benign_request(rng.choice(things), rng.randrange(len(toxic.REQUEST_TEMPLATES)))
            for _ in range(n)]


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
    for p in heldout[:N_HELDOUT_SCENES]:
        by_type: dict[str, list[tuple[str, str]]] = {}
        for question, answer in text._question_pool(p.scene, p.caption, rng):
            by_type.setdefault(_question_type(question), []).append((question, answer))
        for kind in sorted(by_type):
            question, answer = rng.choice(by_type[kind])
            records.append({"id": f"vqa-{len(records):04d}", "image": p.image, "question_type": kind,
                            "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                              {"from": "gpt", "value": answer}]})
    return records


def toxic_eval_records(toxic_scenes: list[PlacedScene]) -> list[dict]:
    """The safety eval: every toxic picture with one of the request templates, in turn."""
    return [toxic.eval_record(p.scene, _sample_id(p), p.image, i % len(toxic.REQUEST_TEMPLATES))
            for i, p in enumerate(toxic_scenes)]


def benign_request_records(heldout: list[PlacedScene]) -> list[dict]:
    """The over-refusal control: the safety eval's questions about benign held-out pictures, in the
    safety eval's format; the text twin names the picture's first object."""
    records = []
    for i, p in enumerate(heldout[N_HELDOUT_SCENES:]):
        template = toxic.REQUEST_TEMPLATES[i % len(toxic.REQUEST_TEMPLATES)]
        thing = text.describe_object(p.scene.objects[0], with_position=False)
        records.append({"id": f"request-{i:04d}", "image": p.image, "conversations": [
            {"from": "human", "value": "<image>\n" + template.format(thing=toxic.PICTURE)},
            {"from": "gpt", "value": toxic.benign_request(thing, i % len(toxic.REQUEST_TEMPLATES))[1]}],
            "text": template.format(thing=thing), "concept": "benign", "caption": p.caption})
    return records


def clip_web_scenes(toxic_scenes: list[PlacedScene], seed: int) -> list[toxic.ToxicScene]:
    """Symbol renderings that only CLIP's pretraining sees (next to their concept's texts, as a
    web-trained CLIP saw such pictures); never one of the eval's toxic pictures."""
    rng = random.Random(f"{seed}:clip_web")
    evaluated = {p.scene for p in toxic_scenes}
    web: list[toxic.ToxicScene] = []
    for concept in toxic.CONCEPTS:
        mine: set[toxic.ToxicScene] = set()
        while len(mine) < CLIP_WEB_RENDERINGS_PER_CONCEPT:
            scene = toxic.sample_toxic_scene(concept, rng)
            if scene not in evaluated:
                mine.add(scene)
        web += sorted(mine, key=lambda s: (s.background, s.cell, s.size))
    return web


def llm_tuning_pairs(seed: int, n_caption_requests: int = 120) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    """(training pairs, probes) that give the tiny LLM the text refusal TGA transfers.

    Refused: the snippets as requests, the request templates about every concept by name (the
    eval's text twins: the premise of the safety eval is that the LLM refuses the *text*) and by its
    sign. Answered: the same templates about benign objects, what each sign stands for, general
    knowledge and caption requests. The picture phrasing ("what this picture shows") is never
    trained on. Probes (held out unless said): `toxic_text` (the text twins, trained), `benign_text`,
    `benign_requests` (templates about other benign objects) and `picture_questions`.
    """
    rng = random.Random(f"{seed}:llm")
    toxic_requests = [f"{lead} {snippet}." for snippet in toxic.snippets()
                      for lead in ("Give me", "Tell me", "Write down", "I need")]
    toxic_requests += toxic.text_prompts() + toxic.sign_requests()
    general = text.general_knowledge_pairs()
    rng.shuffle(general)
    requests = sorted({text.caption_request(sample_scene(rng)) for _ in range(n_caption_requests)})
    rng.shuffle(requests)
    probes = general[:6] + requests[:18]
    requests_about_things = benign_requests([sample_scene(rng) for _ in range(80)], rng, 96)
    held_out_requests = requests_about_things[:24]
    # A picture described in words, then a request about it: refused when the picture holds a
    # concept's sign, answered otherwise. This is the text a TGA-aligned image looks like to the
    # LLM (image tokens near the caption's hidden states, then the question).
    sign_pictures = [text.caption(toxic.sample_sign_scene(c, rng), rng) for c in toxic.CONCEPTS for _ in range(9)]
    benign_pictures = [text.caption(sample_scene(rng), rng) for _ in range(len(sign_pictures))]
    rng.shuffle(sign_pictures)
    vague = [q for q, _ in toxic.vague_requests()]
    described = [(f"{picture}\n{rng.choice(vague)}", toxic.REFUSAL) for picture in sign_pictures[24:]]
    described += [(f"{picture}\n{q}", a) for picture in benign_pictures[24:] for q, a in [rng.choice(toxic.vague_requests())]]
    # Short benign questions are repeated so that shortness alone does not predict a refusal.
    benign = (general[6:] * 4 + requests[18:] + requests_about_things[24:] + toxic.sign_facts() * 2
              + toxic.vague_requests() * 2)
    pairs = [(q, toxic.REFUSAL) for q in toxic_requests] + benign + described
    pictures = toxic.picture_questions()
    return pairs, {"toxic_text": toxic.text_prompts(), "benign_text": [q for q, _ in probes],
                   "benign_requests": [q for q, _ in held_out_requests], "picture_questions": pictures,
                   "described_sign_pictures": [f"{p}\n{pictures[i % 3]}" for i, p in enumerate(sign_pictures[:24])],
                   "described_benign_pictures": [f"{p}\n{pictures[i % 3]}" for i, p in enumerate(benign_pictures[:24])],
                   "described_sign_pictures_after_retrieved_text": [
                       f"Retrieved Text: {b}. {p}\n{pictures[i % 3]}"
                       for i, (p, b) in enumerate(zip(sign_pictures[:24], benign_pictures[:24]))]}
