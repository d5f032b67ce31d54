"""Build the demo intrinsics' data: templated documents and dialogues whose labels come from how they are built.

A small fictional world (people, companies, towns, books; names, values and sentence templates written for this
project) is sampled into three tasks. Nothing is judged by a model: every label is known by construction.

- ``answerability``: documents and a question in the chat; is the answer in the documents?  The unanswerable
  cases are built to be hard: the entity is described but not the asked attribute (``missing_attribute``), the
  attribute is given for another entity of the same kind (``other_entity``), or the documents are about
  something else (``unrelated``).
- ``hallucination``: documents, a question and the assistant's answer; is the answer supported?  Hallucinated
  answers carry a value that is not in the documents (``invented``), a value the documents give for another
  entity or attribute (``swapped``), a near miss of a number (``near_miss``), or a value for a question the
  documents do not answer (``unanswerable_claim``); faithful answers copy the documents (``correct``) or say
  the documents do not tell (``correct_refusal``).
- ``query_rewrite``: a dialogue about the world whose last question leans on it (a pronoun, "What about X?",
  "And her birthplace?") or already stands alone; the target is the question made standalone.

Each intrinsic is called as IBM's intrinsics are (granite-common's ``IntrinsicsRewriter``): the ``io.yaml``
instruction is appended as a user message, the chat template renders the messages with the generation prompt, and
the answer is JSON under the ``response_format`` schema. Rows are ``{"messages", "instruction", "invocation",
"target", "label", "case"}``: ``alora train`` trains on exactly those tokens, and the aLoRA activates at its
invocation (the rendered start of the instruction turn, ``<|im_start|>user\\n<answerability>``), which occurs in
the prompt whether our ``conv.run_intrinsic`` or an OpenAI client appends the instruction.

Train and held-out rows come from disjoint pools of names (people, companies, towns, book titles), so held-out
entities were never seen in training. Output: ``benchmarks/data/{name}_{train,heldout}.jsonl`` and
``benchmarks/data/{name}_io.yaml``.

Reproduce the shipped data and adapters (each adapter folder's ``alora_train.json`` records its arguments; times
on the 2-core CPU of the build, shared with other work, so 6-13 s a step)::

    .venv/bin/python benchmarks/make_intrinsics_data.py        # a second: 3 x (800 train + 200 held-out) rows
    T="--rank 8 --top-layers 15 --epochs 1 --batch-size 8 --lr 1e-3 --save-dtype float16 --val-final-only"
    n=answerability                                            # 100 steps (one epoch) each, aLoRA and LoRA twin
    .venv/bin/python -m alora.cli train benchmarks/data/${n}_train.jsonl alora/demo_adapters/${n} \\
        --val benchmarks/data/${n}_heldout.jsonl --io-yaml benchmarks/data/${n}_io.yaml $T
    .venv/bin/python -m alora.cli train benchmarks/data/${n}_train.jsonl alora/demo_adapters/${n}_lora \\
        --val benchmarks/data/${n}_heldout.jsonl --io-yaml benchmarks/data/${n}_io.yaml $T --lora
    for n in hallucination query_rewrite; do                   # 60 steps each (time), no LoRA twin shipped
      .venv/bin/python -m alora.cli train benchmarks/data/${n}_train.jsonl alora/demo_adapters/${n} \\
          --val benchmarks/data/${n}_heldout.jsonl --io-yaml benchmarks/data/${n}_io.yaml $T --max-steps 60
    done
    .venv/bin/python benchmarks/intrinsics_quality.py          # the quality table
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DATA_DIR = Path(__file__).resolve().parent / "data"

# ---- the intrinsics: io.yaml contents ------------------------------------------------------------------

INTRINSICS = {
    "answerability": dict(
        instruction=('<answerability> Can my last question be answered from the documents above? Reply '
                     '"answerable" if they contain the answer, "unanswerable" if they do not.'),
        response_format={"type": "string", "enum": ["answerable", "unanswerable"]},
        categories={"answerable": 1.0, "unanswerable": 0.0},
        field="answerability_likelihood", max_tokens=6),
    "hallucination": dict(
        instruction=('<hallucination> Is the last answer supported by the documents above? Reply "faithful" if '
                     'the documents support it, "hallucinated" if they do not.'),
        response_format={"type": "string", "enum": ["faithful", "hallucinated"]},
        categories={"faithful": 0.0, "hallucinated": 1.0},
        field="hallucination_likelihood", max_tokens=6),
    "query_rewrite": dict(
        instruction=("<query_rewrite> Rewrite my last question so that it can be understood without the "
                     "conversation above; if it already stands alone, repeat it. Reply in JSON with the field "
                     "rewritten_question."),
        response_format={"type": "object", "properties": {"rewritten_question": {"type": "string"}},
                         "required": ["rewritten_question"], "additionalProperties": False},
        categories=None, field=None, max_tokens=48),
}


def invocation(name: str) -> str:
    """The aLoRA's invocation text: the rendered start of the instruction's user turn, up to its tag."""
    tag = INTRINSICS[name]["instruction"].split(" ", 1)[0]
    return f"<|im_start|>user\n{tag}"


def io_yaml(name: str) -> str:
    """The ``io.yaml`` of intrinsic ``name`` (IBM's layout, read by granite-common and ``load_intrinsic``)."""
    spec = INTRINSICS[name]
    lines = [f"model: {name}", "response_format: |", f"  {json.dumps(spec['response_format'])}"]
    if spec["categories"]:
        lines += ["transformations:", "  - type: likelihood", f"    categories_to_values: "
                  f"{json.dumps(spec['categories'])}", "    input_path: []", "  - type: nest",
                  "    input_path: []", f"    field_name: {spec['field']}"]
    else:
        lines.append("transformations: ~")
    lines += [f"instruction: {json.dumps(spec['instruction'])}", "parameters:",
              f"  max_completion_tokens: {spec['max_tokens']}", "sentence_boundaries: ~"]
    return "\n".join(lines) + "\n"


def target_text(name: str, value: str) -> str:
    """The JSON text the schema admits for ``value`` (a category, or the rewritten question)."""
    if name == "query_rewrite":
        return json.dumps({"rewritten_question": value}, ensure_ascii=False)
    return json.dumps(value)


# ---- the world --------------------------------------------------------------------------------------------
# Name pools are split in two by position (train | held-out): held-out entities never occur in training.

FEMALE = """Marta Ines Aiko Priya Leona Sofia Nadia Greta Elena Amara Yuki Clara Freya Lucia Hana Olga Maya Zara
Ingrid Rosa Esther Nora Keiko Fatima Lena Mirela Tamsin Beatriz Daria Ayla Selma Imogen Chiara Anouk Wanda Paloma
Ottilie Meera Signe Lourdes Rania Ilse Jovana Carmen Agnes Noemi Tove Aurelie Kalinda Vesna""".split()
MALE = """Jonas Tomas Kenji Rafael Omar Felix Anton Mateo Ivan Rohan Lars Diego Hugo Emil Kwame Pavel Nils Arjun
Bruno Samir Oskar Tariq Milo Stefan Joaquin Dmitri Hamza Luca Teodor Yusuf Casimir Ruben Aleksander Idris Finn
Benedek Ansel Marek Corentin Haruto Leandro Bastian Thiago Ravi Niklas Soren Vikram Gideon Cyrus Eamon""".split()
LAST = """Velasquez Berg Tanaka Okafor Lindqvist Moreau Kowalski Haddad Ferreira Novak Sato Brennan Achterberg
Castellano Dubois Eriksen Fischer Gallagher Horvath Ibarra Jansen Kapoor Larsen Mendoza Nakamura Olsen Petrov
Quintero Rossi Schneider Takahashi Ulrich Varga Wojcik Yilmaz Zielinski Abara Bianchi Conti Demir Esposito Fontaine
Grünewald Hashemi Iwasaki Jovanovic Kaur Lombardi Mbeki Nieminen Oyelaran Pacheco Rahimi Salonen Tremblay Urquhart
Vasquez Whitlock Xavier Yamada Zamora Alvarado Bergstrom Calloway Delacroix Engel Falk Gupta Holm Ishikawa Jaramillo
Keller Lund Marchetti Nyberg Ortega Pires Quast Rinaldi Strand Thorsen Uddin Valdez Wexler""".split()
COMPANY_A = """Norvik Brightwave Copperleaf Halcyon Tidewater Redstone Amberline Silverpine Bluefjord Quillon
Marlowe Kestrel Ironbark Saffron Lumen Northgate Pebblebrook Cobalt Driftwood Evergreen Falconer Glasswing Harbor
Juniper Larkspur Meridian Oakhurst Pinecrest Riverton Stonebridge Thistle Vantage Willowmere Zephyr Ashgrove
Birchwood Cedarline Dunmore Emberly Foxglove""".split()
COMPANY_B = """Labs Foods Systems Textiles Robotics Press Motors Analytics Pharma Logistics Studios Energy Optics
Furniture Instruments Biotech""".split()
TOWN_A = """Eld Varn Kess Mor Thal Brisk Ash Cald Dun Fen Gorm Hollin Isk Jarl Kel Lind Marr Nor Oster Pell Quen
Rav Sel Tor Ulm Vey Wick Yarl Zell Brom Corv Drey Elm Fald Grist""".split()
TOWN_B = "moor holt bridge haven ford wick stead mere by dale field ton".split()
BOOK_ADJ = """Silent Hidden Last Burning Quiet Broken Golden Winter Distant Forgotten Crimson Endless Hollow Paper
Glass Iron Secret Wandering Sleeping Northern Salt Lantern Falling Painted""".split()
BOOK_NOUN = """Harbor Orchard Garden Lighthouse River Kingdom Mirror Archive Compass Meadow Tower Island Bridge
Station Library Forest Voyage Clockmaker Cartographer Season Letters Summer Engine Atlas Shore Valley""".split()

CITIES = """Lisbon Oslo Nairobi Kyoto Montreal Valparaiso Krakow Tunis Auckland Ghent Porto Bergen Lyon Seville
Tallinn Cork Graz Utrecht Bologna Riga Quito Osaka Perth Halifax Leeds Turin Malmo Aarhus Cusco Hanoi Dakar Accra
Izmir Split Bilbao Gdansk Tartu Basel Salzburg Bordeaux Nantes Dundee Brno Cluj Plovdiv Sapporo Busan Pune Mysore
Kandy Arusha Windhoek Mendoza Cordoba Tucson Boise Calgary Regina Hobart Darwin Nelson""".split()
COUNTRIES = """Norway Portugal Chile Kenya Japan Canada Poland Tunisia Estonia Ireland Austria Italy Latvia Ecuador
Vietnam Senegal Ghana Croatia Spain Belgium Denmark Finland Peru Morocco Iceland Uruguay Scotland Wales""".split()
OCCUPATIONS = [o.strip() for o in """marine biologist|carpenter|architect|pediatric nurse|software engineer|
pastry chef|geologist|translator|airline pilot|violin teacher|structural engineer|veterinarian|librarian|
watchmaker|photographer|beekeeper|tax lawyer|museum curator|radio host|glassblower|bus driver|pharmacist|
landscape gardener|sound engineer|firefighter|cartographer|midwife|furniture maker|data analyst|
primary school teacher""".replace("\n", "").split("|")]
INSTRUMENTS = """cello piano trumpet accordion harp clarinet banjo oboe drums saxophone flute ukulele bassoon
mandolin""".split()
SUBJECTS = [s.strip() for s in """chemistry|medieval history|mechanical engineering|linguistics|economics|
astronomy|philosophy|civil law|botany|statistics|music theory|architecture|marine ecology|mathematics|
political science|computer science|art history|geography|nursing|agriculture""".replace("\n", "").split("|")]
PETS = "dog cat parrot rabbit tortoise horse goat ferret".split()
PET_NAMES = """Biscuit Pepper Juniper Waffles Mochi Luna Ziggy Clementine Pickles Noodle Bramble Tofu Pixel
Hazel Marble Rusty Olive Sprout Maple Dumpling Comet Fig""".split()
PRODUCTS = [p.strip() for p in """solar water pumps|kitchen knives|hiking boots|hearing aids|electric bicycles|
frozen dumplings|wool blankets|drone cameras|board games|insulin pens|garden tools|vinyl records|rain jackets|
coffee grinders|smart thermostats|children's books|wind turbine blades|ceramic tiles""".replace("\n", "").split("|")]
FESTIVALS = [f.strip() for f in """a lantern festival|a jazz festival|a cheese market|a kite festival|
a harvest fair|a rowing regatta|a puppet festival|a folk dance festival|a winter light show|
a chili cook-off""".replace("\n", "").split("|")]
RIVER_NAMES = "Aln Brede Coln Dorn Esk Frome Garry Hull Isla Kent Lune Mole Nidd Ouse Rhee Swale Tees Ure Wey Yare".split()
GENRES = [g.strip() for g in """mystery|science fiction|historical fiction|poetry|fantasy|biography|thriller|
travel writing|romance|short stories""".replace("\n", "").split("|")]


def _split(pool: list, split: str) -> list:
    cut = int(len(pool) * 0.8)
    return pool[:cut] if split == "train" else pool[cut:]


def number_text(n: int) -> str:
    return f"{n:,}"


@dataclass
class Entity:
    kind: str  # person | company | town | book
    name: str
    gender: str | None = None  # people: "f" | "m"
    facts: dict[str, str] = field(default_factory=dict)

    @property
    def pronoun(self) -> str:
        return {"f": "she", "m": "he"}.get(self.gender, "it")

    @property
    def possessive(self) -> str:
        return {"f": "her", "m": "his"}.get(self.gender, "its")


@dataclass(frozen=True)
class Attribute:
    """One fact an entity can have: its value sampler, how documents state it, how questions and answers ask
    and tell it. Templates use {s} (subject: name or pronoun; {s_mid} mid-sentence), {pr} (the pronoun), {p}
    (possessive: "Name's" or "her"), {pos_short} (the possessive pronoun), {pet} (a person's kind of pet) and
    {v} (the value)."""
    key: str
    kind: str
    value_type: str  # values of one type can be swapped for each other (a hallucination)
    sample: Callable[[random.Random, "World"], str]
    statements: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]
    noun: str  # "And her {noun}?" / "The documents do not mention her {noun}."


