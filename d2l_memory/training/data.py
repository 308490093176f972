"""Meta-training contexts and questions, built from ../shared/data and templates (nothing downloaded).

Each `Sample` is one (context, question, answer) triple. Sources:
- `facts`: synthetic personal-fact chats and notes (names, preferences, codes), values drawn so that
  held-out samples use combinations never seen in training;
- `needle`: a code or number hidden in Paul Graham essay filler at a random depth;
- `squad`: SQuADShifts (new wiki, reddit, amazon) and the SQuAD v1.1 train sample passages with
  their own questions; `fairytale`: FairytaleQA train sections;
- `friends`: FriendsQA scenes (several named speakers) as `absorb_messages` writes a chat, asked about
  who said or did what in the third person.
LoCoMo, LongMemEval, the SQuAD v1.1 dev sample and the FriendsQA test file are benchmarks or held out,
and never read here.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from d2l_memory.transcripts import segment_turns, transcript_turns


def shared_data() -> Path:
    """Where the data sets live: `$D2L_MEMORY_DATA`, else `shared/data` beside the repository checkout."""
    if os.environ.get("D2L_MEMORY_DATA"):
        return Path(os.environ["D2L_MEMORY_DATA"])
    for candidate in (Path(__file__).resolve().parents[3] / "shared" / "data", Path("/work/shared/data")):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("the data sets were not found: set D2L_MEMORY_DATA to the folder that holds "
                            "squad/, squadshifts/, paul_graham_essays/ ...")


FIRST = ["Alice", "Bruno", "Chloe", "Dmitri", "Elena", "Farah", "Gustav", "Hana", "Ivan", "Julia", "Kenji",
         "Lena", "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Samir", "Tara", "Umar", "Vera",
         "Wanda", "Xavier", "Yuki", "Zoe", "Amara", "Boris", "Carmen", "Diego", "Esther", "Felix", "Greta",
         "Hugo", "Ines", "Jonas", "Kira", "Luca", "Mila", "Nico", "Olga", "Pablo", "Rina", "Sven", "Tomas"]
ATTRIBUTES: dict[str, tuple[str, str, list[str]]] = {
    # key: (statement template, question template, values)
    "color": ("{name}'s favorite color is {value}.", "What is {name}'s favorite color?",
              ["teal", "crimson", "yellow", "violet", "orange", "green", "maroon", "silver", "navy", "pink",
               "turquoise", "beige", "amber", "lavender", "olive", "scarlet"]),
    "city": ("{name} lives in {value}.", "Where does {name} live?",
             ["Oslo", "Lisbon", "Nairobi", "Osaka", "Denver", "Krakow", "Quito", "Perth", "Tunis", "Leeds",
              "Austin", "Bergen", "Seville", "Hanoi", "Dublin", "Tallinn", "Zurich", "Cairo"]),
    "pet": ("{name} has a pet {value}.", "What kind of pet does {name} have?",
            ["parrot", "hamster", "tortoise", "rabbit", "iguana", "ferret", "goldfish", "beagle", "cat",
             "donkey", "hedgehog", "canary"]),
    "job": ("{name} works as a {value}.", "What is {name}'s job?",
            ["dentist", "pilot", "baker", "plumber", "librarian", "chemist", "carpenter", "nurse",
             "architect", "farmer", "journalist", "translator", "firefighter", "jeweler"]),
    "food": ("{name}'s favorite food is {value}.", "What is {name}'s favorite food?",
             ["sushi", "lasagna", "tacos", "ramen", "paella", "dumplings", "curry", "pancakes", "falafel",
              "risotto", "goulash", "pierogi"]),
    "sport": ("{name} plays {value} every weekend.", "Which sport does {name} play?",
              ["tennis", "hockey", "volleyball", "cricket", "badminton", "rugby", "golf", "baseball",
               "squash", "handball"]),
    "instrument": ("{name} plays the {value}.", "Which instrument does {name} play?",
                   ["violin", "cello", "trumpet", "piano", "flute", "drums", "harp", "saxophone", "banjo",
                    "clarinet"]),
    "code": ("The secret code of {name} is {value}.", "What is the secret code of {name}?", []),
    "age": ("{name} is {value} years old.", "How old is {name}?", []),
}
CHAT_OPENERS = ["Hi! ", "Hello. ", "Hey there. ", "", "Quick note about me: ", "Nice to meet you. "]


class Sample(BaseModel):
    """One meta-training example: the student sees `question`, the teacher `context` + `question`.

    `student_context` is text the student also reads in its prompt beside its adapter (`hybrid` mode's
    best snippet), in the teacher's format; by default the student reads the question alone."""

    model_config = ConfigDict(extra="forbid")

    context: str
    question: str
    answer: str
    source: str
    response: str | None = None  # a full-sentence reference answer, when the template knows one
    memories: list[str] | None = None  # what the student's adapter composes (default: the context alone)
    student_context: str | None = None
    templates: list[str] = []  # provenance of generated samples' phrasings (the leak test reads it)


