"""Long-context tasks generated locally from a seed (no downloads): passkey, NIAH, and RULER's task families.

Every generator takes (length, seed, count_tokens, ...) and returns a `Sample`: the user message (`context` +
`question`), an `answer_prefix` the assistant turn starts with (as RULER does), the reference answers and the
RULER metric that scores them. `length` is a budget in tokens for the whole prompt, measured with `count_tokens`
(the model's tokenizer in the runner; a word count in the tests); the haystack is filled to
length - `reserve` tokens, where `reserve` covers the chat template and the answer.

Families (RULER, Hsieh et al. 2024, adapted; values are random, names follow RULER's task ids):

    passkey            noise haystack ("The grass is green. ..."), one 5-digit pass key           string_match_all
    niah_single        one "special magic number" needle at a requested depth, prose haystack       string_match_all
    niah_single_noise  RULER niah_single_1: the same needle in the repeated-noise haystack          string_match_all
    niah_multikey      RULER niah_multikey_1: the needle among 3 distractor needles (other keys)   string_match_all
    niah_multivalue    RULER niah_multivalue: 4 values for one key, all must be returned           string_match_all
    niah_multiquery    RULER niah_multiquery: 4 keys asked at once, all values must be returned    string_match_all
    vt                 variable tracking: a chain VAR A = 12345, VAR B = VAR A, ... return all names   string_match_all
    cwe                common-words extraction: numbered word list, the 10 most common words        string_match_all
    fwe                frequent-words extraction: Zipf-distributed coded words, the 3 most frequent  string_match_all
    qa                 question answering over generated documents (one holds the answer)           string_match_part

The haystack "prose" is generated from a seeded grammar (RULER uses Paul Graham essays, which we cannot
download); the QA documents are generated fact sheets about fictional entities, so the answer cannot come from
the model's memory.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field
from typing import Callable

CountTokens = Callable[[str], int]

# Tokens kept free for the chat template, the question and the answer prefix, beyond what count_tokens measures
# for the context itself (the generators measure the question too; this is the template's share).
TEMPLATE_RESERVE = 48


def count_words(text: str) -> int:
    """A tokenizer-free length (words); the tests use it, the runner uses the model's tokenizer."""
    return len(text.split())


@dataclass
class Sample:
    task: str
    length: int  # the token budget asked for
    seed: int
    context: str
    question: str
    answer_prefix: str
    answers: list[str]
    metric: str  # "all" (string_match_all) or "part" (string_match_part)
    max_new_tokens: int
    depth: float | None = None  # where the (first) needle sits, as a fraction of the haystack
    meta: dict = field(default_factory=dict)

    @property
    def user_message(self) -> str:
        return f"{self.context}\n\n{self.question}"

    @property
    def uid(self) -> str:
        d = "" if self.depth is None else f"-d{self.depth:.2f}"
        return f"{self.task}-L{self.length}{d}-s{self.seed}"


# --------------------------------------------------------------------------------------------------------------
# Haystacks
# --------------------------------------------------------------------------------------------------------------
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

_SUBJECTS = ["The committee", "A small team", "The old engineer", "Our neighbour", "The research group",
             "Every visitor",
             "The new manager", "A quiet student", "The city council", "The gardener", "The captain", "Most founders",
             "The librarian", "A young painter", "The chef", "The museum"]
_VERBS = ["discussed", "planned", "studied", "ignored", "described", "rebuilt", "measured", "questioned", "painted",
          "visited", "reorganised", "sold", "borrowed", "admired", "repaired", "compared"]
_OBJECTS = ["the harbour bridge", "a wooden cabinet", "the morning schedule", "an unusual proposal", "the river valley",
            "a set of old maps", "the train timetable", "the winter garden", "a long report", "the village market",
            "the quarterly budget", "a broken clock", "the north tower", "a collection of letters", "the mountain road",
            "the annual festival"]
_TAILS = ["before the rain started.", "after a long debate.", "with great care.", "for the third time this year.",
          "without telling anyone.", "while the others waited outside.", "in the early afternoon.",
          "as the season changed.", "because nobody else would.", "with surprising results.",
          "during the quiet weeks of spring.", "at the request of a friend."]


def prose_sentences(rng: random.Random, n: int) -> list[str]:
    """n grammatical filler sentences from a seeded grammar (the 'essay' haystack)."""
    return [f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
            for _ in range(n)]


def noise_sentences(n: int) -> list[str]:
    return [NOISE] * n