def _year(lo, hi):
    return lambda rng, w: str(rng.randint(lo, hi))


def _pick(pool):
    return lambda rng, w: rng.choice(pool)


ATTRIBUTES = [
    # people
    Attribute("birth_year", "person", "year", _year(1931, 2004),
              ("{s} was born in {v}.", "{s} was born in the year {v}."),
              ("When was {s} born?", "In what year was {s} born?", "What year was {s} born?"),
              ("{s} was born in {v}.", "{v}.", "{s} was born in the year {v}."), "birth year"),
    Attribute("birthplace", "person", "city", _pick(CITIES),
              ("{s} was born in {v}.", "{s} grew up in {v}, where {pr} was born."),
              ("Where was {s} born?", "What city was {s} born in?", "In which city was {s} born?"),
              ("{s} was born in {v}.", "In {v}.", "{v}."), "birthplace"),
    Attribute("residence", "person", "city", _pick(CITIES),
              ("{s} lives in {v}.", "{s} now lives in {v}.", "These days {s_mid} lives in {v}."),
              ("Where does {s} live?", "In which city does {s} live?", "What city does {s} live in now?"),
              ("{s} lives in {v}.", "In {v}.", "{v}."), "home city"),
    Attribute("occupation", "person", "occupation", _pick(OCCUPATIONS),
              ("{s} works as a {v}.", "{s} is a {v} by profession.", "By trade, {s_mid} is a {v}."),
              ("What does {s} do for a living?", "What is {p} job?", "What is {p} profession?"),
              ("{s} works as a {v}.", "{s} is a {v}.", "A {v}."), "job"),
    Attribute("employer", "person", "company", lambda rng, w: w.company_name(rng),
              ("{s} works at {v}.", "{s} is employed by {v}.", "{s} has a job at {v}."),
              ("Which company does {s} work for?", "Who employs {s}?", "Where does {s} work?"),
              ("{s} works at {v}.", "{s} is employed by {v}.", "At {v}."), "employer"),
    Attribute("instrument", "person", "instrument", _pick(INSTRUMENTS),
              ("{s} plays the {v}.", "In the evenings {s_mid} plays the {v}."),
              ("Which instrument does {s} play?", "What instrument does {s} play?"),
              ("{s} plays the {v}.", "The {v}."), "instrument"),
    Attribute("subject", "person", "subject", _pick(SUBJECTS),
              ("{s} studied {v} at university.", "{s} holds a degree in {v}."),
              ("What did {s} study?", "What is {p} degree in?", "Which subject did {s} study at university?"),
              ("{s} studied {v}.", "{s} has a degree in {v}.", "{v}."), "field of study"),
    Attribute("spouse", "person", "person", lambda rng, w: w.person_name(rng)[0],
              ("{s} is married to {v}.", "{s} married {v}."),
              ("Who is {s} married to?", "Who is {p} spouse?", "Who did {s} marry?"),
              ("{s} is married to {v}.", "{s} married {v}.", "{v}."), "spouse"),
    Attribute("pet", "person", "pet", _pick(PET_NAMES),
              ("{s} has a {pet} called {v}.", "{s} owns a {pet} named {v}."),
              ("What is the name of {p} pet?", "What is {p} pet called?", "What did {s} name {pos_short} pet?"),
              ("{p} pet is called {v}.", "It is called {v}.", "{v}."), "pet's name"),
    # companies
    Attribute("founded", "company", "year", _year(1890, 2021),
              ("{s} was founded in {v}.", "{s} was established in {v}."),
              ("When was {s} founded?", "In what year was {s} founded?", "What year was {s} established?"),
              ("{s} was founded in {v}.", "In {v}.", "{v}."), "founding year"),
    Attribute("founder", "company", "person", lambda rng, w: w.person_name(rng)[0],
              ("{s} was founded by {v}.", "{v} founded {s}."),
              ("Who founded {s}?", "Who is the founder of {s}?", "Who started {s}?"),
              ("{s} was founded by {v}.", "{v} founded it.", "{v}."), "founder"),
    Attribute("headquarters", "company", "city", _pick(CITIES),
              ("{s} has its headquarters in {v}.", "{s} is based in {v}."),
              ("Where is {s} based?", "Where are {p} headquarters?", "In which city is {s} headquartered?"),
              ("{s} is based in {v}.", "{p} headquarters are in {v}.", "In {v}."), "headquarters"),
    Attribute("product", "company", "product", _pick(PRODUCTS),
              ("{s} makes {v}.", "{s} is best known for its {v}.", "{s} designs and sells {v}."),
              ("What does {s} make?", "What products does {s} sell?", "What is {s} known for making?"),
              ("{s} makes {v}.", "{s} sells {v}.", "{v}."), "products"),
    Attribute("employees", "company", "count", lambda rng, w: number_text(rng.choice(
        [rng.randint(12, 400), rng.randint(400, 9000), rng.randint(9000, 90000)])),
              ("{s} has {v} employees.", "{s} employs {v} people."),
              ("How many employees does {s} have?", "How many people work at {s}?", "How many people does {s} "
               "employ?"),
              ("{s} has {v} employees.", "{s} employs {v} people.", "{v}."), "number of employees"),
    Attribute("ceo", "company", "person", lambda rng, w: w.person_name(rng)[0],
              ("{s} is run by its chief executive, {v}.", "The CEO of {s} is {v}."),
              ("Who is the CEO of {s}?", "Who runs {s}?", "Who is {p} chief executive?"),
              ("The CEO of {s} is {v}.", "{v} runs it.", "{v}."), "chief executive"),
    # towns
    Attribute("population", "town", "count", lambda rng, w: number_text(rng.randint(800, 250000)),
              ("{s} has a population of {v}.", "About {v} people live in {s}."),
              ("What is the population of {s}?", "How many people live in {s}?", "How big is {p} population?"),
              ("{s} has a population of {v}.", "About {v} people.", "{v}."), "population"),
    Attribute("country", "town", "country", _pick(COUNTRIES),
              ("{s} is a town in {v}.", "{s} lies in {v}."),
              ("Which country is {s} in?", "In what country is {s}?", "Where is {s} located?"),
              ("{s} is in {v}.", "In {v}.", "{v}."), "country"),
    Attribute("river", "town", "river", lambda rng, w: f"the {rng.choice(RIVER_NAMES)}",
              ("{s} sits on the banks of {v}.", "{v} runs through {s}."),
              ("Which river runs through {s}?", "What river is {s} on?"),
              ("{v} runs through {s}.", "{s} is on {v}.", "{v}."), "river"),
    Attribute("festival", "town", "festival", _pick(FESTIVALS),
              ("Every summer {s} hosts {v}.", "{s} is famous for {v}."),
              ("What is {s} famous for?", "What festival does {s} hold?", "Which event is {s} known for?"),
              ("{s} is famous for {v}.", "{s} hosts {v}.", "{v}."), "festival"),
    Attribute("mayor", "town", "person", lambda rng, w: w.person_name(rng)[0],
              ("The mayor of {s} is {v}.", "{v} is the mayor of {s}."),
              ("Who is the mayor of {s}?", "Who is {p} mayor?", "Who leads the town council of {s}?"),
              ("The mayor of {s} is {v}.", "{v} is the mayor.", "{v}."), "mayor"),
    # books
    Attribute("author", "book", "person", lambda rng, w: w.person_name(rng)[0],
              ("{s} was written by {v}.", "{v} wrote {s}."),
              ("Who wrote {s}?", "Who is the author of {s}?", "Who is {p} author?"),
              ("{s} was written by {v}.", "{v} wrote it.", "{v}."), "author"),
    Attribute("published", "book", "year", _year(1921, 2023),
              ("{s} was published in {v}.", "{s} first came out in {v}."),
              ("When was {s} published?", "In what year was {s} published?", "What year did {s} come out?"),
              ("{s} was published in {v}.", "In {v}.", "{v}."), "publication year"),
    Attribute("pages", "book", "count", lambda rng, w: str(rng.randint(96, 880)),
              ("{s} is {v} pages long.", "{s} runs to {v} pages."),
              ("How many pages does {s} have?", "How long is {s}?", "How many pages is {s}?"),
              ("{s} has {v} pages.", "{v} pages.", "{v}."), "page count"),
    Attribute("genre", "book", "genre", _pick(GENRES),
              ("{s} is a work of {v}.", "{s} is usually shelved under {v}."),
              ("What genre is {s}?", "What kind of book is {s}?", "Which genre does {s} belong to?"),
              ("{s} is {v}.", "It is {v}.", "{v}."), "genre"),
    Attribute("setting", "book", "city", _pick(CITIES),
              ("{s} is set in {v}.", "The story of {s} takes place in {v}."),
              ("Where is {s} set?", "In which city does {s} take place?", "What is {p} setting?"),
              ("{s} is set in {v}.", "In {v}.", "{v}."), "setting"),
]
BY_KIND: dict[str, list[Attribute]] = {}
for _a in ATTRIBUTES:
    BY_KIND.setdefault(_a.kind, []).append(_a)
