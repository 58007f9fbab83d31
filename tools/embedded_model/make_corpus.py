"""Generate the embedded model's training corpus from the word lists and facts in this folder.

    python tools/embedded_model/make_corpus.py --out corpus_out --seed 1234 --mb 22

Writes corpus_out/train.jsonl and corpus_out/val.jsonl: one JSON string (a document)
per line. Every 100th document (1%) is held out for perplexity. The same seed gives
byte-identical files (the sha256 is printed and written to corpus_out/corpus.sha256).
Nothing is downloaded: every sentence comes from the code and word lists here.
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from countries import COUNTRIES, sentence_start  # noqa: E402
from knowledge import (SCIENCE_QA, SCIENCE_FACTS, TOPICS, THINKERS, MEANING_ANSWERS,  # noqa: E402
                       TOPIC_QA, EXPLAIN_TOPICS)
from stories import story  # noqa: E402
from wordlists import (GIRL_NAMES, BOY_NAMES, SURNAMES, JOBS, LIKES, COLORS, FAV_ANIMALS,  # noqa: E402
                       FOODS)


# ---------------------------------------------------------------------------------
# Capitals
# ---------------------------------------------------------------------------------
def _cap(rng):
    return rng.choice(COUNTRIES)


def capital_sentence(rng, c):
    name, cap, cont, _ = c
    return rng.choice([
        f"The capital of {name} is {cap}.",
        f"The capital of {name} is {cap}.",
        f"The capital of {name} is {cap}.",
        f"{cap} is the capital of {name}.",
        f"The capital city of {name} is {cap}.",
        f"{sentence_start(name)} is a country in {cont}, and its capital is {cap}.",
    ])


def doc_capital_short(rng):
    c = _cap(rng)
    name, cap, cont, _ = c
    first = f"The capital of {name} is {cap}."
    r = rng.random()
    if r < 0.25:
        return first
    if r < 0.5:
        return first + " " + rng.choice([
            f"{sentence_start(name)} is a country in {cont}.",
            f"{cap} is a city in {cont}.",
            f"{sentence_start(name)} is in {cont}.",
            f"Many people visit {cap} every year.",
            f"{cap} is the home of the government of {name}.",
        ])
    if r < 0.75:
        other = _cap(rng)
        return f"The capital of {name} is {cap}, and the capital of {other[0]} is {other[1]}."
    return " ".join([first] + [capital_sentence(rng, _cap(rng)) for _ in range(rng.randint(1, 4))])


def doc_capital_question(rng):
    c = _cap(rng)
    name, cap, cont, _ = c
    r = rng.random()
    if r < 0.45:
        return f"Question: What is the capital of {name}?\nAnswer: {cap}."
    if r < 0.6:
        return f"Question: What is the capital of {name}?\nAnswer: The capital of {name} is {cap}."
    if r < 0.72:
        return f"Q: What is the capital of {name}?\nA: {cap}."
    if r < 0.84:
        return f"What is the capital of {name}? The capital of {name} is {cap}."
    # several in a row
    parts = []
    for _ in range(rng.randint(2, 5)):
        n2, c2, _, _ = _cap(rng)
        parts.append(f"Question: What is the capital of {n2}?\nAnswer: {c2}.")
    return "\n\n".join(parts)


def doc_capital_list(rng):
    cont = rng.choice(["Africa", "Asia", "Europe", "North America", "South America", "Oceania"])
    cs = [c for c in COUNTRIES if c[2] == cont]
    rng.shuffle(cs)
    cs = cs[: rng.randint(3, 8)]
    r = rng.random()
    if r < 0.4:
        head = rng.choice([f"Here are some countries in {cont} and their capitals:",
                           f"Countries of {cont} and their capitals:",
                           f"Some capitals in {cont}:"])
        return head + "\n" + "\n".join(f"- {sentence_start(c[0])}: {c[1]}" for c in cs)
    if r < 0.8:
        return " ".join(f"The capital of {c[0]} is {c[1]}." for c in cs)
    return f"Let us learn about {cont}. " + " ".join(capital_sentence(rng, c) for c in cs)


def doc_country_profile(rng):
    name, cap, cont, _ = _cap(rng)
    s = [f"{sentence_start(name)} is a country in {cont}.", f"The capital of {name} is {cap}."]
    s.append(rng.choice([
        f"If you travel to {name}, you will probably visit {cap}.",
        f"The government of {name} meets in {cap}.",
        f"{cap} is an important city for the people of {name}.",
        f"Students in {name} learn that their capital is {cap}.",
    ]))
    return " ".join(s)


# ---------------------------------------------------------------------------------
# Science and geography
# ---------------------------------------------------------------------------------
def doc_science_paragraph(rng):
    facts = rng.sample(SCIENCE_FACTS, rng.randint(3, 6))
    head = rng.choice(["", "Here are some facts about the world. ", "Did you know? ",
                       "Some simple science facts: ", "Fun facts: "])
    return head + " ".join(facts)


def doc_science_qa(rng):
    q, a, full = rng.choice(SCIENCE_QA)
    r = rng.random()
    if r < 0.4:
        return f"Question: {q}\nAnswer: {a}."
    if r < 0.7:
        return f"Question: {q}\nAnswer: {full}"
    if r < 0.85:
        return f"{q} {full}"
    return f"Q: {q}\nA: {full}"


# ---------------------------------------------------------------------------------
# Explanations and paragraphs on a topic
# ---------------------------------------------------------------------------------
def topic_paragraph(rng, key, n_min=3, n_max=6, opener=None):
    t = TOPICS[key]
    body = t["body"]
    k = min(len(body), rng.randint(n_min, n_max))
    idx = sorted(rng.sample(range(len(body)), k))
    sents = [opener or rng.choice(t["openers"])] + [body[i] for i in idx]
    if rng.random() < 0.7:
        sents.append(rng.choice(t["closers"]))
    return " ".join(sents)


TOPIC_KEYS = sorted(TOPICS)
# The lesson's topics come up more often.
TOPIC_WEIGHTS = {k: 1.0 for k in TOPIC_KEYS}
TOPIC_WEIGHTS.update({"AI": 6.0, "the future of AI": 4.0, "programming": 4.0, "quantum computing": 4.0,
                      "the meaning of life": 4.0, "machine learning": 2.0, "language models": 2.0})


def _topic(rng):
    return rng.choices(TOPIC_KEYS, weights=[TOPIC_WEIGHTS[k] for k in TOPIC_KEYS])[0]


def doc_write_paragraph(rng):
    key = _topic(rng)
    name = rng.choice(TOPICS[key]["names"])
    verb = rng.choice(["Write a short paragraph about", "Write a short paragraph about",
                       "Write a paragraph about", "Write a few sentences about"])
    return f"{verb} {name}:\n{topic_paragraph(rng, key)}"


def doc_explain(rng):
    key = rng.choice(EXPLAIN_TOPICS + ["quantum computing"] * 6 + ["AI"] * 2)
    name = rng.choice(TOPICS[key]["names"])
    sep = rng.choice([".\n", ".\n", "\n", ":\n", ".\n\n"])
    lead = rng.choice(["Explain", "Explain", "Explain", "Please explain"])
    body = topic_paragraph(rng, key, 4, 7)
    if key == "quantum computing" and rng.random() < 0.5:
        body = rng.choice(["Sure! ", "Here is a simple explanation. ", ""]) + body
    return f"{lead} {name} in simple terms{sep}{body}"


def doc_topic_plain(rng):
    return topic_paragraph(rng, _topic(rng))


def doc_future_ai(rng):
    return topic_paragraph(rng, "the future of AI", 3, 6)


LEARN_OPENERS = [
    "The best way to learn programming is to write code every day.",
    "The best way to learn programming is to build small projects that you care about.",
    "The best way to learn programming is to practice, practice and practice.",
    "The best way to learn programming is to start with a simple language like Python and write a little code every day.",
    "The best way to learn programming is by doing: write programs, make mistakes and fix them.",
    "The best way to learn programming is to pick a small project and finish it.",
]


def doc_learn_programming(rng):
    return topic_paragraph(rng, "programming", 2, 5, opener=rng.choice(LEARN_OPENERS))


MEANING_OPENERS = [
    "The meaning of life is a question that people have asked for thousands of years.",
    "The meaning of life is different for every person.",
    "The meaning of life is a big question, and there are many answers.",
    "The meaning of life is to love, to learn and to help others, or so many people say.",
    "The meaning of life is one of the oldest questions in philosophy.",
    "The meaning of life is something each of us must find for ourselves.",
]


def doc_meaning(rng):
    t = rng.sample(THINKERS, rng.randint(2, 4))
    sents = [rng.choice(MEANING_OPENERS)] + [x[2] for x in t]
    if rng.random() < 0.6:
        sents.append(rng.choice(TOPICS["the meaning of life"]["closers"]))
    if rng.random() < 0.3:
        who, short, _ = rng.choice(THINKERS)
        return f"According to {who}, {short}. " + " ".join(sents[1:])
    return " ".join(sents)


# ---------------------------------------------------------------------------------
# Questions with answers, numbered like the lesson's prompts
# ---------------------------------------------------------------------------------
def _any_qa(rng):
    r = rng.random()
    if r < 0.35:
        return "What is the meaning of life?", rng.choice(MEANING_ANSWERS)
    if r < 0.6:
        name, cap, _, _ = _cap(rng)
        return f"What is the capital of {name}?", rng.choice([f"The capital of {name} is {cap}.", f"{cap}."])
    if r < 0.8:
        q, a, full = rng.choice(SCIENCE_QA)
        return q, full
    return rng.choice(TOPIC_QA)


def doc_numbered_questions(rng):
    n = rng.randint(1, 5) if rng.random() < 0.4 else 1
    start = rng.randint(0, 120)
    parts = []
    for i in range(n):
        q, a = _any_qa(rng)
        parts.append(f"Question {start + i}: {q}\nAnswer: {a}")
    return "\n\n".join(parts)


def doc_plain_question(rng):
    q, a = rng.choice(TOPIC_QA) if rng.random() < 0.6 else _any_qa(rng)
    return rng.choice([f"Question: {q}\nAnswer: {a}", f"{q}\n{a}", f"{q} {a}", f"Q: {q}\nA: {a}"])


# ---------------------------------------------------------------------------------
# Greetings and self-introductions
# ---------------------------------------------------------------------------------
def doc_introduction(rng):
    g = rng.random() < 0.5
    name = rng.choice(GIRL_NAMES if g else BOY_NAMES)
    cname, cap, _, _ = _cap(rng)
    likes = rng.sample(LIKES, 2)
    r = rng.random()
    if r < 0.45:  # a child
        age = rng.randint(6, 15)
        s = [f"Hello, my name is {name}.", f"I am {age} years old.",
             rng.choice([f"I live in {cap}, the capital of {cname}.", f"I live in {cap}.",
                         f"I come from {cname}.", f"I live in a small town in {cname}."]),
             rng.choice([f"I like {likes[0]} and {likes[1]}.", f"My hobbies are {likes[0]} and {likes[1]}.",
                         f"I love {likes[0]}."])]
        extra = [f"My favorite color is {rng.choice(COLORS)}.", f"My favorite animals are {rng.choice(FAV_ANIMALS)}.",
                 f"My favorite food is {rng.choice(FOODS)}.", f"I have {rng.choice(['one', 'two', 'three'])} "
                 f"{rng.choice(['brothers', 'sisters', 'cousins', 'cats', 'fish'])}.",
                 "I go to school every day, and I like my teacher."]
        s += rng.sample(extra, rng.randint(1, 3))
    elif r < 0.85:  # an adult
        job = rng.choice(JOBS)
        s = [rng.choice([f"Hello, my name is {name} {rng.choice(SURNAMES)}.", f"Hello, my name is {name}."]),
             rng.choice([f"I am {job} from {cap}.", f"I work as {job} in {cap}.", f"I am {job}, and I live in {cname}."]),
             rng.choice([f"In my free time, I enjoy {likes[0]}.", f"I like {likes[0]} and {likes[1]}.",
                         f"I have been {job} for {rng.randint(2, 25)} years.", "I love my job because I can help people."])]
        if rng.random() < 0.6:
            s.append(rng.choice(["I am happy to meet you.", "Nice to meet you!", "I hope we can work together.",
                                 "Today I want to tell you a little about my work."]))
    else:  # the model itself, or a robot
        s = [rng.choice(["Hello, my name is TinyLab.", "Hello, my name is Robo.", f"Hello, my name is {name}, and I am a robot."]),
             rng.choice(["I am a small language model.", "I am a small AI that lives inside a computer.",
                         "I am a friendly robot."]),
             rng.choice(["I can tell stories, answer simple questions and name the capital of every country.",
                         "I learned to write by reading many short stories and facts.",
                         "I like to help people learn."])]
    text = " ".join(s)
    if rng.random() < 0.25:
        text = rng.choice(["Hi! ", "Good morning! ", "Hello everyone! "]) + text
    if rng.random() < 0.5 and not text.endswith("!"):
        text += " " + rng.choice(["Nice to meet you!", "Nice to meet you.", "Have a nice day!", "Thank you for listening."])
    return text


def doc_greeting(rng):
    name = rng.choice(GIRL_NAMES + BOY_NAMES)
    name2 = rng.choice(GIRL_NAMES + BOY_NAMES)
    return rng.choice([
        f"Hello! How are you today?\nI am fine, thank you. And you?\nI am very well, thanks!",
        f"How are you? I am doing well, thank you for asking. I hope you are having a good day.",
        f"How are you?\nI am fine, thanks. It is a beautiful day today.",
        f"Hello, {name}! It is nice to see you.\nHello, {name2}! How was your day?\nIt was great, thank you.",
        f"Hello world! This is the first program that many people write when they learn to code.",
        f"Hello, world! In Python, you can print this message with one line: print(\"Hello, world!\")",
        f"Hello world, and welcome to my blog. Today I want to write about {rng.choice(['AI', 'programming', 'music', 'space', 'books'])}.",
        f"Hello! My name is {name}. What is your name?\nMy name is {name2}. Nice to meet you!",
        f"Hello there! Welcome to our class. Today we will learn about {rng.choice(['planets', 'animals', 'capitals of the world', 'computers', 'AI'])}.",
        f"Hello, everyone. Thank you for coming today.",
        f"Good morning! How are you? I hope you slept well.",
        f"Hello! I am happy to see you. Shall we go to the park?",
        f"What is AI? AI stands for artificial intelligence. It means computers that can learn from data and solve problems.",
        f"What is AI?\nAI, or artificial intelligence, is a kind of computer program that can learn, understand language and solve problems.",
    ])


# ---------------------------------------------------------------------------------
GENERATORS = [
    # (generator, weight by document count)
    (story, 30),
    (doc_capital_short, 10),
    (doc_capital_question, 10),
    (doc_capital_list, 3),
    (doc_country_profile, 3),
    (doc_science_paragraph, 4),
    (doc_science_qa, 5),
    (doc_write_paragraph, 5),
    (doc_explain, 5),
    (doc_topic_plain, 4),
    (doc_future_ai, 3),
    (doc_learn_programming, 3),
    (doc_meaning, 3),
    (doc_numbered_questions, 8),
    (doc_plain_question, 3),
    (doc_introduction, 8),
    (doc_greeting, 3),
]


def generate(seed: int, target_bytes: int, kinds: bool = False):
    """Yield (index, document), or (index, document, generator name) with kinds=True."""
    rng = random.Random(seed)
    gens = [g for g, _ in GENERATORS]
    weights = [w for _, w in GENERATORS]
    total = 0
    i = 0
    while total < target_bytes:
        g = rng.choices(gens, weights=weights)[0]
        doc = g(rng)
        total += len(doc.encode("utf-8")) + 1
        yield (i, doc, g.__name__) if kinds else (i, doc)
        i += 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="corpus_out")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--mb", type=float, default=22.0, help="size of the corpus in MB (10^6 bytes)")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()
    h = hashlib.sha256()
    n_train = n_val = 0
    nbytes = 0
    with open(os.path.join(args.out, "train.jsonl"), "w", encoding="utf-8") as ft, \
            open(os.path.join(args.out, "val.jsonl"), "w", encoding="utf-8") as fv:
        for i, doc in generate(args.seed, int(args.mb * 1e6)):
            line = json.dumps(doc, ensure_ascii=False) + "\n"
            h.update(line.encode("utf-8"))
            nbytes += len(doc.encode("utf-8"))
            if i % 100 == 37:
                fv.write(line)
                n_val += 1
            else:
                ft.write(line)
                n_train += 1
    digest = h.hexdigest()
    with open(os.path.join(args.out, "corpus.sha256"), "w") as f:
        f.write(digest + "\n")
    print(f"{n_train + n_val} documents ({n_train} train, {n_val} held out), {nbytes / 1e6:.1f} MB of text, "
          f"seed {args.seed}, {time.time() - t0:.1f} s, sha256 {digest}")


if __name__ == "__main__":
    main()