def fill(units: list[str], budget: int, count_tokens: CountTokens) -> list[str]:
    """The longest prefix of `units` whose joined text fits `budget` tokens (units are joined with spaces).

    Counts one unit at a time and then corrects with one count of the whole text (tokenizers are not exactly
    additive), so the result is within budget."""
    out, used = [], 0
    cost = {}
    for u in units:
        c = cost.get(u)
        if c is None:
            c = cost[u] = count_tokens(u) + (1 if out else 0)
        if used + c > budget:
            break
        out.append(u)
        used += c
    while out and count_tokens(" ".join(out)) > budget:
        out.pop()
    return out


def insert_at_depth(units: list[str], needles: list[str], depths: list[float]) -> tuple[list[str], list[int]]:
    """Insert each needle between units at fraction `depth` of the haystack (0 = start, 1 = end).

    Returns the new list and the index of each needle in it."""
    order = sorted(range(len(needles)), key=lambda i: depths[i])
    out = list(units)
    positions = [0] * len(needles)
    shift = 0
    for i in order:
        pos = round(depths[i] * len(units)) + shift
        out.insert(pos, needles[i])
        positions[i] = pos
        shift += 1
    return out, positions


def _haystack_units(kind: str, rng: random.Random, approx_units: int) -> list[str]:
    return noise_sentences(approx_units) if kind == "noise" else prose_sentences(rng, approx_units)


def _build(kind: str, rng: random.Random, length: int, count_tokens: CountTokens, fixed_text: str,
           needles: list[str], depths: list[float]) -> tuple[str, list[int], int]:
    """Fill a haystack of `kind` so that haystack + needles + fixed_text fit length - TEMPLATE_RESERVE tokens."""
    budget = length - TEMPLATE_RESERVE - count_tokens(fixed_text) - sum(count_tokens(n) + 1 for n in needles)
    if budget <= 0:
        raise ValueError(f"length {length} is too short for this task")
    per_unit = max(1, count_tokens(_haystack_units(kind, random.Random(0), 1)[0]))
    units = fill(_haystack_units(kind, rng, budget // per_unit + 8), budget, count_tokens)
    units, positions = insert_at_depth(units, needles, depths)
    return " ".join(units), positions, len(units)


# --------------------------------------------------------------------------------------------------------------
# Random values
# --------------------------------------------------------------------------------------------------------------
_WORDS = ["apple", "bridge", "candle", "dragon", "engine", "falcon", "garden", "harbor", "island", "jacket", "kettle",
          "lantern", "marble", "needle", "orchid", "pepper", "quartz", "rabbit", "saddle", "tunnel", "umbrella",
          "violin", "walnut", "yellow", "zebra", "anchor", "basket", "cactus", "donkey", "feather", "glacier",
          "helmet", "igloo", "jungle", "kitten", "ladder", "meadow", "nutmeg", "oyster", "parrot", "quiver",
          "ribbon", "spider", "teapot", "velvet", "window", "yogurt", "copper", "silver", "forest", "castle",
          "rocket", "pencil", "mirror", "shadow", "thunder", "crystal", "planet", "saturn", "comet", "puzzle"]


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10 ** digits - 1))


def _keys(rng: random.Random, n: int) -> list[str]:
    """n distinct two-word keys like 'silver-falcon'."""
    keys: set[str] = set()
    while len(keys) < n:
        keys.add(f"{rng.choice(_WORDS)}-{rng.choice(_WORDS)}")
    # Sorted before the seeded shuffle: a set's iteration order follows the per-process string hash (PYTHONHASHSEED),
    # so shuffling the set itself gave every process a different key order (same rng draws either way).
    return sorted(sorted(keys), key=lambda _: rng.random())


def _magic(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


_NIAH_INSTRUCTION = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                     "I will quiz you about the number afterwards.")


# --------------------------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------------------------
def passkey(length: int, seed: int, count_tokens: CountTokens = count_words, depth: float | None = None) -> Sample:
    rng = random.Random(f"passkey-{length}-{seed}")
    depth = rng.random() if depth is None else depth
    key = _number(rng, 5)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    head = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
            "I will quiz you about the important information there.")
    question = "What is the pass key?"
    text, _, _ = _build("noise", rng, length, count_tokens, head + question, [needle], [depth])
    return Sample("passkey", length, seed, f"{head}\n\n{text}", question, "The pass key is", [key], "all", 8, depth,
                  {"needle": needle})


