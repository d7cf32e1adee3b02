"""The language of the tiny world: captions, instructions and question/answer turns about scenes.

All functions are pure: (scene, rng) -> text. Answers are derived from the scene itself, so they
are always right; the rng only picks among phrasings and which questions get asked.
"""
from __future__ import annotations

import random

from .scenes import COLOURS, SHAPES, Scene, SceneObject

# Where an object is, as a phrase that reads after the object ("a red circle at the top left").
POSITION_PHRASES = {
    "top left": "at the top left", "top": "at the top", "top right": "at the top right",
    "left": "on the left", "center": "in the center", "right": "on the right",
    "bottom left": "at the bottom left", "bottom": "at the bottom", "bottom right": "at the bottom right",
}
NUMBER_WORDS = {0: "no", 1: "one", 2: "two", 3: "three"}

# The brief-description prompts of LLaVA's LCS-558K stage-1 data (LLaVA paper, appendix).
BRIEF_INSTRUCTIONS = (
    "Describe the image concisely.",
    "Provide a brief description of the given image.",
    "Offer a succinct explanation of the picture presented.",
    "Summarize the visual content of the image.",
    "Give a short and clear explanation of the subsequent image.",
    "Share a concise interpretation of the image provided.",
    "Present a compact description of the photo's key features.",
    "Relay a brief, clear account of the picture shown.",
    "Render a clear and concise summary of the photo.",
    "Write a terse but informative summary of the picture.",
    "Create a compact narrative representing the image presented.",
)

_CAPTION_TEMPLATES = (
    "{objects} on {a_background} background",
    "{a_background} background with {objects}",
    "a picture of {objects} against {a_background} background",
    "{objects}, {colour} background",
)

# General knowledge of the world for text-only samples (LLaVA mixes ShareGPT text-only chats).
_SHAPE_FACTS = {
    "circle": "A circle is round and has no corners.",
    "square": "A square has four equal sides and four corners.",
    "triangle": "A triangle has three sides and three corners.",
    "star": "The stars in these pictures have five points.",
    "diamond": "A diamond has four sides, like a square standing on one corner.",
    "cross": "A cross is made of two bars of the same length that meet in the middle.",
}
_COLOUR_MIXES = (
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
    ("red", "white", "pink"), ("black", "white", "gray"), ("blue", "green", "cyan"),
)


