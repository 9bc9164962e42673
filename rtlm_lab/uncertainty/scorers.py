"""The six linguistic uncertainty scorers.

Every scorer maps a parsed prompt (a spaCy ``Doc`` plus its lower-cased text) to an *evidence strength*
``s >= 0`` and a list of evidence spans. The quantifier turns strength into a graded score with a
saturating map ``score = 1 - exp(-K[type] * s)`` (one clear cue of strength 1 gives about 0.5-0.6,
several cues push towards 1), so scores stay in [0, 1] and grow monotonically with evidence.

structural
    Attachment and scope ambiguity (several valid parses). Cues: (a) a prepositional phrase after a
    verb's noun object, ``V NP PP`` ("saw the man with the telescope"), weighted by the preposition's
    attachment freedom ("with" 1.0 ... temporal/numeric objects 0.15, "of" 0); (b) a pre-modifier
    before a noun coordination, ``ADJ N and N`` ("old men and women"); (c) a relative clause after
    ``N of N`` ("the daughter of the colonel who ...").
syntactic
    Part-of-speech (category) ambiguity. Cues are token patterns where a word that WordNet lists under
    several parts of speech sits where both readings parse: noun-compound vs subject-verb
    ("time flies", "complex houses"), ``her + N/V`` ("saw her duck"), gerund vs adjective
    ("visiting relatives", "are cooking apples"), garden paths ("the old man the boat",
    "the horse raced past the barn fell"), and headline noun chains ("dog bite victim"). A weak
    background term adds the share of content words that are noun/verb ambiguous in WordNet.
semantic
    Lexical polysemy without disambiguating context. For each content word (not a light word) we take
    the effective number of senses ``2**H`` of its SemCor-smoothed sense distribution and its raw synset
    count, average their logs (bits of sense ambiguity), discount verbs (WordNet splits verb senses very
    finely), and divide by ``1 + 0.5 * (number of other content words)``: every co-occurring content
    word is a chance to disambiguate, so short prompts are the most ambiguous. Strength = the maximum
    over words plus 0.25 of the rest.
vagueness
    Hedges, approximators, vague quantifiers and placeholders (lexicon in :mod:`.lexicons`), summed.
open_endedness
    Questions/requests whose answer is not closed: explanatory wh ("why", "how" except "how many/old"),
    opinion/narration/explanation cues ("what do you think", "tell me about", "describe"). Yes/no and
    factoid wh-questions and commands without such cues score near 0.
multi_part
    Number of distinct questions/requests in the turn: interrogative or imperative clauses (sentence- or
    conjunct-initial wh-word, aux-subject inversion, request verb) and '?' groups; strength = parts - 1.
"""

from __future__ import annotations

import math
import re

from rtlm_lab.uncertainty import lexicons as L
from rtlm_lab.uncertainty import wordnet as wn

_SPACY2WN = {"NOUN": "n", "VERB": "v", "ADJ": "a", "ADV": "r"}


def _span(doc, i, j) -> str:
    return doc[max(0, i): min(len(doc), j)].text


# ------------------------------------------------------------------ structural
PREP_WEIGHT = {"with": 1.0, "on": 0.8, "in": 0.7, "near": 0.9, "by": 0.8, "from": 0.8, "behind": 0.9,
               "under": 0.8, "at": 0.6, "about": 0.6, "without": 0.8, "beside": 0.9, "for": 0.5, "to": 0.2,
               "into": 0.4, "over": 0.6, "of": 0.0, "like": 0.5}
TEMPORAL = {"minute", "minutes", "hour", "hours", "day", "days", "week", "weeks", "month", "months",
            "year", "years", "morning", "evening", "night", "tonight", "today", "tomorrow", "yesterday",
            "monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday", "mondays",
            "tuesdays", "wednesdays", "thursdays", "fridays", "saturdays", "sundays", "lunch", "dinner",
            "breakfast", "weekend", "weekends", "time", "while", "second", "seconds", "moment", "now"}