KINDS = list(BY_KIND)


class World:
    """Entity factory over one split's name pools."""

    def __init__(self, split: str):
        self.female, self.male, self.last = _split(FEMALE, split), _split(MALE, split), _split(LAST, split)
        self.company_a, self.town_a = _split(COMPANY_A, split), _split(TOWN_A, split)
        self.book_adj, self.book_noun = _split(BOOK_ADJ, split), _split(BOOK_NOUN, split)

    def person_name(self, rng) -> tuple[str, str]:
        gender = rng.choice("fm")
        first = rng.choice(self.female if gender == "f" else self.male)
        return f"{first} {rng.choice(self.last)}", gender

    def company_name(self, rng) -> str:
        return f"{rng.choice(self.company_a)} {rng.choice(COMPANY_B)}"

    def entity(self, rng, kind: str, avoid: set[str] = frozenset()) -> Entity:
        while True:
            gender = None
            if kind == "person":
                name, gender = self.person_name(rng)
            elif kind == "company":
                name = self.company_name(rng)
            elif kind == "town":
                name = rng.choice(self.town_a) + rng.choice(TOWN_B)
            else:
                name = f"The {rng.choice(self.book_adj)} {rng.choice(self.book_noun)}"
            if name not in avoid:
                break
        e = Entity(kind, name, gender)
        for a in BY_KIND[kind]:
            e.facts[a.key] = a.sample(rng, self)
        e.facts["_pet_kind"] = rng.choice(PETS)
        return e