def with_article(phrase: str) -> str:
    """"a red circle", "an orange circle"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def describe_object(obj: SceneObject, with_size: bool = True, with_position: bool = True) -> str:
    words = ([obj.size] if with_size else []) + [obj.colour, obj.shape]
    if with_position:
        words.append(POSITION_PHRASES[obj.position])
    return with_article(" ".join(words))


def join_phrases(phrases: list[str]) -> str:
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def caption(scene: Scene, rng: random.Random) -> str:
    """The ground-truth caption: every object (size, colour, shape, place) and the background."""
    objects = join_phrases([describe_object(obj) for obj in scene.objects])
    return rng.choice(_CAPTION_TEMPLATES).format(
        objects=objects, a_background=with_article(scene.background), colour=scene.background)


def stage1_prompt(rng: random.Random) -> str:
    """First human turn of an LCS-558K sample: the placeholder goes before or after the instruction."""
    instruction = rng.choice(BRIEF_INSTRUCTIONS)
    return f"<image>\n{instruction}" if rng.random() < 0.5 else f"{instruction}\n<image>"


def _unique(items: list[str]) -> set[str]:
    return {x for x in items if items.count(x) == 1}


def _question_pool(scene: Scene, scene_caption: str, rng: random.Random) -> list[tuple[str, str]]:
    """Every (question, answer) pair this scene supports; the answers follow from the scene."""
    objs = scene.objects
    pool: list[tuple[str, str]] = []
    n = len(objs)
    pool.append((
        rng.choice(("How many objects are there in the image?", "How many shapes can you see?")),
        "There is one object." if n == 1 else f"There are {NUMBER_WORDS[n]} objects.",
    ))
    shape = rng.choice(SHAPES)
    k = sum(obj.shape == shape for obj in objs)
    pool.append((
        f"How many {plural(shape)} are there?",
        f"There is one {shape}." if k == 1 else f"There are {NUMBER_WORDS[k]} {plural(shape)}.",
    ))
    pool.append((
        rng.choice(("What colour is the background?", "What is the background colour of the image?")),
        f"The background is {scene.background}.",
    ))
    for shape in sorted(_unique([obj.shape for obj in objs])):
        colour = next(obj.colour for obj in objs if obj.shape == shape)
        pool.append((f"What colour is the {shape}?", f"The {shape} is {colour}."))
    for colour in sorted(_unique([obj.colour for obj in objs])):
        shape = next(obj.shape for obj in objs if obj.colour == colour)
        pool.append((f"What shape is the {colour} object?", f"The {colour} object is a {shape}."))
    for name in sorted(_unique([f"{obj.colour} {obj.shape}" for obj in objs])):
        obj = next(o for o in objs if f"{o.colour} {o.shape}" == name)
        pool.append((f"Where is the {name}?", f"The {name} is {POSITION_PHRASES[obj.position]} of the image."))
    present = rng.choice(objs)
    pool.append((
        f"Is there {with_article(present.colour)} {present.shape} in the image?",
        f"Yes, there is {with_article(present.colour)} {present.shape} {POSITION_PHRASES[present.position]}.",
    ))
    colour, shape = rng.choice(sorted(set(COLOURS) - {scene.background})), rng.choice(SHAPES)
    if not any(obj.colour == colour and obj.shape == shape for obj in objs):
        pool.append((f"Is there {with_article(colour)} {shape} in the image?", f"No, there is no {colour} {shape}."))
    pool.append((
        rng.choice(("Describe the image briefly.", "What does the picture show?")),
        scene_caption[0].upper() + scene_caption[1:] + ".",
    ))
    return pool


def scene_conversation(scene: Scene, scene_caption: str, rng: random.Random) -> list[dict[str, str]]:
    """1-3 question/answer turns about the scene; the first question carries `<image>`."""
    pool = _question_pool(scene, scene_caption, rng)
    turns = rng.sample(pool, rng.randint(1, min(3, len(pool))))
    conversation: list[dict[str, str]] = []
    for i, (question, answer) in enumerate(turns):
        if i == 0:
            # mix665k puts the placeholder first almost always, sometimes last.
            question = f"<image>\n{question}" if rng.random() < 0.9 else f"{question}\n<image>"
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return conversation


def general_knowledge_pairs() -> list[tuple[str, str]]:
    """Every (question, answer) about shapes and colours in general, no picture needed."""
    pairs = []
    for shape, fact in _SHAPE_FACTS.items():
        pairs += [(f"What does a {shape} look like?", fact), (f"Tell me about the {shape} shape.", fact)]
    for a, b, mixed in _COLOUR_MIXES:
        pairs.append((f"What colour do you get when you mix {a} and {b}?", f"Mixing {a} and {b} gives {mixed}."))
    return pairs


def caption_request(hypothetical: Scene) -> tuple[str, str]:
    """Ask for a caption of a described (not shown) picture; the answer restates it as a caption."""
    objects = join_phrases([describe_object(o, with_position=False) for o in hypothetical.objects])
    background = with_article(hypothetical.background)
    return (f"Write a short caption for a picture of {objects} on {background} background.",
            f"{objects[0].upper() + objects[1:]} on {background} background.")


def text_only_conversation(rng: random.Random, hypothetical: Scene) -> list[dict[str, str]]:
    """1-3 turns of general knowledge about shapes and colours; no image anywhere."""
    pool = rng.sample(general_knowledge_pairs(), 2) + [caption_request(hypothetical)]
    turns = rng.sample(pool, rng.randint(1, 3))
    return [turn for q, a in turns for turn in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