def _value(key: str, rng: random.Random) -> str:
    if key == "code":
        return str(rng.randint(1000, 99999))
    if key == "age":
        return str(rng.randint(18, 90))
    return rng.choice(ATTRIBUTES[key][2])


def fact_sample(rng: random.Random, max_facts: int = 3) -> Sample:
    """A short note or first-person chat stating 1..max_facts facts; the question asks for one."""
    name = rng.choice(FIRST)
    keys = rng.sample(sorted(ATTRIBUTES), rng.randint(1, max_facts))
    values = {k: _value(k, rng) for k in keys}
    statements = [ATTRIBUTES[k][0].format(name=name, value=values[k]) for k in keys]
    if rng.random() < 0.5:
        context = " ".join(statements)
    else:  # a chat turn in the first person, the way users tell an assistant about themselves
        first = [s.replace(f"{name}'s", "My").replace(f"of {name}", "of mine").replace(f"{name} ", "I ", 1)
                 .replace("I is", "I am").replace("I lives", "I live").replace("I has", "I have")
                 .replace("I works", "I work").replace("I plays", "I play") for s in statements]
        context = f"User: {rng.choice(CHAT_OPENERS)}My name is {name}. " + " ".join(first)
    key = rng.choice(keys)
    return Sample(context=context, question=ATTRIBUTES[key][1].format(name=name), answer=values[key],
                  source="facts", response=ATTRIBUTES[key][0].format(name=name, value=values[key]))


def essays() -> list[str]:
    """Paul Graham's essays (`shared_data()/paul_graham_essays`): the filler needles are hidden in."""
    return [p.read_text() for p in sorted((shared_data() / "paul_graham_essays").glob("*.txt"))]


def bury(rng: random.Random, essays: Sequence[str], filler_chars: int, needle: str) -> str:
    """`needle` (a sentence) between two sentences of about `filler_chars` characters of `essays` (one
    essay, continued into the next ones where it is shorter: long documents are not capped by one essay's
    length), at a random depth."""
    first = rng.randrange(len(essays))  # the draw `rng.choice(essays)` made, so short needles stay the same
    essay = essays[first]
    for step in range(1, len(essays)):
        if len(essay) >= filler_chars:
            break
        essay += "\n\n" + essays[(first + step) % len(essays)]
    start = rng.randint(0, max(0, len(essay) - filler_chars))
    filler = essay[start : start + filler_chars]
    cut = filler.rfind(". ", 0, rng.randint(0, len(filler))) + 2 if filler else 0
    return f"{filler[:cut]} {needle} {filler[cut:]}".strip()


def needle_sample(rng: random.Random, essays: Sequence[str], filler_chars: int) -> Sample:
    """The first generation's needle: a code hidden in essay filler (`bury`)."""
    name = rng.choice(FIRST)
    code = str(rng.randint(1000, 99999))
    needle = f"The secret code of {name} is {code}."
    return Sample(context=bury(rng, essays, filler_chars, needle), question=f"What is the secret code of {name}?",
                  answer=code, source="needle", response=needle)


def squad_samples(path: Path, max_context_chars: int = 1500) -> Iterator[Sample]:
    """(passage, question, first gold answer) from a SQuAD-format JSON file."""
    for article in json.loads(path.read_text())["data"]:
        for para in article["paragraphs"]:
            if len(para["context"]) > max_context_chars:
                continue
            for qa in para["qas"]:
                if qa.get("is_impossible") or not qa["answers"]:
                    continue
                yield Sample(context=para["context"], question=qa["question"],
                             answer=qa["answers"][0]["text"], source=f"squad:{path.stem}")


def fairytale_samples(path: Path, max_context_chars: int = 1500) -> Iterator[Sample]:
    """FairytaleQA: each section with its own questions (explicit answers only)."""
    for line in path.read_text().splitlines():
        story = json.loads(line)
        sections = {str(s["section"]): s["text"] for s in story.get("sections", [])}
        for qa in story.get("questions", []):
            if qa.get("ex-or-im1") != "explicit":
                continue
            text = " ".join(sections.get(str(s).strip(), "") for s in str(qa.get("cor_section", "")).split(","))
            answer = qa.get("answer1") or ""
            if text.strip() and answer and len(text) <= max_context_chars and len(answer) <= 60:
                yield Sample(context=text.strip(), question=qa["question"], answer=answer, source="fairytale")