def niah_single(length: int, seed: int, count_tokens: CountTokens = count_words, depth: float | None = None,
                haystack: str = "prose", task: str = "niah_single") -> Sample:
    rng = random.Random(f"{task}-{length}-{seed}")
    depth = rng.random() if depth is None else depth
    key, value = _keys(rng, 1)[0], _number(rng)
    question = f"What is the special magic number for {key} mentioned in the provided text?"
    prefix = f"The special magic number for {key} mentioned in the provided text is"
    needle = _magic(key, value)
    text, _, _ = _build(haystack, rng, length, count_tokens, _NIAH_INSTRUCTION + question + prefix, [needle], [depth])
    return Sample(task, length, seed, f"{_NIAH_INSTRUCTION}\n\n{text}", question, prefix, [value], "all", 12, depth,
                  {"needle": needle, "key": key})


def niah_single_noise(length: int, seed: int, count_tokens: CountTokens = count_words,
                      depth: float | None = None) -> Sample:
    return niah_single(length, seed, count_tokens, depth, haystack="noise", task="niah_single_noise")


def niah_multikey(length: int, seed: int, count_tokens: CountTokens = count_words, distractors: int = 3) -> Sample:
    rng = random.Random(f"niah_multikey-{length}-{seed}")
    keys = _keys(rng, 1 + distractors)
    values = [_number(rng) for _ in keys]
    depths = [rng.random() for _ in keys]
    question = f"What is the special magic number for {keys[0]} mentioned in the provided text?"
    prefix = f"The special magic number for {keys[0]} mentioned in the provided text is"
    needles = [_magic(k, v) for k, v in zip(keys, values)]
    text, _, _ = _build("prose", rng, length, count_tokens, _NIAH_INSTRUCTION + question + prefix, needles, depths)
    return Sample("niah_multikey", length, seed, f"{_NIAH_INSTRUCTION}\n\n{text}", question, prefix, [values[0]],
                  "all", 12, depths[0], {"key": keys[0], "distractor_values": values[1:]})


def niah_multivalue(length: int, seed: int, count_tokens: CountTokens = count_words, n_values: int = 4) -> Sample:
    rng = random.Random(f"niah_multivalue-{length}-{seed}")
    key = _keys(rng, 1)[0]
    values = [_number(rng) for _ in range(n_values)]
    depths = [rng.random() for _ in values]
    instruction = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                   "I will quiz you about the numbers afterwards.")
    question = f"What are all the special magic numbers for {key} mentioned in the provided text?"
    prefix = f"The special magic numbers for {key} mentioned in the provided text are"
    needles = [_magic(key, v) for v in values]
    text, _, _ = _build("prose", rng, length, count_tokens, instruction + question + prefix, needles, depths)
    return Sample("niah_multivalue", length, seed, f"{instruction}\n\n{text}", question, prefix, values, "all", 48,
                  min(depths), {"key": key})


def niah_multiquery(length: int, seed: int, count_tokens: CountTokens = count_words, n_queries: int = 4) -> Sample:
    rng = random.Random(f"niah_multiquery-{length}-{seed}")
    keys = _keys(rng, n_queries)
    values = [_number(rng) for _ in keys]
    depths = [rng.random() for _ in keys]
    instruction = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                   "I will quiz you about the numbers afterwards.")
    listing = ", ".join(keys[:-1]) + f", and {keys[-1]}"
    question = f"What are all the special magic numbers for {listing} mentioned in the provided text?"
    prefix = f"The special magic numbers for {listing} mentioned in the provided text are"
    needles = [_magic(k, v) for k, v in zip(keys, values)]
    text, _, _ = _build("prose", rng, length, count_tokens, instruction + question + prefix, needles, depths)
    return Sample("niah_multiquery", length, seed, f"{instruction}\n\n{text}", question, prefix, values, "all", 48,
                  min(depths), {"keys": keys})


def _var_name(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_uppercase) for _ in range(5))


def vt(length: int, seed: int, count_tokens: CountTokens = count_words, hops: int = 4) -> Sample:
    """Variable tracking (RULER vt, 1 chain): VAR X0 = v; VAR X1 = VAR X0; ... find every name bound to v."""
    rng = random.Random(f"vt-{length}-{seed}")
    names: list[str] = []
    while len(names) < hops + 1:
        n = _var_name(rng)
        if n not in names:
            names.append(n)
    value = _number(rng, 5)
    needles = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops + 1)]
    depths = sorted(rng.random() for _ in needles)
    instruction = "Memorize and track the chain(s) of variable assignment hidden in the following text."
    question = f"Question: Find all variables that are assigned the value {value} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, {hops + 1} variables "
              f"are assigned the value {value}, they are:")
    text, _, _ = _build("noise", rng, length, count_tokens, instruction + question + prefix, needles, depths)
    return Sample("vt", length, seed, f"{instruction}\n\n{text}", question, prefix, names, "all", 30, depths[0],
                  {"value": value})