def _fill(template: str, e: Entity, v: str = "", *, subject: str | None = None) -> str:
    s = subject if subject is not None else e.name
    poss = f"{e.name}'s" if s == e.name else e.possessive
    text = template.format(s=s, s_mid=s if s == e.name else s.lower(), pr=e.pronoun, p=poss, v=v,
                           pet=e.facts.get("_pet_kind", "pet"), pos_short=e.possessive)
    return text[0].upper() + text[1:]


def attribute(key: str) -> Attribute:
    return next(a for a in ATTRIBUTES if a.key == key)


def document(rng, e: Entity, keys: list[str]) -> str:
    """A short paragraph about ``e`` stating the facts ``keys`` (first sentence names it; later ones may use a
    pronoun)."""
    sentences = []
    for i, key in enumerate(keys):
        subject = e.name if i == 0 or rng.random() < 0.5 else e.pronoun
        sentences.append(_fill(rng.choice(attribute(key).statements), e, e.facts[key], subject=subject))
    return " ".join(sentences)


DOC_HEADERS = ("Documents:\n", "Here are some documents.\n\n", "Context:\n", "Use these sources.\n\n", "")
QUESTION_PREFIXES = ("", "", "Question: ", "Based on the documents, ", "According to the text, ")


def render_docs(rng, docs: list[str]) -> str:
    style = rng.randrange(3)
    if style == 0:
        body = "\n\n".join(f"[Document {i + 1}]\n{d}" for i, d in enumerate(docs))
    elif style == 1:
        body = "\n".join(f"Document {i + 1}: {d}" for i, d in enumerate(docs))
    else:
        body = "\n\n".join(docs)
    return rng.choice(DOC_HEADERS) + body