COMPANIONS = {"friend", "friends", "sister", "sisters", "brother", "brothers", "mom", "mum", "dad", "parents",
              "family", "kids", "children", "wife", "husband", "girlfriend", "boyfriend", "cousin", "cousins",
              "roommate", "roommates", "partner", "son", "daughter", "grandma", "grandpa", "team", "classmates",
              "coworkers", "colleagues", "people", "everyone", "mother", "father", "buddy", "buddies"}
ARG_PP_VERBS = {"put", "place", "placed", "putting", "lay", "laid", "hang", "hung", "stick", "stuck", "set",
                "store", "keep", "kept", "moved", "move", "go", "went", "come", "came", "live", "lived",
                "sat", "sit", "stay", "stayed"}
VAGUE_NOUNS = {"stuff", "things", "thing", "something", "anything", "everything", "whatever", "it", "that"}


def _tokens(doc, toks):
    return toks if toks is not None else list(doc)


def _sentences(toks):
    """Split a token list at spaCy's sentence starts (cheaper than ``doc.sents``)."""
    out, cur = [], []
    for t in toks:
        if cur and t.is_sent_start:
            out.append(cur)
            cur = []
        cur.append(t)
    if cur:
        out.append(cur)
    return out


def structural(doc, toks=None):
    s, ev = 0.0, []
    toks = _tokens(doc, toks)
    for t in toks:
        # (a) V NP PP
        if t.dep_ == "prep" and t.lower_ in PREP_WEIGHT:
            head = t.head
            verb, obj = None, None
            if head.pos_ in ("VERB", "AUX"):
                objs = [c for c in head.children if c.dep_ in ("dobj", "obj") and c.i < t.i
                        and c.pos_ in ("NOUN", "PROPN")]
                # V P NP PP: "yelled at the student with the loud voice"
                objs += [g for c in head.children if c.dep_ == "prep" and c.i < t.i
                         for g in c.children if g.dep_ == "pobj" and g.pos_ in ("NOUN", "PROPN")]
                if objs:
                    verb, obj = head, objs[0]
            elif head.pos_ in ("NOUN", "PROPN") and head.dep_ in ("dobj", "obj", "pobj") and head.i < t.i:
                verb, obj = head.head, head
                if head.dep_ == "pobj" and t.lower_ == "of":
                    verb = None
            if verb is None:
                continue
            w = PREP_WEIGHT[t.lower_]
            pobj = [c for c in t.children if c.dep_ == "pobj"]
            if pobj and (pobj[0].lower_ in TEMPORAL or pobj[0].like_num
                         or any(c.like_num for c in pobj[0].children)):
                w *= 0.15
            if pobj and pobj[0].pos_ == "PRON":
                w *= 0.5  # "a quiz on it": little room for a second reading
            if t.lower_ == "with" and pobj and pobj[0].lower_ in COMPANIONS:
                w *= 0.3  # comitative "with my friends" attaches to the activity verb
            if verb.lower_ in ARG_PP_VERBS:
                w *= 0.3  # locative argument: "put the book on the shelf"
            if pobj and pobj[0].lower_ in VAGUE_NOUNS:
                w *= 0.3
            if w > 0:
                s += w
                ev.append(_span(doc, min(verb.i, obj.i), t.right_edge.i + 1))
    # (b) ADJ N and N (coordination scope), on raw tags so that it survives parser choices
    for i in range(len(toks) - 3):
        a, n1, cc, n2 = toks[i: i + 4]
        if (a.tag_ in ("JJ", "JJR", "JJS", "VBN") and n1.tag_ in ("NN", "NNS") and cc.lower_ in ("and", "or")
                and n2.tag_ in ("NN", "NNS") and n2.lower_ not in VAGUE_NOUNS and (i == 0 or toks[i - 1].tag_ not in ("CC",))):
            s += 1.0
            ev.append(_span(doc, i, i + 4))
    # (c) N of (DT) N who/that/which ... (relative clause attachment)
    for t in toks:
        if t.tag_ in ("WP", "WDT") and t.lower_ in ("who", "which", "that") and t.i >= 3:
            prev = toks[t.i - 1]
            if prev.pos_ in ("NOUN", "PROPN"):
                k = prev.i - 1
                if k >= 0 and toks[k].tag_ == "DT":
                    k -= 1
                if k >= 1 and toks[k].lower_ == "of" and toks[k - 1].pos_ in ("NOUN", "PROPN"):
                    s += 1.0
                    ev.append(_span(doc, k - 1, t.i + 1))
    return s, ev