def _pseudo_words(rng: random.Random, n: int) -> list[str]:
    """n distinct pronounceable pseudo-words (consonant-vowel syllables), e.g. 'tokabi'."""
    cons, vow = "bdfgklmnprstvz", "aeiou"
    out: dict[str, None] = {}
    while len(out) < n:
        out["".join(rng.choice(cons) + rng.choice(vow) for _ in range(rng.randint(2, 3)))] = None
    return list(out)


def cwe(length: int, seed: int, count_tokens: CountTokens = count_words, n_common: int = 10, common_freq: int = 30,
        rare_freq: int = 3) -> Sample:
    """Common-words extraction (RULER cwe): 10 words appear `common_freq` times, the others `rare_freq` times.

    As in RULER, the list is as long as the budget allows; if even the common words alone do not fit, their
    frequency is lowered (never below rare_freq + 2)."""
    rng = random.Random(f"cwe-{length}-{seed}")
    pool = _pseudo_words(rng, 3000)
    common, rare = pool[:n_common], pool[n_common:]
    instruction = "Below is a numbered list of words. In these words, some appear more often than others."
    question = "Question: What are the 10 most common words in the above list?"
    prefix = "Answer: The top 10 words that appear most often in the list are:"
    budget = length - TEMPLATE_RESERVE - count_tokens(instruction + question + prefix)

    def render(cf: int, n_rare: int) -> str:
        words = [w for w in common for _ in range(cf)] + [w for w in rare[:n_rare] for _ in range(rare_freq)]
        random.Random(f"cwe-order-{length}-{seed}").shuffle(words)
        return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

    cf = common_freq
    while cf > rare_freq + 2 and count_tokens(render(cf, 0)) > budget:
        cf -= 1
    # Largest number of rare words that fits: estimate from the cost per entry, then step down.
    per_entry = count_tokens(render(cf, 200)) - count_tokens(render(cf, 0))
    n_rare = max(0, int((budget - count_tokens(render(cf, 0))) / max(1e-9, per_entry / 200)))
    while n_rare > 0 and count_tokens(render(cf, n_rare)) > budget:
        n_rare = int(n_rare * 0.97)
    return Sample("cwe", length, seed, f"{instruction}\n{render(cf, n_rare)}", question, prefix, common, "all", 80,
                  None, {"common_freq": cf, "rare_freq": rare_freq, "n_rare": n_rare})


def fwe(length: int, seed: int, count_tokens: CountTokens = count_words, alpha: float = 2.0) -> Sample:
    """Frequent-words extraction (RULER fwe): coded words with Zipf frequencies; the 3 most frequent."""
    rng = random.Random(f"fwe-{length}-{seed}")
    vocab: list[str] = []
    while len(vocab) < 200:
        w = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6)))
        if w not in vocab:
            vocab.append(w)
    instruction = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                   "frequently appeared coded words.")
    question = ("Question: Do not provide any explanation. What are the three most frequently appeared words in the "
                "above coded text?")
    prefix = "Answer: According to the coded text above, the three most frequently appeared words are:"
    budget = length - TEMPLATE_RESERVE - count_tokens(instruction + question + prefix)
    weights = [1.0 / (r + 1) ** alpha for r in range(len(vocab))]
    per_word = max(1, count_tokens(" ".join(vocab[:50])) / 50)
    n = int(budget / per_word)
    while True:
        words = rng.choices(vocab, weights=weights, k=n)
        # Make the top 3 strict, whatever the draw: ranks 0 > 1 > 2 > everything else.
        counts = {w: words.count(w) for w in vocab}
        top = sorted(vocab, key=lambda w: -counts[w])[:3]
        text = " ... ".join(words)
        if count_tokens(text) <= budget:
            break
        n = int(n * 0.9)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    if len(ranked) > 3 and ranked[2][1] == ranked[3][1]:  # a tie at rank 3: add one more copy of the 3rd word
        words.append(ranked[2][0])
        text = " ... ".join(words)
        top = [w for w, _ in ranked[:3]]
    return Sample("fwe", length, seed, f"{instruction}\n{text}", question, prefix, top, "all", 30, None,
                  {"counts_top": [c for _, c in ranked[:4]]})


_CITIES = ["Varnholt", "Quillmere", "Ostrava Nova", "Belmoor", "Tyrsfield", "Kelvane", "Drumlow", "Saltreach",
           "Emberly", "Norwick", "Pellridge", "Hasbury"]
_ITEMS = ["glass lanterns", "copper kettles", "wool blankets", "paper kites", "clay bowls", "oak chairs",
          "silk scarves", "brass compasses", "wax candles", "linen shirts"]