def detokenize(text: str) -> str:
    """FriendsQA's tokenized text ("do n't", "gon na", "hello ,") written the way people type it."""
    text = re.sub(r" (n't|'s|'re|'ve|'ll|'m|'d)\b", r"\1", text)
    text = re.sub(r"\b(gon|wan|got) (na|ta)\b", r"\1\2", text)
    text = re.sub(r" ([.,!?;:%)\]])", r"\1", text)
    return re.sub(r"([(\[]) ", r"\1", text).strip()


def friends_samples(path: Path, count_tokens: Callable[[str], int] | None = None, segment_tokens: int = 256,
                    max_distractors: int = 2) -> Iterator[Sample]:
    """FriendsQA: each scene's utterances as `absorb_messages` writes them (`Speaker: text` lines, cut at
    turn boundaries into `segment_tokens` memories; `count_tokens` the base model's tokenizer, by default
    four characters a token) with its own questions (first gold answer). The context is the memory
    holding the answer's utterance; the student's adapter composes it with up to `max_distractors` other
    memories of the same scene, drawn with a per-scene seed (reproducible)."""
    count_tokens = count_tokens or (lambda text: len(text) // 4)
    for scene in json.loads(path.read_text())["data"]:
        for para in scene["paragraphs"]:
            utterances = para["utterances:"]
            turns = transcript_turns([(" and ".join(u["speakers"]) or "Someone", detokenize(u["utterance"]))
                                      for u in utterances if u["utterance"].strip()])
            memories = segment_turns(turns, count_tokens, segment_tokens)
            rng = random.Random(scene["title"])
            for qa in para["qas"]:
                if not qa["answers"]:
                    continue
                answer = detokenize(qa["answers"][0]["answer_text"]).rstrip(" .")
                uid = qa["answers"][0]["utterance_id"]
                if not answer or not 0 <= uid < len(utterances):
                    continue
                line = detokenize(utterances[uid]["utterance"])
                holding = next((m for m in memories if line in m and answer in m), None)
                if holding is None:
                    continue
                others = [m for m in memories if m is not holding]
                composed = [holding, *rng.sample(others, min(len(others), rng.randint(0, max_distractors)))]
                rng.shuffle(composed)
                yield Sample(context=holding, question=detokenize(qa["question"]), answer=answer,
                             source=f"friends:{scene['title']}", memories=composed)


TRAIN_FILES = ["squadshifts/new_wiki_v1.0.json", "squadshifts/reddit_v1.0.json",
               "squadshifts/amazon_reviews_v1.0.json", "squad/saipriya_train-v1.1_sample.json"]
FAIRYTALE_TRAIN_FILE = "fairytaleqa/fairytaleqa_train.jsonl"
FRIENDS_TRAIN_FILE = "friendsqa/friendsqa_dev.json"  # friendsqa_tst.json stays out of training


CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Egypt": "Cairo", "Canada": "Ottawa",
            "Germany": "Berlin", "Spain": "Madrid", "Russia": "Moscow", "China": "Beijing", "India": "New Delhi",
            "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm", "Poland": "Warsaw", "Kenya": "Nairobi",
            "Peru": "Lima", "Portugal": "Lisbon", "Ireland": "Dublin", "Austria": "Vienna", "Argentina": "Buenos Aires",
            "Chile": "Santiago", "Cuba": "Havana", "Finland": "Helsinki", "Hungary": "Budapest", "Thailand": "Bangkok",
            "Mexico": "Mexico City"}
GENERAL = {"What color is the sky on a clear day?": "blue", "How many days are in a week?": "seven",
           "What is the largest ocean?": "Pacific", "What do bees make?": "honey",
           "What is the boiling point of water in Celsius?": "100", "How many legs does a spider have?": "eight",
           "What is the opposite of hot?": "cold", "Which planet is known as the Red Planet?": "Mars",
           "What is frozen water called?": "ice", "How many hours are in a day?": "24",
           "What is the color of grass?": "green", "Who wrote Romeo and Juliet?": "Shakespeare",
           "What gas do plants absorb from the air?": "carbon dioxide", "What is the largest mammal?": "whale",
           "How many months are in a year?": "12", "What is the chemical symbol for gold?": "Au",
           "What language is spoken in Brazil?": "Portuguese", "What is the tallest animal?": "giraffe"}


def control_questions(split: str) -> list[tuple[str, str]]:
    """General (question, answer) pairs unrelated to any context: even ones train, odd ones evaluate."""
    pool = [(f"What is the capital of {c}?", a) for c, a in CAPITALS.items()] + list(GENERAL.items())
    return pool[0::2] if split == "train" else pool[1::2]