# ------------------------------------------------------------------ syntactic
def _has(word, *poses):
    pc = wn.pos_counts(word)
    return all(p in pc for p in poses)


BE_FORMS = {"are", "is", "were", "was", "'re", "be", "am"}


def syntactic(doc, toks=None):
    s, ev = 0.0, []
    all_toks = _tokens(doc, toks)
    for toks in _sentences(all_toks):
        sent_start = toks[0].i
        low = [t.lower_ for t in toks]
        n = len(toks)
        for i in range(n):
            t = toks[i]
            if not t.is_alpha:
                continue
            nxt = toks[i + 1] if i + 1 < n else None
            # noun-compound vs subject-verb: "time flies", "complex houses", "left waffles"
            if (i <= 2 and nxt is not None and nxt.is_alpha and nxt.lower_.endswith("s")
                    and nxt.tag_ in ("NNS", "VBZ") and nxt.pos_ != "AUX"
                    and nxt.lower_ not in ("is", "has", "does", "was", "says", "gets", "goes")
                    and t.tag_ in ("NN", "NNP", "JJ", "VBD", "VBN")
                    and len(wn.pos_counts(t.lower_)) >= 2 and "n" in wn.pos_counts(t.lower_)
                    and _has(nxt.lower_, "n", "v")
                    and (i == 0 or toks[i - 1].tag_ in ("DT", "NNP", "JJ"))):
                s += 1.2
                ev.append(_span(doc, t.i, t.i + 2))
            # her + N/V
            if low[i] == "her" and nxt is not None and nxt.is_alpha and _has(nxt.lower_, "n", "v") \
                    and (i + 2 >= n or not toks[i + 2].is_alpha or toks[i + 2].pos_ in ("ADP", "ADV", "PART")):
                s += 1.2
                ev.append(_span(doc, t.i, t.i + 2))
            # gerund vs adjective: (start | be) + V-ing + N
            if (low[i].endswith("ing") and nxt is not None and nxt.tag_ in ("NNS", "NN")
                    and (i == 0 or (low[i - 1] in BE_FORMS and (_has(low[i], "n") or _has(low[i], "a"))))
                    and wn.lemmatize(low[i], "v") is not None):
                s += 1.2
                ev.append(_span(doc, t.i, t.i + 2))
            # headline "N V-ing N": "man eating chicken"
            if (i == 0 and t.pos_ in ("NOUN", "PROPN") and nxt is not None and nxt.tag_ == "VBG"
                    and i + 2 < n and toks[i + 2].pos_ == "NOUN"):
                s += 1.2
                ev.append(_span(doc, t.i, t.i + 3))
            # garden path "the old man the boat": DT ADJ N(v) DT
            if (i == 0 and low[i] in ("the", "a") and n >= 4 and toks[1].tag_ in ("JJ", "NN")
                    and toks[2].tag_ in ("NN", "NNS", "VBP") and _has(low[2], "v") and toks[3].tag_ == "DT"):
                s += 1.5
                ev.append(_span(doc, sent_start, sent_start + 4))
            # headline noun chain with an N/V middle word: "dog bite victim"
            if (i + 2 < n and t.tag_ in ("NN", "VB") and _has(low[i], "n") and toks[i + 1].tag_ in ("NN", "VB", "VBP")
                    and toks[i + 2].tag_ in ("NN", "NNS") and _has(low[i + 1], "n", "v")
                    and (i == 0 or toks[i - 1].tag_ not in ("DT", "PRP$", "JJ"))):
                s += 1.0
                ev.append(_span(doc, t.i, t.i + 3))
        # reduced-relative garden path: two past-tense verbs, nothing linking them
        past = [k for k in range(n) if toks[k].tag_ in ("VBD", "VBN")]
        for a, b in zip(past, past[1:]):
            between = toks[a + 1: b]
            if (b - a >= 3 and not any(x.tag_ in ("CC", "WDT", "WP", "PRP", ",", "MD", "IN") and x.lower_ not in
                                       ("past", "by", "in", "at", "on", "from", "to", "into", "through")
                                       for x in between)
                    and not any(x.lower_ in ("that", "and", "but", "when", "because", "so") for x in between)
                    and toks[a].i > sent_start and toks[a - 1].pos_ in ("NOUN", "PROPN")
                    and any(x.pos_ == "NOUN" for x in between)):
                s += 1.5
                ev.append(_span(doc, toks[a].i - 1, toks[b].i + 1))
    # weak background: share of content words that WordNet lists as both noun and verb
    content = [t for t in all_toks if t.pos_ in ("NOUN", "VERB", "ADJ") and t.is_alpha
               and t.lower_ not in L.LIGHT_WORDS]
    if content:
        amb = sum(1 for t in content if _has(t.lower_, "n", "v"))
        s += 0.3 * amb / len(content)
    return s, ev