_COLORS = ["green", "crimson", "amber", "violet", "teal", "ochre", "silver", "indigo"]


def _document(rng: random.Random, idx: int, name: str) -> tuple[str, dict[str, str]]:
    facts = {"city": rng.choice(_CITIES), "year": str(rng.randint(1850, 1990)), "item": rng.choice(_ITEMS),
             "founder": f"{rng.choice(['Anna', 'Boris', 'Clara', 'Dmitri', 'Elena', 'Felix', 'Greta', 'Hugo'])} "
                        f"{rng.choice(['Marsh', 'Okafor', 'Lindqvist', 'Ferreira', 'Novak', 'Ito', 'Brandt'])}",
             "color": rng.choice(_COLORS)}
    body = " ".join(prose_sentences(rng, 3))
    text = (f"Document {idx}: {name}\n{name} is a small workshop founded in {facts['year']} by {facts['founder']} in "
            f"the town of {facts['city']}. It is best known for its {facts['item']}, sold in {facts['color']} "
            f"boxes. {body}")
    return text, facts


_QA_QUESTIONS = {
    "city": ("In which town was {name} founded?", "{name} was founded in the town of"),
    "founder": ("Who founded {name}?", "{name} was founded by"),
    "item": ("What is {name} best known for?", "{name} is best known for its"),
    "year": ("In which year was {name} founded?", "{name} was founded in"),
}


def qa(length: int, seed: int, count_tokens: CountTokens = count_words, depth: float | None = None) -> Sample:
    """QA over generated documents (RULER qa with generated, not downloaded, documents): one document answers."""
    rng = random.Random(f"qa-{length}-{seed}")
    depth = rng.random() if depth is None else depth
    syllables = ["bel", "cor", "dan", "fir", "gal", "hol", "kin", "lum", "mor", "nel", "pra", "quo", "ros", "tal"]
    names: list[str] = []
    while len(names) < 400:
        n = "".join(rng.choice(syllables) for _ in range(3)).capitalize() + " Works"
        if n not in names:
            names.append(n)
    target = names[0]
    kind = rng.choice(sorted(_QA_QUESTIONS))
    question_t, prefix_t = _QA_QUESTIONS[kind]
    instruction = ("Answer the question based on the given documents. Only give me the answer and do not output any "
                   "other words.")
    question = f"Answer the question based on the given documents. Question: {question_t.format(name=target)}"
    prefix = f"Answer: {prefix_t.format(name=target)}"
    budget = length - TEMPLATE_RESERVE - count_tokens(instruction + question + prefix)
    gold_text, gold = _document(rng, 0, target)
    docs = []
    used = count_tokens(gold_text) + 2
    for name in names[1:]:
        d, _ = _document(rng, 0, name)
        c = count_tokens(d) + 2
        if used + c > budget:
            break
        docs.append(d)
        used += c
    pos = round(depth * len(docs))
    docs.insert(pos, gold_text)
    docs = [d.replace("Document 0:", f"Document {i + 1}:", 1) for i, d in enumerate(docs)]
    text = "\n\n".join(docs)
    while count_tokens(instruction + "\n\n" + text) > budget + count_tokens(instruction) and len(docs) > 1:
        drop = len(docs) - 1 if pos != len(docs) - 1 else 0
        docs.pop(drop)
        text = "\n\n".join(docs)
    answers = [gold[kind]]
    if kind == "founder":
        answers.append(gold[kind].split()[-1])  # the surname alone also counts (string_match_part)
    return Sample("qa", length, seed, f"{instruction}\n\n{text}", question, prefix, answers, "part", 16, depth,
                  {"kind": kind, "name": target})


GENERATORS: dict[str, Callable[..., Sample]] = {
    "passkey": passkey,
    "niah_single": niah_single,
    "niah_single_noise": niah_single_noise,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "qa": qa,
}

# The RULER-style suite (one task per RULER family).
RULER_TASKS = ["niah_single_noise", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe",
               "fwe", "qa"]


def generate(task: str, length: int, seed: int, count_tokens: CountTokens = count_words, **kwargs) -> Sample:
    if task not in GENERATORS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(GENERATORS)}")
    return GENERATORS[task](length, seed, count_tokens, **kwargs)


def needle_depth(sample: Sample, needle: str) -> float:
    """Where `needle` starts in the sample's context, as a fraction of the context's characters."""
    pos = sample.context.find(needle)
    if pos < 0:
        raise ValueError("needle not in the context")
    return pos / max(1, len(sample.context))
