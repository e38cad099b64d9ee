"""A tiny hand-written Spanish/English grammar for the SLAM demo corpus.

Why a grammar and not random words: the demo trains ASR and X->En speech translation on
synthesized speech, so every Spanish sentence needs a *correct* English translation and the
vocabulary must be small enough for a CPU model to learn in minutes, yet compositional enough
that held-out sentences are genuinely new combinations of known words.

Covered: determiners with gender/number agreement (el/la/los/las, un/una/unos/unas,
este/ese, mi/nuestro, muchos, numbers dos..diez), adjectives after the noun in Spanish and
before it in English (with a/an), present tense 3rd person singular/plural verbs with
selectional restrictions, the personal "a" before animate objects, the contractions al/del,
optional locative prepositional phrases and time adverbs.

Generation is deterministic for a seed and prefix-stable: ``generate_pairs(k, s)`` is a prefix
of ``generate_pairs(n, s)`` for k <= n, so a corpus can put its held-out sentences first and
change the training sizes without changing them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Iterable, Optional

__all__ = [
    "Noun", "Adjective", "Verb", "NP", "Sentence", "NOUNS", "ADJECTIVES", "VERBS",
    "DETERMINERS", "PREPOSITIONS", "ADVERBS", "realize", "sample_sentence",
    "generate_pairs", "generate_english", "to_transcript",
]


@dataclass(frozen=True)
class Noun:
    es_sg: str
    es_pl: str
    gender: str  # "m" or "f"
    en_sg: str
    en_pl: str
    tags: frozenset[str]


@dataclass(frozen=True)
class Adjective:
    es: str  # masculine singular (the lexicon key)
    en: str
    tags: frozenset[str]  # noun tags it may modify

    def form(self, gender: str, plural: bool) -> str:
        """Spanish agreement: -o adjectives inflect for gender, all inflect for number."""
        base = self.es
        if gender == "f" and base.endswith("o"):
            base = base[:-1] + "a"
        if not plural:
            return base
        if base.endswith("z"):
            return base[:-1] + "ces"
        if base[-1] in "aeiou":
            return base + "s"
        return base + "es"

    def forms(self) -> set[str]:
        return {self.form(g, p) for g in "mf" for p in (False, True)}


@dataclass(frozen=True)
class Verb:
    inf: str  # Spanish infinitive (the lexicon key)
    es_sg: str
    es_pl: str
    en_sg: str
    en_pl: str
    subj_tags: frozenset[str]
    obj_tags: frozenset[str]  # empty: intransitive


@dataclass(frozen=True)
class Determiner:
    key: str
    es: tuple[Optional[str], Optional[str], Optional[str], Optional[str]]  # m_sg f_sg m_pl f_pl
    en_sg: Optional[str]
    en_pl: Optional[str]


@dataclass(frozen=True)
class NP:
    det: str  # Determiner.key
    noun: str  # Noun.es_sg
    adj: Optional[str] = None  # Adjective.es
    plural: bool = False


@dataclass(frozen=True)
class Sentence:
    subj: NP
    verb: str  # Verb.inf
    obj: Optional[NP] = None
    prep: Optional[str] = None  # key of PREPOSITIONS
    pp: Optional[NP] = None
    adverb: Optional[str] = None  # key of ADVERBS


def _t(*tags: str) -> frozenset[str]:
    return frozenset(tags)


PERSON, ANIMAL, FOOD, OBJECT, FURNITURE, VEHICLE, BUILDING, PLACE = (
    "person", "animal", "food", "object", "furniture", "vehicle", "building", "place")
READING, OPENABLE = "reading", "openable"
ANIMATE = _t(PERSON, ANIMAL)

# es_sg, es_pl, gender, en_sg, en_pl, tags
_NOUN_ROWS = [
    # people (9)
    ("niño", "niños", "m", "boy", "boys", _t(PERSON)),
    ("niña", "niñas", "f", "girl", "girls", _t(PERSON)),
    ("hombre", "hombres", "m", "man", "men", _t(PERSON)),
    ("mujer", "mujeres", "f", "woman", "women", _t(PERSON)),
    ("médico", "médicos", "m", "doctor", "doctors", _t(PERSON)),
    ("maestra", "maestras", "f", "teacher", "teachers", _t(PERSON)),
    ("soldado", "soldados", "m", "soldier", "soldiers", _t(PERSON)),
    ("rey", "reyes", "m", "king", "kings", _t(PERSON)),
    ("reina", "reinas", "f", "queen", "queens", _t(PERSON)),
    # animals (9)
    ("perro", "perros", "m", "dog", "dogs", _t(ANIMAL)),
    ("gato", "gatos", "m", "cat", "cats", _t(ANIMAL)),
    ("caballo", "caballos", "m", "horse", "horses", _t(ANIMAL)),
    ("vaca", "vacas", "f", "cow", "cows", _t(ANIMAL)),
    ("pájaro", "pájaros", "m", "bird", "birds", _t(ANIMAL)),
    ("ratón", "ratones", "m", "mouse", "mice", _t(ANIMAL)),
    ("lobo", "lobos", "m", "wolf", "wolves", _t(ANIMAL)),
    ("oso", "osos", "m", "bear", "bears", _t(ANIMAL)),
    ("tortuga", "tortugas", "f", "turtle", "turtles", _t(ANIMAL)),
    # food (7)
    ("manzana", "manzanas", "f", "apple", "apples", _t(FOOD)),
    ("pera", "peras", "f", "pear", "pears", _t(FOOD)),
    ("plátano", "plátanos", "m", "banana", "bananas", _t(FOOD)),
    ("huevo", "huevos", "m", "egg", "eggs", _t(FOOD)),
    ("pastel", "pasteles", "m", "cake", "cakes", _t(FOOD)),
    ("galleta", "galletas", "f", "cookie", "cookies", _t(FOOD)),
    ("zanahoria", "zanahorias", "f", "carrot", "carrots", _t(FOOD)),
    # objects (12)
    ("libro", "libros", "m", "book", "books", _t(OBJECT, READING, OPENABLE)),
    ("carta", "cartas", "f", "letter", "letters", _t(OBJECT, READING, OPENABLE)),
    ("periódico", "periódicos", "m", "newspaper", "newspapers", _t(OBJECT, READING)),
    ("caja", "cajas", "f", "box", "boxes", _t(OBJECT, OPENABLE)),
    ("botella", "botellas", "f", "bottle", "bottles", _t(OBJECT, OPENABLE)),
    ("bolsa", "bolsas", "f", "bag", "bags", _t(OBJECT, OPENABLE)),
    ("llave", "llaves", "f", "key", "keys", _t(OBJECT)),
    ("pelota", "pelotas", "f", "ball", "balls", _t(OBJECT)),
    ("taza", "tazas", "f", "cup", "cups", _t(OBJECT)),
    ("cuchillo", "cuchillos", "m", "knife", "knives", _t(OBJECT)),
    ("lápiz", "lápices", "m", "pencil", "pencils", _t(OBJECT)),
    ("sombrero", "sombreros", "m", "hat", "hats", _t(OBJECT)),
    # furniture (5)
    ("mesa", "mesas", "f", "table", "tables", _t(FURNITURE)),
    ("silla", "sillas", "f", "chair", "chairs", _t(FURNITURE)),
    ("cama", "camas", "f", "bed", "beds", _t(FURNITURE)),
    ("puerta", "puertas", "f", "door", "doors", _t(FURNITURE, OPENABLE)),
    ("ventana", "ventanas", "f", "window", "windows", _t(FURNITURE, OPENABLE)),
    # vehicles (5)
    ("coche", "coches", "m", "car", "cars", _t(VEHICLE)),
    ("tren", "trenes", "m", "train", "trains", _t(VEHICLE)),
    ("barco", "barcos", "m", "boat", "boats", _t(VEHICLE)),
    ("camión", "camiones", "m", "truck", "trucks", _t(VEHICLE)),
    ("bicicleta", "bicicletas", "f", "bicycle", "bicycles", _t(VEHICLE)),
    # buildings and places (11)
    ("casa", "casas", "f", "house", "houses", _t(BUILDING)),
    ("escuela", "escuelas", "f", "school", "schools", _t(BUILDING)),
    ("iglesia", "iglesias", "f", "church", "churches", _t(BUILDING)),
    ("tienda", "tiendas", "f", "shop", "shops", _t(BUILDING)),
    ("granja", "granjas", "f", "farm", "farms", _t(BUILDING)),
    ("puente", "puentes", "m", "bridge", "bridges", _t(BUILDING)),
    ("jardín", "jardines", "m", "garden", "gardens", _t(PLACE)),
    ("ciudad", "ciudades", "f", "city", "cities", _t(PLACE)),
    ("bosque", "bosques", "m", "forest", "forests", _t(PLACE)),
    ("playa", "playas", "f", "beach", "beaches", _t(PLACE)),
    ("río", "ríos", "m", "river", "rivers", _t(PLACE)),
]
NOUNS: dict[str, Noun] = {r[0]: Noun(*r) for r in _NOUN_ROWS}

_THINGS = _t(OBJECT, FURNITURE, VEHICLE, FOOD)
_ALL = _t(PERSON, ANIMAL, FOOD, OBJECT, FURNITURE, VEHICLE, BUILDING, PLACE)
_COLORED = _t(OBJECT, FURNITURE, VEHICLE, BUILDING, FOOD)
_ADJ_ROWS = [
    ("grande", "big", _ALL),
    ("pequeño", "small", _ALL),
    ("rojo", "red", _COLORED),
    ("azul", "blue", _COLORED - {FOOD}),
    ("verde", "green", _COLORED),
    ("negro", "black", _COLORED | {ANIMAL}),
    ("blanco", "white", _COLORED | {ANIMAL}),
    ("amarillo", "yellow", _COLORED),
    ("viejo", "old", _ALL - {FOOD}),
    ("nuevo", "new", _t(OBJECT, FURNITURE, VEHICLE, BUILDING)),
    ("bonito", "pretty", _ALL),
    ("feo", "ugly", _ALL - {FOOD}),
    ("alto", "tall", _t(PERSON, BUILDING)),
    ("rápido", "fast", _t(ANIMAL, VEHICLE)),
    ("lento", "slow", _t(ANIMAL, VEHICLE)),
    ("feliz", "happy", ANIMATE),
    ("triste", "sad", ANIMATE),
    ("roto", "broken", _t(OBJECT, FURNITURE, VEHICLE)),  # not limpio/clean: verb homographs
    ("sucio", "dirty", _ALL),
    ("caliente", "hot", _t(FOOD)),
    ("frío", "cold", _t(FOOD, PLACE)),
    ("cansado", "tired", ANIMATE),
]
ADJECTIVES: dict[str, Adjective] = {r[0]: Adjective(*r) for r in _ADJ_ROWS}

_VERB_ROWS = [
    # transitive (20)
    ("comer", "come", "comen", "eats", "eat", ANIMATE, _t(FOOD)),
    ("comprar", "compra", "compran", "buys", "buy", _t(PERSON), _t(FOOD, OBJECT, VEHICLE)),
    ("vender", "vende", "venden", "sells", "sell", _t(PERSON), _t(FOOD, OBJECT, VEHICLE)),
    ("ver", "ve", "ven", "sees", "see", ANIMATE, _ALL),
    ("buscar", "busca", "buscan", "looks for", "look for", ANIMATE,
     _t(PERSON, ANIMAL, OBJECT, FOOD)),
    ("encontrar", "encuentra", "encuentran", "finds", "find", ANIMATE,
     _t(PERSON, ANIMAL, OBJECT, FOOD)),
    ("tener", "tiene", "tienen", "has", "have", _t(PERSON), _t(OBJECT, FOOD, ANIMAL, VEHICLE)),
    ("llevar", "lleva", "llevan", "carries", "carry", _t(PERSON), _t(OBJECT, FOOD)),
    ("romper", "rompe", "rompen", "breaks", "break", ANIMATE, _t(OBJECT, FURNITURE, VEHICLE)),
    ("lavar", "lava", "lavan", "washes", "wash", _t(PERSON), _THINGS | {ANIMAL}),
    ("pintar", "pinta", "pintan", "paints", "paint", _t(PERSON),
     _t(OBJECT, FURNITURE, VEHICLE, BUILDING)),
    ("querer", "quiere", "quieren", "wants", "want", ANIMATE, _t(OBJECT, FOOD, VEHICLE)),
    ("cocinar", "cocina", "cocinan", "cooks", "cook", _t(PERSON), _t(FOOD)),
    ("leer", "lee", "leen", "reads", "read", _t(PERSON), _t(READING)),
    ("escribir", "escribe", "escriben", "writes", "write", _t(PERSON), _t(READING)),
    ("seguir", "sigue", "siguen", "follows", "follow", ANIMATE, _t(PERSON, ANIMAL, VEHICLE)),
    ("ayudar", "ayuda", "ayudan", "helps", "help", ANIMATE, ANIMATE),
    ("limpiar", "limpia", "limpian", "cleans", "clean", _t(PERSON),
     _t(OBJECT, FURNITURE, VEHICLE, BUILDING)),
    ("construir", "construye", "construyen", "builds", "build", _t(PERSON),
     _t(FURNITURE, VEHICLE, BUILDING)),
    ("abrir", "abre", "abren", "opens", "open", _t(PERSON), _t(OPENABLE)),
    # intransitive (10)
    ("dormir", "duerme", "duermen", "sleeps", "sleep", ANIMATE, _t()),
    ("correr", "corre", "corren", "runs", "run", ANIMATE, _t()),
    ("cantar", "canta", "cantan", "sings", "sing", ANIMATE, _t()),
    ("saltar", "salta", "saltan", "jumps", "jump", ANIMATE, _t()),
    ("caminar", "camina", "caminan", "walks", "walk", ANIMATE, _t()),
    ("bailar", "baila", "bailan", "dances", "dance", _t(PERSON), _t()),
    ("nadar", "nada", "nadan", "swims", "swim", ANIMATE, _t()),
    ("jugar", "juega", "juegan", "plays", "play", ANIMATE, _t()),
    ("esperar", "espera", "esperan", "waits", "wait", ANIMATE, _t()),
    ("trabajar", "trabaja", "trabajan", "works", "work", _t(PERSON), _t()),
]
VERBS: dict[str, Verb] = {r[0]: Verb(*r) for r in _VERB_ROWS}

_NUMBERS = [("dos", "two"), ("tres", "three"), ("cuatro", "four"), ("cinco", "five"),
            ("seis", "six"), ("siete", "seven"), ("ocho", "eight"), ("nueve", "nine"),
            ("diez", "ten")]
DETERMINERS: dict[str, Determiner] = {d.key: d for d in [
    Determiner("the", ("el", "la", "los", "las"), "the", "the"),
    Determiner("a", ("un", "una", "unos", "unas"), "a", "some"),
    Determiner("this", ("este", "esta", "estos", "estas"), "this", "these"),
    Determiner("that", ("ese", "esa", "esos", "esas"), "that", "those"),
    Determiner("my", ("mi", "mi", "mis", "mis"), "my", "my"),
    Determiner("our", ("nuestro", "nuestra", "nuestros", "nuestras"), "our", "our"),
    Determiner("many", (None, None, "muchos", "muchas"), None, "many"),
    *[Determiner(en, (None, None, es, es), None, en) for es, en in _NUMBERS],
]}
# Weights: definite articles dominate, as in real text.
_DET_WEIGHTS_SG = {"the": 6, "a": 3, "this": 1, "that": 1, "my": 1, "our": 1}
_DET_WEIGHTS_PL = {"the": 5, "a": 1, "this": 1, "that": 1, "my": 1, "our": 1, "many": 1,
                   **{en: 0.5 for _, en in _NUMBERS}}

# key -> (Spanish, English, noun tags allowed in the object of the preposition)
PREPOSITIONS: dict[str, tuple[str, str, frozenset[str]]] = {
    "en": ("en", "in", _t(BUILDING, PLACE, VEHICLE)),
    "cerca": ("cerca de", "near", _t(BUILDING, PLACE, VEHICLE, FURNITURE)),
    "detrás": ("detrás de", "behind", _t(BUILDING, VEHICLE, FURNITURE)),
    "delante": ("delante de", "in front of", _t(BUILDING, VEHICLE, FURNITURE)),
    "junto": ("junto a", "next to", _t(BUILDING, PLACE, VEHICLE, FURNITURE)),
    "debajo": ("debajo de", "under", _t(FURNITURE, VEHICLE)),
    "sobre": ("sobre", "on", _t(FURNITURE)),
}
ADVERBS: dict[str, tuple[str, str]] = {
    "hoy": ("hoy", "today"),
    "mañana": ("por la mañana", "in the morning"),
    "tarde": ("por la tarde", "in the afternoon"),
    "noche": ("por la noche", "at night"),
    "cada": ("cada día", "every day"),
    "ahora": ("ahora", "now"),
}


def _np_es(np: NP) -> str:
    noun = NOUNS[np.noun]
    det = DETERMINERS[np.det]
    idx = (2 if np.plural else 0) + (1 if noun.gender == "f" else 0)
    det_es = det.es[idx]
    if det_es is None:
        raise ValueError(f"determiner {np.det!r} does not allow plural={np.plural}")
    words = [det_es, noun.es_pl if np.plural else noun.es_sg]
    if np.adj is not None:
        words.append(ADJECTIVES[np.adj].form(noun.gender, np.plural))
    return " ".join(words)


def _np_en(np: NP) -> str:
    noun = NOUNS[np.noun]
    det = DETERMINERS[np.det]
    det_en = det.en_pl if np.plural else det.en_sg
    if det_en is None:
        raise ValueError(f"determiner {np.det!r} does not allow plural={np.plural}")
    rest = []
    if np.adj is not None:
        rest.append(ADJECTIVES[np.adj].en)
    rest.append(noun.en_pl if np.plural else noun.en_sg)
    if det_en == "a" and rest[0][0] in "aeiou":
        det_en = "an"
    return " ".join([det_en, *rest])


def _contract(es: str) -> str:
    """Spanish obligatory contractions: a + el -> al, de + el -> del."""
    return re.sub(r"\b(a|de) el\b", lambda m: "al" if m.group(1) == "a" else "del", es)


def realize(s: Sentence) -> tuple[str, str]:
    """Render one sentence structure as (Spanish, English), lowercase with a final period."""
    verb = VERBS[s.verb]
    plural = s.subj.plural
    es = [_np_es(s.subj), verb.es_pl if plural else verb.es_sg]
    en = [_np_en(s.subj), verb.en_pl if plural else verb.en_sg]
    if s.obj is not None:
        obj_es = _np_es(s.obj)
        if NOUNS[s.obj.noun].tags & ANIMATE:
            obj_es = "a " + obj_es  # personal "a" before animate direct objects
        es.append(obj_es)
        en.append(_np_en(s.obj))
    if s.prep is not None and s.pp is not None:
        p_es, p_en, _ = PREPOSITIONS[s.prep]
        es.append(f"{p_es} {_np_es(s.pp)}")
        en.append(f"{p_en} {_np_en(s.pp)}")
    if s.adverb is not None:
        a_es, a_en = ADVERBS[s.adverb]
        es.append(a_es)
        en.append(a_en)
    return _contract(" ".join(es)) + ".", " ".join(en) + "."


def _nouns_with(tags: frozenset[str]) -> list[Noun]:
    return [n for n in NOUNS.values() if n.tags & tags]


def _sample_np(rng: random.Random, nouns: list[Noun], avoid: Optional[str] = None,
               p_plural: float = 0.35, p_adj: float = 0.5) -> NP:
    noun = rng.choice(nouns)
    while noun.es_sg == avoid and len(nouns) > 1:
        noun = rng.choice(nouns)
    plural = rng.random() < p_plural
    weights = _DET_WEIGHTS_PL if plural else _DET_WEIGHTS_SG
    det = rng.choices(list(weights), weights=list(weights.values()))[0]
    adj = None
    if rng.random() < p_adj:
        adjs = [a for a in ADJECTIVES.values() if a.tags & noun.tags]
        adj = rng.choice(adjs).es
    return NP(det=det, noun=noun.es_sg, adj=adj, plural=plural)


def sample_sentence(rng: random.Random) -> Sentence:
    """Draw one random sentence structure respecting the selectional restrictions."""
    verb = rng.choice(list(VERBS.values()))
    subj = _sample_np(rng, _nouns_with(verb.subj_tags))
    obj = None
    if verb.obj_tags:
        obj = _sample_np(rng, _nouns_with(verb.obj_tags), avoid=subj.noun, p_adj=0.4)
    prep = pp = None
    if rng.random() < (0.3 if obj is not None else 0.7):
        prep = rng.choice(list(PREPOSITIONS))
        pp = _sample_np(rng, _nouns_with(PREPOSITIONS[prep][2]),
                        avoid=obj.noun if obj is not None else None, p_plural=0.15, p_adj=0.3)
        if pp.det == "many" or pp.det in dict(_NUMBERS).values():
            pp = NP("the", pp.noun, pp.adj, pp.plural)
    adverb = rng.choice(list(ADVERBS)) if rng.random() < 0.2 else None
    return Sentence(subj=subj, verb=verb.inf, obj=obj, prep=prep, pp=pp, adverb=adverb)


def generate_pairs(n: int, seed: int = 0, exclude: Iterable[str] = (),
                   max_tries: int = 50) -> list[tuple[str, str]]:
    """``n`` distinct (Spanish, English) pairs, deterministic and prefix-stable for a seed.

    ``exclude`` holds sentences (either language, lowercase with period) that must not appear.
    """
    out: list[tuple[str, str]] = []
    rng = random.Random(f"slam-demo-grammar-{seed}")
    seen = set(exclude)
    tries = 0
    while len(out) < n:
        es, en = realize(sample_sentence(rng))
        if es in seen or en in seen:
            tries += 1
            if tries > max_tries * max(n, 100):
                raise RuntimeError(f"grammar exhausted after {len(out)} distinct pairs")
            continue
        seen.add(es)
        seen.add(en)
        out.append((es, en))
    return out


def generate_english(n: int, seed: int = 0, exclude: Iterable[str] = ()) -> list[str]:
    """English-only sentences (the English side of ``generate_pairs``)."""
    return [en for _, en in generate_pairs(n, seed, exclude)]


def to_transcript(sentence: str) -> str:
    """LibriSpeech style: UPPERCASE letters, apostrophes and single spaces only."""
    text = re.sub(r"[^a-z' ]+", " ", sentence.lower())
    return " ".join(text.split()).upper()