def ask(rng, e: Entity, key: str, prefix_choices=QUESTION_PREFIXES) -> str:
    q = _fill(rng.choice(attribute(key).questions), e)
    prefix = rng.choice(prefix_choices)
    return prefix + (q[0].lower() + q[1:] if prefix and not prefix.endswith(": ") else q)


@dataclass
class Scene:
    """Documents about entities (each with the fact keys it states) and the asked entity and attribute."""
    entity: Entity
    key: str
    described: list[tuple[Entity, list[str]]]
    docs: list[str]

    @property
    def text(self) -> str:
        return " ".join(self.docs)

    def stated(self, e: Entity) -> list[str]:
        return next((keys for f, keys in self.described if f is e), [])


def rag_scene(rng, world: World, case: str, distractor_same_kind: float = 0.6, rival: bool = False) -> Scene:
    """A scene for answerability and hallucination. ``case``: ``answerable`` (a document about the entity states
    the asked attribute), ``missing_attribute`` (it describes the entity but not that attribute),
    ``other_entity`` (another entity of the same kind has the attribute; the asked one is absent) or
    ``unrelated`` (documents about other kinds of things). ``rival``: another entity of the same kind states the
    asked attribute too."""
    kind = rng.choice(KINDS)
    keys = [a.key for a in BY_KIND[kind]]
    e = world.entity(rng, kind)
    key = rng.choice(keys)
    others = [k for k in keys if k != key]
    described: list[tuple[Entity, list[str]]] = []
    if case == "answerable":
        described.append((e, rng.sample(others, rng.randint(1, 3)) + [key]))
    elif case == "missing_attribute":
        described.append((e, rng.sample(others, rng.randint(2, 4))))
    elif case == "other_entity":
        described.append((world.entity(rng, kind, avoid={e.name}), rng.sample(others, rng.randint(0, 2)) + [key]))
    if rival and case != "other_entity":
        described.append((world.entity(rng, kind, avoid={e.name}), rng.sample(others, rng.randint(0, 2)) + [key]))
    n_docs = rng.choice((1, 2, 2, 3))
    while len(described) < n_docs:
        if case == "unrelated":
            k2 = rng.choice([k for k in KINDS if k != kind])
        else:
            k2 = kind if rng.random() < distractor_same_kind else rng.choice(KINDS)
        f = world.entity(rng, k2, avoid={e.name})
        described.append((f, rng.sample([a.key for a in BY_KIND[k2]], rng.randint(2, 4))))
    for _, ks in described:
        rng.shuffle(ks)
    rng.shuffle(described)
    return Scene(e, key, described, [document(rng, f, ks) for f, ks in described])