# ------------------------------------------------------------------ semantic
VERB_DISCOUNT = 0.35      # WordNet splits verb senses very finely
ADJ_DISCOUNT = 0.8
HOMOGRAPH_BOOST = 1.3     # unrelated meanings (bank/bat): strongest source of lexical ambiguity
POLYSEME_DISCOUNT = 0.6   # related senses of one meaning (school/building, school/institution)
CONTEXT_RATE = 0.7        # each other content word divides ambiguity by (1 + 0.7 * its weight)
LIGHT_CONTEXT = 0.3       # light words (see, need, new, time) disambiguate little


def semantic(doc, toks=None):
    words = [t for t in _tokens(doc, toks) if t.is_alpha and t.pos_ in ("NOUN", "VERB", "ADJ", "PROPN", "NUM")]
    if not words:
        return 0.0, []
    weight = [LIGHT_CONTEXT if t.lower_ in L.LIGHT_WORDS else 1.0 for t in words]
    tot = sum(weight)
    scored = []
    for t, w in zip(words, weight):
        if t.pos_ not in _SPACY2WN or t.lower_ in L.LIGHT_WORDS or len(t.text) <= 2:
            continue
        pos = _SPACY2WN[t.pos_]
        n = wn.n_synsets(t.lower_, pos)
        if n <= 1:
            continue
        bits = 0.5 * (math.log2(wn.sense_perplexity(t.lower_, pos)) + math.log2(min(n, 32)))
        lemma = wn.lemmatize(t.lower_, pos) or t.lower_
        if pos in L.HOMOGRAPHS.get(lemma, ""):
            bits = max(bits, 2.0) * HOMOGRAPH_BOOST
        else:
            bits *= POLYSEME_DISCOUNT
        if pos == "v":
            bits *= VERB_DISCOUNT
        elif pos == "a":
            bits *= ADJ_DISCOUNT
        scored.append((bits / (1.0 + CONTEXT_RATE * (tot - w)), t.text))
    if not scored:
        return 0.0, []
    scored.sort(reverse=True)
    s = scored[0][0] + 0.1 * sum(b for b, _ in scored[1:])
    return s, [w for b, w in scored if b >= 0.8]


# ------------------------------------------------------------------ vagueness
def vagueness(doc, low: str):
    s, ev, taken = 0.0, [], []
    for rx, w in L.VAGUE_RE:
        for m in rx.finditer(low):
            a, b = m.span()
            if any(a < y and x < b for x, y in taken):
                continue
            word = m.group(0)
            if word.endswith("ish") and " " not in word and word in L.ISH_STOP:
                continue
            if word.startswith("pretty "):  # "pretty" as degree adverb only (pretty good, not pretty girl)
                nxt = m.group(1)
                if nxt in ("girl", "woman", "face", "dress", "flowers", "much", "sure"):
                    w2 = 0.3 if nxt in ("much", "sure") else 0.0
                    if w2 == 0:
                        continue
                    s += w2
                    taken.append((a, b))
                    ev.append(word)
                    continue
            taken.append((a, b))
            s += w
            ev.append(word)
    return s, ev


