"""The embedded default task: short movie reviews, where RLHF should make the reviews more positive.

In the spirit of TRL's gpt2-sentiment demo, but fully offline and with a rule that scores the *true* objective, so
PPO's effect can be measured rather than trusted to the reward model:

    prompt:      "Write a review of the silver river."
    completion:  " the acting was superb. the plot felt dull."

- SFT data: reviews whose sentences are positive, negative or neutral at random (mean positivity ~ 0).
- RM data: pairs for one prompt; `chosen` is the more positive review, or the well-formed one when `rejected` is
  broken (cut off, repeated words), so the reward model also guards form.
- PPO prompts: titles; eval prompts use titles never seen in training.

`positivity()` and `well_formed()` are the rule; `objective()` combines them; `positivity_reward()` is a ready-made
Python reward function for `reward.function: hfalign.demo.task:positivity_reward`.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

SUBJECTS = ["the acting", "the plot", "the music", "the ending", "the cast", "the script", "the pacing", "the story"]
VERBS = ["was", "felt", "seemed", "is"]
POSITIVE = ["superb", "wonderful", "brilliant", "moving", "delightful", "charming", "great"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "weak", "tedious", "bland"]
NEUTRAL = ["long", "quiet", "simple", "short", "unusual"]
COLORS = ["silver", "red", "hidden", "last", "quiet", "golden", "broken", "northern", "empty", "bright", "lost", "winter"]
NOUNS = ["river", "door", "garden", "train", "city", "letter", "mountain", "harbor", "mirror", "island", "forest", "bridge"]

_SENTENCE = (rf"(?:{'|'.join(SUBJECTS)}) (?:{'|'.join(VERBS)}) (?:{'|'.join(POSITIVE + NEGATIVE + NEUTRAL)})\.")
_WELL_FORMED = re.compile(rf"^ ?{_SENTENCE}(?: {_SENTENCE}){{0,3}}$")


def titles(split: str) -> list[str]:
    """All 144 titles; the last noun column (every 6th) is held out for evaluation."""
    every = [f"the {c} {n}" for c in COLORS for n in NOUNS]
    held = {t for i, t in enumerate(every) if i % 6 == 5}
    return sorted(held) if split == "eval" else [t for t in every if t not in held]


def prompt_for(title: str) -> str:
    return f"Write a review of {title}."


def review(rng: random.Random, n_sentences: int | None = None, weights=(0.35, 0.35, 0.30)) -> str:
    n = n_sentences or rng.randint(2, 3)
    words = []
    for _ in range(n):
        pool = rng.choices([POSITIVE, NEGATIVE, NEUTRAL], weights=weights)[0]
        words.append(f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(pool)}.")
    return " " + " ".join(words)


def broken(rng: random.Random) -> str:
    """A malformed review: cut mid-sentence, a repeated adjective, or a missing period."""
    text = review(rng)
    kind = rng.randrange(3)
    if kind == 0:
        return text[: rng.randint(5, len(text) - 3)].rstrip(".")
    if kind == 1:
        return " " + " ".join([rng.choice(POSITIVE)] * rng.randint(3, 6))
    return text.replace(".", "")


def well_formed(completion: str) -> bool:
    return bool(_WELL_FORMED.match(completion.rstrip()))


def positivity(completion: str) -> float:
    """(#positive - #negative adjectives) / #sentences, in [-1, 1] for well-formed text."""
    words = re.findall(r"[a-z]+", completion.lower())
    sentences = max(1, completion.count("."))
    return (sum(w in POSITIVE for w in words) - sum(w in NEGATIVE for w in words)) / sentences


def objective(completion: str) -> float:
    """The true objective: positivity of a well-formed review; -1 for anything malformed."""
    return positivity(completion) if well_formed(completion) else -1.0


def positivity_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A Python reward function (reward.function: hfalign.demo.task:positivity_reward)."""
    return [objective(c) for c in completions]


def format_reward(prompts: list[str], completions: list[str]) -> list[float]:
    """A format rule as a reward source: 1 for a well-formed review, 0 otherwise (recipes/reward/ppo-combined.yaml)."""
    return [float(well_formed(c)) for c in completions]


# --- data files -------------------------------------------------------------------------------------------------


def generate(seed: int = 0) -> dict[str, list[dict]]:
    from hfalign.demo import preference_splits

    rng = random.Random(seed)
    return preference_splits(rng, {"train": titles("train"), "eval": titles("eval")}, prompt_for,
                             completion=lambda p: review(rng), pair=lambda p: (review(rng), review(rng)),
                             broken=lambda p: broken(rng), key=lambda c, p: objective(c))


def write_data(out_dir: str | Path, seed: int = 0) -> list[Path]:
    from hfalign.demo import write_data as write

    return write("reviews", out_dir, seed)


def corpus(seed: int = 0) -> list[str]:
    """Text the tiny tokenizer is trained on: every prompt and review the task can produce, plus broken ones."""
    rng = random.Random(seed)
    texts = [prompt_for(t) for t in titles("train") + titles("eval")]
    texts += [review(rng) for _ in range(3000)] + [broken(rng) for _ in range(300)]
    return texts


documents = corpus  # pretraining text: prompts and reviews are already separate documents