def rag_messages(rng, docs: list[str], question: str, prior: tuple[str, str] | None = None) -> list[dict]:
    """Chat messages holding the documents and ``question`` in one of a few layouts; ``prior``: an earlier
    (question, answer) exchange asked with the documents."""
    layout = 0 if prior is not None else rng.randrange(3)
    if layout == 0:
        first = prior[0] if prior else question
        msgs = [{"role": "user", "content": f"{render_docs(rng, docs)}\n\n{first}"}]
        if prior:
            msgs += [{"role": "assistant", "content": prior[1]}, {"role": "user", "content": question}]
        return msgs
    if layout == 1:
        msgs = [{"role": "system", "content": "Answer the user's questions from these documents.\n\n"
                 + render_docs(rng, docs)}]
    else:
        msgs = [{"role": "user", "content": render_docs(rng, docs)},
                {"role": "assistant", "content": rng.choice(("Thanks, I have read the documents.",
                                                             "Got it. What would you like to know?"))}]
    return msgs + [{"role": "user", "content": question}]


def answerability_row(rng, world: World) -> dict:
    case = "answerable" if rng.random() < 0.5 else rng.choices(
        ["missing_attribute", "other_entity", "unrelated"], weights=[55, 30, 15])[0]
    sc = rag_scene(rng, world, case, rival=rng.random() < 0.25)
    prior = None
    earlier = [k for k in sc.stated(sc.entity) if k != sc.key]
    if earlier and rng.random() < 0.3:  # an earlier, answered question about the same entity
        pk = rng.choice(earlier)
        prior = (ask(rng, sc.entity, pk), _fill(attribute(pk).answers[0], sc.entity, sc.entity.facts[pk]))
    messages = rag_messages(rng, sc.docs, ask(rng, sc.entity, sc.key), prior)
    return dict(messages=messages, label="answerable" if case == "answerable" else "unanswerable", case=case)