# ------------------------------------------------------------------ question / request units
def _clause_units(doc, toks=None):
    """Start tokens of question/request clauses (sentence- or conjunct-initial)."""
    units = []
    toks = _tokens(doc, toks)
    n = len(toks)
    for i, t in enumerate(toks):
        prev = toks[i - 1] if i > 0 else None
        starts = (prev is None or t.is_sent_start or prev.lower_ in L.CLAUSE_LINKERS
                  or prev.is_punct or prev.lower_ in ("so", "well", "also", "then", "and", "oh", "ok", "okay"))
        if not starts:
            continue
        lw = t.lower_
        nxt = toks[i + 1].lower_ if i + 1 < n else ""
        if lw in L.WH_WORDS:
            # "what about X", "and why?", "how about you" count; "what" after "and" only if it
            # starts a clause (has an aux/verb right after or is the last word)
            units.append(("wh", i))
        elif lw in L.QUESTION_AUX and (nxt in L.SUBJECT_PRONOUNS or (i + 1 < n and toks[i + 1].pos_ in ("PROPN",)
                                                                      and prev is None)):
            units.append(("yn", i))
        elif lw in L.REQUEST_VERBS and t.tag_ in ("VB", "VBP", "NN", "NNP") and (prev is None or t.is_sent_start
                                                                                or prev.lower_ in ("and", "then", ",", "please", "also")) \
                and (i + 1 >= n or toks[i + 1].pos_ in ("PRON", "DET", "ADP", "NOUN", "ADV", "PART", "PROPN", "NUM")):
            units.append(("req", i))
        elif lw == "any" and t.is_sent_start and i + 1 < n and toks[i + 1].pos_ == "NOUN":
            units.append(("yn", i))  # "Any plans for the weekend?"
    # coordinated bare verbs inside a request/question: "set an alarm ... and remind me"
    unit_heads = set()
    for kind, i in units:
        unit_heads.add(toks[i].head.i)
    for t in toks:
        if (t.dep_ == "conj" and t.tag_ == "VB" and t.head.i in unit_heads
                and not any(c.dep_ in ("nsubj", "nsubjpass") for c in t.children)
                and not any(toks[k].lower_ in L.WH_WORDS for k in range(t.head.i, t.i))
                and i_between_cc(toks, t)):
            units.append(("req", t.i))
    return units


def i_between_cc(toks, t):
    return any(toks[k].lower_ in ("and", "then") for k in range(t.head.i + 1, t.i))


def _question_marks(text: str) -> int:
    return len(re.findall(r"\?+", text))


def multi_part(doc, text: str, units=None):
    units = _clause_units(doc) if units is None else units
    n_q = _question_marks(text)
    parts = max(len(units), n_q)
    ev = [doc[i: min(len(doc), i + 4)].text for _, i in units]
    return float(max(0, parts - 1)), ev


# ------------------------------------------------------------------ open-endedness
def open_endedness(doc, low: str, units=None):
    s, ev = 0.0, []
    units = _clause_units(doc) if units is None else units
    is_q_or_req = bool(units) or "?" in low
    for kind, i in units:
        t = doc[i]
        if kind == "wh":
            w = L.WH_WEIGHT.get(t.lower_, 0.0)
            nxt = doc[i + 1].lower_ if i + 1 < len(doc) else ""
            if t.lower_ == "how" and nxt in L.HOW_CLOSED:
                w = 0.0
            if w:
                s += w
                ev.append(doc[i: min(len(doc), i + 3)].text)
    taken = []
    for rx, w in L.OPEN_RE:
        for m in rx.finditer(low):
            a, b = m.span()
            if any(a < y and x < b for x, y in taken):
                continue
            taken.append((a, b))
            s += w
            ev.append(m.group(0))
    if not is_q_or_req:
        s *= 0.5  # statements rarely ask for an open answer
    return s, ev