def _wrong_value(rng, world: World, a: Attribute, true: str, docs_text: str, near_miss: bool) -> str:
    """A value of ``a``'s type that the documents do not give: a random one, or a number close to ``true``."""
    if near_miss:
        n = int(true.replace(",", ""))
        delta = rng.choice((-3, -2, -1, 1, 2, 3)) if a.value_type == "year" else \
            rng.choice((-1, 1)) * max(1, int(n * rng.choice((0.1, 0.2, 0.5))))
        return number_text(n + delta) if "," in true else str(n + delta)
    while True:
        v = a.sample(rng, world)
        if v != true and v not in docs_text:
            return v


def _swapped_value(rng, a: Attribute, sc: Scene) -> str | None:
    """A value the documents give for another entity or attribute of the asked attribute's type."""
    true = sc.entity.facts[sc.key]
    candidates = sorted({f.facts[k] for f, keys in sc.described for k in keys
                         if attribute(k).value_type == a.value_type and f.facts[k] != true})
    return rng.choice(candidates) if candidates else None


ANSWER_LEADS = ("According to the documents, ", "The text says that ", "Based on the sources, ")
REFUSALS = ("The documents do not mention {p} {n}.", "The documents don't say what {p} {n} is.",
            "I can't find {p} {n} in the documents.", "The sources do not give {p} {n}.")


def hallucination_row(rng, world: World) -> dict:
    answerable = rng.random() < 0.75
    faithful = rng.random() < 0.5
    if answerable:
        case = "correct" if faithful else rng.choices(["invented", "swapped", "near_miss"], weights=[35, 45, 20])[0]
        scene_case = "answerable"
    else:
        case = "correct_refusal" if faithful else "unanswerable_claim"
        scene_case = rng.choice(["missing_attribute", "other_entity", "unrelated"])
    sc = rag_scene(rng, world, scene_case, distractor_same_kind=0.7,
                   rival=case == "swapped" and rng.random() < 0.7 or rng.random() < 0.2)
    e, a = sc.entity, attribute(sc.key)
    if case == "near_miss" and a.value_type not in ("year", "count"):
        case = "invented"
    true = e.facts[sc.key]
    subject = e.name if rng.random() < 0.6 else e.pronoun
    if case == "correct_refusal":
        answer = rng.choice(REFUSALS).format(p=f"{e.name}'s" if subject == e.name else e.possessive, n=a.noun)
    else:
        value = true if case == "correct" else None
        if case == "swapped" or (case == "unanswerable_claim" and rng.random() < 0.4):
            value = _swapped_value(rng, a, sc)
            if value is None and case == "swapped":
                case = "invented"
        if value is None:
            value = _wrong_value(rng, world, a, true, sc.text, near_miss=case == "near_miss")
        answer = _fill(rng.choice(a.answers), e, value, subject=subject)
        first = answer.split()[0]
        if rng.random() < 0.3 and (first in ("She", "He", "It") or answer.startswith(e.name)):
            answer = rng.choice(ANSWER_LEADS) + (answer[0].lower() + answer[1:] if first in ("She", "He", "It")
                                                 else answer)
    messages = rag_messages(rng, sc.docs, ask(rng, e, sc.key)) + [{"role": "assistant", "content": answer}]
    return dict(messages=messages, label="faithful" if faithful else "hallucinated", case=case)


FOLLOWUP_PREFIXES = ("", "", "And ", "Ok, and ", "Thanks! ", "Great. ", "One more thing: ")


def _with_prefix(rng, q: str) -> str:
    prefix = rng.choice(FOLLOWUP_PREFIXES)
    if prefix.startswith(("And", "Ok, and")):
        return prefix + q[0].lower() + q[1:]
    return prefix + q


def query_rewrite_row(rng, world: World) -> dict:
    kind = rng.choice(KINDS)
    keys = [a.key for a in BY_KIND[kind]]
    messages: list[dict] = []
    if rng.random() < 0.4:  # an earlier exchange about another entity: the reference is the most recent one
        k0 = rng.choice(KINDS)
        e0 = world.entity(rng, k0)
        key0 = rng.choice([a.key for a in BY_KIND[k0]])
        messages += [{"role": "user", "content": _fill(rng.choice(attribute(key0).questions), e0)},
                     {"role": "assistant", "content": _fill(attribute(key0).answers[0], e0, e0.facts[key0])}]
    e = world.entity(rng, kind)
    key1, key2 = rng.sample(keys, 2)
    q1_template = rng.choice(attribute(key1).questions)
    q1 = _fill(q1_template, e)
    a1 = _fill(rng.choice(attribute(key1).answers[:1] + attribute(key1).answers[:1] + attribute(key1).answers[1:2]),
               e, e.facts[key1], subject=e.name if rng.random() < 0.7 else e.pronoun)
    messages += [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}]
    case = rng.choices(["pronoun", "other_entity", "attribute_only", "standalone"], weights=[40, 25, 15, 20])[0]
    if case == "pronoun":
        template = rng.choice([t for t in attribute(key2).questions if "{s}" in t or "{p}" in t])
        last = _with_prefix(rng, _fill(template, e, subject=e.pronoun))
        rewrite = _fill(template, e)
    elif case == "other_entity":
        f = world.entity(rng, kind, avoid={e.name})
        last = rng.choice(("What about {n}?", "And {n}?", "How about {n}?", "And what about {n}?",
                           "Same question for {n}.")).format(n=f.name)
        rewrite = _fill(q1_template, f)
    elif case == "attribute_only":
        a2 = attribute(key2)
        last = rng.choice(("And {p} {n}?", "What about {p} {n}?", "And what is {p} {n}?")).format(
            p=e.possessive, n=a2.noun)
        rewrite = _fill(a2.questions[0], e)
    else:
        f = e if rng.random() < 0.5 else world.entity(rng, kind, avoid={e.name})
        rewrite = _fill(rng.choice(attribute(key2).questions), f)
        last = rewrite
    messages.append({"role": "user", "content": last})
    return dict(messages=messages, label=rewrite, case=case)


MAKERS = {"answerability": answerability_row, "hallucination": hallucination_row,
          "query_rewrite": query_rewrite_row}


def make_rows(name: str, n: int, split: str, seed: int) -> list[dict]:
    """``n`` rows of intrinsic ``name`` from the ``split`` ('train' | 'heldout') world, deterministic in
    ``seed``; duplicates (same messages) are skipped."""
    rng = random.Random(f"{name}-{split}-{seed}")
    world = World(split)
    spec = INTRINSICS[name]
    rows, seen = [], set()
    while len(rows) < n:
        r = MAKERS[name](rng, world)
        key = json.dumps(r["messages"])
        if key in seen:
            continue
        seen.add(key)
        rows.append({"messages": r["messages"], "instruction": spec["instruction"], "invocation": invocation(name),
                     "target": target_text(name, r["label"]), "label": r["label"], "case": r["case"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=800, help="training rows per intrinsic (default 800)")
    p.add_argument("--heldout", type=int, default=200, help="held-out rows per intrinsic (default 200)")
    p.add_argument("--intrinsics", default=",".join(INTRINSICS), help="comma-separated names")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DATA_DIR)
    args = p.parse_args(argv)
    names = [n for n in args.intrinsics.split(",") if n]
    for n in names:
        if n not in INTRINSICS:
            p.error(f"unknown intrinsic {n!r} (known: {', '.join(INTRINSICS)})")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        (args.out / f"{name}_io.yaml").write_text(io_yaml(name))
        for split, n in (("train", args.train), ("heldout", args.heldout)):
            rows = make_rows(name, n, split, args.seed)
            path = args.out / f"{name}_{split}.jsonl"
            path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
            counts: dict[str, int] = {}
            for r in rows:
                counts[r["case"]] = counts.get(r["case"], 0) + 1
            print(f"{path}: {len(rows)} rows; cases {dict(sorted(counts.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
